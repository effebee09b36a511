"""``python -m fwdllm.edge_client run ...``: what ``fwdllm simulate`` starts for each
device (the ``fwdllm`` entry point works too; this skips the other command groups)."""

from fwdllm.edge_client.cli import client

client(prog_name="fwdllm client")
