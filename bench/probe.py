"""``fwdllm bench probe``: what a classifier head on the frozen INT4 features can reach.

The classification loss only reads the label words' logits at the last prompt
position, ``z = E_lab h``, where ``h`` is the final-normed hidden state (the
LM head's input) and ``E_lab`` the label words' rows of the output matrix.
Training a correction ``dW`` of those rows is a linear probe on frozen
features that starts exactly at zero-shot.  This bench measures, on the real
llama.cpp features of the INT4 model:

* **exact**: ``dW`` fitted by full-batch Adam with L2 on ``n`` training rows
  (several ``n``): the accuracy a head-only fine-tune can reach at all;
* **zo**: the same head trained the way fwdllm trains (K seeds per round, one-
  sided differences, ``clients`` batches of ``batch_size`` per round, cosine
  lr), simulated in numpy on the same features: how much of it zeroth-order
  SGD gets in ``rounds`` rounds, with ``d = n_labels * n_embd`` dimensions.
* **head**: the head as ``--head`` trains it (the exact gradient of
  ``clients x batch_size`` fresh rows per round, stepped by fwdllm's own
  optimizer), over ``--repeats`` sampling seeds.  A real ``--head`` run follows one
  such draw; the spread says how far a single run's best can fall from the
  mean on a dev split of this size.

``--template`` swaps the task's prompt, so the same numbers rank prompts by
what a head can read from their features (zero-shot accuracy does not).
``--lora`` reads the features under a trained adapter (a run's
``adapter.gguf``): what ``--head`` can reach when a run warm-starts from that
LoRA with ``--init-adapter``.

The head's perturbation is scaled by ``1/sqrt(n_embd)`` so that ``eps``
moves a logit by about ``eps`` times the RMS of ``h``'s entries.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import click
import numpy as np

from fwdllm.bench.common import RESULTS, bench_task, figure, number_list, out_help, save_figure, write_result
from fwdllm.options import Command, option, shared, threads_for


def head_features(model: Path, prompts: Sequence[str], threads: int, batch: int = 16,
                  lora: Path | None = None) -> np.ndarray:
    """(n, n_embd) last-position hidden states after the final norm, from llama.cpp
    (under the adapter ``lora`` at scale 1, as the engine applies a run's LoRA)."""
    import llama_cpp

    from fwdllm.runtime.log import quiet_llama

    quiet_llama()
    llm = llama_cpp.Llama(model_path=str(model), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST,
                          n_ctx=4096, n_batch=4096, n_ubatch=4096, n_seq_max=batch, n_threads=threads,
                          lora_path=str(lora) if lora else None, verbose=False)
    out: list[list[float]] = []
    for i in range(0, len(prompts), batch):
        out.extend(llm.embed(list(prompts[i:i + batch]), normalize=False))
    llm.close()
    return np.asarray(out, dtype=np.float64)


def label_rows(model: Path, spec) -> np.ndarray:  # noqa: ANN001 - TaskSpec
    """Dequantized output-matrix rows of the verbalizer's token ids, as the
    engine defines them (:attr:`EdgeSession.label_ids`); the tied embedding
    when the model has no ``output.weight``."""
    from fwdllm.runtime.readout import output_rows
    from fwdllm.runtime.session import EdgeSession

    with EdgeSession(model, spec, n_threads=1) as session:
        ids = session.label_ids
    return output_rows(model, ids)


def restricted(h: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(mean CE, accuracy, softmax) of the label-restricted logits ``h @ w.T``."""
    z = h @ w.T
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    return float(-np.log(p[np.arange(len(y)), y]).mean()), float((z.argmax(1) == y).mean()), p


def fit_exact(h: np.ndarray, y: np.ndarray, w0: np.ndarray, l2: float, iters: int = 1500) -> np.ndarray:
    """``w0 + dW`` minimising CE + ``l2/2 |dW|^2`` (full-batch Adam, lr 1e-2)."""
    dw, m, v = np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, iters + 1):
        p = restricted(h, y, w0 + dw)[2]
        p[np.arange(len(y)), y] -= 1
        g = p.T @ h / len(y) + l2 * dw
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        dw -= 1e-2 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return w0 + dw


def zo_train(h: np.ndarray, y: np.ndarray, dev: tuple[np.ndarray, np.ndarray], w0: np.ndarray, *, rounds: int,
             lr: float, eps: float, k: int, clients: int, batch_size: int, evals: int, seed: int) -> list[float]:
    """Dev accuracy at ``evals`` evenly spaced rounds of simulated one-sided ZO-SGD on the head."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / math.sqrt(w0.shape[1])
    a = np.zeros_like(w0)
    per_client = max(1, k // clients)
    accs = []
    for r in range(rounds):
        g = np.zeros_like(a)
        for _ in range(clients):
            b = rng.choice(len(y), batch_size, replace=False)
            base = restricted(h[b], y[b], w0 + scale * a)[0]
            for _ in range(per_client):
                v = rng.standard_normal(a.shape)
                g += (restricted(h[b], y[b], w0 + scale * (a + eps * v))[0] - base) / eps * v
        a -= lr * 0.5 * (1 + math.cos(math.pi * r / rounds)) * g / (per_client * clients)
        if (r + 1) % max(1, rounds // evals) == 0:
            accs.append(restricted(dev[0], dev[1], w0 + scale * a)[1])
    return accs


def head_train(h: np.ndarray, y: np.ndarray, dev: tuple[np.ndarray, np.ndarray], w0: np.ndarray, *, rounds: int,
               lr: float, clients: int, batch_size: int, evals: int, seed: int, ema: float = 0.0) -> list[float]:
    """Dev accuracy at ``evals`` evenly spaced rounds of ``--head`` on frozen
    features: :class:`fwdllm.optim.Optimizer` (Adam for the head, cosine
    schedule, ``--ema`` average evaluated as a run evaluates it) on the exact
    gradient, so the simulation cannot drift from the product's step."""
    from fwdllm.core.layout import HEAD
    from fwdllm.core.optim import Optimizer, OptimizerSpec

    spec = OptimizerSpec(lr=lr, head_lr=lr, schedule="cosine", total_rounds=rounds, ema=ema)
    opt, params = Optimizer(spec), {HEAD: np.zeros(w0.shape, np.float32)}
    rng = np.random.default_rng(seed)
    accs = []
    for r in range(rounds):
        b = np.concatenate([rng.choice(len(y), batch_size, replace=False) for _ in range(clients)])
        p = restricted(h[b], y[b], w0 + params[HEAD])[2]
        p[np.arange(len(b)), y[b]] -= 1
        opt.step(params, {HEAD: p.T @ h[b] / len(b)}, spec.lr_at(r))
        if (r + 1) % max(1, rounds // evals) == 0:
            accs.append(restricted(dev[0], dev[1], w0 + opt.averaged(params)[HEAD])[1])
    return accs


@click.command("probe", cls=Command)
@shared("model", "task", "label_words")
@click.option("--template", default=None,
              help="Prompt template instead of the task's: {text} (or the task's columns), \\n for a newline.")
@option("lora")
@click.option("--train-sizes", "n_train", default="64,256,1000,3000", show_default=True, callback=number_list(int, 1),
              metavar="N,...", help="Training-set sizes of the exact fit, comma-separated.")
@option("dev_limit")
@click.option("--l2-grid", "l2", default="0,1e-3,1e-2", show_default=True, callback=number_list(float, 0), metavar="L2,...",
              help="L2 strengths of the exact fit, comma-separated.")
@option("rounds", default=300, help="Rounds of the simulated ZO and --head runs.")
@click.option("--zo-lr-grid", "zo_lr", default="0.3,1,3", show_default=True, callback=number_list(float, positive=True),
              metavar="LR,...", help="Learning rates of the simulated ZO runs, comma-separated.")
@shared("eps", "k", "clients", "batch_size")
@click.option("--head-lr-grid", "head_lr", default="1e-3,3e-3", show_default=True, callback=number_list(float, positive=True),
              metavar="LR,...", help="Learning rates of the simulated --head runs, comma-separated.")
@click.option("--ema-grid", "head_ema", default="0", show_default=True, callback=number_list(float, 0, 1), metavar="DECAY,...",
              help="--ema decays of the simulated --head runs, comma-separated (0 = the last iterate).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Simulated --head runs per (lr, ema), each with its own sampling seed (--seed, --seed+1, ...).")
@shared("seed", "threads")
@option("out", default=RESULTS, help=out_help("probe"))
def probe(model, task, label_words, template, lora, n_train, dev_limit, l2, rounds, zo_lr, eps, k, clients,  # noqa: ANN001
          batch_size, head_lr, head_ema, repeats, seed, threads, out: Path) -> None:
    """Linear-probe ceiling of the frozen INT4 features, exact and by simulated ZO-SGD.

    --template swaps the task's prompt; --lora reads the features under a
    trained adapter.

    \b
    Examples:
      fwdllm bench probe --task agnews
      fwdllm bench probe --task sst2 --train 1000 --zo-lr 1
      fwdllm bench probe --task sst2 --template 'Review: a dull mess.\\nSentiment: negative\\nReview: {text}\\nSentiment:'
      fwdllm bench probe --task sst2-2shot --lora runs/long/adapter.gguf --rounds 400 --head-lr 1e-2 --head-ema 0,0.95
    """
    from fwdllm.core.errors import UserError
    from fwdllm.core.lora import open_base, read_lora_for
    from fwdllm.runtime.models import resolve_model
    from fwdllm.runtime.tasks import default_data, read_examples

    path = resolve_model(model)
    if lora is not None:  # a clear error before minutes of feature extraction
        read_lora_for(lora, open_base(path), "--lora")
    spec = bench_task(task, label_words, template.replace("\\n", "\n") if template else None)
    sizes = sorted(set(n_train))
    train = read_examples(spec, default_data(task, "train"))
    if sizes[-1] > len(train):
        raise UserError(f"--train {sizes[-1]} exceeds the {len(train)} training rows")
    picked = np.random.default_rng(seed).choice(len(train), sizes[-1], replace=False)
    train = [train[i] for i in picked]
    dev = read_examples(spec, default_data(task, "dev"), limit=dev_limit)
    threads = threads_for(threads)
    t0 = time.perf_counter()
    with click.progressbar(length=2, label="llama.cpp features (train, dev)", file=None) as bar:
        h_train = head_features(path, [e.prompt for e in train], threads, lora=lora)
        bar.update(1)
        h_dev = head_features(path, [e.prompt for e in dev], threads, lora=lora)
        bar.update(1)
    feature_s = time.perf_counter() - t0
    y_train, y_dev = np.array([e.label for e in train]), np.array([e.label for e in dev])
    w0 = label_rows(path, spec)
    zero_loss, zero_acc, _ = restricted(h_dev, y_dev, w0)
    exact_rows = []
    for n in sizes:
        for lam in l2:
            w = fit_exact(h_train[:n], y_train[:n], w0, lam)
            loss, acc, _ = restricted(h_dev, y_dev, w)
            exact_rows.append([n, lam, acc, loss, restricted(h_train[:n], y_train[:n], w)[1]])
    zo_curves = {}
    for lr in zo_lr:
        zo_curves[lr] = zo_train(h_train, y_train, (h_dev, y_dev), w0, rounds=rounds, lr=lr, eps=eps, k=k,
                                 clients=clients, batch_size=batch_size, evals=6, seed=seed)
    head_curves = {  # keyed (lr, ema); the same sampling seeds for every pair
        (lr, ema): [head_train(h_train, y_train, (h_dev, y_dev), w0, rounds=rounds, lr=lr, clients=clients,
                               batch_size=batch_size, evals=6, seed=seed + i, ema=ema) for i in range(repeats)]
        for lr in head_lr for ema in head_ema
    }
    passes = rounds * (k + clients)
    write_result(
        out,
        "probe",
        {"model": str(path), "lora": str(lora) if lora else None, "task": task, "template": spec.template, "n_embd": int(w0.shape[1]), "d_head": int(w0.size),
         "zero_shot": {"accuracy": zero_acc, "loss": zero_loss}, "feature_s": feature_s,
         "zo": {"rounds": rounds, "k": k, "clients": clients, "batch_size": batch_size, "eps": eps,
                "forward_passes": passes, "curves": {str(lr): c for lr, c in zo_curves.items()}},
         "head": {"rounds": rounds, "clients": clients, "batch_size": batch_size, "repeats": repeats,
                  "curves": {f"{lr}" + (f" ema {ema}" if ema else ""): c for (lr, ema), c in head_curves.items()}}},
        {
            f"exact linear probe on {path.name} features ({task}, {len(dev)} dev rows; zero-shot {zero_acc:.4f})": (
                ["train rows", "L2", "dev acc", "dev loss", "train acc"], exact_rows),
            f"simulated ZO-SGD on the head (d = {w0.size}, K={k} one-sided, {clients}x{batch_size} rows/round)": (
                ["lr", *[f"round {rounds * (i + 1) // 6}" for i in range(6)]],
                [[lr, *c] for lr, c in zo_curves.items()]),
            f"simulated --head (exact gradient, Adam, cosine, {clients}x{batch_size} rows/round; "
            f"{repeats} sampling seeds)": (
                ["head lr", "ema", *[f"round {rounds * (i + 1) // 6}, mean" for i in range(6)], "final min",
                 "final max", "best, max over seeds"],
                [[lr, ema, *np.mean(c, axis=0).round(4).tolist(), min(r[-1] for r in c), max(r[-1] for r in c),
                  max(max(r) for r in c)] for (lr, ema), c in head_curves.items()]),
        },
    )
    fig, axes = figure(2)
    for lam in sorted({r[1] for r in exact_rows}):
        pts = [(r[0], r[2]) for r in exact_rows if r[1] == lam]
        axes[0].plot(*zip(*pts), "o-", label=f"exact, L2 {lam:g}")
    axes[0].axhline(zero_acc, color="gray", ls=":", label="zero-shot")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("training rows")
    for lr, c in zo_curves.items():
        axes[1].plot([rounds * (i + 1) // 6 for i in range(len(c))], c, "o-", label=f"ZO lr {lr:g}")
    for (lr, ema), c in head_curves.items():
        axes[1].plot([rounds * (i + 1) // 6 for i in range(len(c[0]))], np.mean(c, axis=0), "s--",
                     label=f"--head lr {lr:g}{f' ema {ema:g}' if ema else ''} (mean of {repeats})")
    axes[1].axhline(zero_acc, color="gray", ls=":")
    axes[1].set_xlabel("rounds (simulated)")
    for ax in axes:
        ax.set_ylabel(f"{task} dev accuracy")
        ax.legend(fontsize=8)
    save_figure(fig, out, "probe")
