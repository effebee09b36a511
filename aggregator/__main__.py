"""``python -m fwdllm.aggregator serve ...``: what ``fwdllm simulate`` starts (the
``fwdllm`` entry point works too; this avoids importing every other group)."""

from fwdllm.aggregator.cli import aggregator

aggregator(prog_name="fwdllm aggregator")
