"""``fwdllm aggregator serve`` and ``fwdllm simulate``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from fwdllm.aggregator.recipes import apply_recipe, build_stages
from fwdllm.aggregator.registry import STRATEGIES
from fwdllm.aggregator.strategy import StrategySpec
from fwdllm.core.errors import UserError
from fwdllm.core.layout import PerturbMask
from fwdllm.core.optim import OptimizerSpec, Stage
from fwdllm.options import (
    Command,
    Group,
    option,
    parse_layers,
    parse_targets,
    server_key_options,
    strategy_extra,
    threads_for,
    training_options,
)
from fwdllm.runtime.transport import check_bind, server_keys


def _check_stages(kw: dict[str, Any], stages: tuple[Stage, ...], rounds: int) -> None:
    """Stages, and ``--k 0`` (a head-only run or stage): say what they need before anything is written."""
    if stages and kw["strategy"] != "zo-sgd":
        raise UserError(f"--stages runs with --strategy zo-sgd; {kw['strategy']} chooses its own perturbations")
    if stages and sum(st.rounds for st in stages) != rounds:
        raise UserError(f"--stages add up to {sum(st.rounds for st in stages)} rounds, but --rounds is {rounds}")
    if all(st.k for st in stages) if stages else kw["k"]:
        return
    what = "a stage with k=0" if stages else "--k 0"
    if not kw["head"]:
        raise UserError(f"{what} perturbs nothing and so trains nothing without --head (the head-only mode)")
    if kw["strategy"] != "zo-sgd":
        raise UserError(f"{what} (head-only) runs with --strategy zo-sgd; {kw['strategy']} chooses perturbations")
    if not kw["one_sided"]:
        raise UserError(f"{what} (head-only) needs --one-sided: the head's gradient comes from the base pass")


def _specs(kw: dict[str, Any], rounds: int) -> tuple[OptimizerSpec, StrategySpec]:
    stages = build_stages(kw.get("stages"), kw)
    _check_stages(kw, stages, rounds)
    try:
        opt = OptimizerSpec(
            name=kw["optimizer"],
            lr=kw["lr"],
            momentum=kw["momentum"],
            ema=kw["ema"],
            head_lr=kw["head_lr"],
            schedule=kw["schedule"],
            warmup=kw["warmup"],
            total_rounds=rounds,
            stages=stages,
        )
        strat = StrategySpec(
            name=kw["strategy"],
            run_seed=kw["seed"],
            k=kw["k"],
            eps=kw["eps"],
            batch_size=kw["batch_size"],
            mask=PerturbMask(parts=kw["parts"], layers=parse_layers(kw["layers"])),
            dist=kw["dist"],
            one_sided=kw["one_sided"],
            stratify=kw["batch_draw"] == "stratified",
            extra=strategy_extra(kw["strategy_opt"]),
            stages=stages,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    return opt, strat


def explicit_options(ctx: click.Context, names: Any) -> set[str]:
    """The parameters of ``names`` that the user gave (not click's defaults)."""
    default = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)
    return {n for n in names if ctx.get_parameter_source(n) not in default}


def _privacy(kw: dict[str, Any], rounds: int):  # noqa: ANN202 - setup.PrivacySpec
    """Protocol v2's options of a new run (--head-codec, --secagg, --dp-*)."""
    from fwdllm.aggregator.privacy import DPSpec
    from fwdllm.aggregator.secure import SecAggOptions
    from fwdllm.aggregator.setup import PrivacySpec

    dp = None
    if kw["dp_epsilon"] is not None:
        try:
            dp = DPSpec(epsilon=kw["dp_epsilon"], delta=kw["dp_delta"], clip=kw["dp_clip"], rounds=rounds,
                        on_spent=kw["dp_on_spent"]).to_dict()
        except ValueError as e:
            raise UserError(str(e)) from None
    secagg = SecAggOptions(bound=kw["secagg_bound"]).to_dict() if kw["secagg"] else None
    return PrivacySpec(head_codec=kw["head_codec"], secagg=secagg, dp=dp)


def _dev_file(task: str, dev: Path | None) -> Path | None:
    """--dev, else the task's default dev split, else no evaluation."""
    from fwdllm.runtime.tasks import default_data

    if dev is not None:
        if not dev.is_file():
            raise UserError(f"dev file {dev} not found")
        return dev
    try:
        return default_data(task, "dev")
    except UserError:
        return None


@click.group("aggregator", cls=Group)
def aggregator() -> None:
    """The federated-training server (ZeroMQ ROUTER)."""


#: serve's own options (parameter names) that run.json keeps: ``--resume`` restores
#: them, and any of them given again on the command line wins (and is kept)
SERVE_OPTIONS = ("bind", "min_clients", "heartbeat_s", "liveness", "round_timeout_s", "quorum", "deadline_floor_s",
                 "deadline_slack", "evict_after", "threads", "curve_secret", "allow")


