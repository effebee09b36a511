"""Aggregator CLI errors, data sharding and metrics files (fast, no model)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from fwdllm.aggregator import checkpoint
from fwdllm.aggregator.cli import aggregator, simulate
from fwdllm.aggregator.simulate import split_indices, write_shards


def test_serve_needs_out() -> None:
    res = CliRunner().invoke(aggregator, ["serve", "--rounds", "2"])
    assert res.exit_code == 2 and "needs --out RUN_DIR" in res.output


def test_resume_of_a_non_run_is_a_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(aggregator, ["serve", "--resume", str(tmp_path)])
    assert res.exit_code == 2 and "not a run directory" in res.output
    assert "Traceback" not in res.output


def test_simulate_refuses_an_existing_run(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{}")
    res = CliRunner().invoke(simulate, ["--out", str(tmp_path)])
    assert res.exit_code == 2 and "already holds a run" in res.output


def test_shards_are_disjoint_and_dirichlet_skews_labels(tmp_path: Path, data_dir: Path) -> None:
    iid = write_shards("sst2", tmp_path / "iid", 4, 50, None, seed=0)
    rows = [p.read_text().splitlines() for p in iid]
    assert all(r[0] == "label\tsentence" and len(r) == 51 for r in rows)
    bodies = [set(r[1:]) for r in rows]
    assert sum(len(b) for b in bodies) == len(set().union(*bodies))  # disjoint

    labels = ["0"] * 500 + ["1"] * 500
    skew = split_indices(labels, 1000, 4, 200, alpha=0.1, seed=0)
    flat = [i for s in skew for i in s]
    assert len(flat) == len(set(flat)) == 800
    pos = [sum(labels[i] == "1" for i in s) / max(1, len(s)) for s in skew if s]
    assert max(pos) - min(pos) > 0.5  # strong label skew at alpha=0.1
    even = split_indices(labels, 1000, 4, 200, alpha=None, seed=0)
    assert all(len(s) == 200 for s in even)


def test_metrics_trim_drops_unfinished_rounds_and_torn_lines(tmp_path: Path) -> None:
    for r in range(4):
        checkpoint.append_metrics(tmp_path, {"round": r})
    with open(tmp_path / checkpoint.METRICS, "a") as f:
        f.write('{"round": 4, "lo')  # a crash mid-write
    assert [r["round"] for r in checkpoint.read_metrics(tmp_path)] == [0, 1, 2, 3]
    checkpoint.trim_metrics(tmp_path, 2)
    assert [json.loads(x)["round"] for x in (tmp_path / checkpoint.METRICS).read_text().splitlines()] == [0, 1, 2]


def test_layers_option_is_checked(tmp_path: Path, tiny_model: Path) -> None:
    """--layers must parse as START:STOP and fit the model; nothing is written otherwise."""
    for value, why in (("3:1", "need 0 <= START < STOP"), ("a:b", "expected START:STOP"),
                       ("0:99", "the model has 4 layers")):
        out = tmp_path / value.replace(":", "-")
        res = CliRunner().invoke(aggregator, ["serve", "--model", str(tiny_model), "--out", str(out), "--rounds", "1",
                                              "--layers", value])
        assert res.exit_code == 2 and why in res.output, res.output
        assert not (out / "run.json").exists()


def test_head_only_k0_is_checked_before_anything_is_written(tmp_path: Path, tiny_model: Path) -> None:
    """--k 0 is the head-only mode: without --head, with another strategy, or
    central, it is a one-line error and no run directory appears (simulate
    checks before writing shards)."""
    for extra, why in ((["--no-head"], "trains nothing without --head"),
                       (["--head", "--strategy", "pacing"], "runs with --strategy zo-sgd"),
                       (["--head", "--central"], "needs --one-sided")):
        out = tmp_path / "bad"
        res = CliRunner().invoke(aggregator, ["serve", "--model", str(tiny_model), "--out", str(out), "--rounds", "1",
                                              "--k", "0", *extra])
        assert res.exit_code == 2 and why in res.output and "Traceback" not in res.output, res.output
        assert not out.exists()
    res = CliRunner().invoke(simulate, ["--model", str(tiny_model), "--out", str(tmp_path / "sim"), "--k", "0"])
    assert res.exit_code == 2 and "without --head" in res.output, res.output
    assert not (tmp_path / "sim").exists()


def test_targets_option_takes_both_spellings(tmp_path: Path, tiny_model: Path) -> None:
    """``q+v`` (the profiler's spelling, usable inside a comma-separated bench
    entry) means ``q,v``; a bad name is a one-line error with nothing written."""
    from fwdllm.options import parse_targets

    assert parse_targets("v+q") == parse_targets("v, q") == ("v", "q")
    res = CliRunner().invoke(aggregator, ["serve", "--model", str(tiny_model), "--out", str(tmp_path / "bad"),
                                          "--rounds", "1", "--targets", "q+x"])
    assert res.exit_code == 2 and "--targets: unknown ['x']" in res.output, res.output
    assert not (tmp_path / "bad" / "run.json").exists()


def test_init_adapter_starts_the_run_from_it(tmp_path: Path, tiny_model: Path) -> None:
    """--init-adapter: round 0 is the file's adapter (checkpoint and run.json say
    so); a file whose layout differs from --rank/--lora-alpha/--targets, or that
    is no adapter, is a one-line error with nothing written."""
    from fwdllm.aggregator import setup
    from fwdllm.aggregator.strategy import StrategySpec
    from fwdllm.core.adapter_io import read_adapter
    from fwdllm.core.lora import init_lora, write_lora
    from fwdllm.core.optim import OptimizerSpec

    layout, tensors = init_lora(tiny_model, 4, 8.0, ("q", "v"), seed=1)
    rng = np.random.default_rng(0)
    trained = {k: v if k.endswith("lora_a") else rng.standard_normal(v.shape).astype(np.float32)
               for k, v in tensors.items()}
    ad = write_lora(tmp_path / "trained.gguf", layout, trained, tiny_model)
    for path, why in ((ad, "Pass --rank 4 --lora-alpha 8 --targets q,v"), (tiny_model, "not a LoRA adapter")):
        res = CliRunner().invoke(aggregator, ["serve", "--model", str(tiny_model), "--out", str(tmp_path / "bad"),
                                              "--rounds", "1", "--init-adapter", str(path)])
        assert res.exit_code == 2 and why in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "bad" / "run.json").exists()

    run = tmp_path / "run"
    spec = setup.LoraSpec(4, 8.0, ("q", "v"), 0, init_adapter=ad)
    setup.new_run(run, tiny_model, "sha", "sst2", None, None, 2, 1, spec, OptimizerSpec(), StrategySpec())
    saved_layout, saved = read_adapter(run / checkpoint.ADAPTER)
    assert saved_layout == layout and all(np.array_equal(saved[k], trained[k]) for k in trained)
    digest = hashlib.sha256(ad.read_bytes()).hexdigest()
    assert checkpoint.read_config(run).init_adapter == {"path": str(ad), "sha256": digest}
