"""fwdllm: federated fine-tuning of LLaMA-family models by perturbed inference."""

__version__ = "0.1.0"
