"""The command line's vocabulary: every option that more than one command
takes, with its one meaning, its one format and its one default.

A flag means the same thing in every ``fwdllm`` command, so a command that
needs a shared option takes it from :data:`OPTIONS` (``@shared("model",
"task", ...)``) instead of declaring its own.  Only the size of the job a
command runs (``--rounds``, ``--clients``) and where its output goes
(``--out``) may have a command's own default; ``docs/cli.md`` is generated
from these definitions.

This module also holds :class:`Command` and :class:`Group`, which every
command uses so that bad input is one line and exit status 2, never a
traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import click

from fwdllm.core.directions import DISTRIBUTIONS
from fwdllm.core.errors import UserError
from fwdllm.core.layout import PARTS, TARGETS, split_targets
from fwdllm.core.optim import OPTIMIZERS, SCHEDULES
from fwdllm.runtime.models import DEFAULT_MODEL
from fwdllm.runtime.tasks import SPLITS


class Failure(click.ClickException):
    """A :class:`UserError` as click shows it: ``Error: <line>``, exit status 2."""

    exit_code = UserError.exit_code


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a :class:`UserError` raised below a command into click's one-line error."""
    try:
        yield
    except UserError as e:
        raise Failure(str(e)) from None


#: Every command's context: ``-h`` works everywhere, and help wraps at a width that reads well.
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Command(click.Command):
    """Every fwdllm command: bad input is one line and exit status 2, never a traceback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["context_settings"] = {**CONTEXT, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with one_line_errors():
            return super().invoke(ctx)


class Group(click.Group):
    """Every fwdllm command group; its commands and subgroups are fwdllm's too."""

    command_class = Command
    group_class = type  # subgroups are of this class

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["context_settings"] = {**CONTEXT, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with one_line_errors():
            return super().invoke(ctx)


# --------------------------------------------------------------------------- #
# parsing shared formats
# --------------------------------------------------------------------------- #


def parse_targets(value: str) -> tuple[str, ...]:
    """``--targets q,v`` (or ``q+v``), checked before anything is written."""
    names = split_targets(value)
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise UserError(f"--targets: unknown {bad or value!r}; choose from {','.join(TARGETS)}")
    return names


def parse_layers(value: str | None) -> tuple[int, int] | None:
    """``--layers START:STOP`` -> a half-open layer range (checked against the model later)."""
    if value is None:
        return None
    try:
        start, stop = (int(x) for x in value.split(":"))
    except ValueError:
        raise UserError(f"--layers: expected START:STOP, e.g. 0:15; got {value!r}") from None
    if not 0 <= start < stop:
        raise UserError(f"--layers: need 0 <= START < STOP, got {value!r}")
    return start, stop


def parse_columns(value: str | None) -> tuple[str, ...] | None:
    """``--text-column title,description`` -> the column names, or None (the task's own)."""
    return tuple(c.strip() for c in value.split(",") if c.strip()) if value else None


def parse_label_words(value: str | None) -> tuple[str, ...] | None:
    """``--label-words bad,good`` -> a verbalizer override, or None (the task's own)."""
    return tuple(value.split(",")) if value else None


def threads_for(threads: int | None, processes: int = 1) -> int:
    """``--threads``, or this machine's cores shared evenly among ``processes``
    (llama.cpp is compute bound: more threads than cores only adds contention)."""
    if threads:
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    return max(1, cores // processes)


def strategy_extra(pairs: Sequence[str]) -> dict[str, Any]:
    """``--strategy-opt KEY=VALUE`` pairs -> a dict (VALUE as JSON when it parses)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--strategy-opt {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


# --------------------------------------------------------------------------- #
# the table
# --------------------------------------------------------------------------- #

_FILE_IN = click.Path(dir_okay=False, exists=True, path_type=Path)
_DIR_OUT = click.Path(file_okay=False, path_type=Path)
_POSITIVE = click.FloatRange(min=0, min_open=True)

#: name -> (flags, click attributes).  The defaults of the training knobs are the
#: measured best on SmolLM2-135M INT4 (docs/experiments): eps 3e-2 agrees best
#: with torch's exact projections, lr 0.1 is the edge of stability, targets v
#: carries the most gradient per dimension, one-sided Gaussian SGD ties or beats
#: the alternatives per forward pass.
OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    # what to run on
    "model": (("--model",), dict(default=DEFAULT_MODEL, show_default=True,
                                 help="Base model: a GGUF path or a model-store name (pulled on first use).")),
    "task": (("--task",), dict(default="sst2", show_default=True,
                               help="Task: a preset (sst2, sst2-2shot, sst2-8shot, agnews, agnews-headline, sft) or a "
                                    ".toml/.json task spec.")),
    "data": (("--data",), dict(type=click.Path(dir_okay=False, path_type=Path), default=None,
                               help="Data file (csv, tsv or jsonl); commands that can do without one read a split of "
                                    "the task's own data.")),
    "split": (("--split",), dict(type=click.Choice(SPLITS), default="dev", show_default=True,
                                 help="The task's data split to read when --data is not given (dev-phrases: SST-2's "
                                      "phrase-level dev split; tune-*: held out of train for choosing recipes; test: "
                                      "agnews-headline's held-out split).")),
    "label_words": (("--label-words",), dict(default=None, metavar="W1,W2,...",
                                             help="Override the task's label words (its verbalizer).")),
    "lora": (("--lora",), dict(type=_FILE_IN, default=None, help="LoRA adapter GGUF, e.g. a run's adapter.gguf.")),
    "limit": (("--limit",), dict(type=click.IntRange(min=1), default=None, help="Use only the first N good rows.")),
    "dev_limit": (("--dev-limit",), dict(type=click.IntRange(1), default=None,
                                         help="Evaluate on the first N dev examples only (default: all).")),
    "eval_every": (("--eval-every",), dict(type=click.IntRange(1), default=None,
                                           help="Evaluate every N rounds, and after the last (default: a few "
                                                "times per run).")),
    # how llama.cpp runs
    "threads": (("--threads",), dict(type=click.IntRange(1, 256), default=None,
                                     help="llama.cpp threads per process (default: the cores, shared evenly "
                                          "among the processes this command starts).")),
    "max_batch": (("--max-batch",), dict(type=click.IntRange(1, 256), default=16, show_default=True,
                                         help="Sequences per llama_decode (an sft task decodes one at a time), and "
                                              "the most rows a device scores per batch.")),
    "n_ctx": (("--n-ctx",), dict(type=click.IntRange(min=8), default=None,
                                 help="Max tokens per example (default: 256, sft 512, plus room for a long template).")),
    "no_mmap": (("--no-mmap",), dict(is_flag=True, help="Read the model into memory instead of mmap "
                                                        "(1.14x the file at peak instead of ~2x).")),
    "no_repack": (("--no-repack",), dict(is_flag=True, help="Skip llama.cpp's CPU weight repacking "
                                                            "(lower peak memory, slower Q4_0).")),
    "json": (("--json", "as_json"), dict(is_flag=True, help="Print one JSON object as the last stdout line.")),
    # the adapter
    "rank": (("--rank",), dict(type=click.IntRange(1, 256), default=8, show_default=True, help="LoRA rank.")),
    "lora_alpha": (("--lora-alpha",), dict(type=float, default=16.0, show_default=True,
                                           help="LoRA alpha: llama.cpp scales B@A by alpha/rank.")),
    "targets": (("--targets",), dict(default="v", show_default=True,
                                     help=f"Weights the LoRA adapts, from {','.join(TARGETS)} (comma- or "
                                          "plus-separated).")),
    "layers": (("--layers",), dict(default=None, metavar="START:STOP",
                                   help="Only layers START..STOP-1, e.g. 0:15 (default: all).")),
    # the perturbations
    "k": (("--k",), dict(type=click.IntRange(0, 4096), default=16, show_default=True,
                         help="Perturbations (seeds) per round, all clients together. In training, 0 with "
                              "--head trains the head alone (one forward pass per client per round).")),
    "eps": (("--eps",), dict(type=_POSITIVE, default=3e-2, show_default=True,
                             help="Perturbation size, in LoRA tensor units.")),
    "parts": (("--parts",), dict(type=click.Choice(PARTS), default="b", show_default=True,
                                 help="Which LoRA factor to perturb (B starts at zero).")),
    "dist": (("--dist",), dict(type=click.Choice(DISTRIBUTIONS), default="gaussian", show_default=True,
                               help="Distribution of the perturbation directions.")),
    "one_sided": (("--one-sided/--central",), dict(default=True, show_default=True,
                                                   help="Forward differences (K+1 passes, one shared base loss) "
                                                        "or central differences (2K passes).")),
    "batch_size": (("--batch-size",), dict(type=click.IntRange(1, 256), default=8, show_default=True,
                                           help="Examples per scored batch (per client per round).")),
    "lr": (("--lr",), dict(type=_POSITIVE, default=0.1, show_default=True, help="Learning rate of the LoRA.")),
    "seed": (("--seed",), dict(type=int, default=0, show_default=True,
                               help="Seed of every random choice: perturbations, batches, LoRA init.")),
    # job size and output (a command may set its own default)
    "rounds": (("--rounds",), dict(type=click.IntRange(1), help="Training rounds.")),
    "clients": (("--clients",), dict(type=click.IntRange(1, 1024), default=4, show_default=True,
                                     help="Number of clients.")),
    "out": (("--out",), dict(type=_DIR_OUT, help="Directory for this command's output.")),
}


def option(name: str, **override: Any) -> Callable[[Callable], Callable]:
    """The shared option ``name``; ``override`` may set only ``required`` and,
    for ``rounds``/``clients``/``out``, the command's own ``default``."""
    decls, attrs = OPTIONS[name]
    allowed = {"required", "default", "help"} if name in ("rounds", "clients", "out") else {"required"}
    if set(override) - allowed:
        raise TypeError(f"--{name}: a shared option may not change {sorted(set(override) - allowed)}")
    if "default" in override:
        override = {"show_default": True, **override}
    return click.option(*decls, **{**attrs, **override})


def shared(*names: str) -> Callable[[Callable], Callable]:
    """Decorate a command with shared options, listed in ``--help`` in this order."""
    return lambda f: functools.reduce(lambda g, n: option(n)(g), reversed(names), f)


def engine_options(f: Callable) -> Callable:
    """What every command that scores data through llama.cpp takes."""
    return shared("threads", "max_batch", "n_ctx", "no_mmap", "no_repack")(f)


# --------------------------------------------------------------------------- #
# training runs (aggregator serve, simulate)
# --------------------------------------------------------------------------- #


def training_options(strategies: Sequence[str]) -> Callable[[Callable], Callable]:
    """Options that define a run's training (shared by serve and simulate);
    ``strategies`` are the ``--strategy`` choices (the aggregator's registry)."""
    own = [
        option("task"),
        click.option("--recipe", default="auto", show_default=True, metavar="auto|none|NAME",
                     help="The task's measured training defaults (stages, rates, head): auto = the task's own, "
                          "none = the plain option defaults. Every option you pass wins over it."),
        click.option("--stages", default=None, metavar="ROUNDS[:KEY=V...],...",
                     help="Stages inside the run, each ROUNDS rounds with its own k, lr, head-lr and ema "
                          "(KEY=VALUE; the run's options fill the rest; the schedule restarts in each stage; "
                          "a stage with ema ends on its average), e.g. 300:k=16:lr=0.05:ema=0.98,"
                          "100:k=0:head-lr=1e-2. '' = one stage. Default: the recipe's."),
        click.option("--dev", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Dev file to evaluate on (default: the task's dev split)."),
        option("dev_limit"),
        option("eval_every"),
        click.option("--strategy", type=click.Choice(strategies), default="zo-sgd", show_default=True,
                     help="Training algorithm (docs/algorithms.md)."),
        option("k"),
        option("eps"),
        option("batch_size"),
        click.option("--batch-draw", type=click.Choice(("uniform", "stratified")), default="uniform",
                     show_default=True,
                     help="How a client draws its batch: uniform, or stratified by label (each label gets its "
                          "share of the shard, rounded at random, so the batch gradient stays unbiased)."),
        option("lr"),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="sgd", show_default=True,
                     help="Optimizer of the LoRA (the head always steps with Adam)."),
        click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
                     help="SGD momentum."),
        click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
                     help="Decay of a moving average of the adapter over rounds (0 = off). The average is what is "
                          "evaluated and written to adapter.gguf; it costs no forward passes."),
        click.option("--head/--no-head", default=False, show_default=True,
                     help="Also train the label words' output rows (classify tasks). Their gradient is exact and "
                          "comes from the forward pass; it costs n_labels*n_embd*4 bytes each way per round."),
        click.option("--head-lr", type=_POSITIVE, default=3e-3, show_default=True,
                     help="Learning rate of the head (--head), on the same schedule."),
        click.option("--schedule", type=click.Choice(SCHEDULES), default="cosine", show_default=True,
                     help="Learning-rate schedule over the rounds."),
        click.option("--warmup", type=click.IntRange(0), default=0, show_default=True,
                     help="Rounds of linear learning-rate warmup."),
        option("rank"),
        option("lora_alpha"),
        option("targets"),
        click.option("--init-adapter", type=_FILE_IN, default=None,
                     help="Start from this LoRA GGUF (a run's adapter.gguf, or `fwdllm convert lora-from-peft` "
                          "output) instead of a fresh one; --rank/--lora-alpha/--targets must match it."),
        option("parts"),
        option("layers"),
        option("dist"),
        option("one_sided"),
        option("seed"),
        click.option("--strategy-opt", "strategy_opt", multiple=True, metavar="KEY=VALUE",
                     help="Strategy-specific option (repeatable; VALUE is parsed as JSON when it can be)."),
        # protocol v2: compression and privacy (docs/security.md)
        click.option("--head-codec", type=click.Choice(("f32", "f16", "int8")), default="int8", show_default=True,
                     help="Encoding of head gradients both ways (--head): int8 is a scale per row and a byte an "
                          "entry, with the rounding error carried into the next round."),
        click.option("--secagg/--no-secagg", default=False, show_default=True,
                     help="Secure aggregation: the aggregator learns only the sum of the clients' scalars (and "
                          "head gradients), never one client's. Every client scores every seed; zo-sgd only."),
        click.option("--secagg-bound", type=_POSITIVE, default=1e4, show_default=True,
                     help="With --secagg, each client clips every entry it contributes to +-this before masking "
                          "(a sum outside clients x bound is rejected)."),
        click.option("--dp-epsilon", type=_POSITIVE, default=None,
                     help="Example-level differential privacy of the scalars at this epsilon over the whole run "
                          "(Poisson batches, per-example clipping, Gaussian noise; no --head). Default: off."),
        click.option("--dp-delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-5,
                     show_default=True, help="The delta of --dp-epsilon."),
        click.option("--dp-clip", type=_POSITIVE, default=1.0, show_default=True,
                     help="L2 bound of one example's per-seed scalars under --dp-epsilon."),
        click.option("--dp-on-spent", type=click.Choice(("stop", "warn")), default="stop", show_default=True,
                     help="When the next round would pass the privacy budget: stop the run, or warn and go on."),
    ]
    return lambda f: functools.reduce(lambda g, o: o(g), reversed(own), f)


#: How simulate passes each boolean training option on to ``serve``.
BOOL_FLAGS = {"one_sided": ("--one-sided", "--central"), "head": ("--head", "--no-head"),
              "secagg": ("--secagg", "--no-secagg")}

#: The training options' parameter names, in the order simulate passes them on.
TRAINING_KEYS = (
    "task recipe stages dev dev_limit eval_every strategy k eps batch_size batch_draw lr optimizer momentum ema head "
    "head_lr schedule warmup rank lora_alpha targets init_adapter parts layers dist one_sided seed strategy_opt "
    "head_codec secagg secagg_bound dp_epsilon dp_delta dp_clip dp_on_spent"
).split()


# --------------------------------------------------------------------------- #
# CURVE keys
# --------------------------------------------------------------------------- #


def server_key_options(f: Callable) -> Callable:
    """``--curve-secret`` / ``--allow`` for the aggregator (kw: curve_secret, allow)."""
    f = click.option("--allow", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
                     help="Directory of allowed client public keys (*.key); enables CURVE with --curve-secret.")(f)
    return click.option("--curve-secret", type=_FILE_IN, default=None,
                        help="The aggregator's CURVE keypair (NAME.key_secret from `fwdllm keys generate`).")(f)


def client_key_options(f: Callable) -> Callable:
    """``--curve-secret`` / ``--server-key`` for a device (kw: curve_secret, server_key)."""
    f = click.option("--server-key", type=_FILE_IN, default=None,
                     help="The aggregator's public key (its NAME.key); enables CURVE with --curve-secret.")(f)
    return click.option("--curve-secret", type=_FILE_IN, default=None,
                        help="This device's CURVE keypair (NAME.key_secret from `fwdllm keys generate`).")(f)
