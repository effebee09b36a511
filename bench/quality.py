"""``fwdllm bench quality``: a task's recipe against its floor and its ceiling.

One table per task, every row on the same dev split, prompt and shards:

* **zero-shot** - the base model;
* **head only** - the recipe's head-only schedule (``--stages`` with k=0): a
  federated linear probe of the frozen features, the floor the zeroth-order
  part has to beat;
* **ZO only** - the recipe's zeroth-order stages without the head;
* **ZO + head** - the recipe itself, what ``fwdllm simulate --task T`` runs;
* **FedAvg-LoRA** - backprop LoRA on the same shards (:mod:`fwdllm.bench.baselines`),
  the ceiling.

Each row reports its accuracy (on SST-2 also on the phrase-level split), the
forward passes, the wall time and the bytes per client it took, and the
command that reproduces it.  The ZO rows run through ``fwdllm simulate``.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

import click

from fwdllm.bench.common import RESULTS, write_result
from fwdllm.options import Command, option, shared, threads_for

ROWS = ("zero-shot", "head", "zo", "both", "fedavg-lora")


def _extra_splits(task: str) -> list[str]:
    """Splits reported beside dev: SST-2's phrase-level one."""
    from fwdllm.core.errors import UserError
    from fwdllm.runtime.tasks import default_data

    try:
        default_data(task, "dev-phrases")
    except UserError:
        return []
    return ["dev-phrases"]


def _evaluate(model: Path, task: str, split: str, lora: Path | None, threads: int) -> tuple[float, float]:
    """(accuracy, loss) of the base model or an adapter on a split of ``task``."""
    from fwdllm.core.adapter_io import read_adapter
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import default_data, load_task, read_examples

    spec = load_task(task)
    with EdgeSession(model, spec, n_threads=threads) as s:
        if lora is not None:
            s.set_lora(*read_adapter(lora))
        r = s.evaluate(read_examples(spec, default_data(task, split)))
    return float(r.accuracy or 0.0), r.loss


def _totals(records: list[dict[str, Any]]) -> tuple[int, float, int]:
    """(forward passes, wall seconds, bytes per client down+up) of a run."""
    steps = [r for r in records if r["round"] > 0]
    return (sum(r["forward_passes"] for r in steps), steps[-1]["wall_s"] if steps else 0.0,
            sum(r["bytes_down_per_client"] + r["bytes_up_per_client"] for r in steps))


@click.command("quality", cls=Command)
@shared("model", "task")
@click.option("--methods", default=",".join(ROWS), show_default=True,
              help=f"The table's rows to run, comma-separated, from {','.join(ROWS)}.")
@option("clients")
@click.option("--shard-size", type=click.IntRange(1), default=2000, show_default=True, help="Training rows per client.")
@click.option("--bp-rounds", type=click.IntRange(1), default=50, show_default=True,
              help="Rounds of the backprop baseline.")
@click.option("--local-steps", type=click.IntRange(1), default=2, show_default=True,
              help="Backprop steps per client per round.")
