"""``fwdllm simulate``: an aggregator and N clients as real processes on 127.0.0.1.

Nothing is short-circuited: the processes are the same ``aggregator serve``
and ``client run`` a deployment uses, talking ZeroMQ over loopback.  This
module only prepares the data shards, starts and watches the processes, and
turns ``metrics.jsonl`` into a live progress line.
"""

from __future__ import annotations

import csv
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from fwdllm.aggregator.checkpoint import read_metrics
from fwdllm.core.errors import UserError
from fwdllm.core.files import output_dir
from fwdllm.options import BOOL_FLAGS, TRAINING_KEYS, threads_for

#: --quick / --long presets; explicit options win.  50 rounds is a demo's budget;
#: 300 is where plain ZO on SST-2 stops improving (docs/experiments).
PRESETS: dict[bool, dict[str, Any]] = {
    True: {"rounds": 50, "dev_limit": None, "eval_every": 25},
    False: {"rounds": 300, "dev_limit": None, "eval_every": 50},
}


# --------------------------------------------------------------------------- #
# shards
# --------------------------------------------------------------------------- #


def _read_rows(path: Path, fmt: str) -> tuple[list[str] | None, list[list[str]] | list[str]]:
    """(header, rows) of a csv/tsv file, or (None, raw lines) of a JSONL file."""
    if fmt == "jsonl":
        return None, [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, **_dialect(fmt))
        header = next(reader, None)
        return header, list(reader)


def _dialect(fmt: str) -> dict[str, Any]:
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}


def split_indices(labels: list[str] | None, n_rows: int, n_clients: int, shard_size: int,
                  alpha: float | None, seed: int) -> list[list[int]]:
    """Disjoint row indices per client: IID, or Dirichlet(alpha) label skew.

    First an IID sample of ``n_clients * shard_size`` rows is drawn; with
    ``alpha`` each label's rows are then divided among clients in
    proportions drawn from Dir(alpha) (smaller alpha = more skew).
    """
    rng = np.random.default_rng(seed)
    pool = rng.permutation(n_rows)[: n_clients * shard_size]
    if alpha is None or labels is None:
        return [sorted(pool[i::n_clients].tolist()) for i in range(n_clients)]
    shards: list[list[int]] = [[] for _ in range(n_clients)]
    for label in sorted({labels[i] for i in pool}):
        rows = [int(i) for i in pool if labels[i] == label]
        cuts = (np.cumsum(rng.dirichlet([alpha] * n_clients))[:-1] * len(rows)).astype(int)
        for shard, part in zip(shards, np.split(np.array(rows, dtype=np.int64), cuts)):
            shard.extend(part.tolist())
    return [sorted(s) for s in shards]


def write_shards(task_ref: str, out: Path, n_clients: int, shard_size: int, alpha: float | None,
                 seed: int) -> list[Path]:
    """Write one training file per client under ``out``; returns their paths."""
    from fwdllm.runtime.tasks import default_data, load_task

    task = load_task(task_ref)
    src = default_data(task_ref, "train")
    header, rows = _read_rows(src, task.format)
    labels = None
    if header is not None and task.kind == "classify" and task.label_column in header:
        col = header.index(task.label_column)
        labels = [r[col] if col < len(r) else "" for r in rows]
    parts = split_indices(labels, len(rows), n_clients, shard_size, alpha, seed)
    if any(not p for p in parts):
        raise UserError(f"a client got no data (--dirichlet {alpha} too small, or too little data for {n_clients} clients)")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, idx in enumerate(parts):
        path = out / f"client-{i:02d}.{task.format}"
        with path.open("w", encoding="utf-8", newline="") as f:
            if header is None:
                f.write("".join(rows[j] + "\n" for j in idx))  # type: ignore[operator]
            else:
                w = csv.writer(f, lineterminator="\n", **_dialect(task.format))
                w.writerow(header)
                w.writerows(rows[j] for j in idx)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- #
