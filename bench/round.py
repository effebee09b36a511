"""``fwdllm bench round``: one full FwdLLM round on a (7B-shaped) INT4 model.

A device's round is: for each of K seeds, build the two shifted adapters
(direction -> LoRA +- eps*direction -> GGUF in /dev/shm -> llama.cpp load),
switch to each, decode the B x T token batch under it, and turn the logits
into the loss.  :func:`staged_round` runs exactly the
steps of :meth:`EdgeSession.perturbed` (a test pins their losses equal) with
a clock around each stage, and :func:`plain_pass` scores the same tokens with
no perturbation: their tokens/s ratio is the price of perturbed inference.

Every loading mode the engine exposes runs in its own subprocess, so each
peak RSS (VmHWM) is that mode's alone: default (mmap + CPU_REPACK copy),
``--no-repack`` (mmap only) and ``--no-mmap`` (read, repack, free the read).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

from fwdllm.bench.common import (
    GIB,
    RESULTS,
    bench_task,
    child_main,
    figure,
    out_help,
    run_child,
    save_figure,
    write_result,
)
from fwdllm.options import Command, option, parse_targets, shared, threads_for

#: loading modes of fwdllm.runtime.engine.Engine: name -> (mmap, repack)
MODES: dict[str, tuple[bool, bool]] = {"default": (True, True), "no-repack": (True, False), "no-mmap": (False, True),
                                        "no-mmap-no-repack": (False, False)}


def synth_cache() -> Path:
    env = os.environ.get("FWDLLM_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "fwdllm") / "synth"


def synth_model(preset: str, quant: str = "Q4_0") -> Path:
    """The synthetic ``preset`` GGUF in the cache, written on first use."""
    from fwdllm.convert.synth import write_synth

    path = synth_cache() / f"{preset}-{quant}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        click.echo(f"writing synthetic {preset} {quant} to {path} (once)", err=True)
        tmp = path.with_name(path.name + ".part")
        write_synth(tmp, preset=preset, quant=quant, seed=0)
        os.replace(tmp, path)
    return path


@dataclass
class Stages:
    """Seconds spent per stage of a perturbed round."""

    build: float = 0.0  # direction + perturbation tensors + GGUF write + load + free
    switch: float = 0.0  # llama_set_adapters_lora calls
    decode: float = 0.0  # llama_decode incl. the scheduler re-reserve after each switch
    loss: float = 0.0  # logits -> loss
    passes: int = 0
    first_decode: list[float] = field(default_factory=list)  # first chunk after each switch

    def total(self) -> float:
        return self.build + self.switch + self.decode + self.loss


def _score(session, batch, adapters: list, st: Stages) -> float:  # noqa: ANN001 - EdgeSession, Batch
    """One pass of ``batch`` under ``adapters``: mean loss, stages timed."""
    t = time.perf_counter()
    session.engine.set_adapters(adapters)
    st.switch += time.perf_counter() - t
    nll = terms = 0.0
    for j, chunk in enumerate(batch.chunks):
        t = time.perf_counter()
        logits = session.engine.decode([batch.seqs[i] for i in chunk])
        dt = time.perf_counter() - t
        st.decode += dt
        if j == 0:
            st.first_decode.append(dt)
        t = time.perf_counter()
        for i, z in zip(chunk, logits):
            a, b, _ = session.nll(z, batch.targets[i])
            nll, terms = nll + a, terms + b
        st.loss += time.perf_counter() - t
    st.passes += 1
    return nll / terms


def staged_round(session, batch, seeds: Sequence[int], eps: float, mask, dist: str = "gaussian"):  # noqa: ANN001, ANN201
    """:meth:`EdgeSession.perturbed` (central) step by step, with a clock per stage.

    The adapter build runs on the main thread here (``perturbed`` overlaps it
    with the previous seed's decodes), so ``build`` is what that overlap hides.
    Returns ``(loss_plus, loss_minus, Stages)``.
    """
    st = Stages()
    plus, minus = np.empty(len(seeds)), np.empty(len(seeds))
    for k, seed in enumerate(seeds):
        t = time.perf_counter()
        ads = [session.load_file(f) for f in session.write_shifted(int(seed), eps, mask, dist, (1, -1))]
        st.build += time.perf_counter() - t
        plus[k] = _score(session, batch, [(ads[0], 1.0)], st)
        minus[k] = _score(session, batch, [(ads[1], 1.0)], st)
        t = time.perf_counter()
        session.engine.set_adapters(session.main_set())
        for ad in ads:
            session.engine.free_adapter(ad)
        st.build += time.perf_counter() - t
    return plus, minus, st


def plain_pass(session, batch) -> tuple[float, Stages]:  # noqa: ANN001
    """Plain llama.cpp scoring of the same tokens (main LoRA only)."""
    st = Stages()
    return _score(session, batch, session.main_set(), st), st


def token_batch(session, examples, n_tokens: int):  # noqa: ANN001, ANN201
    """B sequences of exactly ``n_tokens`` tokens: each real prompt's tokens
    repeated or cut to length, scored at the last position, so that every
    model (whatever its tokenizer) decodes the same amount of work."""
    from fwdllm.runtime.engine import Seq
    from fwdllm.runtime.session import Batch

    seqs, targets = [], []
    for ex in examples:
        toks = session.engine.tokenize(ex.prompt, bos=True)
        toks = (toks * (n_tokens // len(toks) + 1))[:n_tokens]
        seqs.append(Seq(tuple(toks), (n_tokens - 1,)))
        targets.append(np.array([ex.label]))
    return Batch(seqs, targets, session.engine.pack(seqs), n_tokens * len(seqs))


def worker(args: dict[str, Any]) -> dict[str, Any]:
    """One loading mode in this (child) process: load, warm up, plain, round, plain."""
    from fwdllm.core.layout import PerturbMask
    from fwdllm.core.lora import layout_for_base
    from fwdllm.reference.torch_ref import random_lora
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import default_data, read_examples

    mmap, repack = MODES[args["mode"]]
    b, t_len, k = args["batch"], args["tokens"], args["k"]
    task = bench_task(args["task"], args["label_words"])
    t0 = time.perf_counter()
    session = EdgeSession(
        args["model"], task, n_threads=args["threads"], max_batch=b, n_ctx=t_len, mmap=mmap, repack=repack
    )
    load_s = time.perf_counter() - t0
    layout = layout_for_base(session.model_path, args["rank"], 2.0 * args["rank"], tuple(args["targets"]))
    session.set_lora(layout, random_lora(layout, 0))
    batch = token_batch(session, read_examples(task, default_data(args["task"], "train"), limit=b), t_len)
    mask = PerturbMask(parts=args["parts"])
    t0 = time.perf_counter()
    plain_pass(session, batch)  # warm-up: first touch of mmapped pages, graph allocation
    warm_s = time.perf_counter() - t0
    _, plain_a = plain_pass(session, batch)
    t0 = time.perf_counter()
    plus, minus, st = staged_round(session, batch, list(range(1, k + 1)), args["eps"], mask)
    wall = time.perf_counter() - t0
    _, plain_b = plain_pass(session, batch)
    session.close()
    plain_s = (plain_a.decode + plain_a.loss + plain_b.decode + plain_b.loss) / 2
    return {
        "mode": args["mode"],
        "load_s": load_s,
        "warmup_s": warm_s,
        "round_s": wall,
        "stages": {"build": st.build, "switch": st.switch, "decode": st.decode, "loss": st.loss},
        "passes": st.passes,
        "first_decode_s": float(np.mean(st.first_decode)),
        "tokens_per_pass": batch.n_tokens,
        "plain_pass_s": plain_s,
        "plain_decode_s": (plain_a.decode + plain_b.decode) / 2,
        "plain_tok_s": batch.n_tokens / plain_s,
        "perturbed_tok_s": batch.n_tokens * st.passes / wall,
        "projected": ((plus - minus) / (2 * args["eps"])).tolist(),
        "n_lora_params": layout.n_params,
    }


def where_time_goes(r: dict[str, Any]) -> list[tuple[str, float]]:
    """Seconds per pass beyond plain scoring, by cause."""
    p = r["passes"]
    s = r["stages"]
    return [
        ("adapter build (direction, write, load, free)", s["build"] / p),
        ("adapter switch (set_adapters)", s["switch"] / p),
        ("extra decode (scheduler re-reserve after each adapter swap)", s["decode"] / p - r["plain_decode_s"]),
        ("extra loss", s["loss"] / p - (r["plain_pass_s"] - r["plain_decode_s"])),
    ]


@click.command("round", cls=Command)
@option("model")
@click.option("--synth", default=None, metavar="PRESET",
              help="Use this synthetic preset (e.g. llama2-7b, written on first use and cached) instead of --model.")
@shared("task", "label_words", "k", "batch_size")
@click.option("--tokens", type=click.IntRange(1), default=64, show_default=True, help="Tokens per example (T).")
@shared("rank", "targets", "parts", "eps")
@click.option("--modes", default="default,no-repack,no-mmap", show_default=True,
              help="Loading modes to measure, comma-separated; the first one runs the full round.")
@click.option("--mode-k", type=click.IntRange(1), default=1, show_default=True,
              help="Perturbations per mode after the first (enough for its peak RSS and speed).")
@click.option("--quick", is_flag=True, help="Shortcut for --k 2 --batch-size 2 --tokens 32.")
@option("threads")
@option("out", default=RESULTS, help=out_help("round"))
def round_cmd(model, synth, task, label_words, k, batch_size, tokens, rank, targets, parts, eps, modes, mode_k,  # noqa: ANN001
              quick, threads, out: Path) -> None:
    """Time one FwdLLM device round per stage, against plain scoring, per loading mode.

    A round is K central perturbations (two passes each) of a batch of B
    examples cut or repeated to T tokens, under a LoRA on --targets.  Each
    loading mode runs in its own process, one after the other.  --synth,
    when given, replaces --model.

    \b
    Examples:
      fwdllm bench round --synth llama2-7b --quick
      fwdllm bench round --model smollm2-135m --k 8 --batch-size 8 --tokens 64
    """
    from fwdllm.core.errors import UserError
    from fwdllm.runtime.models import resolve_model

    if k < 1:
        raise UserError("--k: a round needs at least one perturbation")
    if quick:
        k, batch_size, tokens = 2, 2, 32
    names = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in names if m not in MODES]
    if bad or not names:
        raise UserError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    lora_targets = parse_targets(targets)
    bench_task(task, label_words)  # a bad --task: one line, before a subprocess
    path = synth_model(synth) if synth else resolve_model(model)
    size = path.stat().st_size
    common = dict(model=str(path), task=task, label_words=label_words, batch=batch_size, tokens=tokens,
                  rank=rank, targets=lora_targets, parts=parts, eps=eps, threads=threads_for(threads))
    runs = []
    from tqdm import tqdm

    for m in tqdm(names, desc="loading modes", unit="mode"):
        runs.append(run_child("fwdllm.bench.round", {**common, "mode": m, "k": k if m == names[0] else mode_k}))
    head = runs[0]
    stage_rows = [[s, v, v / head["round_s"]] for s, v in head["stages"].items()]
    stage_rows.append(["round (wall)", head["round_s"], 1.0])
    ratio = head["perturbed_tok_s"] / head["plain_tok_s"]
    summary = [
        ["model", path.name],
        ["GGUF size (GiB)", size / GIB],
        ["K (central) x B x T", f"{k} x {batch_size} x {tokens}"],
        ["passes / tokens per round", f"{head['passes']} / {head['passes'] * head['tokens_per_pass']}"],
        ["round wall (s)", head["round_s"]],
        ["perturbed tok/s", head["perturbed_tok_s"]],
        ["plain tok/s (same tokens, same run)", head["plain_tok_s"]],
        ["perturbed / plain", ratio],
        ["peak RSS (GiB)", head["peak_rss_bytes"] / GIB],
    ]
    mode_rows = [
        [r["mode"], r["peak_rss_bytes"] / GIB, r["peak_rss_bytes"] / size, r["load_s"], r["plain_tok_s"],
         r["plain_tok_s"] / head["plain_tok_s"]]
        for r in runs
    ]
    tables = {
        "Round": (["quantity", "value"], summary),
        "Stages (s)": (["stage", "seconds", "share of round"], stage_rows),
        "Loading modes": (["mode", "peak RSS GiB", "RSS / file", "load s", "plain tok/s", "speed vs first"], mode_rows),
    }
    if ratio < 0.95:
        tables["Where the time goes (s per pass beyond plain)"] = (
            ["cause", "s/pass"],
            [[c, v] for c, v in where_time_goes(head)] + [["plain pass", head["plain_pass_s"]]],
        )
    write_result(out, "round", {"model": str(path), "size_bytes": size, "k": k, "batch": batch_size, "tokens": tokens,
                                    "ratio": ratio, "runs": runs}, tables)
    fig, (ax1, ax2) = figure(2)
    left = 0.0
    for s, v in head["stages"].items():
        ax1.barh(["perturbed"], [v], left=left, label=s)
        left += v
    ax1.barh(["plain x passes"], [head["plain_pass_s"] * head["passes"]], color="grey")
    ax1.set_xlabel("seconds per round")
    ax1.legend(fontsize=8)
    ax1.set_title(f"{path.name}: K={k} B={batch_size} T={tokens}", fontsize=9)
    ax2.bar([r["mode"] for r in runs], [r["peak_rss_bytes"] / GIB for r in runs])
    ax2.axhline(size / GIB, color="k", ls="--", label="GGUF size")
    ax2.axhline(1.15 * size / GIB, color="r", ls=":", label="1.15x goal")
    ax2.set_ylabel("peak RSS (GiB)")
    ax2.legend(fontsize=8)
    save_figure(fig, out, "round")


if __name__ == "__main__":
    child_main(worker)