@click.option("--bp-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="AdamW learning rate of the baseline.")
@shared("batch_size", "seed", "threads")
@option("out", default=RESULTS, help="Directory for quality.json and the runs (quality-runs/, which must be "
                                     "empty or absent).")
def quality(model, task, methods, clients, shard_size, bp_rounds, local_steps, bp_lr, batch_size, seed,  # noqa: ANN001
            threads, out: Path) -> None:
    """Zero-shot, head only, ZO only, ZO + head (the recipe) and backprop FedAvg-LoRA, side by side.

    Every row uses the task's dev split and prompt and, where it trains, the
    same shards; SST-2 rows report the phrase-level split beside.

    \b
    Examples:
      fwdllm bench quality --task sst2
      fwdllm bench quality --task agnews --methods zero-shot,head,both
    """
    from fwdllm.aggregator.recipes import recipe_for
    from fwdllm.aggregator.simulate import write_shards
    from fwdllm.bench.baselines import BackpropConfig, TorchLora, run_backprop
    from fwdllm.bench.common import bench_task
    from fwdllm.bench.convergence import run_simulate
    from fwdllm.core.errors import UserError
    from fwdllm.runtime.models import resolve_model
    from fwdllm.runtime.tasks import default_data, read_examples

    wanted = [r for r in methods.split(",") if r]
    if not wanted or set(wanted) - set(ROWS):
        raise UserError(f"--methods: unknown {sorted(set(wanted) - set(ROWS)) or methods!r}; choose from {','.join(ROWS)}")
    spec = bench_task(task, None)
    recipe = recipe_for("auto", task)
    if recipe is None and set(wanted) & {"head", "zo", "both"}:
        raise UserError(f"--task {task} has no recipe; its ZO rows need one (aggregator/recipes.py)")
    path = resolve_model(model)
    runs = out / "quality-runs"
    if runs.exists() and any(runs.iterdir()):
        raise UserError(f"{runs} is not empty; pick another --out or remove it")
    splits = ["dev", *_extra_splits(task)]
    eval_threads = threads_for(threads)
    common = {"clients": clients, "shard_size": shard_size, "seed": seed, "batch_size": batch_size,
              **({"threads": threads} if threads else {})}
    variants = {  # row -> extra simulate options
        "head": {"stages": recipe.head_only, "head": None} if recipe else {},
        "zo": {"stages": recipe.zo_only, "no-head": None} if recipe else {},
        "both": {},
    }
    table: list[list[Any]] = []
    data: dict[str, Any] = {"task": task, "model": str(path), "splits": splits, "recipe": recipe.name if recipe else None}
    for row in wanted:
        click.echo(f"quality: {row}", err=True)
        t0 = time.perf_counter()
        if row == "zero-shot":
            accs = [_evaluate(path, task, sp, None, eval_threads) for sp in splits]
            cmd = f"fwdllm eval --model {model} --task {task}"
            table.append([row, *[a for a, _ in accs], accs[0][1], 0, round(time.perf_counter() - t0), 0, cmd])
        elif row in variants:
            opts = {**common, "recipe": "auto", **variants[row]}
            records = run_simulate(str(path), "zo-sgd", runs / row, task, opts)
            adapter = runs / row / "adapter.gguf"
            last = [r for r in records if r.get("dev_accuracy") is not None][-1]
            extra = [_evaluate(path, task, sp, adapter, eval_threads)[0] for sp in splits[1:]]
            passes, wall, nbytes = _totals(records)
            flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is None else f" {shlex.quote(str(v))}")
                             for k, v in {**common, **variants[row]}.items())
            cmd = f"fwdllm simulate --model {model} --task {task} {flags} --out runs/{row}"
            table.append([row, last["dev_accuracy"], *extra, last["dev_loss"], passes, round(wall), nbytes, cmd])
            data[row] = records
        else:
            shard_files = write_shards(task, runs / "bp-shards", clients, shard_size, None, seed)
            shards = [read_examples(spec, p) for p in shard_files]
            tl = TorchLora(path, spec, threads=eval_threads, seed=seed)
            cfg = BackpropConfig(rounds=bp_rounds, local_steps=local_steps, batch_size=batch_size, lr=bp_lr,
                                 eval_every=bp_rounds, seed=seed)
            dev = read_examples(spec, default_data(task, "dev"))
            records = run_backprop("fedavg-lora", tl, shards, dev, cfg)
            extra = [tl.evaluate(read_examples(spec, default_data(task, sp)))[0] for sp in splits[1:]]
            passes = sum(r["forward_passes"] for r in records)
            nbytes = sum(r["bytes_down_per_client"] + r["bytes_up_per_client"] for r in records)
            cmd = (f"fwdllm bench quality --task {task} --methods fedavg-lora --bp-rounds {bp_rounds} "
                   f"--local-steps {local_steps} --bp-lr {bp_lr} --clients {clients} --shard-size {shard_size}")
            table.append([row, records[-1]["dev_accuracy"], *extra, records[-1]["dev_loss"], passes,
                          round(time.perf_counter() - t0), nbytes, cmd])
            data[row] = records
    write_result(out, "quality", data, {
        f"{task}: {', '.join(splits)} accuracy, {path.name}, {clients} clients": (
            ["row", *[f"{sp} acc" for sp in splits], "dev loss", "forward passes", "wall s",
             "bytes/client (down+up)", "command"], table)})
