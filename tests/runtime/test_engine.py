"""edge_client on a real (tiny, random) llama GGUF: tasks, batched decode,
perturbation adapters, and the eval/score command lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from harness import THREADS

from fwdllm.core.adapter_io import base_shapes, write_adapter
from fwdllm.core.batches import sample_batch, stratum_sizes
from fwdllm.core.directions import direction
from fwdllm.core.errors import UserError
from fwdllm.core.layout import LoraLayout, PerturbMask
from fwdllm.edge_client.cli import client, eval_cmd
from fwdllm.runtime.engine import Engine, Seq
from fwdllm.runtime.session import EdgeSession
from fwdllm.runtime.tasks import SST2_DEV_ROWS, Example, default_data, load_task, read_examples

ROWS = [
    ("1", "a fun and moving film"),
    ("0", "boring and bad"),
    ("1", "the best movie of the year"),
    ("0", "I hate this story"),
    ("1", "great play , good people"),
    ("0", "the worst film"),
]


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A custom TOML classification task with a tsv file (the tiny model's
    SPM vocab makes "negative"/"positive" start with different tokens)."""
    d = tmp_path_factory.mktemp("task")
    (d / "data.tsv").write_text("stars\treview\n" + "".join(f"{lab}\t{t}\n" for lab, t in ROWS))
    (d / "task.toml").write_text(
        'name = "mini"\nformat = "tsv"\ntemplate = "Review: {text}\\nSentiment:"\n'
        'label_words = ["negative", "positive"]\nlabels = ["0", "1"]\n'
        'text_columns = ["review"]\nlabel_column = "stars"\ndev = "data.tsv"\n'
    )
    return d / "task.toml"


@pytest.fixture(scope="module")
def session(tiny_model: Path, tiny_task: Path):
    s = EdgeSession(tiny_model, load_task(str(tiny_task)), n_threads=THREADS, max_batch=4)
    yield s
    s.close()


def _lora(model: Path, rank: int = 4) -> tuple[LoraLayout, dict[str, np.ndarray]]:
    from fwdllm.reference.torch_ref import random_lora

    layout = LoraLayout.for_base(base_shapes(model), rank=rank, alpha=2 * rank, targets=["q", "k", "v"])
    return layout, random_lora(layout, seed=1, b_std=0.05)


# ----------------------------------------------------------------- tasks


def test_presets_and_sst2_split(data_dir):
    from fwdllm.runtime.tasks import sst2_splits, whole_sentences

    assert whole_sentences(["a b", "a b c", "b c", "x", "x", "c a", "b"]) == [1, 3, 4, 5]
    files = sst2_splits()
    lines = {k: p.read_text().splitlines()[1:] for k, p in files.items()}
    total = (data_dir / "sst2" / "train.tsv").read_text().splitlines()[1:]
    dev = read_examples(load_task("sst2"), default_data("sst2", "dev"))
    assert len(dev) == len(lines["dev-phrases"]) == SST2_DEV_ROWS
    assert set(lines["dev"]) <= set(total) and set(lines["dev"]) <= set(whole_sentences_of(total))
    # no dev sentence is trained on, whole or in part, and the phrase split stays out of train too
    runs = {" ".join(w[a:b]) for ln in lines["dev"] for w in [ln.split("\t")[1].split()]
            for a in range(len(w)) for b in range(a + 1, len(w) + 1)}
    assert not any(ln.split("\t")[1] in runs for ln in lines["train"])
    assert not set(lines["dev-phrases"]) & set(lines["train"])
    assert set(lines["tune-val"]) <= set(lines["train"]) and set(lines["tune-train"]) < set(lines["train"])
    assert not set(lines["tune-val"]) & set(lines["tune-train"])
    assert default_data("sst2", "train") == files["train"]
    plain = read_examples(load_task("sst2"), default_data("sst2", "dev"))
    for other in ("sst2-2shot", "sst2-8shot"):  # the same carved split, the same prompt after demonstrations
        demo = read_examples(load_task(other), default_data(other, "dev"))
        assert [e.label for e in demo] == [e.label for e in plain]
        assert all(t.prompt.endswith(d.prompt) and len(t.prompt) > len(d.prompt) for t, d in zip(demo, plain))
    ag = read_examples(load_task("agnews"), default_data("agnews", "dev"), limit=5)
    assert len(ag) == 5 and all(0 <= e.label < 4 for e in ag) and ag[0].line == 2
    with pytest.raises(UserError, match="no dev-phrases split"):
        default_data("agnews", "dev-phrases")


def whole_sentences_of(rows: list[str]) -> list[str]:
    from fwdllm.runtime.tasks import whole_sentences

    return [rows[i] for i in whole_sentences([r.split("\t")[1] for r in rows])]


