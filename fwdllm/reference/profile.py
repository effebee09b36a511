"""``fwdllm profile``: which LoRA trainable set does zeroth-order training see best?

For every candidate set (rank, targets, A/B/both, layer range) the profiler
builds the adapter a run would start from, then on the same few batches

* measures K projected gradients on the INT4 GGUF in llama.cpp
  (``EdgeSession.perturbed``, exactly what a client sends) and aggregates them
  into ``G = (1/K) sum p_k v_k`` (:func:`fwdllm.core.directions.combine`), and
* computes the exact gradient ``g`` of the same loss on the same tokens with
  the torch reference (``bench/torch_ref.py``: the GGUF dequantized, autograd).

``cosine(G, g)`` is the quality of one round's update direction; theory for
exact scalars is ``sqrt(K / (K + d + 1))``, so small sets look good, and a set
whose gradient is zero (LoRA A while B is still zero) scores 0.  ``descent =
|g| * cosine`` is the first-order loss decrease per unit step along G: it also
credits a set for how much gradient it holds.  Candidates are ranked by
``--by`` and the best one is written as training options.

Before that, :func:`census` takes the exact gradient of all seven targets in
every layer (torch only, seconds) and reports where it lives, which tells
which targets are worth a candidate at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

from fwdllm.core.directions import combine
from fwdllm.core.errors import UserError
from fwdllm.core.layout import PARTS, TARGETS, PerturbMask
from fwdllm.core.seeds import derive_seed
from fwdllm.options import Command, option, parse_label_words, shared, threads_for


@dataclass(frozen=True)
class Candidate:
    """One trainable set; ``layers`` is a half-open range, None = all layers."""

    rank: int = 8
    targets: tuple[str, ...] = ("q", "v")
    parts: str = "b"
    layers: tuple[int, int] | None = None

    @classmethod
    def parse(cls, text: str) -> "Candidate":
        """``rank=8,targets=q+v,parts=b,layers=15:30`` (every key optional)."""
        kw: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, _, value = item.partition("=")
            try:
                if key == "rank":
                    kw["rank"] = int(value)
                elif key == "targets":
                    kw["targets"] = tuple(t for t in value.split("+") if t)
                elif key == "parts":
                    kw["parts"] = value
                elif key == "layers":
                    a, b = value.split(":")
                    kw["layers"] = (int(a), int(b))
                else:
                    raise ValueError(f"unknown key {key!r}")
            except ValueError as e:
                raise UserError(f"--candidate {text!r}: {e}; expected e.g. rank=8,targets=q+v,parts=b,layers=0:15") from None
        cand = cls(**kw)
        bad = [t for t in cand.targets if t not in TARGETS]
        if bad or not cand.targets or cand.parts not in PARTS or cand.rank < 1:
            raise UserError(f"--candidate {text!r}: targets from {','.join(TARGETS)}, parts from {PARTS}, rank >= 1")
        return cand

    @property
    def label(self) -> str:
        layers = "all" if self.layers is None else f"{self.layers[0]}:{self.layers[1]}"
        return f"r{self.rank} {'+'.join(self.targets)} {self.parts} layers={layers}"


def default_candidates(n_layers: int) -> list[Candidate]:
    """The grid the issue asks about: rank, targets, A/B/both, layer ranges."""
    half = n_layers // 2
    return [
        Candidate(),
        Candidate(parts="both"),
        Candidate(rank=4),
        Candidate(rank=16),
        Candidate(targets=("v",)),
        Candidate(targets=("q", "k", "v", "o")),
        Candidate(targets=("gate", "up", "down")),
        Candidate(layers=(0, half)),
        Candidate(layers=(half, n_layers)),
    ]


@dataclass(frozen=True)
class Measured:
    candidate: Candidate
    dim: int  # perturbed entries
    loss: float
    grad_norm: float  # |g| over the perturbed entries (mean over batches)
    cosine: float  # cos(G_K from llama.cpp, exact g) (mean over batches)
    cosine_exact_scalars: float  # the same seeds with torch's exact g.v: sampling error only
    cosine_theory: float  # sqrt(K/(K+d+1)) for exact scalars
    descent: float  # |g| * cosine

    def row(self) -> list[Any]:
        return [self.candidate.label, self.dim, round(self.grad_norm, 6), round(self.cosine, 4),
                round(self.cosine_exact_scalars, 4), round(self.cosine_theory, 4), round(self.descent, 6)]


def _cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray], names: list[str]) -> float:
    x = np.concatenate([a[n].ravel().astype(np.float64) for n in names])
    y = np.concatenate([b[n].ravel().astype(np.float64) for n in names])
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / den if den > 0 else 0.0


def measure(session, ref, cand: Candidate, batches: Sequence[list], k: int, eps: float,  # noqa: ANN001
            one_sided: bool, state: str, seed: int) -> Measured:
    """Score one candidate on ``batches`` (see the module docstring)."""
    from fwdllm.core.directions import direction
    from fwdllm.core.lora import init_lora
    from fwdllm.reference.torch_ref import directional, random_lora

    layers = range(*cand.layers) if cand.layers else None
    try:
        layout, tensors = init_lora(session.model_path, cand.rank, 2.0 * cand.rank, cand.targets, seed, layers)
    except ValueError as e:
        raise UserError(f"candidate {cand.label}: {e}") from None
    if state == "random":
        tensors = random_lora(layout, seed)
    mask = PerturbMask(parts=cand.parts)
    names = mask.names(layout)
    dim = sum(int(np.prod(layout.shapes()[n])) for n in names)
    session.set_lora(layout, tensors)
    losses, norms, cosines, exact_cosines = [], [], [], []
    for i, batch in enumerate(batches):
        prepared = session.prepare(batch)
        loss, grads = ref.loss_and_grad(layout, session.tensors, prepared.seqs, prepared.targets,
                                        session.task.kind, session.label_ids)
        seeds = [derive_seed(seed, "profile", i, j) for j in range(k)]
        p = session.perturbed(batch, seeds, eps, mask, one_sided=one_sided).projected
        estimate = combine(seeds, p / k, layout, mask)
        exact = np.array([directional(grads, direction(s, layout, mask)) for s in seeds])
        exact_cosines.append(_cosine(combine(seeds, exact / k, layout, mask), grads, names))
        losses.append(loss)
        norms.append(math.sqrt(sum(float(np.sum(grads[n].astype(np.float64) ** 2)) for n in names)))
        cosines.append(_cosine(estimate, grads, names))
    g, c = float(np.mean(norms)), float(np.mean(cosines))
    return Measured(cand, dim, float(np.mean(losses)), g, c, float(np.mean(exact_cosines)),
                    math.sqrt(k / (k + dim + 1)), g * c)


def census(session, ref, rank: int, parts: str, batches: Sequence[list], seed: int) -> list[dict[str, Any]]:  # noqa: ANN001
    """Exact gradient of every (target, layer) at the fresh init, torch only.

    One backward pass per batch covers all seven targets, so this costs
    seconds where scoring a candidate through llama.cpp costs minutes.  Each
    row has ``sq = |mean over batches of dL/dtheta|^2`` and ``d``; what a ZO
    step gains per unit of noise scales with the density ``sq / d``
    (``cos(G, g) ~ sqrt(K/d)`` times ``|g|``), which is why the census ranks
    targets by it.
    """
    from fwdllm.core.lora import init_lora

    layout, tensors = init_lora(session.model_path, rank, 2.0 * rank, TARGETS, seed)
    names = PerturbMask(parts=parts).names(layout)
    mean: dict[str, np.ndarray] = {}
    for batch in batches:  # the session only tokenizes: no adapter goes into llama.cpp
        prepared = session.prepare(batch)
        _, grads = ref.loss_and_grad(layout, tensors, prepared.seqs, prepared.targets,
                                     session.task.kind, session.label_ids)
        for n in names:
            mean[n] = mean.get(n, 0.0) + grads[n].astype(np.float64) / len(batches)
    rows = []
    for t in layout.targets:
        own = [n for n in (t.a_name, t.b_name) if n in mean]
        rows.append({"target": t.target, "layer": t.layer, "d": sum(int(mean[n].size) for n in own),
                     "sq": sum(float(np.sum(mean[n] ** 2)) for n in own)})
    return rows


def census_by_target(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target: share of the total squared gradient, dimensions, density
    relative to the whole adapter (1 = average), densest first."""
    total_sq = sum(r["sq"] for r in rows) or 1.0
    total_d = sum(r["d"] for r in rows)
    out = []
    for target in dict.fromkeys(r["target"] for r in rows):
        sq = sum(r["sq"] for r in rows if r["target"] == target)
        d = sum(r["d"] for r in rows if r["target"] == target)
        out.append({"target": target, "share": sq / total_sq, "d": d,
                    "density": (sq / total_sq) / (d / total_d),
                    "layer_share": [r["sq"] / sq if sq else 0.0 for r in rows if r["target"] == target]})
    return sorted(out, key=lambda r: -r["density"])


