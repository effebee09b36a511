"""``fwdllm bench throughput``: what perturbed scoring costs over plain scoring.

In one run, on the same examples and the same loaded model + LoRA:

* plain batched scoring (``EdgeSession.evaluate``) repeated as many times as
  the perturbed evaluation makes passes, and
* perturbed scoring (``EdgeSession.perturbed``, central difference: two
  passes per seed, each under its own shifted adapter, written ahead by a
  helper thread and loaded per seed),

interleaved round by round so that a noisy (shared) machine hurts both alike.
The headline is ``ratio = perturbed tokens/s / plain tokens/s`` (goal >= 0.95).
It also times one adapter/scale switch (the scheduler re-reserve llama.cpp
does on the next decode) as the difference between a decode right after a
switch and the same decode repeated, and the per-seed write+load of the
two shifted adapters.  ``--mem`` additionally loads the model in each
mmap/repack mode in a fresh process and records peak RSS and speed.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from fwdllm.bench.common import RESULTS, bench_task, out_help
from fwdllm.options import Command, option, parse_targets, shared, threads_for


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def mem_probe(model: str, mmap: bool, repack: bool, threads: int) -> None:
    """Child process: load, score one batch, print peak RSS and tokens/s."""
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import default_data, load_task, read_examples

    task = load_task("sst2")
    ex = read_examples(task, default_data("sst2", "dev"), limit=64)
    t0 = time.perf_counter()
    with EdgeSession(model, task, n_threads=threads, mmap=mmap, repack=repack) as s:
        load_s = time.perf_counter() - t0
        r = s.evaluate(ex)
    print(json.dumps({"mmap": mmap, "repack": repack, "load_s": load_s, "peak_rss_mb": _rss_peak_mb(),
                      "tokens_per_s": r.n_tokens / r.seconds}))


def _memory_modes(model: str, threads: int) -> list[dict]:
    out = []
    for mmap, repack in ((True, True), (True, False), (False, True), (False, False)):
        code = f"from fwdllm.bench.throughput import mem_probe; mem_probe({model!r}, {mmap}, {repack}, {threads})"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def _switch_ms(session, batch, ads: list, reps: int) -> tuple[float, float]:  # noqa: ANN001
    """(ms for a decode right after an adapter switch) - (ms for the same decode
    again), median over ``reps``; and the plain decode ms."""
    eng = session.engine
    chunk = [batch.seqs[i] for i in batch.chunks[0]]
    extra, plain = [], []
    for k in range(reps):
        eng.set_adapters([(ads[k % 2], 1.0)])
        t0 = time.perf_counter()
        eng.decode(chunk)
        t1 = time.perf_counter()
        eng.decode(chunk)
        t2 = time.perf_counter()
        extra.append((t1 - t0) - (t2 - t1))
        plain.append(t2 - t1)
    return 1000 * float(np.median(extra)), 1000 * float(np.median(plain))


@click.command("throughput", cls=Command)
@shared("model", "task", "label_words", "batch_size", "k")
@option("rounds", default=3, help="Rounds; each scores plain and perturbed in turn.")
@shared("eps", "rank", "targets", "parts", "threads")
@click.option("--mem", is_flag=True, help="Also measure peak RSS and speed of each mmap/repack loading mode, each "
                                          "in a fresh process.")
@option("out", default=RESULTS, help=out_help("throughput"))
def throughput(model: str, task: str, label_words: str | None, batch_size: int, k: int, rounds: int, eps: float,
               rank: int, targets: str, parts: str, threads: int | None, mem: bool, out: Path) -> None:
    """Perturbed vs plain scoring throughput and adapter-switch cost.

    Each round scores --batch-size dev examples 2K times plainly and once
    per sign of each of --k perturbations (central differences).

    \b
    Example:
      fwdllm bench throughput --model smollm2-135m --batch-size 16 --k 8 --mem
    """
    from tqdm import tqdm

    from fwdllm.core.adapter_io import base_shapes
    from fwdllm.core.errors import UserError
    from fwdllm.core.layout import LoraLayout, PerturbMask
    from fwdllm.reference.torch_ref import random_lora
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import default_data, read_examples

    if k < 1:
        raise UserError("--k: a round needs at least one perturbation")
    lora_targets = parse_targets(targets)
    spec = bench_task(task, label_words, kinds=None)
    ex = read_examples(spec, default_data(task, "dev"), limit=batch_size)
    mask = PerturbMask(parts)
    with EdgeSession(model, spec, n_threads=threads_for(threads)) as s:
        layout = LoraLayout.for_base(base_shapes(s.model_path), rank, 2 * rank, lora_targets)
        s.set_lora(layout, random_lora(layout, 0))
        batch = s.prepare(ex)
        s.evaluate(ex)  # warm-up (first decode allocates)
        plain_tok = plain_s = pert_tok = pert_s = 0.0
        for r in tqdm(range(rounds), desc="rounds", file=sys.stderr):
            t0 = time.perf_counter()
            for _ in range(2 * k):
                plain_tok += s.evaluate(ex).n_tokens
            plain_s += time.perf_counter() - t0
            res = s.perturbed(ex, range(r * k, (r + 1) * k), eps, mask)
            pert_tok += res.n_tokens
            pert_s += res.seconds
        t0 = time.perf_counter()
        ads = [s.load_file(f) for f in s.write_shifted(0, eps, mask, "gaussian", (1, -1))]
        load_ms = 1000 * (time.perf_counter() - t0)
        switch_ms, decode_ms = _switch_ms(s, batch, ads, reps=6)
        s.engine.set_adapters(s.main_set())
        for ad in ads:
            s.engine.free_adapter(ad)
        model_path = str(s.model_path)
    result = {
        "model": model_path,
        "task": task,
        "examples": len(ex),
        "tokens_per_batch": batch.n_tokens,
        "seeds_per_round": k,
        "rounds": rounds,
        "threads": s.engine.n_threads,
        "plain_tokens_per_s": plain_tok / plain_s,
        "perturbed_tokens_per_s": pert_tok / pert_s,
        "ratio": (pert_tok / pert_s) / (plain_tok / plain_s),
        "switch_ms": switch_ms,
        "decode_ms_per_batch": decode_ms,
        "adapter_write_load_ms": load_ms,
    }
    if mem:
        result["memory_modes"] = _memory_modes(model_path, s.engine.n_threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(result, indent=2))
    _plot(result, out / "throughput.png")
    for key, v in result.items():
        if key != "memory_modes":
            click.echo(f"{key:>24}: {v:.4g}" if isinstance(v, float) else f"{key:>24}: {v}")
    for m in result.get("memory_modes", []):
        click.echo(f"  mmap={m['mmap']!s:5} repack={m['repack']!s:5} peak RSS {m['peak_rss_mb']:.0f} MB  "
                   f"{m['tokens_per_s']:.0f} tok/s  load {m['load_s']:.2f} s")
    click.echo(f"wrote {out / 'throughput.json'}")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    vals = [result["plain_tokens_per_s"], result["perturbed_tokens_per_s"]]
    ax.bar(["plain", "perturbed (+/-)"], vals, color=["#888", "#2a7"])
    ax.set_ylabel("tokens / s")
    ax.set_title(f"ratio {result['ratio']:.3f}, switch {result['switch_ms']:.1f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