def test_bad_rows_reported_with_line_numbers(tmp_path: Path, capsys):
    f = tmp_path / "bad.tsv"
    f.write_text("label\tsentence\n1\tgood\n7\tunknown label\n0\t   \n1\t" + "x" * 5000 + "\n0\tfine\n")
    ex = read_examples(load_task("sst2"), f)
    assert [e.line for e in ex] == [2, 6]
    err = capsys.readouterr().err
    for line, why in ((3, "unknown label '7'"), (4, "empty text"), (5, "too long")):
        assert f"{f}:{line}: bad row: {why}" in err
    with pytest.raises(UserError, match=r"bad\.tsv:3: bad row: unknown label"):
        read_examples(load_task("sst2"), f, strict=True)


def test_sft_loss_is_the_completion_cross_entropy_of_llama_cpp_logits(tiny_model: Path) -> None:
    """An sft row's loss is the mean cross-entropy of its completion tokens
    under llama-cpp-python's own logits (``logits_all``), taken here in one array."""
    import llama_cpp

    ex = Example(prompt="Review: a fun and moving film\nSentiment:", completion=" great fun, and moving too")
    with EdgeSession(tiny_model, load_task("sft"), n_threads=THREADS) as session:
        got = session.evaluate([ex]).loss
        prompt = session.engine.tokenize(ex.prompt, bos=True)
        comp = session.engine.tokenize(ex.completion, bos=False)
    llm = llama_cpp.Llama(model_path=str(tiny_model), n_ctx=256, n_threads=THREADS, logits_all=True, verbose=False)
    llm.eval(prompt + comp)
    z = np.asarray(llm.scores[len(prompt) - 1: len(prompt) + len(comp) - 1], dtype=np.float64)
    lse = np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
    want = float(np.mean(lse - z[np.arange(len(comp)), comp]))
    assert len(comp) > 2 and np.isclose(got, want, rtol=1e-4)


def test_custom_specs_overrides_and_sft(tmp_path: Path, capsys):
    (tmp_path / "d.csv").write_text("y,head,body\nno,Hi,there\nyes,,only body\n")
    (tmp_path / "t.json").write_text(json.dumps({
        "template": "{head} / {body}:", "label_words": [" A", " B"], "labels": ["no", "yes"],
        "text_columns": ["head", "body"], "label_column": "y"}))
    ex = read_examples(load_task(str(tmp_path / "t.json")), tmp_path / "d.csv")
    assert [(e.prompt, e.label) for e in ex] == [("Hi / there:", 0), (" / only body:", 1)]
    (tmp_path / "e.csv").write_text("yy,txt\nyes,hello\n")
    task = load_task(str(tmp_path / "t.json"), text_columns="txt", label_column="yy", template="{text}")
    assert read_examples(task, tmp_path / "e.csv")[0].prompt == "hello"
    (tmp_path / "s.jsonl").write_text('{"prompt": "Q: 2+2?", "completion": " 4"}\n\n[1]\n{"prompt": "x"}\n')
    sft = read_examples(load_task("sft"), tmp_path / "s.jsonl")
    assert len(sft) == 1 and sft[0].completion == " 4"
    assert "s.jsonl:3: bad row: not a JSON object" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown task override"):
        load_task(str(tmp_path / "t.json"), nonsense=1)
    (tmp_path / "u.json").write_text('{"labelwords": []}')
    with pytest.raises(UserError, match="unknown field"):
        load_task(str(tmp_path / "u.json"))
    with pytest.raises(UserError, match="not a preset"):
        load_task("no-such-task")


def test_sample_batch_is_deterministic_and_distinct():
    items = list(range(100))
    a = sample_batch(items, 10, batch_seed=5)
    assert a == sample_batch(items, 10, batch_seed=5) and len(set(a)) == 10
    assert a != sample_batch(items, 10, batch_seed=6)
    assert a == [46, 70, 4, 25, 67, 43, 90, 33, 98, 54]  # pinned: devices must agree
    assert sorted(sample_batch(items[:3], 10, 1)) == [0, 1, 2]


