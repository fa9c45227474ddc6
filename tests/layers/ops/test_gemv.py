"""The split-K GEMV kernel equals F.linear in float32 on small shapes (CPU, under the Triton
interpreter, in a subprocess so TRITON_INTERPRET=1 is set before Triton is imported), and
decode-sized bf16 matmuls on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

_INTERPRETED_CHECK = """
import torch
from pagedllm.layers.ops.gemv import gemv

torch.manual_seed(0)
# Shapes with ragged edges in N and K, and every split of K (1 slice, several, one per block).
for M, N, K, split_k in [(1, 40, 300, None), (3, 64, 256, 1), (8, 70, 520, 3), (5, 16, 128, 2)]:
    x = torch.randn(M, K)
    w = torch.randn(N, K)
    b = torch.randn(N)
    expected = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
    got = gemv(x, w, b, split_k=split_k, block_n=16, block_k=64)
    assert got.shape == (M, N) and got.dtype == torch.float32
    # float32 sums of K <= 520 products of N(0,1) values: error well under 1e-3.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
x3 = torch.randn(2, 1, 96)
w = torch.randn(24, 96)
torch.testing.assert_close(gemv(x3, w, block_n=16, block_k=32), torch.nn.functional.linear(x3, w), rtol=0, atol=1e-3)
try:
    gemv(torch.randn(9, 96), w)
except ValueError as error:
    assert "at most 8 rows" in str(error)
else:
    raise AssertionError("9 rows accepted")
print("ok")
"""


def test_split_k_gemv_matches_linear_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERPRETED_CHECK)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize(("in_features", "out_features"), [(4096, 6144), (4096, 4096), (14336, 4096), (512, 1000)])
def test_split_k_gemv_matches_linear_on_the_gpu(rows, in_features, out_features):
    from pagedllm.layers.ops.gemv import gemv

    torch.manual_seed(0)
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) / in_features**0.5
    bias = torch.randn(out_features, device="cuda", dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    got = gemv(x, w, bias)
    # Both accumulate in float32 and round once to bf16 (relative step 2^-8 on |y| ~ 1-4).
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=2e-2)
