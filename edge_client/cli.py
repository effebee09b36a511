"""``fwdllm eval`` and ``fwdllm client ...``: the device side on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from fwdllm.core.errors import UserError
from fwdllm.edge_client.worker import run_device
from fwdllm.options import (
    Command,
    Group,
    client_key_options,
    engine_options,
    option,
    parse_columns,
    shared,
    threads_for,
)
from fwdllm.runtime.tasks import TaskSpec, default_data, load_task, read_examples


def data_options(f: Callable) -> Callable:
    """What every command that scores a task's data through llama.cpp takes."""
    f = shared("json")(f)
    f = engine_options(f)
    f = click.option("--strict/--skip-bad", default=False, show_default=True,
                     help="Fail on the first bad row, or skip bad rows with a warning.")(f)
    f = click.option("--completion-column", help="Override the sft completion column.")(f)
    f = click.option("--prompt-column", help="Override the sft prompt column.")(f)
    f = click.option("--label-column", help="Override the label column.")(f)
    f = click.option("--text-column", help="Override the text column(s), comma separated.")(f)
    return shared("model", "task", "data", "split", "limit")(f)


def _load(kw: dict[str, Any]) -> tuple[TaskSpec, list, Any]:
    """Task, examples and an open EdgeSession from the shared options."""
    task = _task(kw)
    return task, _examples(kw, task), _session(kw, task)


def _task(kw: dict[str, Any]) -> TaskSpec:
    return load_task(
        kw["task"],
        text_columns=parse_columns(kw["text_column"]),
        label_column=kw["label_column"],
        prompt_column=kw["prompt_column"],
        completion_column=kw["completion_column"],
    )


def _examples(kw: dict[str, Any], task: TaskSpec) -> list:
    data = kw["data"] or default_data(kw["task"], kw["split"])
    return read_examples(task, data, limit=kw["limit"], strict=kw["strict"])


def _session(kw: dict[str, Any], task: TaskSpec) -> Any:
    from fwdllm.runtime.session import EdgeSession

    return EdgeSession(
        kw["model"],
        task,
        n_threads=threads_for(kw["threads"]),
        max_batch=kw["max_batch"],
        n_ctx=kw["n_ctx"],
        mmap=not kw["no_mmap"],
        repack=not kw["no_repack"],
        strict=kw["strict"],
    )


def _load_lora(session: Any, lora: Path | None) -> None:
    """Apply ``lora`` (a llama.cpp adapter, with a ``--head`` run's classifier head in it)."""
    from fwdllm.core.adapter_io import read_adapter

    if lora is None:
        return
    try:
        layout, tensors = read_adapter(lora)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read LoRA {lora}: {e}") from None
    session.set_lora(layout, tensors)


@click.command("eval", cls=Command)
@data_options
@option("lora")
def eval_cmd(lora: Path | None, **kw: Any) -> None:
    """Accuracy and mean loss of a model (+ LoRA) on a task's data; on an sft
    task, completion perplexity, ROUGE-L and exact match of greedy generations.

    \b
    Examples:
      fwdllm eval --model smollm2-135m --task sst2            # 872-sentence SST-2 dev split
      fwdllm eval --model smollm2-135m --task agnews --limit 200 --json
      fwdllm eval --model m.gguf --lora run/adapter.gguf --task spec.toml --data test.csv
      fwdllm eval --task sst2 --split dev-phrases --lora run/adapter.gguf   # the phrase-level split
      fwdllm eval --task agnews-headline --split test --lora run/adapter.gguf --json
    """
    task, examples, session = _load(kw)
    with session:
        _load_lora(session, lora)
        if task.kind == "sft":
            from fwdllm.runtime.generation import sft_scores

            out = {"task": task.name, **sft_scores(session, examples, progress=True)}
            click.echo(f"{task.name}: perplexity {out['perplexity']:.3f}  ROUGE-L {out['rouge_l']:.4f}  exact match "
                       f"{out['exact_match']:.4f}  loss {out['loss']:.4f}  n {out['n']}  ({out['n_tokens']} tokens "
                       f"scored, {out['generated_tokens']} generated)")
            if kw["as_json"]:
                click.echo(json.dumps(out))
            return
        r = session.evaluate(examples, progress=True)
        tps = r.n_tokens / r.seconds
    acc = "" if r.accuracy is None else f"accuracy {r.accuracy:.4f}  "
    click.echo(f"{task.name}: {acc}loss {r.loss:.4f}  n {r.n}  ({r.n_tokens} tokens, {tps:.0f} tok/s)")
    if kw["as_json"]:
        out = {"task": task.name, "accuracy": r.accuracy, "loss": r.loss, "n": r.n,
               "n_tokens": r.n_tokens, "seconds": r.seconds, "tokens_per_s": tps}
        click.echo(json.dumps(out))


@click.command("generate", cls=Command)
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="A prompt to continue, used verbatim (repeatable). Without it, the prompts come from --data "
                   "or the task's --split, built by the task's template.")
@data_options
@option("lora")
@click.option("--max-tokens", type=click.IntRange(1), default=None,
              help="New tokens per prompt at most (default: the task's: 64; agnews-headline 32).")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True,
              help="0 decodes greedily (the argmax); above 0 samples from softmax(logits / T), seeded by --seed.")
