"""Tasks: what a device scores, and how rows of a data file become prompts.

A :class:`TaskSpec` says how to read a file (format, columns), how to build a
prompt (``template``) and what the loss is:

* ``classify`` - the prompt is followed by one of ``label_words``; the loss is
  the cross-entropy of the true label's first token under a softmax restricted
  to the label words' first tokens at the last prompt position.
* ``sft`` - JSONL rows with ``prompt``/``completion``; the loss is the mean
  token cross-entropy over the completion tokens.

Built-in presets
----------------
``sst2``  ``../shared/data/sst2/train.tsv`` (``label<TAB>sentence``, header line).
          Template ``Review: {text}\\nSentiment:``, labels 0/1 -> `` negative``/
          `` positive``.
          SST-2 ships no labelled dev file here, so a FIXED dev split is carved
          out of train.tsv: the 872 data rows (GLUE's dev size) whose
          ``sha256("sst2-dev:<row index>")`` are smallest, row index counted
          from 0 after the header.  ``train`` is every other row.  Both are
          materialised once, in file order, under ``$FWDLLM_CACHE/data`` (default
          ``~/.cache/fwdllm/data``) so that every tool reads plain files.
``sst2-2shot`` SST-2's data and split, with two fixed demonstrations in front
          of the same prompt: 3x the tokens and a lower zero-shot accuracy, but
          features that ``--head`` reads better (``fwdllm bench probe``).
``agnews`` ``ag_news/{train,dev}.csv`` (``label,title,description``), labels
          1-4 = World, Sports, Business, Sci/Tech.  Template
          ``{title}. {description}\nThis news article is about`` -> `` world``/
          `` sports``/`` business``/`` technology``: best of five candidates on
          the first dev rows with SmolLM2 Q4_0 (0.75 on 48 rows; "Article: ...
          Topic (World, Sports, Business or Technology):" got 0.29 on 200,
          "News: ... Category:" 0.48, a question-style prompt 0.42).
``sft``   JSONL with ``prompt`` and ``completion`` (no default data).
``agnews-headline`` headline generation (an ``sft`` task) from AG News:
          prompt ``Article: {description}\nHeadline:``, completion
          `` {title}``.  ``train`` is every row of ``ag_news/train.csv``;
          ``ag_news/dev.csv`` is cut in two by a FIXED hash rule: the 400 data
          rows whose ``sha256("agnews-headline-test:<row index>")`` are
          smallest (row index counted from 0 after the header) are ``test``,
          the other 400 ``dev``.  Tune on dev, report on test.  Runs of
          whitespace become one space; rows with an empty title or
          description are left out.  The splits are
          materialised once as JSONL (``prompt``/``completion``, file order)
          under ``$FWDLLM_CACHE/data``: the very format a user's own ``sft``
          data takes.  Generation stops at a newline (a headline is one line).

A custom task is a ``.toml`` or ``.json`` file with the same field names as
:class:`TaskSpec` (``kind``, ``template``, ``label_words``, ``labels``,
``text_columns``, ``label_column``, ``format``, ``train``/``dev``/``test`` data paths
relative to the spec file, and for ``sft`` the generation limits ``stop`` and
``max_new_tokens``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from fwdllm.core.errors import UserError

KINDS = ("classify", "sft")
FORMATS = ("tsv", "csv", "jsonl")
SST2_DEV_ROWS = 872
HEADLINE_TEST_ROWS = 400
SPLITS = ("train", "dev", "test")
AGNEWS_TEMPLATE = "{title}. {description}\nThis news article is about"
#: Two hand-written demonstrations (not from the data) in front of SST-2's
#: prompt.  Zero-shot falls, but ``--head`` reads the last hidden state, and
#: after them a linear fit on the frozen features separates the labels better
#: (``fwdllm bench probe --template``).
SST2_TWO_SHOT = (
    "Review: an utterly charming and hilarious film.\nSentiment: positive\n"
    "Review: a dull, lifeless mess.\nSentiment: negative\n"
)


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to turn a data file into scored prompts."""

    name: str
    kind: str = "classify"
    template: str = "{text}"
    #: verbalizer, one per label (classify); scored by their FIRST token
    label_words: tuple[str, ...] = ()
    #: raw label values in the file, same order as ``label_words``
    labels: tuple[str, ...] = ()
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    format: str = "csv"
    #: rows whose prompt+completion exceed this many characters are bad rows
    #: (the engine applies the exact token limit of its context as well)
    max_chars: int = 4000
    train: str | None = None
    dev: str | None = None
    #: the held-out split results are reported on (never tuned on)
    test: str | None = None
    #: generation (sft): strings that end a completion, and its token budget
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"task {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.format not in FORMATS:
            raise UserError(f"task {self.name}: format must be one of {FORMATS}, got {self.format!r}")
        if self.kind == "classify":
            if len(self.label_words) < 2 or len(self.label_words) != len(self.labels):
                raise UserError(
                    f"task {self.name}: need >= 2 label_words and as many labels "
                    f"(got {len(self.label_words)} words, {len(self.labels)} labels)"
                )
            if len(set(self.labels)) != len(self.labels):
                raise UserError(f"task {self.name}: duplicate labels {self.labels}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Example:
    """One scored row.  ``label`` indexes ``label_words`` (classify);
    ``completion`` is the target text (sft).  ``line`` is the 1-based line in
    the source file, for error messages."""

    prompt: str
    label: int | None = None
    completion: str | None = None
    line: int = 0
    source: str = field(default="", compare=False)


PRESETS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2",
        template="Review: {text}\nSentiment:",
        label_words=(" negative", " positive"),
        labels=("0", "1"),
        text_columns=("sentence",),
        format="tsv",
        train="sst2/train.tsv",  # split by default_data(), see module docstring
    ),
    "agnews": TaskSpec(
        name="agnews",
        template=AGNEWS_TEMPLATE,
        label_words=(" world", " sports", " business", " technology"),
        labels=("1", "2", "3", "4"),
        text_columns=("title", "description"),
        format="csv",
        train="ag_news/train.csv",
        dev="ag_news/dev.csv",
    ),
    "sft": TaskSpec(name="sft", kind="sft", template="{prompt}", format="jsonl"),
    "agnews-headline": TaskSpec(
        name="agnews-headline",
        kind="sft",
        template="{prompt}",
        format="jsonl",
        train="ag_news/train.csv",  # built into JSONL splits by default_data(), see module docstring
        dev="ag_news/dev.csv",
        test="ag_news/dev.csv",
        stop=("\n",),
        max_new_tokens=32,
    ),
}

