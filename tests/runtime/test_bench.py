"""Smoke tests of the ``fwdllm bench`` commands that run in this process on
llama.cpp alone, on the tiny synthetic model (those that need torch or child
processes: tests/system/test_bench_smoke.py).

They check that each bench runs end to end on real llama.cpp, writes its JSON
and PNG, and that the numbers mean what the tables say (e.g. the staged round
IS EdgeSession.perturbed, the fwdllm messages are the encoded contract
messages).  No timing is asserted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from harness import THREADS, TINY_BENCH, bench_result, invoke


def test_every_bench_takes_the_shared_options() -> None:
    """A flag means the same in every bench: each shared option is the one of
    fwdllm.options (same flags, same default, bar the job-size and output
    options' own defaults), --out is a directory defaulting to results/, and
    no bench has a flag of its own named like a shared one, nor a --seeds count."""
    from fwdllm.bench.cli import bench
    from fwdllm.options import OPTIONS

    own_defaults = {"rounds", "clients", "out"}
    shared_flags = {flag: name for name, (decls, _) in OPTIONS.items() for flag in decls if flag.startswith("-")}
    for cmd in bench.commands.values():
        flags = {p.name: p for p in cmd.params}
        assert flags["out"].default == Path("results"), cmd.name
        assert "seeds" not in flags and "out_dir" not in flags, cmd.name
        for p in cmd.params:
            for flag in p.opts:
                name = shared_flags.get(flag)
                if name is None or (cmd.name, flag) == ("fidelity", "--eps-grid"):  # fidelity: a list of eps
                    continue
                decls, attrs = OPTIONS[name]
                assert p.name == name, (cmd.name, flag)
                assert tuple(p.opts) == tuple(d for d in decls if d.startswith("-")), (cmd.name, flag)
                if name not in own_defaults:
                    assert p.default == attrs.get("default"), (cmd.name, flag)
            short = [o for o in p.opts if o.startswith("-") and not o.startswith("--")]
            assert not short, (cmd.name, short)  # long flags only


def test_staged_round_is_edge_session_perturbed(tiny_model: Path) -> None:
    from fwdllm.bench.common import bench_task
    from fwdllm.bench.round import plain_pass, staged_round
    from fwdllm.core.layout import PerturbMask
    from fwdllm.core.lora import layout_for_base
    from fwdllm.reference.torch_ref import random_lora
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import default_data, read_examples

    task = bench_task("sst2", "good,bad")
    examples = read_examples(task, default_data("sst2", "train"), limit=3)
    mask = PerturbMask(parts="both")
    with EdgeSession(tiny_model, task, n_threads=THREADS, max_batch=4) as s:
        layout = layout_for_base(tiny_model, 4, 8.0, ("q", "v"))
        s.set_lora(layout, random_lora(layout, 1))
        ref = s.perturbed(examples, [5, 6, 7], 0.05, mask)
        plus, minus, st = staged_round(s, s.prepare(examples), [5, 6, 7], 0.05, mask)
        base, _ = plain_pass(s, s.prepare(examples))
        assert base == s.evaluate(examples).loss
    np.testing.assert_array_equal(plus, ref.loss_plus)
    np.testing.assert_array_equal(minus, ref.loss_minus)
    assert st.passes == 6 and len(st.first_decode) == 6
    assert st.total() > 0 and min(st.build, st.switch, st.decode, st.loss) > 0


def test_round_bench_smoke(tiny_model: Path, tmp_path: Path) -> None:
    from fwdllm.bench.round import round_cmd

    invoke(round_cmd, ["--model", str(tiny_model), "--k", "2", "--batch-size", "2", "--tokens", "16", "--modes",
                        "default,no-repack", "--out", str(tmp_path), *TINY_BENCH])
    data = bench_result(tmp_path, "round")
    default, no_repack = data["runs"]
    assert default["passes"] == 4 and no_repack["passes"] == 2  # --mode-k 1 for the second mode
    assert default["tokens_per_pass"] == 32
    assert data["ratio"] > 0 and all(r["peak_rss_bytes"] > tiny_model.stat().st_size for r in data["runs"])
    # same model, LoRA and seed 1 under both loading modes: same directional derivative
    assert np.isclose(default["projected"][0], no_repack["projected"][0], rtol=0.05, atol=1e-3)


def test_comm_bench_counts_encoded_messages(tiny_model: Path, tmp_path: Path) -> None:
    from fwdllm.bench.comm import comm, fwdllm_bytes
    from fwdllm.core.gguf_file import read_header

    invoke(comm, ["--model", str(tiny_model), "--k", "16", "--clients", "4", "--out", str(tmp_path)])
    data = bench_result(tmp_path, "comm")
    rows = {r[0]: r for r in next(iter(data["tables"].values()))["rows"]}
    solo = rows["fwdllm, 1 client x 16 seeds"]
    dense = rows["FedAvg-LoRA (dense f32)"]
    assert dense[1] == dense[2] == data["lora_params"] * 4
    assert solo[1] < 1024 and solo[2] < 1024  # the issue's <= 1 KiB per direction at K=16
    # every extra seed costs its uint32 seed and two float64 losses on the way up
    # (20 raw bytes; base64 in the JSON header adds a third)
    extra = fwdllm_bytes(64, 16)["result"] - fwdllm_bytes(16, 16)["result"]
    assert 48 * 20 <= extra <= 48 * 20 * 4 / 3 + 8
    # --head adds its int8 gradient (a float32 scale and a byte an entry per
    # row), raw, once each way, plus the few header bytes that name it and its
    # codec (a run without a head sends no head fields)
    head = rows["fwdllm --head (4 labels, int8), 4 clients x 4 seeds"]
    plain = rows["fwdllm, 4 clients x 4 seeds"]
    n_embd = int(read_header(tiny_model).field("llama.embedding_length"))
    for way in (1, 2):
        assert 0 < head[way] - plain[way] - 4 * (n_embd + 4) < 80


def test_passes_to_counts_a_lucky_evaluation_only_without_smoothing() -> None:
    from fwdllm.bench.convergence import passes_to

    # a curve on a plateau near the target (evaluated every 10 rounds): one evaluation touches 0.81
    c = {"forward_passes": [0, 200, 400, 600, 800, 1000], "accuracy": [0.766, 0.795, 0.787, 0.810, 0.797, 0.790]}
    assert passes_to(c, 0.805) == 600
    assert passes_to(c, 0.805, window=3) is None  # no three evaluations in a row average 0.805
    assert passes_to(c, 0.79, window=3) == 600  # (0.795 + 0.787 + 0.810) / 3
    assert passes_to(c, 0.70, window=3) == 0


@pytest.mark.parametrize("entry", ["zo-sgd:lr", "zo-sgd:bogus=1", "zo-sgd:central=1", "zo-sgd:rounds=3"])
def test_convergence_refuses_bad_strategy_options(entry: str) -> None:
    from fwdllm.bench.convergence import parse_entry
    from fwdllm.core.errors import UserError

    assert parse_entry("pacing:lr=0.2:central:strategy-opt=k_max=8") == (
        "pacing", {"lr": "0.2", "central": None, "strategy-opt": "k_max=8"})
    assert parse_entry("zo-sgd:layers=0:10:lr=0.2") == ("zo-sgd", {"layers": "0:10", "lr": "0.2"})
    with pytest.raises(UserError, match="bad option"):
        parse_entry(entry)


def test_probe_bench_features_are_the_engines_logits_and_the_exact_fit_separates(tiny_model: Path, tmp_path: Path) -> None:
    from fwdllm.bench.common import bench_task
    from fwdllm.bench.probe import probe
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import default_data, read_examples

    invoke(probe, ["--model", str(tiny_model), "--train-sizes", "8,16", "--dev-limit", "12", "--l2-grid", "0",
                    "--rounds", "6", "--zo-lr-grid", "1", "--head-lr-grid", "1e-2", "--ema-grid", "0,0.9", "--repeats", "2",
                    "--template", "Text: {text}\\nLabel:", "--out", str(tmp_path), *TINY_BENCH])
    data = bench_result(tmp_path, "probe")
    assert data["template"] == "Text: {text}\nLabel:"
    head = data["head"]["curves"]["0.01"]
    assert len(head) == 2 and all(len(c) == 6 for c in head) and head[0] != head[1]  # two sampling seeds
    averaged = data["head"]["curves"]["0.01 ema 0.9"]  # same seeds, the average evaluated instead
    assert len(averaged) == 2 and averaged != head
    exact = data["tables"][next(t for t in data["tables"] if t.startswith("exact"))]["rows"]
    assert [r[0] for r in exact] == [8, 16]
    assert all(r[4] == 1.0 for r in exact)  # n < n_embd rows: an unregularised head fits them all
    assert len(data["zo"]["curves"]["1.0"]) == 6 and data["d_head"] == 2 * data["n_embd"]
    # zero-shot through the embedding path (float64 E_lab @ h) is the engine's restricted softmax
    spec = bench_task("sst2", "good,bad", "Text: {text}\nLabel:")  # the features came from this prompt
    with EdgeSession(tiny_model, spec, n_threads=THREADS) as s:
        engine = s.evaluate(read_examples(spec, default_data("sst2", "dev"), limit=12))
    assert abs(data["zero_shot"]["loss"] - engine.loss) < 2e-3  # measured 5e-5: q8 activations vs float64


def test_probe_reads_features_under_a_trained_lora(tiny_model: Path, tmp_path: Path) -> None:
    """--lora: the probe's zero-shot is the engine's with that adapter as the
    run's LoRA (what a run warm-started by --init-adapter begins from); a file
    that is no LoRA adapter is a one-line error before any feature is read."""
    from fwdllm.bench.common import bench_task
    from fwdllm.bench.probe import probe
    from fwdllm.core.lora import layout_for_base, write_lora
    from fwdllm.reference.torch_ref import random_lora
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import default_data, read_examples

    layout = layout_for_base(tiny_model, 4, 8.0, ("q", "v"))
    tensors = random_lora(layout, seed=3, b_std=0.5)
    adapter = write_lora(tmp_path / "trained.gguf", layout, tensors, tiny_model)
    args = ["--model", str(tiny_model), "--train-sizes", "8", "--dev-limit", "12", "--l2-grid", "0", "--rounds", "6",
            "--zo-lr-grid", "1", "--head-lr-grid", "1e-2", "--repeats", "1", *TINY_BENCH]
    invoke(probe, [*args, "--lora", str(adapter), "--out", str(tmp_path / "p")])
    data = bench_result(tmp_path / "p", "probe")
    assert data["lora"] == str(adapter)
    spec = bench_task("sst2", "good,bad", None)
    dev = read_examples(spec, default_data("sst2", "dev"), limit=12)
    with EdgeSession(tiny_model, spec, n_threads=THREADS) as s:
        base = s.evaluate(dev)
        s.set_lora(layout, tensors)
        tuned = s.evaluate(dev)
    assert abs(tuned.loss - base.loss) > 1e-2, (tuned.loss, base.loss)  # the adapter changes the features
    assert abs(data["zero_shot"]["loss"] - tuned.loss) < 2e-3, (data["zero_shot"]["loss"], tuned.loss)

    res = CliRunner().invoke(probe, [*args, "--lora", str(tiny_model), "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--lora: " in res.output and "not a LoRA adapter" in res.output, res.output
    assert not (tmp_path / "bad" / "probe.json").exists()
    res = CliRunner().invoke(probe, [*args, "--ema-grid", "0,1", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "'--ema-grid': values must be in [0, 1)" in res.output, res.output
    res = CliRunner().invoke(probe, [*args, "--head-lr-grid", "1e-2,x", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "'--head-lr-grid': expected comma-separated floats" in res.output, res.output
    assert not (tmp_path / "bad" / "probe.json").exists()
