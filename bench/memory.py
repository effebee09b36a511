"""``fwdllm bench memory``: peak RSS of an edge client vs torch backprop-LoRA.

Each side runs in its own subprocess, so each VmHWM is that side's alone:

* edge - :class:`EdgeSession` in one of the engine's loading modes, a LoRA on
  ``--targets``, then ``rounds`` perturbed rounds of K seeds (what a device does),
  with ``--batch-size`` sequences per decode of up to ``--n-ctx`` tokens each
  (the KV cache holds both); it also reports the RSS of the bare runtime
  (Python with the edge client's imports: numpy, llama_cpp, pyzmq,
  cryptography; no model), which a small model's footprint cannot hide, and
  the RSS once loaded (weights, KV cache, compute buffer), so what the rounds
  add on top (adapter switches) shows apart;
* torch - the backprop-LoRA baseline of :mod:`fwdllm.bench.baselines` (the GGUF
  dequantized to float32, PEFT LoRA on the same targets, AdamW) taking ``steps`` steps.

Goals: edge RSS <= 1.15x the GGUF file, and >= 4x below backprop.
The torch side is skipped, with its float32 weight size as a lower bound,
when those weights alone exceed this machine's available memory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from fwdllm.bench.common import (
    GIB,
    RESULTS,
    bench_task,
    child_main,
    current_rss_bytes,
    figure,
    out_help,
    run_child,
    save_figure,
    write_result,
)
from fwdllm.bench.round import MODES, synth_model
from fwdllm.options import Command, option, parse_targets, shared, threads_for


def edge_worker(args: dict[str, Any]) -> dict[str, Any]:
    """Load in ``mode``, then perturbed rounds; the parent reads VmHWM."""
    import fwdllm.edge_client.worker  # noqa: F401 - a device's process holds its client's imports too
    from fwdllm.core.layout import PerturbMask
    from fwdllm.core.lora import layout_for_base
    from fwdllm.reference.torch_ref import random_lora
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import default_data, read_examples

    mmap, repack = MODES[args["mode"]]
    task = bench_task(args["task"], args["label_words"], kinds=None)
    runtime = current_rss_bytes()  # the interpreter with the client's imports (numpy, llama_cpp, zmq, ...), no model
    t0 = time.perf_counter()
    session = EdgeSession(args["model"], task, n_threads=args["threads"], max_batch=args["batch"], n_ctx=args["n_ctx"],
                          mmap=mmap, repack=repack)
    load_s = time.perf_counter() - t0
    loaded = current_rss_bytes()
    layout = layout_for_base(session.model_path, args["rank"], 2.0 * args["rank"], tuple(args["targets"]))
    session.set_lora(layout, random_lora(layout, 0))
    examples = read_examples(task, default_data(args["task"], "train"), limit=args["batch"])
    t0 = time.perf_counter()
    tokens = 0
    for r in range(args["rounds"]):
        res = session.perturbed(examples, range(r * args["k"] + 1, (r + 1) * args["k"] + 1), 1e-2, PerturbMask("b"))
        tokens += res.n_tokens
    work_s = time.perf_counter() - t0
    session.close()
    return {"side": f"edge ({args['mode']})", "load_s": load_s, "work_s": work_s, "tok_s": tokens / work_s,
            "runtime_rss_bytes": runtime, "loaded_rss_bytes": loaded, "n_ctx": session.engine.max_seq_tokens}


def f32_weight_bytes(path: Path) -> int:
    """Bytes of every tensor of a GGUF at float32: what the torch side must hold."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_elements) * 4 for t in reader.tensors)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0  # pragma: no cover


@click.command("memory", cls=Command)
@option("model")
@click.option("--synth", default=None, metavar="PRESET",
              help="Use this synthetic preset (e.g. llama2-7b, written on first use and cached) instead of --model.")
@click.option("--modes", default="default,no-repack,no-mmap", show_default=True,
              help=f"Edge loading modes, comma-separated, from {', '.join(MODES)}.")
