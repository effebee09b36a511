"""``fwdllm convert``: get models and adapters into (and out of) GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fwdllm.convert.synth import PRESETS
from fwdllm.options import Group, parse_layers, parse_targets, shared
from fwdllm.runtime.quantize import QUANTS

# Plain strings validated by the library (not click.Choice), so that a bad
# value gives fwdllm's one-line error like every other bad input.
_QUANT_HELP = f"One of {', '.join(QUANTS)}."
_GGUF_IN = click.Path(exists=True, dir_okay=False, path_type=Path)
_OUT = click.Path(dir_okay=False, path_type=Path)


@click.group(cls=Group)
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
@click.option("--preset", default="tiny", show_default=True,
              help=f"Architecture to copy (layers, widths, heads, vocab): {', '.join(PRESETS)}.")
@click.option("--quant", default="Q4_0", show_default=True,
              help=f"{_QUANT_HELP} Q4_0/F16 are written directly; others via F16 + llama.cpp's quantizer.")
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
    from fwdllm.convert.synth import write_synth

    click.echo(write_synth(out, preset=preset, quant=quant, seed=seed))


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
    from fwdllm.convert.describe import describe, format_description

    info = describe(file)
    click.echo(json.dumps(info, indent=1) if as_json else format_description(info))


@convert.command("lora-init")
@click.argument("base", type=_GGUF_IN)
@click.argument("out", type=_OUT)
@shared("rank", "lora_alpha", "targets", "layers", "seed")
def lora_init(base: Path, out: Path, rank: int, lora_alpha: float, targets: str, layers: str | None,
              seed: int) -> None:
    """Write a fresh F32 LoRA for BASE: A small random, B zero.

    The adapted model starts out identical to BASE; training moves B (and A).

    \b
    Example:
      fwdllm convert lora-init smollm2.gguf lora.gguf --rank 8 --lora-alpha 16 --targets q,v --layers 0:6
    """
    from fwdllm.core.lora import init_lora, write_lora

    span = parse_layers(layers)
    layout, tensors = init_lora(base, rank, lora_alpha, parse_targets(targets), seed,
                                range(*span) if span else None)
    write_lora(out, layout, tensors, base)
    click.echo(f"{out}: rank {rank}, alpha {lora_alpha:g}, targets {','.join(layout.target_names)}, "
               f"{len(layout.layers)} layers, {layout.n_params} params")


@convert.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=_OUT)
@click.option("--quant", default="Q4_0", show_default=True,
              help=f"{_QUANT_HELP} Anything but F16 is made by llama.cpp's quantizer from an F16 temp file.")
def hf(src: Path, out: Path, quant: str) -> None:
    """Convert a Hugging Face LlamaForCausalLM directory to GGUF.

    SRC is a save_pretrained directory: config.json, *.safetensors and a
    tokenizer (tokenizer.model for SentencePiece, or a byte-level BPE
    tokenizer.json).  Handles GQA, tied embeddings, RoPE theta and the q/k
    RoPE row order.  Streams one tensor at a time, so a 7B model needs a few
    GB of RAM (plus a temporary F16 file next to OUT when quantizing).

    \b
    Example:
      fwdllm convert hf ./TinyLlama-1.1B tinyllama-q4_0.gguf --quant Q4_0
    """
    from fwdllm.convert.hf import convert_hf

    click.echo(convert_hf(src, out, quant))


@convert.command("untie")
@click.argument("src", type=_GGUF_IN)
@click.argument("out", type=_OUT)
def untie_cmd(src: Path, out: Path) -> None:
    """Copy a model with tied embeddings, giving it an explicit output.weight.

    The new tensor has token_embd.weight's bytes and type, so every logit is
    unchanged; the file grows by that tensor.  `--head` needs it: a run's
    classifier head is a LoRA of the output projection, and llama.cpp reads a
    LoRA of a tied token_embd.weight as one of the input embeddings.  The
    store's smollm2-135m is untied already.

    \b
    Example:
      fwdllm convert untie my-tied-q4_0.gguf my-untied-q4_0.gguf
    """
    from fwdllm.runtime.quantize import untie

    click.echo(untie(src, out))


@convert.command("lora-from-peft")
@click.argument("peft_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("base", type=_GGUF_IN)
@click.argument("out", type=_OUT)
def lora_from_peft(peft_dir: Path, base: Path, out: Path) -> None:
    """Convert a PEFT LoRA directory to a llama.cpp LoRA GGUF for BASE.

    PEFT_DIR holds adapter_model.safetensors and adapter_config.json; BASE is
    the GGUF of the same model (its head counts fix the q/k row order).

    \b
    Example:
      fwdllm convert lora-from-peft ./my-lora smollm2.gguf my-lora.gguf
    """
    from fwdllm.convert.peft_bridge import peft_to_gguf

    click.echo(peft_to_gguf(peft_dir, base, out))


@convert.command("lora-to-peft")
@click.argument("lora", type=_GGUF_IN)
@click.argument("base", type=_GGUF_IN)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def lora_to_peft(lora: Path, base: Path, out_dir: Path) -> None:
    """Write a llama.cpp LoRA GGUF (e.g. a trained fwdllm adapter) as a PEFT directory.

    Load the result with peft.PeftModel.from_pretrained(hf_model, OUT_DIR).  A
    --head run's classifier head becomes a LoRA of lm_head (its own rank in
    rank_pattern).

    \b
    Example:
      fwdllm convert lora-to-peft runs/demo/adapter.gguf smollm2.gguf ./peft-lora
    """
    from fwdllm.convert.peft_bridge import gguf_to_peft

    click.echo(gguf_to_peft(lora, base, out_dir))