def _serve_options(ctx: click.Context, saved: dict[str, Any] | None) -> dict[str, Any]:
    """This process's serve options: the command line's, or on ``--resume``
    the run's saved ones for every flag not given again."""
    mine = {k: ctx.params[k] for k in SERVE_OPTIONS}
    mine.update({k: str(Path(v).resolve()) for k in ("curve_secret", "allow") if (v := mine[k]) is not None})
    if saved is None:
        return mine
    given = {k for k in SERVE_OPTIONS if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
    return {k: mine[k] if k in given or k not in saved else saved[k] for k in SERVE_OPTIONS}


@aggregator.command("serve")
@click.option("--bind", default="tcp://*:5555", show_default=True, help="ZeroMQ address to listen on.")
@option("model")
@option("rounds", help="Training rounds (default: the recipe's, else 50).")
@option("out", help="Run directory for checkpoints, metrics and adapter.gguf.")
@click.option("--resume", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Continue RUN_DIR from its last finished round. Training options come from RUN_DIR/run.json, "
                   "and so do this command's own options (--bind, --min-clients, timeouts, keys...) unless given "
                   "again; --model defaults to the run's.")
@click.option("--min-clients", type=click.IntRange(1), default=1, show_default=True,
              help="Clients to wait for before this process's first round.")
@click.option("--heartbeat", "heartbeat_s", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Heartbeat interval, seconds.")
@click.option("--liveness", type=click.IntRange(2), default=5, show_default=True,
              help="Missed heartbeats before a client is dropped.")
@click.option("--round-timeout", "round_timeout_s", type=click.FloatRange(min=1), default=900.0, show_default=True,
              help="Finish a round with whatever came back after this many seconds.")
@click.option("--quorum", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="End a round once this fraction of its clients reported (stragglers' results then count as late).")
@click.option("--deadline-floor", "deadline_floor_s", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="A task's deadline is this many seconds plus --deadline-slack times the client's measured "
                   "seconds per seed (a client not measured yet: the median client's; before anyone is: slack x "
                   "floor). A task past its deadline goes to another client in the same round.")
@click.option("--deadline-slack", type=click.FloatRange(min=1), default=4.0, show_default=True,
              help="How many times its measured speed a client may take over a task (see --deadline-floor).")
@click.option("--evict-after", type=click.IntRange(1), default=3, show_default=True,
              help="Task deadlines a client may miss in a row before it is evicted from the run (under CURVE its "
                   "key is then refused at every handshake).")
@option("threads")
@server_key_options
@training_options(sorted(STRATEGIES))
@click.pass_context
def serve(ctx: click.Context, bind: str, model: str, rounds: int | None, out: Path | None, resume: Path | None,
          min_clients: int, heartbeat_s: float, liveness: int, round_timeout_s: float, quorum: float,
          deadline_floor_s: float, deadline_slack: float, evict_after: int, threads: int | None,
          curve_secret: Path | None, allow: Path | None, **kw: Any) -> None:
    """Run the aggregator: hand out seeds, turn scalars into LoRA updates.

    Each round every participating client gets seeds and a batch seed, returns
    two losses per seed, and receives the step as (seed, coefficient) pairs.
    After every round RUN_DIR holds adapter.gguf (a llama.cpp LoRA), the
    checkpoint state.npz and metrics.jsonl; kill it at any time and continue
    with --resume RUN_DIR.

    \b
    Examples:
      fwdllm aggregator serve --model smollm2-135m --task sst2 --rounds 100 --out runs/a
      fwdllm aggregator serve --resume runs/a
    """
    from fwdllm.aggregator import checkpoint, setup
    from fwdllm.aggregator.server import Aggregator, ServerOptions
    from fwdllm.runtime.log import log_to_stderr_without_blocking, quiet_llama
    from fwdllm.runtime.models import model_sha256, resolve_model

    listener = log_to_stderr_without_blocking("%(asctime)s aggregator %(message)s")
    logging.getLogger("fwdllm").setLevel(logging.INFO)
    quiet_llama()
    try:
        if resume is not None:
            run_dir = resume
            if out is not None and out.resolve() != resume.resolve():
                raise UserError("--out and --resume name different directories")
            if not (run_dir / "run.json").is_file():
                raise UserError(f"{run_dir} is not a run directory (no run.json)")
            cfg = checkpoint.read_config(run_dir)
            values = _serve_options(ctx, cfg.serve or {})
            check_bind(values["bind"])
            keys = server_keys(*(Path(v) if v else None for v in (values["curve_secret"], values["allow"])))
            given = ctx.get_parameter_source("model") is not click.core.ParameterSource.DEFAULT
            model_path = resolve_model(model if given else cfg.model)
            cfg, replica, state, elapsed = setup.resume_run(run_dir, model_sha256(model_path))
            cfg = checkpoint.save_serve_options(run_dir, cfg, values)
            evicted = tuple(checkpoint.server_state(run_dir).get("evicted", ()))
        else:
            if out is None:
                raise UserError("a new run needs --out RUN_DIR (or --resume RUN_DIR)")
            values = _serve_options(ctx, None)
            check_bind(values["bind"])
            keys = server_keys(curve_secret, allow)  # bad key files fail before any run directory is touched
            model_path = resolve_model(model)
            kw["rounds"] = rounds
            recipe = apply_recipe(kw, explicit_options(ctx, kw), quick=False)
            rounds = kw["rounds"] or 50
            opt, strat = _specs(kw, rounds)
            dev = _dev_file(kw["task"], kw["dev"])
            lora = setup.LoraSpec(kw["rank"], kw["lora_alpha"], parse_targets(kw["targets"]), kw["seed"], kw["head"],
                                  kw["init_adapter"])
            eval_every = kw["eval_every"] or max(1, rounds // 5)
            cfg, replica = setup.new_run(out, model_path, model_sha256(model_path), kw["task"], dev, kw["dev_limit"],
                                         rounds, eval_every, lora, opt, strat, recipe=recipe.name if recipe else None,
                                         privacy=_privacy(kw, rounds), serve=values)
            run_dir, state, elapsed, evicted = out, {}, 0.0, ()
        opts = ServerOptions(keys=keys, **{k: values[k] for k in SERVE_OPTIONS if k not in ("threads", "curve_secret",
                                                                                          "allow")})
        server = Aggregator(run_dir, cfg, replica, setup.strategy_for(cfg, state), opts,
                            setup.evaluator(cfg, model_path, threads_for(values["threads"])), elapsed, evicted)
        server.serve()
    finally:
        listener.stop()
    click.echo(f"done: {cfg.rounds} rounds; adapter at {run_dir / 'adapter.gguf'}")


@click.command("simulate", cls=Command)
@option("model")
@option("clients", help="Client processes to start.")
@option("rounds", help="Training rounds (default: the recipe's schedule; without a recipe, --quick 50 and --long 300).")
@option("out", required=True, help="Run directory (shards, logs, checkpoints, metrics, adapter.gguf).")
@click.option("--dirichlet", type=click.FloatRange(min=0, min_open=True), default=None, metavar="ALPHA",
              help="Non-IID shards: each label is split over the clients in Dirichlet(ALPHA) proportions "
                   "(smaller = more skew). Default: IID shards.")
@click.option("--quick/--long", default=False, show_default=True,
              help="The recipe's few-minute demo schedule (50 rounds), or its full schedule (a task without "
                   "a recipe: 300 rounds); both evaluate on the full dev split.")
@option("threads")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="Aggregator port on 127.0.0.1 (default: a free one).")
@click.option("--shard-size", type=click.IntRange(1), default=2000, show_default=True, help="Training examples per client.")
@click.option("--byzantine", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="TEST ONLY: this fraction of the clients are attackers that send garbage scalars "
                   "(pair with --strategy-opt robust=clip).")
@training_options(sorted(STRATEGIES))
@click.pass_context
def simulate(ctx: click.Context, **kw: Any) -> None:
    """Federated training on this machine: 1 aggregator + N client processes.

    Every client gets a disjoint shard of the task's training data (written
    to RUN_DIR/shards), all talk ZeroMQ over 127.0.0.1 exactly as on a real
    network, and the dev accuracy (sft: perplexity, and ROUGE-L of greedy
    generations) is printed before and after training.

    The task's recipe (--recipe) sets the schedule: its stages, learning
    rates, head and averaging, as measured on data held out of training;
    any option you pass wins over it.

    \b
    Examples:
      fwdllm simulate --task sst2 --out runs/sst2          # the recipe's full schedule
      fwdllm simulate --task sst2 --quick --out runs/demo  # its few-minute demo
      fwdllm simulate --clients 8 --dirichlet 0.3 --out runs/noniid
      fwdllm simulate --task agnews-headline --out runs/headline   # federated SFT: headlines
    """
    from fwdllm.aggregator.simulate import PRESETS, run_simulation

    recipe = apply_recipe(kw, explicit_options(ctx, kw), kw["quick"])
    kw["rounds"] = kw["rounds"] or PRESETS[kw["quick"]]["rounds"]
    kw["recipe"] = recipe.name if recipe else "none"  # serve records it; the options below are all explicit
    _specs(kw, kw["rounds"])  # bad training options fail here, before shards or processes exist
    run_simulation(**kw)