@option("seed")
def generate_cmd(prompts: tuple[str, ...], lora: Path | None, max_tokens: int | None, temperature: float,
                 seed: int, **kw: Any) -> None:
    """Continue prompts with a model (+ LoRA) through llama.cpp.

    Generation stops at the end-of-sequence token, at the task's stop string
    (a newline for agnews-headline) or after --max-tokens. With a task's data,
    each reference (the completion, or the label word) is shown beside the
    text. Greedy text is the same as llama-cpp-python's
    Llama(model_path=M, lora_path=L, flash_attn=True) at temperature 0.

    \b
    Examples:
      fwdllm generate --task agnews-headline --split test --limit 5
      fwdllm generate --task agnews-headline --split test --limit 5 --lora runs/headline/adapter.gguf
      fwdllm generate --prompt $'Article: Stocks rose on Monday.\\nHeadline:' --max-tokens 16
      fwdllm generate --task sft --data my.jsonl --temperature 0.7 --seed 1 --json
    """
    import dataclasses

    from fwdllm.runtime.generation import generate

    if prompts and kw["data"] is not None:
        raise UserError("give prompts with --prompt or --data, not both")
    task = _task(kw)
    examples = None if prompts else _examples(kw, task)
    prompts = prompts or tuple(ex.prompt for ex in examples)
    # Generation reads no label words: a classify task's verbalizer need not
    # fit this model's vocabulary, and the context is sized as for sft.
    session = _session(kw, dataclasses.replace(task, kind="sft", label_words=(), labels=()))
    with session:
        _load_lora(session, lora)
        gens = generate(session, prompts, max_new_tokens=max_tokens or task.max_new_tokens, stop=task.stop,
                        temperature=temperature, seed=seed, progress=True)
    refs = [None] * len(prompts) if examples is None else [
        ex.completion if ex.completion is not None else task.label_words[ex.label] for ex in examples]
    for i, (prompt, g, ref) in enumerate(zip(prompts, gens, refs), start=1):
        click.echo(f"[{i}] {_tail(prompt)}")
        click.echo(f"  generated: {_flat(g.text)}")
        if ref is not None:
            click.echo(f"  reference: {_flat(ref)}")
    if kw["as_json"]:
        click.echo(json.dumps({"model": str(session.model_path), "lora": None if lora is None else str(lora),
                               "temperature": temperature, "seed": seed, "generations": [
                                   {"prompt": p, "text": g.text, "reference": r, "n_tokens": g.n_tokens,
                                    "ended": g.ended} for p, g, r in zip(prompts, gens, refs)]}))


def _tail(prompt: str, width: int = 160) -> str:
    """A prompt on one line, its start cut to ``width`` characters (the end is what the model continues)."""
    flat = prompt.replace("\n", " | ")
    return flat if len(flat) <= width else "..." + flat[-width + 3:]


def _flat(text: str) -> str:
    """A generation on one line for the terminal (--json keeps the text as it is)."""
    return text.strip().replace("\n", "\\n")


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter("comma-separated integers, e.g. 1,2,3") from None
    if not seeds or any(not 0 <= s < 2**32 for s in seeds):
        raise click.BadParameter("need >= 1 seed, each in [0, 2^32)")
    return seeds


@click.group("client", cls=Group)
def client() -> None:
    """The edge device: perturbed scoring, and joining an aggregator."""


@client.command("score")
@data_options
@option("lora", required=True)
@click.option("--seeds", required=True, callback=lambda _c, _p, v: _seeds(v), metavar="S1,S2,...",
              help="The seeds whose directions to score, comma separated.")
@shared("eps", "one_sided", "dist", "parts")
def score_cmd(lora: Path, seeds: list[int], eps: float, one_sided: bool, dist: str, parts: str, **kw: Any) -> None:
    """Losses at LoRA +- eps * direction(seed), as a device computes them.

    \b
    Example:
      fwdllm client score --model smollm2-135m --lora a.gguf --task sst2 --limit 16 --seeds 1,2,3
    """
    from fwdllm.core.layout import PerturbMask

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


@client.command("run")
@click.option("--connect", required=True, metavar="URL", help="Aggregator address, e.g. tcp://10.0.0.5:5555.")
@option("model")
@option("data", required=True)
@option("task")
@option("threads")
@click.option("--client-id", default=None, help="Name of this device in logs and metrics (default: HOST-PID).")
@option("max_batch")
@option("no_mmap")
@click.option("--events", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append a JSONL trace (updates and adapter hashes per round) here.")
@click.option("--give-up", "give_up_s", type=float, default=600.0, show_default=True,
              help="Exit after this many seconds without an aggregator.")
@client_key_options
def run_cmd(
    connect: str,
    model: str,
    data: Path,
    task: str,
    threads: int | None,
    client_id: str | None,
    max_batch: int,
    no_mmap: bool,
    events: Path | None,
    give_up_s: float,
    curve_secret: Path | None,
    server_key: Path | None,
) -> None:
    """Join an aggregator and train: score seeds on local data, send scalars.

    Only seeds and a few scalars cross the network each round; the raw data
    never leaves the device.  The worker keeps going until the aggregator ends
    the run, and survives aggregator restarts by reconnecting with backoff.

    \b
    Example:
      fwdllm client run --connect tcp://10.0.0.5:5555 --model smollm2-135m \\
          --data my_reviews.tsv --task sst2 --threads 2
    """
    run_device(connect, model, data, task, threads_for(threads), client_id, max_batch, events, give_up_s,
               curve_secret, server_key, no_mmap=no_mmap)
