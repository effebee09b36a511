"""Device side: perturbed inference on an INT4 GGUF through llama.cpp. Never imports torch."""
