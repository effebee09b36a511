"""``fwdllm bench fidelity``: how well K seeds' scalars reconstruct the gradient.

The aggregated estimate ``G_K = (1/K) sum_k p_k v_k`` (``fwdllm.contract.combine``
of the seeds and the projections ``p_k`` that ``EdgeSession.perturbed`` measured
on the INT4 GGUF in llama.cpp) is compared by cosine with the exact gradient of
the same loss on the same tokens (``bench/torch_ref.py``: the GGUF dequantized
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

from bench.common import (bench_task, figure, number_list, out_option, save_figure, task_options, threads_option,
                          write_result)


def cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray], names: list[str]) -> float:
    x = np.concatenate([a[n].ravel().astype(np.float64) for n in names])
    y = np.concatenate([b[n].ravel().astype(np.float64) for n in names])
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-300))


def k_grid(k_max: int) -> list[int]:
    """1, 2, 4, ... up to k_max (k_max itself included)."""
    ks = [2**i for i in range(int(math.log2(k_max)) + 1)]
    return ks if ks[-1] == k_max else ks + [k_max]


@click.command("fidelity")
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--k-max", type=int, default=256, show_default=True, help="largest K (seeds 1..K, prefixes reused)")
@click.option("--k-llama", type=int, default=None,
              help="score only the first N seeds in llama.cpp (default: all); larger K use exact scalars only")
@click.option("-b", "--batch", type=int, default=8, show_default=True)
@click.option("--eps", "eps_list", default="3e-2", show_default=True, callback=number_list(float, positive=True),
              help="comma list: the first eps draws the K curve; every one gets a per-seed sign/Pearson row")
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--parts", type=click.Choice(["a", "b", "both"]), default="b", show_default=True)
@click.option("--dist", type=click.Choice(["gaussian", "rademacher"]), default="gaussian", show_default=True)
@task_options
@threads_option
@out_option
def fidelity(model, k_max, k_llama, batch, eps_list, rank, parts, dist, task, label_words, threads, out_dir: Path) -> None:  # noqa: ANN001
    """Cosine(aggregated ZO gradient on INT4 llama.cpp, exact torch gradient) vs K.

    \b
    Examples:
      fwdllm bench fidelity --model smollm2-135m --k-max 256
      fwdllm bench fidelity --model smollm2-135m --k-max 32 -b 32 --eps 3e-2,1e-3,1e-2,1e-1
    """
    from tqdm import tqdm

    from bench.torch_ref import TorchRef, directional, random_lora
    from convert.lora import layout_for_base
    from edge_client.session import EdgeSession
    from edge_client.tasks import default_data, read_examples
    from fwdllm.contract import PerturbMask, combine, direction
    from fwdllm.errors import UserError

    if k_max < 1:
        raise UserError("--k-max must be >= 1")
    eps = eps_list[0]
    k_llama = min(k_llama or k_max, k_max)
    spec = bench_task(task, label_words)
    examples = read_examples(spec, default_data(spec.name, "train"), limit=batch)
    mask = PerturbMask(parts=parts)
    seeds = list(range(1, k_max + 1))
    with EdgeSession(model, spec, n_threads=threads, max_batch=batch) as session:
        layout = layout_for_base(session.model_path, rank, 2.0 * rank, ("q", "v"))
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
        out_dir,
        "fidelity",
        {"model": str(model), "d": d, "eps": eps, "parts": parts, "dist": dist, "batch": len(prepared.seqs),
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
    save_figure(fig, out_dir, "fidelity")
