"""Smoke runs of the benches that need torch or child processes, on the tiny
model: convergence (the `fwdllm simulate` path: an aggregator and its client
processes per strategy, and the torch baselines it compares against), memory
(one child per side, so that each peak RSS is that side's alone), fidelity and
noise (llama.cpp against the torch reference).  The other benches' smoke runs:
tests/runtime/test_bench.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from harness import TINY_BENCH, bench_result, invoke


@pytest.mark.timeout(150)
def test_convergence_bench_smoke(tiny_model: Path, tmp_path: Path) -> None:
    from fwdllm.bench.convergence import convergence

    invoke(convergence, ["--model", str(tiny_model), "--clients", "2", "--shard-size", "16", "--rounds", "2",
                          "--strategies", "zo-sgd,zo-sgd:k=4:central,zo-sgd:ema=0.5", "--k", "2", "--batch-size", "2",
                          "--dev-limit", "8",
                          "--eval-every", "1", "--bp-rounds", "2", "--local-steps", "1", "--bp-eval-every", "1",
                          "--out", str(tmp_path), *TINY_BENCH])
    data = bench_result(tmp_path, "convergence")
    curves = data["curves"]
    assert set(curves) == {"zo-sgd", "zo-sgd:k=4:central", "zo-sgd:ema=0.5", "zo-sgd:ema=0.5 (last iterate)",
                           "fedavg-lora", "fedcybgd"}
    # the averaged run is evaluated twice per round: its average and, as its own row, its last iterate
    ema, last = curves["zo-sgd:ema=0.5"], curves["zo-sgd:ema=0.5 (last iterate)"]
    assert len(ema["accuracy"]) == len(last["accuracy"]) == 3 and ema["accuracy"][0] == last["accuracy"][0]
    assert last["accuracy"] == curves["zo-sgd"]["accuracy"]  # the same trajectory as the plain run
    assert curves["zo-sgd"]["forward_passes"] == [0, 4, 8]  # K=2 one-sided: 1 seed + 1 base pass per client
    assert curves["zo-sgd:k=4:central"]["forward_passes"] == [0, 8, 16]  # 2 seeds x 2 signs per client
    assert curves["fedavg-lora"]["forward_passes"] == [0, 2, 4]  # 2 clients x 1 local step
    assert curves["fedcybgd"]["forward_passes"] == [0, 1, 2]
    # FedCyBGD uploads one of two blocks; FedAvg-LoRA the whole adapter, down and up
    assert curves["fedcybgd"]["bytes"][1] == 0.75 * curves["fedavg-lora"]["bytes"][1]


@pytest.mark.timeout(60)
def test_memory_bench_smoke(tiny_model: Path, tmp_path: Path) -> None:
    from fwdllm.bench.memory import memory

    invoke(memory, ["--model", str(tiny_model), "--modes", "no-mmap", "--k", "1", "--rounds", "1", "--steps", "1",
                     "--batch-size", "2", "--out", str(tmp_path), *TINY_BENCH])
    data = bench_result(tmp_path, "memory")
    sides = [r["side"] for r in data["runs"]]
    assert sides == ["edge (no-mmap)", "torch backprop-LoRA"]
    assert all(r["peak_rss_bytes"] > 0 for r in data["runs"])
    edge = data["runs"][0]
    assert 0 < edge["runtime_rss_bytes"] < edge["loaded_rss_bytes"] <= edge["peak_rss_bytes"]


@pytest.mark.timeout(60)
def test_fidelity_bench_smoke(tiny_model: Path, tmp_path: Path) -> None:
    from fwdllm.bench.fidelity import fidelity, k_grid

    assert k_grid(8) == [1, 2, 4, 8] and k_grid(6) == [1, 2, 4, 6]
    invoke(fidelity, ["--model", str(tiny_model), "--k-max", "4", "--batch-size", "2", "--out", str(tmp_path), *TINY_BENCH])
    data = bench_result(tmp_path, "fidelity")
    assert len(data["projected"]) == 4
    assert data["pearson_scalars"] > 0.9  # INT4 finite differences track torch's exact g.v
    rows = next(iter(data["tables"].values()))["rows"]
    assert [r[0] for r in rows] == [1, 2, 4]


@pytest.mark.timeout(60)
def test_noise_bench_measures_the_clients_draw(tiny_model: Path, tmp_path: Path) -> None:
    from fwdllm.bench.noise import batch_noise, noise, signal
    from fwdllm.runtime.tasks import Example

    invoke(noise, ["--model", str(tiny_model), "--rows", "12", "--batch-sizes", "2,4", "--draws", "200",
                          "--rank", "4", "--targets", "q,v", "--out", str(tmp_path), *TINY_BENCH])
    data = bench_result(tmp_path, "noise")
    rows = next(iter(data["tables"].values()))["rows"]
    assert [r[0] for r in rows] == [2, 4] and data["grad_sq"] > 0 and sum(data["label_counts"]) == 12
    assert all(r[1] > 0 and r[2] > 0 for r in rows)
    # the uniform draw against sampling theory without replacement: E|g_b - g|^2 = var/b (n-b)/(n-1)
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((30, 5)) + np.repeat([[3.0], [-3.0]], 15, axis=0)  # a label-driven component
    examples = [Example(prompt=str(i), label=i // 15) for i in range(30)]
    _, var = signal(grads)
    uniform = batch_noise(grads, examples, 6, 4000, stratify=False)
    assert uniform == pytest.approx(var / 6 * 24 / 29, rel=0.08)
    # stratified: 3 + 3 rows every time, so the +-3 label component cancels exactly
    assert batch_noise(grads, examples, 6, 4000, stratify=True) < 0.5 * uniform