PRESETS["sst2-2shot"] = dataclasses.replace(  # the same data and carved split, another prompt
    PRESETS["sst2"], name="sst2-2shot", template=SST2_TWO_SHOT + PRESETS["sst2"].template
)

_TUPLE_FIELDS = {"label_words", "labels", "text_columns", "stop"}


def load_task(name_or_spec: str, **overrides: Any) -> TaskSpec:
    """A preset name (``sst2``, ``agnews``, ``sft``) or a .toml/.json spec file.

    ``overrides`` (e.g. ``text_columns=("review",)``) replace spec fields;
    ``None`` values are ignored so CLI options can be passed straight through.
    """
    fields = {f.name for f in dataclasses.fields(TaskSpec)}
    if name_or_spec in PRESETS:
        base: dict[str, Any] = PRESETS[name_or_spec].to_dict()
    else:
        base = _read_spec_file(Path(name_or_spec))
    unknown = sorted(set(base) - fields)
    if unknown:
        raise UserError(f"task spec {name_or_spec}: unknown field(s) {unknown}; known: {sorted(fields)}")
    for k, v in overrides.items():
        if k not in fields:
            raise UserError(f"unknown task override {k!r}")
        if v is not None:
            base[k] = v
    for k in _TUPLE_FIELDS & set(base):
        v = base[k]
        base[k] = (v,) if isinstance(v, str) else tuple(str(x) for x in v)
    return TaskSpec(**base)


def _read_spec_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"unknown task {str(path)!r}: not a preset ({', '.join(PRESETS)}) nor a spec file")
    try:
        if path.suffix == ".toml":
            import tomllib

            spec = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            spec = json.loads(path.read_text())
        else:
            raise UserError(f"task spec {path}: expected a .toml or .json file")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"task spec {path}: {e}") from None
    if not isinstance(spec, dict):
        raise UserError(f"task spec {path}: expected a table/object at top level")
    spec.setdefault("name", path.stem)
    for split in SPLITS:  # data paths are relative to the spec file
        if isinstance(spec.get(split), str):
            spec[split] = str((path.parent / spec[split]).resolve())
    return spec


# --------------------------------------------------------------------------- #
# data files
# --------------------------------------------------------------------------- #