@option("k")
@option("rounds", default=2, help="Perturbed rounds of the edge side.")
@click.option("--steps", type=click.IntRange(1), default=2, show_default=True, help="Backprop steps of the torch side.")
@shared("batch_size", "rank", "targets")
@click.option("--no-torch", is_flag=True, help="Measure the edge side only.")
@shared("task", "label_words", "threads", "n_ctx")
@option("out", default=RESULTS, help=out_help("memory"))
def memory(model, synth, modes, k, rounds, steps, batch_size, rank, targets, no_torch, task, label_words,  # noqa: ANN001
           threads, n_ctx, out: Path) -> None:
    """Peak RSS: edge client (perturbed rounds) vs torch backprop-LoRA, one subprocess each.

    The subprocesses run one after the other.  --synth, when given, replaces
    --model.

    \b
    Examples:
      fwdllm bench memory --model smollm2-135m
      fwdllm bench memory --synth llama2-7b --modes no-mmap --no-torch
    """
    from fwdllm.core.errors import UserError
    from fwdllm.runtime.models import resolve_model

    if k < 1:
        raise UserError("--k: an edge round needs at least one perturbation")
    names = [m for m in modes.split(",") if m]
    if not names or any(m not in MODES for m in names):
        raise UserError(f"--modes: choose from {', '.join(MODES)}")
    lora_targets = parse_targets(targets)
    bench_task(task, label_words, kinds=None)  # a bad --task: one line, before a subprocess
    path = synth_model(synth) if synth else resolve_model(model)
    size = path.stat().st_size
    common = dict(model=str(path), task=task, label_words=label_words, batch=batch_size, rank=rank,
                  targets=lora_targets, threads=threads_for(threads))
    runs = [run_child("fwdllm.bench.memory", {**common, "mode": m, "k": k, "rounds": rounds, "n_ctx": n_ctx})
            for m in names]
    need = f32_weight_bytes(path)
    torch_note = ""
    if not no_torch and need < 0.8 * mem_available():
        runs.append(run_child("fwdllm.bench.baselines", {**common, "steps": steps}))
    elif not no_torch:
        torch_note = f"torch backprop-LoRA skipped: float32 weights alone need {need / GIB:.1f} GiB"
    torch_rss = next((r["peak_rss_bytes"] for r in runs if r["side"].startswith("torch")), need)
    rows = [[r["side"], r["loaded_rss_bytes"] / GIB if "loaded_rss_bytes" in r else "-",
             r["peak_rss_bytes"] / GIB, r["peak_rss_bytes"] / size,
             (r["peak_rss_bytes"] - r["runtime_rss_bytes"]) / size if "runtime_rss_bytes" in r else "-",
             torch_rss / r["peak_rss_bytes"], r["load_s"], r["work_s"]] for r in runs]
    if torch_note:
        rows.append(["torch backprop-LoRA (f32 weights, lower bound, not run)", "-", need / GIB, need / size, "-", 1.0,
                     "-", "-"])
    header = ["side", "loaded RSS GiB", "peak RSS GiB", "RSS / file", "(RSS - Python runtime) / file", "torch / this",
              "load s", "work s"]
    write_result(
        out,
        "memory",
        {"model": str(path), "size_bytes": size, "f32_weight_bytes": need, "runs": runs, "note": torch_note},
        {f"Peak RSS, {path.name} ({size / GIB:.3f} GiB file); goals: edge <= 1.15x file, >= 4x below torch": (
            header, rows)},
    )
    peak = header.index("peak RSS GiB")
    fig, (ax,) = figure(1)
    ax.bar([r[0] for r in rows], [r[peak] for r in rows])
    ax.axhline(size / GIB, color="k", ls="--", label="GGUF size")
    ax.axhline(1.15 * size / GIB, color="r", ls=":", label="1.15x goal")
    ax.set_ylabel("peak RSS (GiB)")
    ax.tick_params(axis="x", labelsize=7, rotation=15)
    ax.legend(fontsize=8)
    save_figure(fig, out, "memory")


if __name__ == "__main__":
    child_main(edge_worker)
