"""Runs a check script under the Triton interpreter (TRITON_INTERPRET=1), in a subprocess so the
variable is set before Triton is imported: how the Triton kernels are tested on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: str, timeout_s: int = 300) -> None:
    """Runs `script` (dedented) and asserts that it exited cleanly with "ok" as its last output."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(_REPOSITORY_ROOT)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                            text=True, timeout=timeout_s, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