def test_stratified_batches_keep_each_labels_share_and_are_unbiased():
    # 13 rows of label 0, 7 of label 1, 5 of label 2: a batch of 8 holds each
    # label's share rounded down or up, never a lucky all-of-one-label draw
    labels = [0] * 13 + [1] * 7 + [2] * 5
    rows = [Example(prompt=f"r{i}", label=lab) for i, lab in enumerate(labels)]
    quota = [8 * 13 / 25, 8 * 7 / 25, 8 * 5 / 25]
    for seed in range(200):
        batch = sample_batch(rows, 8, seed, stratify=True)
        assert len(batch) == 8 and len({e.prompt for e in batch}) == 8
        counts = [sum(e.label == c for e in batch) for c in range(3)]
        assert all(int(q) <= n <= int(q) + 1 for n, q in zip(counts, quota)), counts
    # exactly unbiased: averaged over every offset, each stratum gets k n_c / n slots
    sizes = [13, 7, 5]
    per_offset = np.array([stratum_sizes(8, sizes, off) for off in range(25)])
    assert (per_offset.sum(axis=1) == 8).all()
    assert np.allclose(per_offset.mean(axis=0), quota, rtol=0, atol=1e-12)
    # deterministic and pinned (devices must agree), and not the uniform draw
    picked = [e.prompt for e in sample_batch(rows, 8, 5, stratify=True)]
    assert picked == [e.prompt for e in sample_batch(rows, 8, 5, stratify=True)]
    assert picked == ["r7", "r1", "r3", "r11", "r16", "r19", "r13", "r21"]
    assert picked != [e.prompt for e in sample_batch(rows, 8, 5)]
    # nothing to stratify: unlabelled rows, a single label, or a batch that takes everything
    sft = [Example(prompt=f"p{i}", completion="c") for i in range(10)]
    assert sample_batch(sft, 4, 3, stratify=True) == sample_batch(sft, 4, 3)
    assert sorted(e.prompt for e in sample_batch(rows[:5], 8, 1, stratify=True)) == sorted(e.prompt for e in rows[:5])


# ---------------------------------------------------------------- engine


