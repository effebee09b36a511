"""Stages inside one run, and the per-task recipes that fill the options a user
did not pass (the federation runs them end to end in test_head_adapter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fwdllm.aggregator.recipes import RECIPES, apply_recipe, build_stages
from fwdllm.core.layout import HEAD, LoraLayout, PerturbMask
from fwdllm.core.optim import Optimizer, OptimizerSpec, Stage
from fwdllm.core.protocol import Update
from fwdllm.core.replica import Replica

STAGES = (Stage(3, 4, 0.1, 0.0, 0.5), Stage(2, 0, 0.0, 0.01))


def test_each_stage_restarts_the_schedule_at_its_own_rates() -> None:
    spec = OptimizerSpec(lr=0.1, head_lr=3e-3, schedule="cosine", total_rounds=5, stages=STAGES)
    assert [spec.lr_at(i) for i in range(5)] == pytest.approx([0.1, 0.075, 0.025, 0.0, 0.0])
    assert [spec.head_rate(i, spec.lr_at(i)) for i in range(5)] == pytest.approx([0, 0, 0, 0.01, 0.005])
    assert [spec.ema_at(i) for i in range(5)] == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert [spec.stage_start(i) for i in range(5)] == [False, False, False, True, False]
    assert OptimizerSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="add up to 5"):
        OptimizerSpec(lr=0.1, total_rounds=6, stages=STAGES)
    plain = OptimizerSpec(lr=0.1, head_lr=3e-3, schedule="cosine", total_rounds=5)  # unstaged: as before
    assert plain.head_rate(2, plain.lr_at(2)) == plain.lr_at(2) * 3e-3 / 0.1


def _update(r: int, spec: OptimizerSpec, head: np.ndarray) -> Update:
    k = (3, 0)[r > 3]
    return Update(r, r, spec.lr_at(r - 1), "", np.arange(k, dtype=np.uint32) + 17 * r, np.full(k, 0.3),
                  PerturbMask("b").to_dict(), "gaussian", head.astype("<f4").tobytes())


def test_a_stage_starts_from_the_last_ones_average_and_replicas_resume_bit_exact() -> None:
    layout = LoraLayout.for_base({"blk.0.attn_v.weight": (6, 5)}, rank=2, alpha=4.0, targets=["v"])
    layout = LoraLayout(layout.rank, layout.alpha, layout.targets, head=(2, 5), head_ids=(1, 3), n_vocab=9)
    spec = OptimizerSpec(lr=0.1, schedule="cosine", total_rounds=5, stages=STAGES)
    start = {**layout.zeros(), "blk.0.attn_v.weight.lora_a": np.ones((2, 5), np.float32)}
    a = Replica(layout, start, Optimizer(spec), 0)
    head = np.linspace(-1, 1, 10).reshape(2, 5)
    for r in (1, 2, 3):
        a.apply(_update(r, spec, head))
    average = {n: t.copy() for n, t in a.optimizer.averaged(a.tensors).items()}
    assert not np.array_equal(average["blk.0.attn_v.weight.lora_b"], a.tensors["blk.0.attn_v.weight.lora_b"])
    assert np.array_equal(a.tensors[HEAD], start[HEAD])  # head-lr 0 in stage 1: held still
    b = Replica.from_bytes(a.to_bytes(), spec)  # a restart, or a snapshot, right at the boundary
    for rep in (a, b):
        rep.apply(_update(4, spec, head))
    assert a.sha == b.sha
    assert np.array_equal(a.tensors["blk.0.attn_v.weight.lora_b"], average["blk.0.attn_v.weight.lora_b"])
    assert not np.array_equal(a.tensors[HEAD], start[HEAD])  # stage 2: the head alone moves
    assert a.optimizer.averaged(a.tensors) is not a.tensors and not a.optimizer.avg


def _kw(**over: object) -> dict:
    kw = {"task": "sst2", "recipe": "auto", "stages": None, "rounds": None, "eval_every": None, "k": 16, "lr": 0.1,
          "head_lr": 3e-3, "ema": 0.0, "head": False, "batch_size": 8}
    return {**kw, **over}


def test_a_recipe_fills_only_what_the_user_left_out() -> None:
    kw = _kw()
    assert apply_recipe(kw, set(), quick=False) is RECIPES["sst2"]
    stages = build_stages(kw["stages"], kw)
    assert kw["head"] and kw["rounds"] == sum(st.rounds for st in stages) and len(stages) >= 1
    assert kw["eval_every"] == RECIPES["sst2"].eval_every

    kw = _kw(lr=0.02, head=False)  # an explicit --lr beats every stage's, an explicit --no-head the recipe's head
    apply_recipe(kw, {"lr", "head"}, quick=False)
    assert not kw["head"] and all(st.lr == 0.02 for st in build_stages(kw["stages"], kw))

    kw = _kw(rounds=40)  # an explicit --rounds scales the stages
    apply_recipe(kw, {"rounds"}, quick=False)
    assert kw["rounds"] == 40 and sum(st.rounds for st in build_stages(kw["stages"], kw)) == 40

    kw = _kw(rounds=1)  # fewer rounds than stages: the first stage, one round
    apply_recipe(kw, {"rounds"}, quick=False)
    assert [st.rounds for st in build_stages(kw["stages"], kw)] == [1]

    kw = _kw(stages="")  # an explicit --stages '' is one plain stage
    apply_recipe(kw, {"stages"}, quick=False)
    assert build_stages(kw["stages"], kw) == ()

    kw = _kw(recipe="none")
    assert apply_recipe(kw, set(), quick=False) is None and kw["stages"] is None and not kw["head"]
    kw = _kw(recipe="none", stages="3:k=2,2:k=0:head-lr=0.5")  # stages alone set the rounds
    apply_recipe(kw, {"stages"}, quick=False)
    assert kw["rounds"] == 5 and build_stages(kw["stages"], kw) == (Stage(3, 2, 0.1, 3e-3), Stage(2, 0, 0.1, 0.5))
    quick = _kw()
    apply_recipe(quick, set(), quick=True)
    assert quick["rounds"] == 50


def test_the_headline_task_gets_its_sft_schedule_and_no_head() -> None:
    kw = _kw(task="agnews-headline")
    assert apply_recipe(kw, set(), quick=False) is RECIPES["agnews-headline"]
    (stage,) = build_stages(kw["stages"], kw)
    assert not kw["head"] and stage.ema == 0.98 and kw["rounds"] == kw["eval_every"] == stage.rounds
    assert RECIPES["agnews-headline"].head_only is None  # nothing for bench quality to ablate


@pytest.mark.parametrize("args, match", [
    (["--stages", "3:q=1"], "KEY=VALUE"),
    (["--stages", "x:k=1"], "not a number of rounds"),
    (["--stages", "3:k=2,2:k=0", "--no-head"], "a stage with k=0 perturbs nothing"),
    (["--stages", "3:k=2", "--rounds", "4"], "add up to 3 rounds"),
    (["--stages", "3:k=2", "--strategy", "pacing"], "runs with --strategy zo-sgd"),
    (["--recipe", "nope"], "unknown 'nope'"),
])
def test_bad_stages_are_one_line_before_anything_starts(args: list[str], match: str, tmp_path: Path) -> None:
    from fwdllm.aggregator.cli import simulate

    res = CliRunner().invoke(simulate, ["--out", str(tmp_path / "run"), "--recipe", "none", *args])
    assert res.exit_code == 2 and match in res.output, res.output
    assert not (tmp_path / "run").exists()


def test_bench_quality_checks_its_rows_and_task_first(tmp_path: Path) -> None:
    from fwdllm.bench.quality import quality

    for args, match in ((["--methods", "zero-shot,nope"], "unknown ['nope']"),
                        (["--task", "sft"], "needs a classify task")):
        res = CliRunner().invoke(quality, [*args, "--out", str(tmp_path)])
        assert res.exit_code == 2 and match in res.output, res.output
    assert not (tmp_path / "quality-runs").exists()
