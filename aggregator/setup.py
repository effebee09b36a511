"""Creating or resuming a run: config, initial adapter, strategy, evaluator."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fwdllm.aggregator import checkpoint
from fwdllm.aggregator.checkpoint import RunConfig
from fwdllm.aggregator.registry import make_strategy
from fwdllm.aggregator.strategy import SHARED, Strategy, StrategySpec
from fwdllm.core.errors import UserError
from fwdllm.core.files import output_dir
from fwdllm.core.layout import HEAD, LoraLayout
from fwdllm.core.optim import Optimizer, OptimizerSpec
from fwdllm.core.replica import Replica
from fwdllm.runtime.tasks import TaskSpec


@dataclass(frozen=True)
class LoraSpec:
    """The trainable adapter of a new run (its defaults: :mod:`fwdllm.options`)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    init_seed: int
    #: also train a correction of the verbalizer's output rows (``--head``)
    head: bool = False
    #: start from this trained adapter instead of a fresh one (``--init-adapter``)
    init_adapter: Path | None = None


@dataclass(frozen=True)
class PrivacySpec:
    """Protocol v2 options of a new run: head codec, secure aggregation, DP."""

    head_codec: str = "int8"
    secagg: dict[str, Any] | None = None
    dp: dict[str, Any] | None = None


def new_run(
    out: Path,
    model: Path,
    model_sha: str,
    task: str,
    dev: Path | None,
    dev_limit: int | None,
    rounds: int,
    eval_every: int,
    lora: LoraSpec,
    optimizer: OptimizerSpec,
    strategy: StrategySpec,
    recipe: str | None = None,
    privacy: PrivacySpec = PrivacySpec(),
    serve: dict[str, Any] | None = None,
) -> tuple[RunConfig, Replica]:
    """Write run.json (with the ``serve`` options) and the round-0 checkpoint in a fresh ``out``."""
    from fwdllm.core.lora import init_lora
    from fwdllm.runtime.tasks import load_task

    if (out / checkpoint.STATE).exists() or (out / checkpoint.RUN_JSON).exists():
        raise UserError(f"{out} already holds a run; continue it with --resume {out} or pick another --out")
    output_dir(out)
    if lora.init_adapter is not None:
        layout, tensors = adapter_start(lora, model)
    else:
        try:
            layout, tensors = init_lora(model, lora.rank, lora.alpha, lora.targets, lora.init_seed)
        except ValueError as e:
            raise UserError(f"cannot build the LoRA: {e}") from None
    if lora.head and layout.head is None:
        layout, tensors = with_head(layout, tensors, model, load_task(task))
    elif layout.head is not None and not lora.head:
        raise UserError(f"--init-adapter {lora.init_adapter} has a classifier head: pass --head to train on from it")
    if strategy.mask.layers is not None and strategy.mask.layers[1] > layout.n_layers:
        raise UserError(f"--layers {strategy.mask.layers[0]}:{strategy.mask.layers[1]}: "
                        f"the model has {layout.n_layers} layers")
    if not strategy.mask.names(layout):
        raise UserError(f"perturbation mask {strategy.mask.to_dict()} selects no tensor of the LoRA")
    check_summed(strategy, privacy, lora.head)
    cfg = RunConfig(
        run_id=uuid.uuid4().hex[:12],
        model=str(model),
        model_sha256=model_sha,
        task=task,
        task_name=load_task(task).name,
        dev=str(dev) if dev else None,
        dev_limit=dev_limit,
        rounds=rounds,
        eval_every=eval_every,
        layout=layout.to_dict(),
        optimizer=asdict(optimizer),
        strategy=strategy.to_dict(),
        recipe=recipe,
        init_adapter=None if lora.init_adapter is None else {
            "path": str(lora.init_adapter),
            "sha256": hashlib.sha256(lora.init_adapter.read_bytes()).hexdigest(),
        },
        init_seed=lora.init_seed if lora.init_adapter is None else None,
        head_codec=privacy.head_codec,
        secagg=privacy.secagg,
        dp=privacy.dp,
        serve=serve,
    )
    replica = Replica(layout, tensors, Optimizer(optimizer), version=0)
    checkpoint.write_config(out, cfg)
    checkpoint.save(out, replica, {}, 0.0)
    checkpoint.trim_metrics(out, 0)
    return cfg, replica


