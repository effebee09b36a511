"""``fwdllm eval`` and ``fwdllm client ...``: the device side on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from edge_client.tasks import TaskSpec, default_data, load_task, read_examples
from edge_client.worker import run_cmd
from fwdllm.errors import UserError


def _columns(value: str | None) -> tuple[str, ...] | None:
    return tuple(c.strip() for c in value.split(",") if c.strip()) if value else None


def task_options(f: Callable) -> Callable:
    """Options shared by every command that reads a task's data."""
    opts = [
        click.option("--model", "model", required=True, help="GGUF path or model name (e.g. smollm2-135m)."),
        click.option("--task", "task_name", default="sst2", show_default=True,
                     help="sst2, agnews, sft, or a .toml/.json task spec."),
        click.option("--data", type=click.Path(dir_okay=False, path_type=Path),
                     help="Data file (csv/tsv/jsonl). Default: the task's dev split."),
        click.option("--limit", type=click.IntRange(min=1), help="Use only the first N good rows."),
        click.option("--text-column", help="Override the text column(s), comma separated."),
        click.option("--label-column", help="Override the label column."),
        click.option("--prompt-column", help="Override the sft prompt column."),
        click.option("--completion-column", help="Override the sft completion column."),
        click.option("--strict/--skip-bad", default=False, show_default=True,
                     help="Fail on the first bad row, or skip bad rows with a warning."),
        click.option("--threads", type=click.IntRange(min=1), help="llama.cpp threads (default: all cores)."),
        click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Sequences per llama_decode."),
        click.option("--n-ctx", type=click.IntRange(min=8), help="Max tokens per example (default 256, sft 512)."),
        click.option("--no-mmap", is_flag=True, help="Read the model into memory instead of mmap."),
        click.option("--no-repack", is_flag=True,
                     help="Skip llama.cpp's CPU weight repacking (halves peak RSS, slower Q4_0)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last stdout line."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _load(kw: dict[str, Any]) -> tuple[TaskSpec, list, Any]:
    """Task, examples and an open EdgeSession from the shared options."""
    from edge_client.session import EdgeSession

    task = load_task(
        kw["task_name"],
        text_columns=_columns(kw["text_column"]),
        label_column=kw["label_column"],
        prompt_column=kw["prompt_column"],
        completion_column=kw["completion_column"],
    )
    data = kw["data"] or default_data(kw["task_name"], "dev")
    examples = read_examples(task, data, limit=kw["limit"], strict=kw["strict"])
    session = EdgeSession(
        kw["model"],
        task,
        n_threads=kw["threads"],
        max_batch=kw["max_batch"],
        n_ctx=kw["n_ctx"],
        mmap=not kw["no_mmap"],
        repack=not kw["no_repack"],
        strict=kw["strict"],
    )
    return task, examples, session


def _load_lora(session: Any, lora: Path | None, head: Path | None = None) -> None:
    """Apply ``lora`` (a llama.cpp adapter) and ``head`` (a run's head.npy)."""
    import dataclasses

    import numpy as np

    from fwdllm.adapter_io import read_adapter
    from fwdllm.contract import HEAD

    if lora is None:
        return
    try:
        layout, tensors = read_adapter(lora)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read LoRA {lora}: {e}") from None
    if head is not None:
        try:
            rows = np.load(head, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"cannot read head {head}: {e}") from None
        if rows.ndim != 2 or rows.dtype != np.float32:
            raise UserError(f"{head}: expected a 2-d float32 array, got {rows.dtype} {rows.shape}")
        layout, tensors = dataclasses.replace(layout, head=rows.shape), {**tensors, HEAD: rows}
    session.set_lora(layout, tensors)


@click.command("eval")
@task_options
@click.option("--lora", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="LoRA adapter GGUF.")
@click.option("--head", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Classifier head of a --head run (RUN_DIR/head.npy), with that run's --lora.")
def eval_cmd(lora: Path | None, head: Path | None, **kw: Any) -> None:
    """Accuracy and mean loss of a model (+ LoRA) on a task's data.

    \b
    Examples:
      fwdllm eval --model smollm2-135m --task sst2            # 872-row SST-2 dev split
      fwdllm eval --model smollm2-135m --task agnews --limit 200 --json
      fwdllm eval --model m.gguf --lora run/adapter.gguf --task spec.toml --data test.csv
      fwdllm eval --model smollm2-135m --task agnews --lora run/adapter.gguf --head run/head.npy
    """
    if head is not None and lora is None:
        raise UserError("--head needs the run's --lora (the head was trained with it)")
    task, examples, session = _load(kw)
    with session:
        _load_lora(session, lora, head)
        r = session.evaluate(examples, progress=True)
        tps = r.n_tokens / r.seconds
    acc = "" if r.accuracy is None else f"accuracy {r.accuracy:.4f}  "
    click.echo(f"{task.name}: {acc}loss {r.loss:.4f}  n {r.n}  ({r.n_tokens} tokens, {tps:.0f} tok/s)")
    if kw["as_json"]:
        out = {"task": task.name, "accuracy": r.accuracy, "loss": r.loss, "n": r.n,
               "n_tokens": r.n_tokens, "seconds": r.seconds, "tokens_per_s": tps}
        click.echo(json.dumps(out))


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter("comma-separated integers, e.g. 1,2,3") from None
    if not seeds or any(not 0 <= s < 2**32 for s in seeds):
        raise click.BadParameter("need >= 1 seed, each in [0, 2^32)")
    return seeds


@click.group("client")
def client() -> None:
    """The edge device: perturbed scoring, and joining an aggregator."""


@client.command("score")
@task_options
@click.option("--lora", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Current LoRA adapter GGUF (its layout defines the directions).")
@click.option("--seeds", required=True, callback=lambda _c, _p, v: _seeds(v), help="Comma-separated seeds.")
@click.option("--eps", type=click.FloatRange(min=0, min_open=True), default=3e-2, show_default=True,
              help="Perturbation size in LoRA tensor units (3e-2: best measured fidelity on SmolLM2 Q4_0).")
@click.option("--one-sided", is_flag=True, help="(L+ - L0)/eps with one shared base loss instead of +-.")
@click.option("--dist", type=click.Choice(["gaussian", "rademacher"]), default="gaussian", show_default=True)
@click.option("--parts", type=click.Choice(["a", "b", "both"]), default="b", show_default=True,
              help="Perturb LoRA A, B or both.")
def score_cmd(lora: Path, seeds: list[int], eps: float, one_sided: bool, dist: str, parts: str, **kw: Any) -> None:
    """Losses at LoRA +- eps * direction(seed), as a device computes them.

    \b
    Example:
      fwdllm client score --model smollm2-135m --lora a.gguf --task sst2 --limit 16 --seeds 1,2,3 --eps 0.01
    """
    from fwdllm.contract import PerturbMask

    task, examples, session = _load(kw)
    with session:
        _load_lora(session, lora)
        r = session.perturbed(examples, seeds, eps, PerturbMask(parts=parts), dist, one_sided)
    click.echo(f"{'seed':>10} {'loss+':>12} {'loss-' if not one_sided else 'loss0':>12} {'projected':>12}")
    for s, lp, lm, g in zip(r.seeds, r.loss_plus, r.loss_minus, r.projected):
        click.echo(f"{int(s):>10} {lp:>12.6f} {lm:>12.6f} {g:>12.5f}")
    click.echo(f"{len(examples)} examples, {r.n_tokens} tokens in {r.seconds:.2f} s "
               f"({r.n_tokens / r.seconds:.0f} tok/s)", file=sys.stderr)
    if kw["as_json"]:
        out = {"task": task.name, "eps": eps, "one_sided": one_sided, "dist": dist, "parts": parts,
               "seeds": r.seeds.tolist(), "loss_plus": r.loss_plus.tolist(), "loss_minus": r.loss_minus.tolist(),
               "projected": r.projected.tolist(), "n_tokens": r.n_tokens, "seconds": r.seconds}
        click.echo(json.dumps(out))


client.add_command(run_cmd)
