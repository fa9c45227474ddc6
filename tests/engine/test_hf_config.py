"""engine/hf_config.py: vLLM's rules for dtype="auto" and the dtype names it accepts."""

from __future__ import annotations

import pytest
import torch

from pagedllm.engine.hf_config import resolve_dtype


def test_auto_dtype_follows_vllm_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert resolve_dtype("auto", torch.float32, cpu) == torch.float32
    assert resolve_dtype("auto", torch.float16, cpu) == torch.float32
    assert resolve_dtype("auto", torch.float16, cuda) == torch.float16
    assert resolve_dtype("half", torch.float32, cpu) == torch.float16
    with pytest.raises(ValueError, match="dtype='int3'"):
        resolve_dtype("int3", None, cpu)
