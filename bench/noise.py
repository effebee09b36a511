"""``fwdllm bench noise``: how much batch noise each ZO scalar carries, and what a stratified draw removes.

A client reports ``p = g_b . v``, the directional derivative of its batch
loss.  Next to the ``d/K`` of the directions, the estimator's error grows with
``rho = E|g_b - g|^2 / |g|^2`` (docs/strategies.md, "The math"): the error of
``G`` is ``d (1 + rho) / K`` in units of ``|g|^2``, so a draw that lowers
``rho`` at the same batch size lowers every scalar's error in proportion to
``1 + rho`` (whether training then gets faster is for a run to show).  Pacing's replicas
estimate ``rho`` from scalars during a run; this bench measures it exactly,
offline:

* the exact gradient of every example of a fixed sample of the training data
  (torch reference, the trained LoRA factor of ``--targets``/``--parts``), at
  the fresh init or under ``--lora``;
* ``|g|^2`` of their mean (unbiased), and for each batch size the mean of
  ``|g_b - g|^2`` over ``--draws`` batches drawn exactly as clients draw them
  (``fwdllm.core.batches.sample_batch``), uniform and stratified by label.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from fwdllm.bench.common import RESULTS, bench_task, figure, number_list, out_help, save_figure, write_result
from fwdllm.options import Command, option, parse_targets, shared, threads_for


def example_gradients(session, layout, tensors, names: list[str], examples: list, threads: int) -> np.ndarray:  # noqa: ANN001
    """(n, d) exact gradients of the per-example losses w.r.t. the ``names`` tensors."""
    from tqdm import tqdm

    from fwdllm.reference.torch_ref import TorchRef

    ref = TorchRef(session.model_path, n_threads=threads)
    rows = []
    for ex in tqdm(examples, desc="exact per-example gradients", unit="row"):
        prepared = session.prepare([ex])
        _, grads = ref.loss_and_grad(layout, tensors, prepared.seqs, prepared.targets, session.task.kind,
                                     session.label_ids)
        rows.append(np.concatenate([grads[n].ravel().astype(np.float64) for n in names]))
    return np.array(rows)


def batch_noise(grads: np.ndarray, examples: list, batch_size: int, draws: int, stratify: bool) -> float:
    """Mean ``|g_b - g|^2`` over ``draws`` batches of the clients' own draw, ``g`` the mean of all rows."""
    from fwdllm.core.batches import sample_batch

    g = grads.mean(axis=0)
    row = {id(e): i for i, e in enumerate(examples)}
    total = 0.0
    for seed in range(draws):
        idx = [row[id(e)] for e in sample_batch(examples, batch_size, seed, stratify=stratify)]
        total += float(np.sum((grads[idx].mean(axis=0) - g) ** 2))
    return total / draws


def signal(grads: np.ndarray) -> tuple[float, float]:
    """(unbiased ``|g|^2`` of the population mean, per-example variance ``E|g_i - g|^2``)."""
    n = len(grads)
    g = grads.mean(axis=0)
    var = float(np.sum((grads - g) ** 2)) / (n - 1)
    return float(g @ g) - var / n, var


@click.command("noise", cls=Command)
@shared("model", "task", "label_words")
@click.option("--rows", type=click.IntRange(2), default=400, show_default=True,
              help="Training rows whose exact per-example gradients are taken.")
@click.option("--batch-sizes", callback=number_list(int, 1, positive=True), default="4,8,16", show_default=True,
              metavar="B,...", help="Batch sizes to measure, comma-separated.")
@click.option("--draws", type=click.IntRange(1), default=3000, show_default=True,
              help="Batches drawn per batch size and draw kind.")
@shared("rank", "targets", "parts")
@option("lora")
@option("threads")
@option("out", default=RESULTS, help=out_help("noise"))
def noise(model, task, label_words, rows, batch_sizes, draws, rank, targets, parts, lora, threads,  # noqa: ANN001
          out: Path) -> None:
    """Batch noise of the ZO scalars, rho = E|g_b - g|^2 / |g|^2, uniform vs stratified batches.

    The gradients are taken at a fresh LoRA (--rank, --targets), or under
    --lora, a trained adapter; --parts picks the factor they are taken of.

    \b
    Examples:
      fwdllm bench noise --task sst2
      fwdllm bench noise --task agnews --batch-sizes 8 --rows 200
      fwdllm bench noise --task sst2 --lora runs/demo/adapter.gguf
    """
    from fwdllm.core.batches import sample_batch
    from fwdllm.core.errors import UserError
    from fwdllm.core.layout import PerturbMask
    from fwdllm.core.lora import init_lora, open_base, read_lora_for
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import default_data, read_examples

    lora_targets = parse_targets(targets)
    threads = threads_for(threads)
    spec = bench_task(task, label_words)
    pool = read_examples(spec, default_data(task, "train"))
    if rows > len(pool):
        raise UserError(f"--rows {rows}: the {spec.name} training split has {len(pool)} rows")
    if max(batch_sizes) >= rows:
        raise UserError(f"--batch-sizes must stay below --rows ({rows}); got {max(batch_sizes)}")
    examples = sample_batch(pool, rows, 0)  # a fixed uniform sample: the population the batches come from
    with EdgeSession(model, spec, n_threads=threads, max_batch=1) as session:
        if lora is not None:
            layout, tensors = read_lora_for(lora, open_base(session.model_path), "--lora")
        else:
            try:
                layout, tensors = init_lora(session.model_path, rank, 2.0 * rank, lora_targets, 0)
            except ValueError as e:
                raise UserError(f"cannot build the LoRA: {e}") from None
        names = PerturbMask(parts=parts).names(layout)
        grads = example_gradients(session, layout, tensors, names, examples, threads)
    gg, var = signal(grads)
    if not gg > 0:
        raise UserError(f"|g|^2 of the {rows}-row mean is {gg:.3g} (not positive): the adapter sits at a stationary "
                        "point of this sample, where rho is undefined; measure at the fresh init or use more --rows")
    counts = np.bincount([e.label for e in examples]).tolist()
    table = []
    for b in batch_sizes:
        uni, strat = (batch_noise(grads, examples, b, draws, s) / gg for s in (False, True))
        table.append([b, uni, strat, (1 + uni) / (1 + strat)])
    where = f"under {lora}" if lora else "fresh init"
    write_result(
        out, "noise",
        {"model": str(model), "task": spec.name, "rows": rows, "label_counts": counts, "d": int(grads.shape[1]),
         "targets": targets, "parts": parts, "lora": str(lora) if lora else None, "grad_sq": gg,
         "example_var": var, "rho_1": var / gg, "draws": draws},
        {f"rho = E|g_b - g|^2 / |g|^2, {spec.name}, {rows} rows {counts}, d={grads.shape[1]} ({targets} {parts}), "
         f"{where}; |g|^2 = {gg:.4g}, one example's rho = {var / gg:.1f}": (
             ["batch", "rho uniform", "rho stratified", "(1+rho) uniform / stratified"], table)},
    )
    fig, (ax,) = figure(1)
    ax.plot(batch_sizes, [r[1] for r in table], "o-", label="uniform")
    ax.plot(batch_sizes, [r[2] for r in table], "s-", label="stratified by label")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("rho = E|g_b - g|^2 / |g|^2")
    ax.set_title(f"{spec.name}, {where}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, out, "noise")
