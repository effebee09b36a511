"""``fwdllm bench convergence``: accuracy vs forward passes, bytes and wall time.

fwdllm's strategies run through the real path: ``fwdllm simulate`` (an
aggregator and N client processes over ZeroMQ on 127.0.0.1, INT4 GGUF in
llama.cpp), whose ``metrics.jsonl`` gives per round the forward passes, the
bytes per client each way, the wall time and the dev accuracy.  The backprop
baselines (:mod:`fwdllm.bench.baselines`) train on the very shard files simulate
writes (same ``write_shards`` call, same seed) and are scored on the same dev
rows, with the same prompt, verbalizer and loss.

Units: a *forward pass* is one batch through the model (a perturbed
evaluation is one; a backprop step is one forward plus a backward of about
twice its cost, so the backprop curves are optimistic on that axis).  The
backprop baselines are evaluated in torch on the dequantized weights, the ZO
runs by llama.cpp on the INT4 file; round 0 of each row shows the gap.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from fwdllm.bench.common import REPO, RESULTS, bench_task, figure, save_figure, write_result
from fwdllm.options import Command, option, shared, threads_for


def task_ref(task: str, label_words: str | None, out: Path) -> str:
    """What ``simulate --task`` gets: the preset name or spec file, or (verbalizer
    override) a spec file keeping the task's name and its data split."""
    if not label_words:
        return task
    from fwdllm.runtime.tasks import default_data

    spec = bench_task(task, label_words)
    data = spec.to_dict()
    data.update(train=str(default_data(task, "train")), dev=str(default_data(task, "dev")))
    path = out / f"{spec.name}-task.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def run_simulate(model: str, strategy: str, run_dir: Path, task: str, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``fwdllm simulate`` run; returns its metrics records."""
    from fwdllm.aggregator.checkpoint import read_config, read_metrics

    args = [sys.executable, "-c", "from fwdllm.aggregator.cli import simulate; simulate()", "--model", model,
            "--strategy", strategy, "--out", str(run_dir), "--task", task]
    if "recipe" not in opts:  # a bench compares strategies at the options it names: no recipe unless asked
        args += ["--recipe", "none"]
    for k, v in opts.items():  # None: a bare flag such as --central
        args += [f"--{k.replace('_', '-')}"] + ([] if v is None else [str(v)])
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    rounds = opts.get("rounds") or (read_config(run_dir).rounds if (run_dir / "run.json").exists() else None)
    done = any(r["round"] == rounds for r in records)
    if proc.returncode != 0 and not done:
        raise click.ClickException(f"simulate {strategy} failed:\n{(proc.stderr or proc.stdout)[-2000:]}")
    if proc.returncode != 0:  # finished every round, then tripped on shutdown: keep the metrics, say so
        click.echo(f"warning: simulate {strategy} exited {proc.returncode} after its last round: "
                   f"{(proc.stderr or proc.stdout).strip().splitlines()[-1]}", err=True)
    return records


