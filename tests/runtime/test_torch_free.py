"""The edge set must install and run without torch: importing edge_client and
running `eval` / `client score` in a fresh interpreter must not load torch or
transformers (they are server-side extras)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fwdllm.core.adapter_io import base_shapes, write_adapter
from fwdllm.core.layout import LoraLayout

SCRIPT = """
import json, sys
from click.testing import CliRunner
import fwdllm.edge_client.worker, fwdllm.runtime.engine, fwdllm.runtime.session, fwdllm.runtime.tasks
from fwdllm.edge_client.cli import client, eval_cmd
args = ["--model", sys.argv[1], "--task", sys.argv[2], "--threads", "1"]
r1 = CliRunner().invoke(eval_cmd, args + ["--json"])
r2 = CliRunner().invoke(client, ["score", *args, "--lora", sys.argv[3], "--seeds", "1,2", "--json"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
print(json.dumps({"codes": [r1.exit_code, r2.exit_code], "heavy": heavy, "out": r1.output + r2.output + repr((r1.exception, r2.exception))}))
"""


def test_edge_client_runs_without_torch(tiny_model: Path, tmp_path: Path):
    (tmp_path / "d.tsv").write_text("label\ttext\n1\ta good film\n0\ta bad film\n")
    spec = tmp_path / "t.json"
    spec.write_text(json.dumps({"format": "tsv", "label_words": ["negative", "positive"], "labels": ["0", "1"],
                                "dev": "d.tsv"}))
    layout = LoraLayout.for_base(base_shapes(tiny_model), rank=2, alpha=4, targets=["v"])
    lora = write_adapter(tmp_path / "a.gguf", layout, layout.zeros())
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model), str(spec), str(lora)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["codes"] == [0, 0], out["out"]
    assert out["heavy"] == []
