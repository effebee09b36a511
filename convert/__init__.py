"""Model and adapter conversion: HF LLaMA -> GGUF, PEFT <-> GGUF LoRA, fresh
LoRAs, synthetic timing models, quantization and inspection.

Writing goes through gguf-py, quantization through llama.cpp's own
``llama_model_quantize``; nothing here reimplements a quantizer.
"""
