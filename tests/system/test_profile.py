"""`fwdllm profile` on the tiny GGUF: real llama.cpp perturbations vs torch autograd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from harness import THREADS

from fwdllm.core.errors import UserError
from fwdllm.reference.profile import Candidate, profile

pytestmark = pytest.mark.timeout(60)


def test_candidate_parsing() -> None:
    c = Candidate.parse("rank=4,targets=q+k+v,parts=both,layers=2:6")
    assert c == Candidate(rank=4, targets=("q", "k", "v"), parts="both", layers=(2, 6))
    assert Candidate.parse("") == Candidate()
    for bad in ("rank=x", "targets=zz", "parts=c", "layers=3", "colour=red"):
        with pytest.raises(UserError):
            Candidate.parse(bad)


def test_profile_ranks_sets_and_writes_the_recommendation(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    args = ["--model", str(tiny_model), "--label-words", "good,bad", "--k", "4", "--n-batches", "1",
            "--batch-size", "2", "--threads", str(THREADS), "--out", str(tmp_path),
            "--candidate", "rank=2,targets=v,layers=2:4", "--candidate", "rank=4,targets=v,parts=a"]
    r = CliRunner().invoke(profile, args)
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    by_label = {c["label"]: c for c in data["candidates"]}
    b_only, a_only = by_label["r2 v b layers=2:4"], by_label["r4 v a layers=all"]
    assert b_only["dim"] == 2 * 2 * 128  # 2 layers of v's B: (n_out=128, r=2) each
    assert b_only["grad_norm"] > 0 and 0 < b_only["cosine"] <= 1 and 0 < b_only["cosine_exact_scalars"] <= 1
    # A's gradient is exactly zero while B is zero (fresh init): nothing to see
    assert a_only["grad_norm"] == 0 and a_only["cosine"] == 0
    assert data["recommended"] == {"rank": 2, "lora_alpha": 4.0, "targets": "v", "parts": "b", "layers": "2:4"}
    assert "recommended: r2 v b layers=2:4" in r.output
    census = {t["target"]: t for t in data["census"]}
    assert set(census) == {"q", "k", "v", "o", "gate", "up", "down"} and "gradient census" in r.output
    assert sum(t["share"] for t in census.values()) == pytest.approx(1.0)
    assert census["v"]["d"] == 4 * 128 * 2 and sum(census["v"]["layer_share"]) == pytest.approx(1.0)
    assert [t["density"] for t in data["census"]] == sorted((t["density"] for t in data["census"]), reverse=True)


def test_census_sees_no_gradient_in_a_while_b_is_zero(tiny_model: Path, torch_ref) -> None:  # noqa: ANN001
    """dL/dA = 0 at B = 0 for every target; B carries all of it. A census
    that mixed up the factors or the layers would fail one of the two."""
    from fwdllm.reference.profile import census
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import Example, load_task

    spec = load_task("sst2", label_words=("good", "bad"))
    batch = [Example("a fine film", 0), Example("dull and long", 1)]
    with EdgeSession(tiny_model, spec, n_threads=THREADS, max_batch=2) as session:
        ref = torch_ref(tiny_model)
        a_rows = census(session, ref, 2, "a", [batch], seed=0)
        b_rows = census(session, ref, 2, "b", [batch], seed=0)
    assert len(a_rows) == len(b_rows) == 7 * 4
    assert all(r["sq"] == 0.0 for r in a_rows)
    assert all(r["sq"] > 0.0 for r in b_rows)


def test_profile_rejects_a_bad_candidate(tiny_model: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(profile, ["--model", str(tiny_model), "--candidate", "targets=zz", "--out",
                                     str(tmp_path / "p")])
    assert r.exit_code == 2 and "targets" in r.output
