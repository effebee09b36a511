"""The ``fwdllm`` command line: one group per concern, each owned by its package."""

from __future__ import annotations

import click

from fwdllm import __version__
from fwdllm.log import set_verbose


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--verbose", is_flag=True, help="Show llama.cpp's own (very loud) logging.")
@click.version_option(__version__, prog_name="fwdllm")
def main(verbose: bool) -> None:
    """Federated fine-tuning of LLaMA-family models without backpropagation.

    Devices run only perturbed inference on an INT4 GGUF (llama.cpp) and send
    back loss differences; the aggregator turns them into LoRA updates.

    \b
    Typical session:
      fwdllm models pull smollm2-135m        # the embedded default model
      fwdllm eval --model smollm2-135m --task sst2
      fwdllm simulate --model smollm2-135m --task sst2 --clients 4 --rounds 20 --out runs/demo

    Every MODEL argument takes a GGUF path or a model-store name such as
    smollm2-135m (pulled on first use).
    """
    set_verbose(verbose)


def _register() -> None:
    from aggregator.cli import aggregator, profile, simulate
    from aggregator.security import keys
    from bench.cli import bench
    from convert.cli import convert
    from edge_client.cli import client, eval_cmd
    from fwdllm.models import models

    for cmd in (models, convert, eval_cmd, client, aggregator, simulate, profile, bench, keys):
        main.add_command(cmd)


_register()