def recommendation(best: Candidate) -> dict[str, Any]:
    """The winner as ``simulate``/``serve`` training options."""
    return {"rank": best.rank, "lora_alpha": 2.0 * best.rank, "targets": ",".join(best.targets),
            "parts": best.parts, "layers": f"{best.layers[0]}:{best.layers[1]}" if best.layers else None}


@click.command("profile", cls=Command)
@shared("model", "task")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Training file to draw batches from (default: the task's train split).")
@shared("label_words")
@click.option("--candidate", "candidates", multiple=True, metavar="SPEC",
              help="A trainable set, e.g. rank=8,targets=q+v,parts=b,layers=0:15 (repeatable; default: a grid).")
@shared("k", "eps")
@click.option("--n-batches", type=click.IntRange(1), default=2, show_default=True, help="Batches to average over.")
@shared("batch_size", "one_sided")
@click.option("--state", type=click.Choice(["init", "random"]), default="init", show_default=True,
              help="Adapter to profile at: a fresh init (B = 0) or a random non-zero B (mid-training-like).")
@click.option("--by", type=click.Choice(["cosine", "descent"]), default="cosine", show_default=True,
              help="Ranking: cos(ZO estimate, exact gradient), or |g| * cos.")
@shared("threads", "seed")
@option("out", default=Path("."), help="Directory for profile.json: the census, the ranking and the recommended "
                                       "training options.")
def profile(model: str, task: str, data: Path | None, label_words: str | None, candidates: tuple[str, ...],
            k: int, eps: float, n_batches: int, batch_size: int, one_sided: bool, state: str, by: str,
            threads: int | None, seed: int, out: Path) -> None:
    """Rank LoRA trainable sets by how well K INT4 perturbations estimate their gradient.

    Needs the [torch] extra (exact gradients). First prints a gradient census
    (seconds: torch only): each target's share of the exact gradient and its
    density, the share per share of dimensions. Writes OUT/profile.json with
    the census, every candidate's numbers and "recommended" training options.

    \b
    Examples:
      fwdllm profile --model smollm2-135m --task sst2
      fwdllm profile --task agnews --candidate rank=8,targets=q+v --candidate rank=4,targets=v --by descent
    """
    from tqdm import tqdm

    from fwdllm.core.batches import sample_batch
    from fwdllm.core.lora import open_base
    from fwdllm.reference.torch_ref import TorchRef
    from fwdllm.runtime.log import quiet_llama
    from fwdllm.runtime.models import resolve_model
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import default_data, load_task, read_examples

    quiet_llama()
    model_path = resolve_model(model)
    threads = threads_for(threads)
    spec = load_task(task, label_words=parse_label_words(label_words))
    examples = read_examples(spec, data or default_data(spec.name, "train"))
    picked = [sample_batch(examples, batch_size, derive_seed(seed, "profile-batch", i)) for i in range(n_batches)]
    n_layers = 1 + max(int(n.split(".")[1]) for n in open_base(model_path).shapes if n.startswith("blk."))
    cands = [Candidate.parse(c) for c in candidates] or default_candidates(n_layers)
    with EdgeSession(model_path, spec, n_threads=threads, max_batch=batch_size) as session:
        ref = TorchRef(session.model_path, n_threads=threads)
        targets = census_by_target(census(session, ref, cands[0].rank, cands[0].parts, picked, seed))
        results = [measure(session, ref, c, picked, k, eps, one_sided, state, seed)
                   for c in tqdm(cands, desc="profiling", unit="set")]
    click.echo(f"gradient census (exact, fresh init, r{cands[0].rank} {cands[0].parts}): density = share of |g|^2 "
               "per share of dimensions")
    for t in targets:
        click.echo(f"  {t['target']:>5}  share {t['share']:6.3f}  d {t['d']:>8}  density {t['density']:6.2f}")
    results.sort(key=lambda m: -(m.cosine if by == "cosine" else m.descent))
    head = ["set", "d", "|g|", "cos(G,g)", "exact p", "theory", "|g|*cos"]
    click.echo("  ".join(f"{h:>12}" for h in head))
    for m in results:
        click.echo("  ".join(f"{str(v):>12}" for v in m.row()))
    report = {
        "model": str(model_path), "task": spec.name, "k": k, "eps": eps, "one_sided": one_sided, "state": state,
        "n_batches": n_batches, "batch_size": batch_size, "ranked_by": by,
        "census": targets,
        "candidates": [{**asdict(m), "candidate": asdict(m.candidate), "label": m.candidate.label} for m in results],
        "recommended": recommendation(results[0].candidate),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    click.echo(f"recommended: {results[0].candidate.label}  -> {out / 'profile.json'}")
