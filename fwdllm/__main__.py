"""``python -m fwdllm``: the same as the ``fwdllm`` command."""

from fwdllm.cli import main

main(prog_name="fwdllm")
