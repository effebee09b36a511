"""fwdllm: federated fine-tuning of LLaMA-family models by perturbed inference.

One import root, in layers (docs/architecture.md): ``fwdllm.core`` (the
contract), ``fwdllm.runtime`` (llama.cpp, tasks, transport), ``fwdllm.options``
(the CLI vocabulary), ``fwdllm.edge_client`` and ``fwdllm.aggregator`` (the two
sides), ``fwdllm.convert``, ``fwdllm.reference`` and ``fwdllm.testing``,
``fwdllm.bench``, and ``fwdllm.cli`` on top.
"""

__version__ = "0.1.0"