def data_root() -> Path:
    """``$FWDLLM_DATA``, else ``../shared/data`` next to the repository."""
    env = os.environ.get("FWDLLM_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def _cache_dir() -> Path:
    env = os.environ.get("FWDLLM_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "fwdllm") / "data"


def default_data(task_name: str, split: str) -> Path:
    """The default file of a preset's ``train``, ``dev`` or ``test`` split."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    spec = load_task(task_name)
    if spec.train == PRESETS["sst2"].train and split != "test":  # sst2 and sst2-2shot share the carved split
        return _sst2_split(split)
    if spec.kind == "sft" and spec.train == PRESETS["agnews-headline"].train:
        return _headline_split(split)
    rel = getattr(spec, split)
    if rel is None:
        raise UserError(f"task {spec.name} has no default {split} data; pass --data FILE")
    path = data_root() / rel if not Path(rel).is_absolute() else Path(rel)
    if not path.is_file():
        raise UserError(f"{path} not found (set FWDLLM_DATA to the shared data directory)")
    return path


def _sst2_split(split: str) -> Path:
    """Materialise the fixed SST-2 dev/train split (see module docstring)."""
    src = data_root() / "sst2" / "train.tsv"
    if not src.is_file():
        raise UserError(f"{src} not found (set FWDLLM_DATA to the shared data directory)")
    st = src.stat()
    out = _cache_dir() / f"sst2-{split}-{st.st_size}.tsv"
    if out.is_file():
        return out
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    header, rows = lines[0], lines[1:]
    ranked = sorted(range(len(rows)), key=lambda i: hashlib.sha256(f"sst2-dev:{i}".encode()).digest())
    dev = set(ranked[:SST2_DEV_ROWS])
    keep = [r for i, r in enumerate(rows) if (i in dev) == (split == "dev")]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.part")
    tmp.write_text(header + "".join(keep), encoding="utf-8")
    os.replace(tmp, out)
    return out


def _headline_split(split: str) -> Path:
    """Materialise the fixed AG News headline splits as JSONL (see module docstring)."""
    src = data_root() / ("ag_news/train.csv" if split == "train" else "ag_news/dev.csv")
    if not src.is_file():
        raise UserError(f"{src} not found (set FWDLLM_DATA to the shared data directory)")
    out = _cache_dir() / f"agnews-headline-{split}-{src.stat().st_size}.jsonl"
    if out.is_file():
        return out
    with src.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    keep = range(len(rows))
    if split != "train":
        ranked = sorted(keep, key=lambda i: hashlib.sha256(f"agnews-headline-test:{i}".encode()).digest())
        test = set(ranked[:HEADLINE_TEST_ROWS])
        keep = [i for i in keep if (i in test) == (split == "test")]
    lines = []
    for i in keep:
        title, desc = (" ".join((rows[i].get(c) or "").split()) for c in ("title", "description"))
        if title and desc:
            lines.append(json.dumps({"prompt": f"Article: {desc}\nHeadline:", "completion": f" {title}"}) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.part")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, out)
    return out


def _rows(task: TaskSpec, path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, row dict or None, parse error) for every data row."""
    with path.open(encoding="utf-8", newline="") as f:
        if task.format == "jsonl":
            for i, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as e:
                    yield i, None, f"not JSON ({e.msg})"
                    continue
                yield (i, row, "") if isinstance(row, dict) else (i, None, "not a JSON object")
            return
        if task.format == "tsv":  # GLUE tsv files are unquoted; a '"' is text
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.DictReader(f)
        for row in reader:
            yield reader.line_num, row, ""


def _example(task: TaskSpec, row: dict[str, Any], line: int, source: str) -> tuple[Example | None, str]:
    """Build one example, or (None, reason) for a bad row."""
    if task.kind == "sft":
        prompt, completion = row.get(task.prompt_column), row.get(task.completion_column)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return None, f"missing string {task.prompt_column!r}/{task.completion_column!r}"
        if not completion.strip():
            return None, "empty completion"
        text = task.template.format(prompt=prompt)
        if len(text) + len(completion) > task.max_chars:
            return None, f"too long ({len(text) + len(completion)} > {task.max_chars} chars)"
        return Example(prompt=text, completion=completion, line=line, source=source), ""
    missing = [c for c in (*task.text_columns, task.label_column) if c not in row]
    if missing:
        return None, f"missing column(s) {missing}"
    cols = {c: str(row[c] if row[c] is not None else "").strip() for c in task.text_columns}
    if not any(cols.values()):
        return None, "empty text"
    label = str(row[task.label_column]).strip()
    if label not in task.labels:
        return None, f"unknown label {label!r} (expected one of {list(task.labels)})"
    text = " ".join(v for v in cols.values() if v)
    try:
        prompt = task.template.format(**{**cols, "text": text})
    except (KeyError, IndexError) as e:
        raise UserError(f"task {task.name}: template refers to unknown column {e}") from None
    if len(prompt) > task.max_chars:
        return None, f"too long ({len(prompt)} > {task.max_chars} chars)"
    return Example(prompt=prompt, label=task.labels.index(label), line=line, source=source), ""


def report_bad(source: str, line: int, reason: str, strict: bool) -> None:
    """A bad row is fatal (``strict``) or a warning on stderr, never silent."""
    msg = f"{source}:{line}: bad row: {reason}"
    if strict:
        raise UserError(msg + " (drop --strict to skip bad rows)")
    print(f"warning: {msg}; skipped", file=sys.stderr)


def read_examples(
    task: TaskSpec, path: str | os.PathLike, *, limit: int | None = None, strict: bool = False
) -> list[Example]:
    """Read up to ``limit`` good examples from ``path`` (csv/tsv/jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} not found")
    out: list[Example] = []
    try:
        for line, row, err in _rows(task, path):
            if limit is not None and len(out) >= limit:
                break
            ex, err = (None, err) if row is None else _example(task, row, line, str(path))
            if ex is None:
                report_bad(str(path), line, err, strict)
            else:
                out.append(ex)
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot parse as {task.format}: {e}") from None
    if not out:
        raise UserError(f"{path}: no usable examples for task {task.name}")
    return out