# processes
# --------------------------------------------------------------------------- #


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _option_args(kw: dict[str, Any], keys: list[str]) -> list[str]:
    """Turn parsed training options back into ``--name value`` arguments."""

    args: list[str] = []
    for k in keys:
        v = kw.get(k)
        if k in BOOL_FLAGS:
            args.append(BOOL_FLAGS[k][0 if v else 1])
        elif isinstance(v, tuple):  # multiple=True options
            args += [a for item in v for a in ("--" + k.replace("_", "-"), str(item))]
        elif v is not None:
            args += ["--" + k.replace("_", "-"), str(v)]
    return args


def _label(rec: dict[str, Any]) -> dict[str, Any]:
    out = {"loss": f"{rec['loss']:.3f}" if rec.get("loss") is not None else "-"}
    if rec.get("dev_accuracy") is not None:
        out["dev_acc"] = f"{rec['dev_accuracy']:.3f}"
    if rec.get("dev_perplexity") is not None:
        out["dev_ppl"] = f"{rec['dev_perplexity']:.2f}"
    if rec.get("clients") is not None:
        out["clients"] = rec["clients"]
    return out


def run_simulation(*, model: str, clients: int, rounds: int | None, out: Path, dirichlet: float | None,
                   quick: bool, threads: int | None, port: int, shard_size: int, byzantine: float = 0.0,
                   **kw: Any) -> None:
    """Prepare shards, start the processes, show progress, print before/after."""
    from tqdm import tqdm

    from fwdllm.runtime.models import resolve_model

    preset = PRESETS[quick]
    rounds = rounds or preset["rounds"]
    for k in ("dev_limit", "eval_every"):
        kw[k] = kw[k] if kw[k] is not None else preset[k]
    kw["eval_every"] = min(kw["eval_every"], rounds)
    if (out / "run.json").exists():
        raise UserError(f"{out} already holds a run; pick another --out")
    output_dir(out)
    model_path = resolve_model(model)
    eval_threads = threads_for(threads)  # the dev evaluation runs while every client waits for its next task
    threads = threads_for(threads, clients + 1)
    shards = write_shards(kw["task"], out / "shards", clients, shard_size, dirichlet, kw["seed"])
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    agg_cmd = py + ["fwdllm.aggregator", "serve", "--bind", url, "--model", str(model_path), "--rounds", str(rounds),
                    "--out", str(out), "--min-clients", str(clients), "--threads", str(eval_threads)]
    agg_cmd += _option_args(kw, TRAINING_KEYS)
    procs: list[subprocess.Popen] = []
    # A plain `kill` of simulate must not orphan the processes it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        procs.append(_spawn(agg_cmd, logs / "aggregator.log"))
        for i, shard in enumerate(shards):
            cid = f"client-{i:02d}"
            attacker = i < round(byzantine * clients)  # test-only: lies through the real worker
            entry = ["fwdllm.testing.attackers"] if attacker else ["fwdllm.edge_client", "run"]
            cmd = py + entry + ["--connect", url, "--model", str(model_path), "--data", str(shard),
                                "--task", kw["task"], "--threads", str(threads), "--client-id", cid,
                                "--events", str(out / "clients" / f"{cid}.jsonl")]
            (out / "clients").mkdir(exist_ok=True)
            procs.append(_spawn(cmd, logs / f"{cid}.log"))
        click.echo(f"simulate: aggregator + {clients} clients on {url}; logs in {logs}", err=True)
        _watch(out, procs, rounds, tqdm)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    _summary(out)


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as logf:
        return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _watch(out: Path, procs: list[subprocess.Popen], rounds: int, tqdm: Any) -> None:
    """Follow metrics.jsonl until the aggregator exits."""
    agg = procs[0]
    seen = 0
    with tqdm(total=rounds, desc="rounds", unit="round", file=sys.stderr) as bar:
        while True:
            recs = read_metrics(out)
            for rec in recs[seen:]:
                if rec["round"] == 0 and rec.get("dev_accuracy") is not None:
                    bar.write(f"before training: dev accuracy {rec['dev_accuracy']:.4f} (n={rec.get('dev_n')})")
                elif rec["round"] == 0 and rec.get("dev_perplexity") is not None:
                    bar.write(f"before training: dev perplexity {rec['dev_perplexity']:.3f} (n={rec.get('dev_n')})")
                elif rec["round"] > 0:
                    bar.update(rec["round"] - bar.n)
                    bar.set_postfix(_label(rec))
            seen = len(recs)
            if agg.poll() is not None:
                break
            if all(p.poll() is not None for p in procs[1:]):
                # Clients leave on the aggregator's Bye, a moment before it exits.
                try:
                    agg.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    raise UserError(f"all clients exited; see {out / 'logs'}") from None
                continue
            time.sleep(0.5)
    if agg.returncode != 0:
        tail = (out / "logs" / "aggregator.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise UserError(f"aggregator exited with {agg.returncode}:\n" + "\n".join(tail))


def _summary(out: Path) -> None:
    recs = read_metrics(out)
    evals = [r for r in recs if r.get("dev_accuracy") is not None]
    steps = [r for r in recs if r["round"] > 0]
    if not steps:
        return
    fwd = sum(r["forward_passes"] for r in steps)
    down = np.mean([r["bytes_down_per_client"] for r in steps])
    up = np.mean([r["bytes_up_per_client"] for r in steps])
    click.echo(f"rounds {len(steps)}, forward passes {fwd}, per client per round: "
               f"{down:.0f} B down, {up:.0f} B up; wall {steps[-1]['wall_s']:.0f} s")
    if len(evals) >= 2:
        a, b = evals[0], evals[-1]
        click.echo(f"dev accuracy: before {a['dev_accuracy']:.4f} -> after {b['dev_accuracy']:.4f} "
                   f"(round {b['round']}); dev loss {a['dev_loss']:.4f} -> {b['dev_loss']:.4f}")
    sft = sft_summary(recs)
    if sft:
        click.echo(sft)
    paced = pacing_summary(steps)
    if paced:
        click.echo(paced)
    click.echo(f"adapter: {out / 'adapter.gguf'}   metrics: {out / 'metrics.jsonl'}")


def sft_summary(recs: list[dict[str, Any]]) -> str | None:
    """Dev perplexity (and ROUGE-L, exact match) before and after, for an sft run."""
    ppl = [r for r in recs if r.get("dev_perplexity") is not None]
    if len(ppl) < 2:
        return None
    a, b = ppl[0], ppl[-1]
    lines = [f"dev perplexity: before {a['dev_perplexity']:.3f} -> after {b['dev_perplexity']:.3f} "
             f"({100 * (b['dev_perplexity'] / a['dev_perplexity'] - 1):+.1f} %, round {b['round']}); "
             f"dev loss {a['dev_loss']:.4f} -> {b['dev_loss']:.4f}"]
    gen = [r for r in recs if r.get("dev_rouge_l") is not None]
    if len(gen) >= 2:
        a, b = gen[0], gen[-1]
        lines.append(f"dev ROUGE-L: before {a['dev_rouge_l']:.4f} -> after {b['dev_rouge_l']:.4f} "
                     f"({100 * (b['dev_rouge_l'] - a['dev_rouge_l']):+.2f} points); exact match "
                     f"{a['dev_exact_match']:.4f} -> {b['dev_exact_match']:.4f}")
    return "\n".join(lines)


def pacing_summary(steps: list[dict[str, Any]]) -> str | None:
    """One line on how a paced run's rounds ended, or None for unpaced runs.

    Pacing costs forward passes on purpose; whether it bought a certified
    precision or just spent its cap every round decides if it was worth it,
    and that is invisible in the accuracy line."""
    paced = [r for r in steps if "pacing_passed" in r]
    if not paced:
        return None
    passed = sum(bool(r["pacing_passed"]) for r in paced)
    ks = [r["perturbations"] for r in paced]
    line = (f"pacing: the variance test ended {passed} of {len(paced)} rounds, the cap of "
            f"{paced[-1]['pacing_k_max']} seeds the rest; seeds per round: median {int(np.median(ks))}, "
            f"{min(ks)}-{max(ks)}")
    if passed < len(paced) / 2:
        line += ("\n  most rounds ran to the cap: the test never confirmed the precision those seeds paid for "
                 "(docs/algorithms.md, pacing)")
    return line
