"""``fwdllm convert``: get models and adapters into (and out of) GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import click

from convert.quantize import QUANTS
from convert.synth import PRESETS

_QUANT_CHOICE = click.Choice(list(QUANTS), case_sensitive=False)
_GGUF_IN = click.Path(exists=True, dir_okay=False, path_type=Path)
_OUT = click.Path(dir_okay=False, path_type=Path)


@click.group()
def convert() -> None:
    """Convert models and LoRA adapters between Hugging Face, PEFT and GGUF.

    \b
    Examples:
      fwdllm convert hf ./llama-hf llama-q4_0.gguf --quant Q4_0
      fwdllm convert lora-init llama-q4_0.gguf lora.gguf --rank 8 --targets q,v
      fwdllm convert synth --preset llama2-7b synth7b.gguf
      fwdllm convert inspect llama-q4_0.gguf
    """


@convert.command()
@click.argument("out", type=_OUT)
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
              help="Architecture to copy (layer count, widths, heads, vocab size).")
@click.option("--quant", type=_QUANT_CHOICE, default="Q4_0", show_default=True,
              help="Q4_0/F16 are written directly; others via F16 + llama.cpp's quantizer.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
def synth(out: Path, preset: str, quant: str, seed: int) -> None:
    """Write an architecture-exact LLaMA GGUF with random weights, for timing.

    The file has the real model's tensor shapes and quant types and a valid
    (made-up) vocabulary, so llama.cpp runs it at the real model's speed; its
    metadata marks it synthetic (fwdllm.synthetic = true).  A LLaMA-2-7B Q4_0
    file takes a few minutes and little RAM.

    \b
    Example:
      fwdllm convert synth --preset llama2-7b --quant Q4_0 /tmp/synth7b.gguf
    """
    from convert.synth import write_synth

    click.echo(write_synth(out, preset=preset, quant=quant.upper(), seed=seed))


@convert.command("inspect")
@click.argument("file", type=_GGUF_IN)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def inspect_cmd(file: Path, as_json: bool) -> None:
    """Show what a GGUF model or LoRA adapter holds.

    Models: architecture, layers, widths, heads / KV heads, RoPE theta,
    vocabulary and tokenizer, tensor quant types, size.  Adapters: rank,
    alpha, targets, layers and parameter count.

    \b
    Example:
      fwdllm convert inspect lora.gguf --json
    """
    from convert.describe import describe, format_description

    info = describe(file)
    click.echo(json.dumps(info, indent=1) if as_json else format_description(info))


def _targets(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


@convert.command("lora-init")
@click.argument("base", type=_GGUF_IN)
@click.argument("out", type=_OUT)
@click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=float, default=16.0, show_default=True,
              help="LoRA alpha; llama.cpp scales B@A by alpha/rank.")
@click.option("--targets", default="q,v", show_default=True, callback=_targets,
              help="Comma-separated weights to adapt: q,k,v,o,gate,up,down.")
@click.option("--layers", default=None, help="Layers to adapt, e.g. 0-5 or 0,2,4 (default: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random A matrices.")
def lora_init(base: Path, out: Path, rank: int, alpha: float, targets: list[str], layers: str | None,
              seed: int) -> None:
    """Write a fresh F32 LoRA for BASE: A small random, B zero.

    The adapted model starts out identical to BASE; training moves B (and A).

    \b
    Example:
      fwdllm convert lora-init smollm2.gguf lora.gguf --rank 8 --alpha 16 --targets q,v --layers 0-5
    """
    from convert.lora import init_lora, parse_layers, write_lora

    layout, tensors = init_lora(base, rank, alpha, targets, seed, parse_layers(layers))
    write_lora(out, layout, tensors, base)
    click.echo(f"{out}: rank {rank}, alpha {alpha:g}, targets {','.join(layout.target_names)}, "
               f"{len(layout.layers)} layers, {layout.n_params} params")
