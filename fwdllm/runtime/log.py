"""llama.cpp's logging is very loud; fwdllm keeps it quiet unless --verbose."""

from __future__ import annotations

import os

_callback = None  # keep the ctypes callback alive for the process lifetime


def verbose() -> bool:
    """True when the user asked for llama.cpp's own logging (``--verbose``)."""
    return os.environ.get("FWDLLM_VERBOSE", "") not in ("", "0")


def set_verbose(on: bool) -> None:
    # An environment variable, so that worker processes started by
    # ``fwdllm simulate`` inherit the choice.
    os.environ["FWDLLM_VERBOSE"] = "1" if on else "0"


def quiet_llama() -> None:
    """Install a no-op llama.cpp log callback, unless verbose.  Idempotent;
    call it before loading any model."""
    global _callback
    if verbose() or _callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _drop(level, text, user_data):  # noqa: ANN001 - ctypes signature
        return None

    _callback = _drop
    llama_cpp.llama_log_set(_callback, None)
