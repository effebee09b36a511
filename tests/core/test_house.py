"""The house rules: one import root, layers enforced, one CLI vocabulary."""

from __future__ import annotations

import difflib
import subprocess
import sys
import zipfile
from pathlib import Path

import click

from fwdllm.cli import help_pages, main
from fwdllm.options import OPTIONS, Command, Group

REPO = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    """import-linter's contracts (pyproject.toml): layers, a torch-free device, a pure core."""
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "BROKEN" not in res.stdout and res.stdout.count("KEPT") >= 4


def test_the_wheel_installs_one_top_level_module(tmp_path: Path) -> None:
    """The four source folders ship inside fwdllm, and nothing else lands in site-packages."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=100)
    (wheel,) = tmp_path.glob("fwdllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fwdllm", wheel.name.split("-py3")[0] + ".dist-info"}
    for part in ("edge_client/worker.py", "aggregator/server.py", "convert/hf.py", "bench/round.py",
                 "core/protocol.py", "runtime/engine.py"):
        assert f"fwdllm/{part}" in names


def _commands(cmd: click.Command, path: str = "fwdllm") -> list[tuple[str, click.Command]]:
    out = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            out += _commands(sub, f"{path} {name}")
    return out


def test_every_command_turns_bad_input_into_one_line() -> None:
    """A UserError anywhere below a command is one line and exit status 2 only
    if the command is one of fwdllm's own classes."""
    wrong = [p for p, c in _commands(main) if not isinstance(c, (Command, Group))]
    assert not wrong


#: Flags whose default is the size or place of the job a command runs.
JOB_SIZE = {"--rounds", "--clients", "--out", "--shard-size", "--quick"}


def test_a_flag_means_one_thing_everywhere() -> None:
    """A flag that two commands take has one type, one form and one default in
    both (job-size and output flags may set their own default), and the shared
    table's flags are exactly the table's."""
    seen: dict[str, list[tuple[str, click.Parameter]]] = {}
    for path, cmd in _commands(main):
        for p in cmd.params:
            if isinstance(p, click.Option):
                seen.setdefault(p.opts[0], []).append((path, p))
    for flag, uses in seen.items():
        kinds = {(type(p.type).__name__, p.is_flag, p.multiple, p.name) for _, p in uses}
        assert len(kinds) == 1, f"{flag} differs between {[path for path, _ in uses]}: {kinds}"
        if flag not in JOB_SIZE:
            defaults = {repr(p.default) for _, p in uses}
            assert len(defaults) == 1, f"{flag} has defaults {defaults} in {[path for path, _ in uses]}"
    for name, (decls, attrs) in OPTIONS.items():
        ref = click.Option(decls, **attrs)
        for path, p in seen.get(ref.opts[0], []):
            assert type(p.type) is type(ref.type) and p.is_flag == ref.is_flag, f"{path} {ref.opts[0]}"
            if ref.opts[0] not in JOB_SIZE:
                assert p.default == ref.default, f"{path} {ref.opts[0]}: {p.default!r} != {ref.default!r}"


def test_cli_docs_are_the_help_texts() -> None:
    """docs/cli.md is ``make docs`` output: regenerate it when a --help changes."""
    have, want = (REPO / "docs" / "cli.md").read_text(), help_pages() + "\n"
    assert have == want, "".join(difflib.unified_diff(have.splitlines(True), want.splitlines(True), n=1))[:3000]