def test_batched_decode_equals_one_by_one(tiny_model: Path):
    eng = Engine(tiny_model, n_threads=THREADS, n_seq_max=4, n_ctx_seq=64)
    try:
        seqs = [Seq(tuple(eng.tokenize(t, bos=True)), ()) for _, t in ROWS[:4]]
        seqs = [Seq(s.tokens, (0, len(s.tokens) - 1)) for s in seqs]
        together = eng.decode(seqs)
        for s, logits in zip(seqs, together):
            alone = eng.decode([s])[0]
            assert logits.shape == (2, eng.n_vocab)
            np.testing.assert_allclose(logits, alone, rtol=0, atol=1e-4)
        assert eng.pack(seqs * 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    finally:
        eng.close()


def test_evaluate_and_too_long_rows(session: EdgeSession, tiny_task: Path, tiny_model: Path, capsys):
    ex = read_examples(session.task, tiny_task.parent / "data.tsv")
    r = session.evaluate(ex)
    assert r.n == len(ROWS) and 0 <= r.accuracy <= 1 and r.loss > 0 and r.n_tokens > r.n
    with EdgeSession(tiny_model, session.task, n_threads=THREADS, max_batch=4, n_ctx=28) as short:
        r2 = short.evaluate(ex)
        assert r2.n < len(ROWS)
        assert "data.tsv:2: bad row:" in capsys.readouterr().err
    with EdgeSession(tiny_model, session.task, n_threads=THREADS, n_ctx=8, strict=True) as strict:
        with pytest.raises(UserError, match="tokens > context"):
            strict.evaluate(ex)


def test_worker_scores_the_batch_its_task_asks_for(session: EdgeSession, tiny_task: Path, tiny_model: Path):
    """``Task.stratify`` reaches the draw: the worker's base loss is the loss
    of ``sample_batch(..., stratify=task.stratify)``, and for this seed the
    two draws hold different rows (one label twice, or one of each)."""
    from fwdllm.core.protocol import Task
    from fwdllm.edge_client.worker import Scorer

    ex = read_examples(session.task, tiny_task.parent / "data.tsv")
    layout, tensors = _lora(tiny_model)
    scorer = Scorer(session, ex, session.task.name)
    seed = next(s for s in range(100) if len({e.label for e in sample_batch(ex, 2, s)}) == 1)
    for stratify in (False, True):
        batch = sample_batch(ex, 2, seed, stratify=stratify)
        assert len({e.label for e in batch}) == (2 if stratify else 1)
        task = Task(round=1, version=0, adapter_sha256="0" * 64, seeds=np.array([3], dtype=np.uint32),
                    mask=PerturbMask("b").to_dict(), eps=1e-2, batch_size=2, batch_seed=seed, one_sided=True,
                    stratify=stratify)
        got = scorer.score(layout, tensors, task).loss_minus[0]
        session.set_lora(layout, tensors)
        assert got == session.perturbed(batch, [3], 1e-2, PerturbMask("b"), one_sided=True).loss_minus[0]


@pytest.mark.parametrize("parts", ["a", "b", "both"])
def test_shifted_adapters_are_the_moved_lora(session: EdgeSession, tiny_task: Path, tiny_model: Path, parts):
    """L(+-eps) from ``perturbed`` must be the loss of an adapter file holding
    ``tensors +- eps*direction`` written independently (gguf-py writer, not the
    engine's byte image): checks the shift, the alpha/rank scale and the image.
    Same bits in, same deterministic decode, so the match is exact.  Every
    temp file and every per-seed adapter must be gone afterwards.
    """
    ex = read_examples(session.task, tiny_task.parent / "data.tsv")
    layout, tensors = _lora(tiny_model)
    session.set_lora(layout, tensors)
    eps, mask, seeds = 0.5, PerturbMask(parts), [11, 12]
    res = session.perturbed(ex, seeds, eps, mask)
    assert np.all(np.abs(res.loss_plus - res.loss_minus) > 0.01)
    for k, seed in enumerate(seeds):
        for sign, want in ((1, res.loss_plus[k]), (-1, res.loss_minus[k])):
            moved = dict(tensors)
            for n, v in direction(seed, layout, mask).items():
                moved[n] = tensors[n] + sign * eps * v
            path = write_adapter(Path("/dev/shm") / f"test-moved-{parts}.gguf", layout, moved)
            ad = session.engine.load_adapter(path)
            path.unlink()
            got = session._run(session.prepare(ex), [(ad, 1.0)])[0]
            session.engine.set_adapters([])
            session.engine.free_adapter(ad)
            assert got == want
    session.set_lora(layout, tensors)
    assert len(session.engine._adapters) == 1  # only the main adapter stays loaded
    assert not list(Path("/dev/shm").glob(f"fwdllm-lora-{os.getpid()}-*"))


def test_one_sided_and_central(session: EdgeSession, tiny_task: Path, tiny_model: Path):
    ex = read_examples(session.task, tiny_task.parent / "data.tsv")
    layout, tensors = _lora(tiny_model)
    session.set_lora(layout, tensors)
    base = session.evaluate(ex).loss
    one = session.perturbed(ex, [1, 2, 3], 0.01, PerturbMask("both"), one_sided=True)
    assert one.seeds.dtype == np.uint32 and np.all(one.loss_minus == base)
    np.testing.assert_allclose(one.projected, (one.loss_plus - base) / 0.01)
    two = session.perturbed(ex, [1, 2, 3], 0.01, PerturbMask("both"), dist="rademacher")
    np.testing.assert_allclose(two.projected, (two.loss_plus - two.loss_minus) / 0.02)
    assert two.n_tokens == 6 * session.prepare(ex).n_tokens
    session.set_lora(None, None)
    with pytest.raises(UserError, match="needs a LoRA"):
        session.perturbed(ex, [1], 0.01, PerturbMask("b"))
    assert session.tokens_per_second() > 0


# ------------------------------------------------------------------- CLI


def test_eval_cli_json(tiny_model: Path, tiny_task: Path):
    res = CliRunner().invoke(
        eval_cmd, ["--model", str(tiny_model), "--task", str(tiny_task), "--threads", str(THREADS), "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n"] == len(ROWS) and out["task"] == "mini" and 0 <= out["accuracy"] <= 1


def test_eval_cli_errors(tiny_model: Path, tiny_task: Path, tmp_path: Path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("stars\treview\n1\tok\n9\tnope\n")
    args = ["--model", str(tiny_model), "--task", str(tiny_task), "--data", str(bad), "--strict"]
    res = CliRunner().invoke(eval_cmd, args)
    assert res.exit_code == 2 and "bad.tsv:3: bad row: unknown label" in res.output
    res = CliRunner().invoke(eval_cmd, ["--model", str(tmp_path / "none.gguf"), "--task", str(tiny_task)])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_client_score_cli(tiny_model: Path, tiny_task: Path, tmp_path: Path):
    layout, tensors = _lora(tiny_model)
    lora = write_adapter(tmp_path / "a.gguf", layout, tensors)
    args = ["score", "--model", str(tiny_model), "--task", str(tiny_task), "--lora", str(lora),
            "--seeds", "1,2,3", "--eps", "0.01", "--parts", "both", "--central", "--threads", str(THREADS), "--json"]
    res = CliRunner().invoke(client, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["seeds"] == [1, 2, 3] and len(out["projected"]) == 3
    np.testing.assert_allclose(out["projected"], (np.array(out["loss_plus"]) - out["loss_minus"]) / 0.02)
    res = CliRunner().invoke(client, args[:-3] + ["--seeds", "1,x"])
    assert res.exit_code == 2 and "comma-separated" in res.output
    assert "run" in client.commands
