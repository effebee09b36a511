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
          SST-2 ships no labelled dev file here, and ``train.tsv`` holds every
          labelled *phrase* of its sentences (mean 9 tokens) next to the
          sentences themselves, while users score whole reviews.  So FIXED
          splits are carved out of it (:func:`sst2_splits`):

          * ``dev`` - 872 whole sentences (GLUE's dev size).  A *whole
            sentence* is a row whose tokens (split on spaces) are a contiguous
            run of no other, longer row; the 6,886 such rows average 19
            tokens, like GLUE's sentence-level dev set.  The 872 are those
            whose ``sha256("sst2-sentence-dev:" + text)`` are smallest.
          * ``dev-phrases`` - the earlier phrase-level split, kept for
            continuity: the 872 rows whose ``sha256("sst2-dev:<row index>")``
            are smallest (row index counted from 0 after the header).
          * ``train`` - every other row, less every row whose tokens are a
            contiguous run of a ``dev`` sentence (its phrases) and every row
            whose text is a ``dev-phrases`` row's: no dev sentence is seen in
            training, whole or in part.
          * ``tune-train`` / ``tune-val`` - ``train`` split once more the same
            way (salt ``sst2-sentence-val:``), for choosing recipes without
            touching ``dev``.

          All are materialised once, in file order, under ``$FWDLLM_CACHE/data``
          (default ``~/.cache/fwdllm/data``) so that every tool reads plain
          files.
``sst2-2shot`` SST-2's data and split, the prompt after two hand-written
          demonstrations.
``sst2-8shot`` the prompt after :data:`SST2_EIGHT_SHOT`, eight training
          sentences: they raise what ``--head`` can read from the frozen
          features of whole sentences from 0.82 to 0.88 (docs/experiments) for
          ~250 more tokens, which the engine decodes once per batch.
``agnews`` ``ag_news/{train,dev}.csv`` (``label,title,description``), labels
          1-4 = World, Sports, Business, Sci/Tech.  Template
          ``{title}. {description}\nThis news article is about`` -> `` world``/
          `` sports``/`` business``/`` technology``: best of five candidates on
          the first dev rows with SmolLM2 Q4_0 (0.75 on 48 rows; "Article: ...
          Topic (World, Sports, Business or Technology):" got 0.29 on 200,
          "News: ... Category:" 0.48, a question-style prompt 0.42).
          ``tune-train`` / ``tune-val``: ``train.csv`` less / only its 800
          rows whose ``sha256("agnews-val:<row index>")`` are smallest, for
          choosing recipes without touching ``dev``.
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

import bisect
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from fwdllm.core.errors import UserError
from fwdllm.core.files import atomic_write

KINDS = ("classify", "sft")
FORMATS = ("tsv", "csv", "jsonl")
SST2_DEV_ROWS = 872
HEADLINE_TEST_ROWS = 400
#: the splits a task spec file can name, and those ``--split`` can read (presets carve the others)
DATA_SPLITS = ("train", "dev", "test")
AGNEWS_TEMPLATE = "{title}. {description}\nThis news article is about"
#: Two hand-written demonstrations (not from the data) in front of SST-2's
#: prompt.  Zero-shot falls, but ``--head`` reads the last hidden state, and
#: after them a linear fit on the frozen features separates the labels better
#: (``fwdllm bench probe --template``).
SST2_TWO_SHOT = (
    "Review: an utterly charming and hilarious film.\nSentiment: positive\n"
    "Review: a dull, lifeless mess.\nSentiment: negative\n"
)
#: Eight whole sentences of SST-2's ``tune-train`` split (so of ``train``, never
#: of a dev split) with 8-16 tokens, four per label, alternating: those with
#: the smallest ``sha256("sst2-demo:" + text)``.
SST2_EIGHT_SHOT = (
    "Review: by the standards of knucklehead swill , the hot chick is pretty damned funny .\nSentiment: positive\n"
    "Review: this orange has some juice , but it 's far from fresh-squeezed .\nSentiment: negative\n"
    "Review: one of the most gloriously unsubtle and adrenalized extreme shockers since the evil dead .\n"
    "Sentiment: positive\n"
    "Review: the sweetest thing leaves a bitter taste .\nSentiment: negative\n"
    "Review: bigelow offers some flashy twists and turns that occasionally fortify this turgid fable .\n"
    "Sentiment: positive\n"
    "Review: it 's bedeviled by labored writing and slack direction .\nSentiment: negative\n"
    "Review: jeffrey tambor 's performance as the intelligent jazz-playing exterminator is oscar-worthy .\n"
    "Sentiment: positive\n"
    "Review: a relentless , bombastic and ultimately empty world war ii action flick .\nSentiment: negative\n"
)
SST2_PROMPT = "Review: {text}\nSentiment:"


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
        template=SST2_PROMPT,
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

for _name, _demos in (("sst2-2shot", SST2_TWO_SHOT), ("sst2-8shot", SST2_EIGHT_SHOT)):  # the same data and split
    PRESETS[_name] = dataclasses.replace(PRESETS["sst2"], name=_name, template=_demos + SST2_PROMPT)

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
    for split in DATA_SPLITS:  # data paths are relative to the spec file
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


#: The splits :func:`default_data` knows; ``dev-phrases`` is SST-2's only.
SPLITS = (*DATA_SPLITS, "dev-phrases", "tune-train", "tune-val")
AGNEWS_VAL_ROWS = 800


def default_data(task_name: str, split: str) -> Path:
    """The default file of a preset's split (:data:`SPLITS`; module docstring)."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    spec = load_task(task_name)
    if spec.kind == "sft" and spec.train == PRESETS["agnews-headline"].train and split in DATA_SPLITS:
        return _headline_split(split)
    if spec.train == PRESETS["sst2"].train and split != "test":  # the sst2 presets share the carved splits
        return sst2_splits()[split]
    if spec.train == PRESETS["agnews"].train and spec.kind == "classify" and split.startswith("tune-"):
        return _agnews_tune_split()[split]
    if split not in DATA_SPLITS:
        raise UserError(f"task {spec.name} has no {split} split (only the sst2 and agnews presets carve one)")
    rel = getattr(spec, split)
    if rel is None:
        raise UserError(f"task {spec.name} has no default {split} data; pass --data FILE")
    path = data_root() / rel if not Path(rel).is_absolute() else Path(rel)
    if not path.is_file():
        raise UserError(f"{path} not found (set FWDLLM_DATA to the shared data directory)")
    return path


def _shared_file(rel: str) -> Path:
    src = data_root() / rel
    if not src.is_file():
        raise UserError(f"{src} not found (set FWDLLM_DATA to the shared data directory)")
    return src


def _rank(keys: Iterable[str], n: int) -> list[int]:
    """Indices of the ``n`` smallest ``sha256(key)``: a fixed, order-free draw."""
    keys = list(keys)
    return sorted(range(len(keys)), key=lambda i: hashlib.sha256(keys[i].encode()).digest())[:n]


def whole_sentences(texts: Sequence[str]) -> list[int]:
    """Indices of the rows whose tokens (split on spaces) are a contiguous run of
    no other, longer row: SST-2's whole sentences among their own phrases.

    Every suffix of every row is sorted once; row ``t`` is a run inside a longer
    row exactly when some suffix other than ``t`` itself starts with ``t``
    followed by a space or equals ``t`` from a later start, and a space sorts
    before every other character that occurs, so those suffixes follow ``t``.
    """
    toks = [t.split() for t in texts]
    suffixes = sorted((" ".join(w[p:]), p) for w in toks for p in range(len(w)))
    keys = [s for s, _ in suffixes]
    out = []
    for i, w in enumerate(toks):
        t = " ".join(w)
        j = bisect.bisect_left(keys, t)
        inside = False
        while j < len(keys) and (keys[j] == t or keys[j].startswith(t + " ")):
            if keys[j] != t or suffixes[j][1] > 0:
                inside = True
                break
            j += 1
        if w and not inside:
            out.append(i)
    return out


def _runs(text: str) -> set[str]:
    """Every contiguous run of ``text``'s tokens (the phrases a sentence holds)."""
    w = text.split()
    return {" ".join(w[a:b]) for a in range(len(w)) for b in range(a + 1, len(w) + 1)}


def _carve(texts: Sequence[str], pool: Sequence[int], n: int, salt: str) -> tuple[set[int], set[int]]:
    """(chosen, held out): ``n`` whole sentences of ``pool`` ranked by
    ``sha256(salt + text)``, and every row of ``pool`` that is one of them or
    a phrase of one."""
    sentences = [pool[i] for i in whole_sentences([texts[i] for i in pool])]
    chosen = {sentences[i] for i in _rank((salt + texts[i] for i in sentences), n)}
    runs = set().union(*(_runs(texts[i]) for i in chosen))
    return chosen, {i for i in pool if " ".join(texts[i].split()) in runs}


def sst2_splits() -> dict[str, Path]:
    """Materialise SST-2's fixed splits (module docstring) once; split -> file."""
    src = _shared_file(PRESETS["sst2"].train or "")
    tag = f"v3-{src.stat().st_size}"
    out = {split: _cache_dir() / f"sst2-{split}-{tag}.tsv" for split in SPLITS if split != "test"}
    if all(p.is_file() for p in out.values()):
        return out
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    header, rows = lines[0], lines[1:]
    texts = [r.rstrip("\n").partition("\t")[2] for r in rows]
    phrases = set(_rank((f"sst2-dev:{i}" for i in range(len(rows))), SST2_DEV_ROWS))
    dev, held = _carve(texts, range(len(rows)), SST2_DEV_ROWS, "sst2-sentence-dev:")
    phrase_texts = {texts[i] for i in phrases}  # train.tsv repeats some rows word for word
    train = [i for i in range(len(rows)) if i not in held and texts[i] not in phrase_texts]
    val, val_held = _carve(texts, train, SST2_DEV_ROWS, "sst2-sentence-val:")
    picks = {"train": train, "dev": sorted(dev), "dev-phrases": sorted(phrases), "tune-val": sorted(val),
             "tune-train": [i for i in train if i not in val_held]}
    for split, idx in picks.items():
        _write_rows(out[split], header, [rows[i] for i in idx])
    return out


def _agnews_tune_split() -> dict[str, Path]:
    """AG News's ``tune-train``/``tune-val`` files (module docstring)."""
    src = _shared_file(PRESETS["agnews"].train or "")
    tag = src.stat().st_size
    out = {split: _cache_dir() / f"agnews-{split}-{tag}.csv" for split in ("tune-train", "tune-val")}
    if all(p.is_file() for p in out.values()):
        return out
    with src.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    val = set(_rank((f"agnews-val:{i}" for i in range(len(rows))), AGNEWS_VAL_ROWS))
    for split, keep in (("tune-val", True), ("tune-train", False)):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(r for i, r in enumerate(rows) if (i in val) == keep)
        _write_rows(out[split], "", [buf.getvalue()])
    return out


def _write_rows(path: Path, header: str, rows: Sequence[str]) -> None:
    """Write a cached split whole or not at all (several processes may race to make it)."""
    atomic_write(path, (header + "".join(rows)).encode("utf-8"))


def _headline_split(split: str) -> Path:
    """Materialise the fixed AG News headline splits as JSONL (see module docstring)."""
    src = _shared_file("ag_news/train.csv" if split == "train" else "ag_news/dev.csv")
    out = _cache_dir() / f"agnews-headline-{split}-{src.stat().st_size}.jsonl"
    if out.is_file():
        return out
    with src.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    keep = range(len(rows))
    if split != "train":
        test = set(_rank((f"agnews-headline-test:{i}" for i in keep), HEADLINE_TEST_ROWS))
        keep = [i for i in keep if (i in test) == (split == "test")]
    lines = []
    for i in keep:
        title, desc = (" ".join((rows[i].get(c) or "").split()) for c in ("title", "description"))
        if title and desc:
            lines.append(json.dumps({"prompt": f"Article: {desc}\nHeadline:", "completion": f" {title}"}) + "\n")
    _write_rows(out, "", lines)
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