def adapter_start(lora: LoraSpec, model: Path) -> tuple[LoraLayout, dict[str, np.ndarray]]:
    """The trained adapter ``lora.init_adapter`` as round 0 (a warm start).

    Its layout must be the one ``--rank/--lora-alpha/--targets`` describe, so
    that run.json stays a true description of the run; a mismatch is an error
    naming the options that match the file, never a silent override.  A
    classifier head in the file comes along (``--head`` must be on).
    """
    from fwdllm.core.lora import layout_for_base, open_base, read_lora_for

    path = lora.init_adapter
    layout, tensors = read_lora_for(path, open_base(model), "--init-adapter")
    want = layout_for_base(model, lora.rank, lora.alpha, lora.targets)
    if replace(layout, head=None, head_ids=(), n_vocab=0) != want:
        targets = ",".join(dict.fromkeys(t.target for t in layout.targets))
        raise UserError(
            f"--init-adapter {path}: rank {layout.rank}, alpha {layout.alpha:g}, targets {targets} on "
            f"{len(layout.layers)} layers; this run asks for rank {want.rank}, alpha {want.alpha:g}, targets "
            f"{','.join(lora.targets)} on {len(want.layers)} layers of {model.name}. Pass --rank {layout.rank} "
            f"--lora-alpha {layout.alpha:g} --targets {targets} (adapters of another model or a subset of "
            f"layers cannot be continued)"
        )
    return layout, tensors


def with_head(
    layout: LoraLayout, tensors: dict[str, np.ndarray], model: Path, task: TaskSpec
) -> tuple[LoraLayout, dict[str, np.ndarray]]:
    """The layout and tensors plus a zero classifier head (label words x n_embd)
    on the label words' rows of the model's output projection: training starts
    exactly at the zero-shot model."""
    from fwdllm.core.lora import open_base, untied_hint
    from fwdllm.runtime.session import label_token_ids

    if task.kind != "classify":
        raise UserError(f"--head trains a classifier head and needs a classify task; {task.name} is {task.kind}")
    base = open_base(model)
    if base.output is None:
        raise UserError(f"--head: {untied_hint(base)}")
    layout = replace(layout, head=(len(task.label_words), base.output[1]), head_ids=label_token_ids(model, task),
                     n_vocab=base.output[0])
    return layout, {**tensors, HEAD: np.zeros(layout.head, np.float32)}


def resume_run(run_dir: Path, model_sha: str) -> tuple[RunConfig, Replica, dict[str, Any], float]:
    """Load the last finished round of ``run_dir``."""
    if not (run_dir / checkpoint.STATE).exists():
        raise UserError(f"{run_dir} has no checkpoint ({checkpoint.STATE}); nothing to resume")
    cfg = checkpoint.read_config(run_dir)
    if model_sha != cfg.model_sha256:
        raise UserError(f"model sha256 {model_sha[:16]}... is not the run's base model {cfg.model_sha256[:16]}...")
    try:
        spec = cfg.optimizer_spec
    except (ValueError, TypeError) as e:
        raise UserError(f"{run_dir / checkpoint.RUN_JSON}: bad optimizer ({e})") from None
    replica, strategy_state, elapsed = checkpoint.load(run_dir, spec)
    checkpoint.trim_metrics(run_dir, replica.version)
    return cfg, replica, strategy_state, elapsed


