"""Opening JSON inputs (config.json, tokenizer.json ...) with user-facing errors.

json raises a bare JSONDecodeError; every convert command goes through
:func:`read_json` so the user sees one line naming the file instead.  GGUF
inputs go through :func:`fwdllm.core.gguf_file.open_gguf`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fwdllm.core.errors import UserError


def read_json(path: Path) -> Any:
    """Parse a JSON file (config.json, tokenizer.json ...) or say which one is broken."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable JSON ({e})") from None
