"""``fwdllm bench fidelity``: how well K seeds' scalars reconstruct the gradient.

The aggregated estimate ``G_K = (1/K) sum_k p_k v_k`` (``fwdllm.core.directions.combine``
of the seeds and the projections ``p_k`` that ``EdgeSession.perturbed`` measured
on the INT4 GGUF in llama.cpp) is compared by cosine with the exact gradient of
the same loss on the same tokens (``fwdllm/reference/torch_ref.py``: the GGUF dequantized
in torch, autograd).  The same seeds are reused as K grows (prefixes of one
list), so the curve is one estimator getting more samples.

Two references separate the two error sources:

* ``exact scalars``: ``G_K`` built from torch's exact ``g . v_k`` - the pure
  sampling error of a K-direction estimate in ``d`` dimensions;
* theory: for i.i.d. unit-variance directions ``E|G_K|^2 = |g|^2 (K+d+1)/K``
  and ``E[G_K . g] = |g|^2``, hence ``cos ~ sqrt(K / (K + d + 1))``
  (``~ sqrt(K/d)`` for ``K << d``); this is the curve plotted.

The gap between llama.cpp's curve and the exact-scalar curve is what INT4
arithmetic and the finite difference cost.
"""

from __future__ import annotations

import math
from pathlib import Path

import click
import numpy as np

from fwdllm.bench.common import RESULTS, bench_task, figure, number_list, out_help, save_figure, write_result
from fwdllm.options import Command, option, parse_targets, shared, threads_for


def cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray], names: list[str]) -> float:
    x = np.concatenate([a[n].ravel().astype(np.float64) for n in names])
    y = np.concatenate([b[n].ravel().astype(np.float64) for n in names])
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-300))


def k_grid(k_max: int) -> list[int]:
    """1, 2, 4, ... up to k_max (k_max itself included)."""
    ks = [2**i for i in range(int(math.log2(k_max)) + 1)]
    return ks if ks[-1] == k_max else ks + [k_max]


@click.command("fidelity", cls=Command)
@shared("model", "task", "label_words")
@click.option("--k-max", type=click.IntRange(1), default=256, show_default=True,
              help="Largest K (seeds 1..K, prefixes reused).")
@click.option("--k-llama", type=click.IntRange(1), default=None,
              help="Score only the first N seeds in llama.cpp (default: all); larger K use exact scalars only.")
@option("batch_size")
@click.option("--eps-grid", "eps_list", default="3e-2", show_default=True, callback=number_list(float, positive=True),
              metavar="EPS,...", help="Perturbation sizes, comma-separated, in LoRA tensor units: the first draws "
                                      "the K curve; each gets a per-seed sign/Pearson row.")
@shared("rank", "targets", "parts", "dist", "threads")
@option("out", default=RESULTS, help=out_help("fidelity"))
def fidelity(model, task, label_words, k_max, k_llama, batch_size, eps_list, rank, targets, parts, dist,  # noqa: ANN001
             threads, out: Path) -> None:
    """Cosine(aggregated ZO gradient on INT4 llama.cpp, exact torch gradient) vs K.

    \b
    Examples:
      fwdllm bench fidelity --model smollm2-135m --k-max 256
      fwdllm bench fidelity --model smollm2-135m --k-max 32 --batch-size 32 --eps 3e-2,1e-3,1e-2,1e-1
    """
    from tqdm import tqdm

    from fwdllm.core.directions import combine, direction
    from fwdllm.core.layout import PerturbMask
    from fwdllm.core.lora import layout_for_base
    from fwdllm.reference.torch_ref import TorchRef, directional, random_lora
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import default_data, read_examples

    eps = eps_list[0]
    k_llama = min(k_llama or k_max, k_max)
    lora_targets = parse_targets(targets)
    spec = bench_task(task, label_words, kinds=None)
    examples = read_examples(spec, default_data(task, "train"), limit=batch_size)
    mask = PerturbMask(parts=parts)
    seeds = list(range(1, k_max + 1))
    threads = threads_for(threads)
    with EdgeSession(model, spec, n_threads=threads, max_batch=batch_size) as session:
        layout = layout_for_base(session.model_path, rank, 2.0 * rank, lora_targets)
        session.set_lora(layout, random_lora(layout, 0))
        prepared = session.prepare(examples)
        ref = TorchRef(session.model_path, n_threads=threads)
        torch_loss, grads = ref.loss_and_grad(
            layout, session.tensors, prepared.seqs, prepared.targets, spec.kind, session.label_ids
        )
        del ref
        projs = {e: np.concatenate([
            session.perturbed(examples, seeds[i : min(i + 8, k_llama)], e, mask, dist).projected
            for i in tqdm(range(0, k_llama, 8), desc=f"perturbed scoring eps={e:g}", unit="8 seeds")
        ]) for e in eps_list}
        proj = projs[eps]
        llama_loss = session.evaluate(examples).loss
    names = mask.names(layout)
    d = sum(int(np.prod(layout.shapes()[n])) for n in names)
    exact = np.array([directional(grads, direction(s, layout, mask, dist)) for s in seeds])
    rows = []
    for k in tqdm(k_grid(k_max), desc="combine", unit="K"):
        g_exact = combine(seeds[:k], exact[:k] / k, layout, mask, dist)
        llama = cosine(combine(seeds[:k], proj[:k] / k, layout, mask, dist), grads, names) if k <= k_llama else "-"
        rows.append([k, llama, cosine(g_exact, grads, names), math.sqrt(k / (k + d + 1)), math.sqrt(k / d)])
    head = exact[:k_llama]
    per_eps = [[e, float(np.mean(np.sign(p) == np.sign(head))),
                float(np.corrcoef(p, head)[0, 1]) if k_llama > 1 else float("nan")] for e, p in projs.items()]
    sign, pearson = per_eps[0][1], per_eps[0][2]
    write_result(
        out,
        "fidelity",
        {"model": str(model), "d": d, "eps": eps, "targets": ",".join(lora_targets), "parts": parts, "dist": dist,
         "batch": len(prepared.seqs),
         "torch_loss": torch_loss, "llama_loss": llama_loss, "pearson_scalars": pearson, "sign_agreement": sign,
         "per_eps": [{"eps": e, "sign_agreement": sg, "pearson": pr} for e, sg, pr in per_eps],
         "projected": proj.tolist(), "exact": exact.tolist()},
        {
            f"cos(G_K, exact grad), {Path(str(model)).name}, d={d}, eps={eps:g}, {dist}": (
                ["K", "llama.cpp INT4", "exact scalars", "sqrt(K/(K+d+1))", "sqrt(K/d)"],
                rows,
            ),
            f"Per-seed scalars, {k_llama} seeds, B={len(prepared.seqs)} (loss llama.cpp {llama_loss:.4f}, "
            f"torch {torch_loss:.4f})": (["eps", "sign agreement", "pearson(p, g.v)"], per_eps),
        },
    )
    fig, (ax,) = figure(1)
    ks = [r[0] for r in rows]
    measured = [r for r in rows if r[1] != "-"]
    ax.plot([r[0] for r in measured], [r[1] for r in measured], "o-", label="llama.cpp INT4 scalars")
    ax.plot(ks, [r[2] for r in rows], "s--", label="exact torch scalars")
    ax.plot(ks, [r[3] for r in rows], "k:", label="theory sqrt(K/(K+d+1))")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (perturbations)")
    ax.set_ylabel("cosine with exact gradient")
    ax.set_title(f"d={d}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, out, "fidelity")
