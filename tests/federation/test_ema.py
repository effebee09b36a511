"""--ema: the moving average of the adapter is exact, replayed by every client,
survives resume bit for bit, and is what a run evaluates and ships."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from harness import free_url, serving, start_worker, wait_until

from fwdllm.aggregator import checkpoint
from fwdllm.core.adapter_io import read_adapter
from fwdllm.core.layout import adapter_sha256
from fwdllm.core.optim import Optimizer, OptimizerSpec
from fwdllm.testing.fake import QuadraticScorer


def _grads(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def test_ema_follows_the_recurrence_and_round_trips_through_state() -> None:
    shapes = {"a": (3, 5), "b": (7, 3)}
    rng = np.random.default_rng(1)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    opt = Optimizer(OptimizerSpec(lr=0.1, momentum=0.5, ema=0.9))
    assert all(opt.averaged(params)[n] is params[n] for n in shapes)  # before any step: the adapter itself
    expect = {n: p.astype(np.float64) for n, p in params.items()}
    for _ in range(20):
        opt.step(params, _grads(rng, shapes), 0.1)
        for n in shapes:
            expect[n] = 0.9 * expect[n] + 0.1 * params[n]
    for n in shapes:
        np.testing.assert_allclose(opt.averaged(params)[n], expect[n], rtol=1e-5, atol=1e-6)
        assert not np.allclose(opt.averaged(params)[n], params[n])

    twin = Optimizer(opt.spec)
    twin.load_state_arrays(opt.state_arrays())
    twin_params = {n: p.copy() for n, p in params.items()}
    for _ in range(5):
        g = _grads(rng, shapes)
        opt.step(params, g, 0.1)
        twin.step(twin_params, g, 0.1)
    for n in shapes:
        assert opt.averaged(params)[n].tobytes() == twin.averaged(twin_params)[n].tobytes()


def test_ema_off_ships_the_iterate_and_bad_decays_are_refused() -> None:
    params = {"a": np.ones((2, 2), np.float32)}
    opt = Optimizer(OptimizerSpec(lr=0.1))
    opt.step(params, {"a": np.ones((2, 2), np.float32)}, 0.1)
    assert opt.averaged(params)["a"] is params["a"] and "a/a" not in opt.state_arrays()
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="ema"):
            OptimizerSpec(ema=bad)


def _run(run_dir: Path, stop_after: int | None) -> tuple[dict[str, np.ndarray], list]:
    """6 rounds with --ema 0.8 (straight, or killed after ``stop_after`` and resumed);
    (shipped adapter, the workers)."""
    url = free_url()
    with serving(run_dir, rounds=6, min_clients=2, url=url, ema=0.8) as agg:
        ws = [start_worker(agg.opts.bind, f"c{i}", QuadraticScorer(noise=0.01)) for i in range(2)]
        if stop_after is None:
            for _, t in ws:
                t.join(30)
            final = agg.replica
        else:
            wait_until(lambda: agg.replica.version >= stop_after)
    if stop_after is not None:
        with serving(run_dir, resume=True, min_clients=2, url=url) as agg:
            for _, t in ws:
                t.join(60)
                assert not t.is_alive()
            final = agg.replica
    shipped = read_adapter(run_dir / checkpoint.ADAPTER)[1]
    for n, a in final.optimizer.averaged(final.tensors).items():
        assert shipped[n].tobytes() == a.tobytes()  # adapter.gguf is the average ...
    assert any(shipped[n].tobytes() != final.tensors[n].tobytes() for n in shipped)  # ... not the iterate
    for w, _ in ws:  # clients replay the average with the step, so a snapshot carries it
        assert w.replica.sha == final.sha
        for n, a in final.optimizer.avg.items():
            assert w.replica.optimizer.avg[n].tobytes() == a.tobytes()
    return shipped, ws


def test_ema_run_ships_the_average_and_resumes_bit_identically(tmp_path: Path) -> None:
    straight, _ = _run(tmp_path / "straight", None)
    resumed, _ = _run(tmp_path / "resumed", 3)
    layout = checkpoint.read_config(tmp_path / "straight").lora_layout
    assert adapter_sha256(layout, straight) == adapter_sha256(layout, resumed)
