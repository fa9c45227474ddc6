"""The greedy argmax kernel returns torch's argmax (ties to the lowest index, all-negative rows,
bf16 and float32 logits) and leaves its workspace reset for the next launch: on the CPU under
the Triton interpreter (in a subprocess, so TRITON_INTERPRET=1 is set before Triton is
imported) and on the GPU at a real vocabulary size."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import run_interpreted

_INTERPRETED_CHECK = """
import torch
from pagedllm.layers.ops.argmax import GreedyArgmax

torch.manual_seed(0)
argmax = GreedyArgmax()
for dtype in (torch.float32, torch.bfloat16):
    for rows, vocab in ((1, 10000), (3, 4100), (5, 9000)):
        logits = torch.randn(rows, vocab).to(dtype) * 5 - 3
        if rows > 1:
            logits[1] = -7.0  # every value tied: index 0 wins
        if rows > 2:
            logits[2, 100] = logits[2].max() + 1
            logits[2, 4097] = logits[2, 100]  # tied across two chunks: the lower index wins
        for _ in range(2):  # the second launch finds the workspace reset by the first
            assert torch.equal(argmax(logits), logits.argmax(-1))
negative = -torch.rand(2, 5000) - 1
assert torch.equal(argmax(negative), negative.argmax(-1))
keys, counts = argmax._workspace[negative.device]
assert bool((keys == -(1 << 63)).all()) and int(counts.abs().sum()) == 0
print("ok")
"""


def test_greedy_argmax_equals_torch_under_the_triton_interpreter():
    run_interpreted(_INTERPRETED_CHECK)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_argmax_equals_torch_on_the_gpu(rows, dtype):
    from pagedllm.layers.ops.argmax import GreedyArgmax

    torch.manual_seed(rows)
    argmax = GreedyArgmax()
    logits = (torch.randn(rows, 128256, device="cuda") * 4).to(dtype)
    logits[0, 77_000] = logits[0, 5] = logits[0].max() + 1
    for _ in range(3):
        assert torch.equal(argmax(logits), logits.argmax(-1))