def check_summed(strategy: StrategySpec, privacy: PrivacySpec, head: bool) -> None:
    """What a run whose server sees only sums cannot do, said before anything is written."""
    if privacy.secagg is None and privacy.dp is None:
        return
    flags = " and ".join(f for f, on in (("--secagg", privacy.secagg), ("--dp-epsilon", privacy.dp)) if on)
    if strategy.name != "zo-sgd":
        raise UserError(f"{flags} run with --strategy zo-sgd: {strategy.name} decides from each client's scalars, "
                        "which the server no longer sees")
    if "robust" in strategy.extra:
        raise UserError(f"{flags}: robust=clip/mom needs per-client scalars; under --secagg every entry is clipped "
                        "on the device to --secagg-bound before masking instead (docs/security.md)")
    if strategy.k < 1:
        raise UserError(f"{flags} needs seeds (--k >= 1)")
    if privacy.dp is not None and head:
        raise UserError("--dp-epsilon covers the scalars only; train without --head (the head gradient is not "
                        "privatised)")


def strategy_for(cfg: RunConfig, state: dict[str, Any]) -> Strategy:
    """The run's strategy at ``state``; ``spec.extra["layout"]`` is the run's
    LoRA layout (discriminative sampling and block schedules need it)."""
    try:
        spec = StrategySpec.from_dict(cfg.strategy)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"run.json: bad strategy {cfg.strategy!r:.80} ({e})") from None
    shared = {SHARED: True} if cfg.secagg is not None or cfg.dp is not None else {}
    try:
        strategy = make_strategy(replace(spec, extra={**spec.extra, "layout": cfg.layout, **shared}))
    except ValueError as e:  # a bad --strategy-opt is the user's to fix: one line, no traceback
        raise UserError(f"strategy {spec.name!r}: {e}") from None
    try:
        strategy.load_state_dict(state)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"the checkpoint's strategy state does not fit strategy {spec.name!r} ({e})") from None
    return strategy


def evaluator(cfg: RunConfig, model: Path, threads: int | None):  # noqa: ANN201 - Evaluate callable
    """A dev-set evaluator on ``model`` (the run's base, maybe moved) and the run's task, or None."""
    if not cfg.dev:
        return None
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import load_task, read_examples

    task = load_task(cfg.task)
    examples = read_examples(task, cfg.dev, limit=cfg.dev_limit)
    session = EdgeSession(model, task, n_threads=threads)

    def evaluate(replica: Replica) -> dict[str, float]:
        """``dev_*`` of the adapter the run ships (the weight average under
        ``--ema``), plus ``dev_*_raw`` of the last iterate when they differ,
        so one run shows what the average buys."""
        views = {"": replica.optimizer.averaged(replica.tensors)}
        if replica.optimizer.avg:  # before the first step the average is the adapter itself
            views["_raw"] = replica.tensors
        out: dict[str, float] = {}
        for suffix, tensors in views.items():
            session.set_lora(replica.layout, tensors)
            if task.kind == "sft":
                out.update(_sft_eval(session, examples, suffix, replica.version in (0, cfg.rounds)))
                continue
            r = session.evaluate(examples)
            out.update({f"dev_loss{suffix}": r.loss, f"dev_accuracy{suffix}": r.accuracy,
                        "dev_n": r.n, f"eval_s{suffix}": round(r.seconds, 3)})
        return out

    return evaluate


def _sft_eval(session, examples: list, suffix: str, generations: bool) -> dict[str, float]:  # noqa: ANN001
    """``dev_loss``/``dev_perplexity`` of an sft task; ROUGE-L and exact match of
    greedy generations only when ``generations`` (the run's first and last
    evaluations, of the shipped adapter): generating costs about as much as
    scoring, and the perplexity tracks training in between."""
    from fwdllm.runtime.generation import sft_scores

    s = sft_scores(session, examples, generations=generations and not suffix)
    out = {f"dev_loss{suffix}": s["loss"], f"dev_perplexity{suffix}": s["perplexity"], "dev_n": s["n"],
           f"eval_s{suffix}": round(s["score_s"] + s.get("generate_s", 0.0), 3)}
    out.update({f"dev_{k}": s[k] for k in ("rouge_l", "exact_match") if k in s})
    return out
