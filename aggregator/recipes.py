"""Recipes: the measured training schedule of each task, so that a plain
``fwdllm simulate --task T`` (or ``aggregator serve``) trains it well.

A recipe is a set of training-option defaults plus ``--stages``: the stages
inside the one run (what trains, at which rates, for how many rounds).  Every
option the user passes on the command line wins over the recipe's value; a
recipe stage's ``k``/``lr``/``head-lr``/``ema`` yields to an explicit
``--k``/``--lr``/``--head-lr``/``--ema``, and an explicit ``--rounds`` scales
its stages (:func:`_scaled`).  ``--recipe none`` trains with the plain option defaults.  The
resolved options, stages included, are what run.json records.

The numbers come from runs on data held out of training (the tasks'
``tune-train``/``tune-val`` splits), never from the dev split they are
reported on; docs/experiments has each measurement.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from fwdllm.core.errors import UserError
from fwdllm.core.optim import Stage

#: Stage keys on the command line -> the training option each one yields to.
STAGE_KEYS = {"k": "k", "lr": "lr", "head-lr": "head_lr", "ema": "ema"}


@dataclass(frozen=True)
class Recipe:
    """Training defaults of one task: ``options`` (training-option parameter
    names), and ``stages``/``quick_stages`` for the full run and for
    ``simulate --quick``; ``head_only`` and ``zo_only`` are the stages of a
    classify recipe's ablations (``fwdllm bench quality``): the head alone, and
    the ZO part alone (an sft task has no head, so no ablations)."""

    name: str
    options: Mapping[str, Any]
    stages: str
    quick_stages: str
    eval_every: int
    quick_eval_every: int
    head_only: str | None = None
    zo_only: str | None = None
    #: the presets it serves (a task spec file has none)
    tasks: tuple[str, ...] = field(default=())


_SST2 = Recipe(
    name="sst2",
    tasks=("sst2",),
    options={"head": True, "batch_size": 8},
    stages="300:k=16:lr=0.05:head-lr=0:ema=0.98,100:k=0:lr=0:head-lr=1e-2",
    quick_stages="50:k=16:lr=0.1:head-lr=3e-3:ema=0.9",
    eval_every=100,
    quick_eval_every=50,
    head_only="400:k=0:lr=0:head-lr=1e-2",
    zo_only="400:k=16:lr=0.05:ema=0.98",
)
# AG News: its own head rate (3e-3), measured as docs/experiments records, and 100 ZO rounds
# rather than 300, because its articles make a ZO round ~3x SST-2's (19 s here) and the run must fit the hour
_AGNEWS = dataclasses.replace(
    _SST2,
    name="agnews",
    tasks=("agnews",),
    stages="100:k=16:lr=0.05:head-lr=0:ema=0.98,100:k=0:lr=0:head-lr=3e-3",
    head_only="400:k=0:lr=0:head-lr=3e-3",
    zo_only="100:k=16:lr=0.05:ema=0.98",
)
# Headlines (sft): ZO on v's B alone, at the option defaults, ending on a 0.98 average (a
# ~50-round window); 140 rounds, with the before/after evaluations, fit the hour here
_HEADLINE = Recipe(
    name="agnews-headline",
    tasks=("agnews-headline",),
    options={"batch_size": 8},
    stages="140:k=16:lr=0.1:ema=0.98",
    quick_stages="50:k=16:lr=0.1:ema=0.9",
    eval_every=140,
    quick_eval_every=50,
)
RECIPES: dict[str, Recipe] = {r.name: r for r in (_SST2, _AGNEWS, _HEADLINE)}


def recipe_for(name: str, task: str) -> Recipe | None:
    """``--recipe NAME`` for ``--task``: ``auto`` is the task's own (None for a
    task without one), ``none`` is None."""
    if name == "none":
        return None
    if name == "auto":
        return next((r for r in RECIPES.values() if task in r.tasks), None)
    if name not in RECIPES:
        raise UserError(f"--recipe: unknown {name!r}; choose from auto, none, {', '.join(RECIPES)}")
    return RECIPES[name]


def parse_stages(value: str) -> list[tuple[int, dict[str, str]]]:
    """``300:k=16:lr=0.05,100:k=0`` -> [(300, {"k": "16", "lr": "0.05"}), (100, {"k": "0"})]."""
    out = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        rounds, *pairs = part.split(":")
        entry: dict[str, str] = {}
        for pair in pairs:
            key, sep, val = pair.partition("=")
            if not sep or key not in STAGE_KEYS:
                raise UserError(f"--stages {value!r}: bad {pair!r}; a stage is ROUNDS[:KEY=VALUE...] with KEY one "
                                f"of {', '.join(STAGE_KEYS)}")
            entry[key] = val
        if not re.fullmatch(r"[1-9]\d*", rounds):
            raise UserError(f"--stages {value!r}: {rounds!r} is not a number of rounds")
        out.append((int(rounds), entry))
    return out


def build_stages(value: str | None, kw: Mapping[str, Any]) -> tuple[Stage, ...]:
    """The stages of ``--stages``, each key it leaves out taken from the run's
    option (a head rate of 0 there means the LoRA's, as without stages)."""
    if not value:
        return ()
    base = {"k": kw["k"], "lr": kw["lr"], "head_lr": kw["head_lr"] or kw["lr"], "ema": kw["ema"]}
    out = []
    for rounds, entry in parse_stages(value):
        vals = {**base, **{STAGE_KEYS[k]: v for k, v in entry.items()}}
        try:
            out.append(Stage(rounds, int(vals["k"]), float(vals["lr"]), float(vals["head_lr"]), float(vals["ema"])))
        except ValueError as e:
            raise UserError(f"--stages {value!r}: {e}") from None
    return tuple(out)


def _scaled(stages: str, rounds: int) -> str:
    """``stages`` with its rounds scaled to add up to ``rounds``: each stage
    keeps at least one, the last takes the rounding, and with fewer rounds
    than stages the first ``rounds`` stages get one each."""
    parsed = parse_stages(stages)[:rounds]
    total = sum(r for r, _ in parsed)
    sizes = [max(1, round(r * rounds / total)) for r, _ in parsed[:-1]]
    sizes.append(rounds - sum(sizes))
    while sizes[-1] < 1:  # rounding gave the early stages too much: take it back from the largest
        i = sizes.index(max(sizes[:-1]))
        sizes[i] -= 1
        sizes[-1] += 1
    return ",".join(":".join([str(n), *(f"{k}={v}" for k, v in e.items())]) for n, (_, e) in zip(sizes, parsed))


def apply_recipe(kw: dict[str, Any], explicit: set[str], quick: bool) -> Recipe | None:
    """Fill ``kw`` (training options by parameter name) from the task's recipe
    where the user did not pass the option (``explicit``), and return it.

    Sets ``kw["stages"]`` (unless passed), ``kw["rounds"]`` and
    ``kw["eval_every"]`` (unless passed); without a recipe, ``--stages``
    alone still sets the rounds."""
    recipe = recipe_for(kw.get("recipe") or "auto", kw["task"])
    if recipe is None:
        if kw.get("stages") and "rounds" not in explicit:
            kw["rounds"] = sum(n for n, _ in parse_stages(kw["stages"]))
        return None
    for name, value in recipe.options.items():
        if name not in explicit:
            kw[name] = value
    if "stages" not in explicit:
        stages = recipe.quick_stages if quick else recipe.stages
        keep = {k for k, opt in STAGE_KEYS.items() if opt not in explicit}  # an explicit flag beats the stage's
        stages = ",".join(":".join([str(n), *(f"{k}={v}" for k, v in e.items() if k in keep)])
                          for n, e in parse_stages(stages))
        kw["stages"] = _scaled(stages, kw["rounds"]) if "rounds" in explicit else stages
    if "rounds" not in explicit:
        kw["rounds"] = sum(n for n, _ in parse_stages(kw["stages"])) if kw["stages"] else kw["rounds"]
    if "eval_every" not in explicit:
        kw["eval_every"] = recipe.quick_eval_every if quick else recipe.eval_every
    return recipe