def curve(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Cumulative forward passes, bytes per client (down+up) and wall time at
    every evaluated round; ``accuracy_raw`` too when the run averaged its
    adapter (``--ema``: ``accuracy`` is the average's, this the last iterate's)."""
    out: dict[str, list[float]] = {"round": [], "forward_passes": [], "bytes": [], "wall_s": [], "accuracy": []}
    if any(r.get("dev_accuracy_raw") is not None for r in records):
        out["accuracy_raw"] = []
    fwd = nbytes = wall = 0.0
    for r in sorted(records, key=lambda r: r["round"]):
        if r["round"] > 0:
            fwd += r["forward_passes"]
            nbytes += r["bytes_down_per_client"] + r["bytes_up_per_client"]
            wall = r.get("wall_s", wall + r.get("round_s", 0.0))
        if r.get("dev_accuracy") is not None:
            for k, v in (("round", r["round"]), ("forward_passes", fwd), ("bytes", nbytes), ("wall_s", wall),
                         ("accuracy", r["dev_accuracy"])):
                out[k].append(float(v))
            if "accuracy_raw" in out:
                out["accuracy_raw"].append(float(r.get("dev_accuracy_raw", r["dev_accuracy"])))
    return out


def with_last_iterates(curves: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    """``curves`` plus a ``NAME (last iterate)`` row for every averaged run, so
    a table shows what the average bought on the very same trajectory."""
    out = {}
    for name, c in curves.items():
        out[name] = c
        if "accuracy_raw" in c:
            out[f"{name} (last iterate)"] = {**c, "accuracy": c["accuracy_raw"]}
    return out


def parse_entry(entry: str) -> tuple[str, dict[str, str]]:
    """``zo-sgd`` or ``zo-sgd:targets=v:lr=0.2`` -> (strategy, extra simulate
    options).  Variants of one strategy then share the shards, the dev rows
    and the backprop ceiling of one invocation.  A ``:`` starts a new option
    only before a letter, so values keep theirs (``layers=0:10``)."""
    from fwdllm.aggregator.cli import simulate
    from fwdllm.core.errors import UserError

    name, *pairs = re.split(r":(?=[A-Za-z])", entry)
    fixed = {"model", "strategy", "out", "task", "clients", "shard_size", "rounds", "dev_limit", "eval_every",
             "seed", "threads", "quick", "port"}
    params = [p for p in simulate.params if p.name not in fixed]
    valued = {p.name.replace("_", "-") for p in params if not p.is_flag}
    flags = {o.lstrip("-") for p in params if p.is_flag for o in p.opts + p.secondary_opts} - {"help", "h"}
    opts: dict[str, str | None] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if (key in valued and sep) or (key in flags and not sep):
            opts[key] = value if sep else None
        else:
            raise UserError(f"bad option {pair!r} in strategy {entry!r}: want KEY=VALUE with KEY one of "
                            f"{sorted(valued)}, or a flag from {sorted(flags)}")
    return name, opts


SMOOTH = 3  # evaluations averaged by the second passes-to column


def passes_to(c: dict[str, list[float]], target: float, window: int = 1) -> float | None:
    """Forward passes at the first evaluation where the mean accuracy of the
    last ``window`` evaluations (fewer at the start) reaches ``target``.

    ``window=1`` is the first crossing.  On a plateau near the target that
    crossing is decided by dev-set noise (a binomial standard error of
    ``sqrt(p(1-p)/n)`` on ``n`` dev rows), and evaluating more often makes it
    earlier.  A mean over a few evaluations is what a curve holds, not what
    it touched once."""
    acc = c["accuracy"]
    for i, f in enumerate(c["forward_passes"]):
        recent = acc[max(0, i - window + 1): i + 1]
        if sum(recent) / len(recent) >= target:
            return f
    return None


@click.command("convergence", cls=Command)
@shared("model", "task", "label_words")
@click.option("--strategies", default="zo-sgd", show_default=True,
              help="fwdllm strategies (simulate --strategy), comma-separated; 'all' = every registered one. "
                   "An entry may carry simulate options: 'zo-sgd:targets=v:lr=0.2'.")
@click.option("--baselines", default="fedavg-lora,fedcybgd", show_default=True,
              help="Backprop baselines, comma-separated ('' = none).")
@option("clients")
@click.option("--shard-size", type=click.IntRange(1), default=500, show_default=True,
              help="Training rows per client.")
@option("rounds", default=30, help="Rounds of the ZO strategies.")
@click.option("--bp-rounds", type=click.IntRange(1), default=12, show_default=True,
              help="Rounds of the backprop baselines.")
@click.option("--local-steps", type=click.IntRange(1), default=2, show_default=True,
              help="Backprop steps per client per round.")
@shared("k", "batch_size")
@option("lr")
@click.option("--bp-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="AdamW learning rate of the baselines.")
@option("dev_limit")
@option("eval_every")
@click.option("--bp-eval-every", type=click.IntRange(1), default=3, show_default=True,
              help="Backprop rounds between evaluations.")
@shared("seed", "threads")
@option("out", default=RESULTS, help="Directory for convergence.json, convergence.png and the runs "
                                     "(convergence-runs/, which must be empty or absent).")
def convergence(model, task, label_words, strategies, baselines, clients, shard_size, rounds, bp_rounds,  # noqa: ANN001
                local_steps, k, batch_size, lr, bp_lr, dev_limit, eval_every, bp_eval_every, seed, threads,
                out: Path) -> None:
    """Accuracy vs forward passes / bytes / wall time: fwdllm strategies vs backprop baselines.

    The ZO strategies run through `fwdllm simulate` (--threads is passed on:
    by default the cores are shared among its processes); the baselines run
    in this process afterwards, on all cores unless --threads says otherwise.

    \b
    Examples:
      fwdllm bench convergence --model smollm2-135m --task sst2
      fwdllm bench convergence --strategies all --rounds 60 --task agnews
      fwdllm bench convergence --baselines fedavg-lora --bp-rounds 20
      fwdllm bench convergence --strategies zo-sgd,zo-sgd:targets=v --rounds 300
    """
    from fwdllm.aggregator.registry import STRATEGIES
    from fwdllm.aggregator.simulate import write_shards
    from fwdllm.bench.baselines import BACKPROP, BackpropConfig, TorchLora, run_backprop
    from fwdllm.core.errors import UserError
    from fwdllm.runtime.models import resolve_model
    from fwdllm.runtime.tasks import default_data, read_examples

    names = sorted(STRATEGIES) if strategies == "all" else [s for s in strategies.split(",") if s]
    entries = {s: parse_entry(s) for s in names}
    bps = [b for b in baselines.split(",") if b]
    bad = [s for s, (name, _) in entries.items() if name not in STRATEGIES] + [b for b in bps if b not in BACKPROP]
    if bad:
        raise UserError(f"unknown strategy/baseline {bad}; strategies: {sorted(STRATEGIES)}, baselines: {BACKPROP}")
    spec = bench_task(task, label_words)  # a bad --task or a generation task: one line, before any run
    path = resolve_model(model)
    runs = out / "convergence-runs"
    if runs.exists() and any(runs.iterdir()):
        raise UserError(f"{runs} is not empty; pick another --out or remove it")
    ref = task_ref(task, label_words, runs)
    curves: dict[str, dict[str, list[float]]] = {}
    opts = dict(clients=clients, shard_size=shard_size, rounds=rounds, k=k, batch_size=batch_size,
                dev_limit=dev_limit, eval_every=eval_every, seed=seed, threads=threads, lr=lr)
    opts = {key: v for key, v in opts.items() if v is not None}  # unset: simulate's own default
    for s, (name, extra) in entries.items():
        click.echo(f"simulate --strategy {s} ({rounds} rounds)", err=True)
        curves[s] = curve(run_simulate(str(path), name, runs / s.replace(":", "_"), ref, {**opts, **extra}))
    if bps:
        shards = [read_examples(spec, p) for p in write_shards(ref, runs / "bp-shards", clients, shard_size, None, seed)]
        dev = read_examples(spec, default_data(task, "dev"), limit=dev_limit)
        tl = TorchLora(path, spec, threads=threads_for(threads), seed=seed)
        start = tl.state()
        cfg = BackpropConfig(rounds=bp_rounds, local_steps=local_steps, batch_size=batch_size, lr=bp_lr,
                             eval_every=bp_eval_every, seed=seed)
        for b in bps:
            click.echo(f"{b} ({bp_rounds} rounds, backprop)", err=True)
            tl.load(start)
            curves[b] = curve(run_backprop(b, tl, shards, dev, cfg, on_record=lambda r: click.echo(r, err=True)))
    curves = with_last_iterates(curves)
    ceiling = max(curves["fedavg-lora"]["accuracy"]) if "fedavg-lora" in curves else None
    rows = []
    for name, c in curves.items():
        rows.append([name, c["accuracy"][0], c["accuracy"][-1], max(c["accuracy"]), int(c["round"][-1]),
                     int(c["forward_passes"][-1]), int(c["bytes"][-1]), c["wall_s"][-1],
                     passes_to(c, 0.95 * ceiling) if ceiling else None,
                     passes_to(c, 0.95 * ceiling, SMOOTH) if ceiling else None])
    write_result(
        out,
        "convergence",
        {"model": str(path), "task": task, "options": {**opts, "bp_rounds": bp_rounds, "local_steps": local_steps,
                                                        "bp_lr": bp_lr}, "ceiling": ceiling, "curves": curves},
        {f"{task} dev accuracy ({dev_limit or 'all'} rows), {path.name}, {clients} clients": (
            ["method", "acc@0", "final acc", "best acc", "rounds", "forward passes", "bytes/client (down+up)",
             "wall s", "passes to 95% of FedAvg-LoRA best", f"same, mean of {SMOOTH} evals"],
            rows,
        )},
    )
    fig, axes = figure(3)
    for name, c in curves.items():
        for ax, key in zip(axes, ("forward_passes", "bytes", "wall_s")):
            ax.plot([max(x, 1) if key == "bytes" else x for x in c[key]], c["accuracy"], "o-", label=name)
    for ax, label in zip(axes, ("forward passes (batches)", "bytes per client, cumulative", "wall seconds")):
        ax.set_xlabel(label)
        ax.set_ylabel(f"{task} dev accuracy")
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=8)
    save_figure(fig, out, "convergence")
