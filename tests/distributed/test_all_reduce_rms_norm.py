"""The fused all-reduce + residual add + RMSNorm kernel (distributed/all_reduce_rms_norm.py)
under the Triton interpreter, one rank at a time: the peers' packets are written into this
rank's exchange buffer beforehand, as their kernels would have, and the packets this rank
sends are read back from the peers' buffers. The reference is the unfused chain in torch:
the partial sums added in float32 in rank order and rounded to bf16, then the residual add and
RMSNorm of layers/layernorm.py."""

from __future__ import annotations

from triton_interpreter import run_interpreted

_CHECK = """
import torch
from pagedllm.distributed.all_reduce_rms_norm import all_reduce_add_rms_norm
from pagedllm.layers.layernorm import RMSNorm

torch.manual_seed(0)
eps = 1e-5


def packets(words, epoch):
    return (words.to(torch.int64) & 0xFFFFFFFF) | (epoch << 32)


for world, rank, rows, hidden in [(2, 0, 3, 96), (2, 1, 1, 64), (3, 1, 2, 40)]:
    region_words = 4 * 128
    words_per_row = hidden // 2
    buffers = [torch.zeros(2 * world * region_words, dtype=torch.int64) for _ in range(world)]
    buffer_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    epochs = torch.zeros(8, dtype=torch.int32)
    norm = RMSNorm(hidden, eps=eps)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden)).to(torch.bfloat16)
    residual = torch.randn(rows, hidden).to(torch.bfloat16)
    # Two calls: slots 1 then 0, the second with the first's packets still in slot 1.
    for epoch in (1, 2):
        slot = epoch % 2
        partials = [torch.randn(rows, hidden).to(torch.bfloat16) for _ in range(world)]
        for sender in range(world):
            if sender != rank:
                start = (slot * world + sender) * region_words
                buffers[rank][start:start + rows * words_per_row] = packets(partials[sender].view(torch.int32).flatten(), epoch)
        total = torch.zeros(rows, hidden)
        for partial in partials:
            total += partial.float()
        expected_normed, expected_residual = norm.forward_native(total.to(torch.bfloat16), residual.clone())

        x = partials[rank].clone()
        got_normed, got_residual = all_reduce_add_rms_norm(
            x, residual, norm.weight.data, eps, buffer_ptrs, epochs, region_words, rank
        )
        assert got_normed is x and got_residual is residual
        assert torch.equal(got_residual, expected_residual), (world, rank, epoch)
        # Only the order of the sum of squares differs from torch: within a bf16 ulp.
        torch.testing.assert_close(got_normed.float(), expected_normed.float(), rtol=8e-3, atol=1e-5)
        assert epochs[:rows].tolist() == [epoch] * rows and not epochs[rows:].any()
        sent = packets(partials[rank].view(torch.int32).flatten(), epoch)
        start = (slot * world + rank) * region_words
        for peer in range(world):
            region = buffers[peer][start:start + rows * words_per_row]
            assert torch.equal(region, sent if peer != rank else torch.zeros_like(sent)), (peer, epoch)
print("ok")
"""


def test_fused_all_reduce_rms_norm_equals_the_unfused_chain() -> None:
    run_interpreted(_CHECK)


def test_launch_shape_waits_per_thread_only_with_two_to_four_words_a_thread():
    from pagedllm.distributed.all_reduce_rms_norm import launch_shape

    # Llama-3.1-8B's 4096-wide rows: four words a thread on 16 warps (the measured case).
    assert launch_shape(2048) == (16, True)
    assert launch_shape(128) == (1, True)
    assert launch_shape(64) == (1, True)
    # One word a thread: the asm wait reads two. Eight: its blocks would wait in turn.
    assert launch_shape(32) == (1, False)
    assert launch_shape(4096) == (16, False)
    for block_words in (1, 2, 4, 16, 32, 64, 128, 256, 1024, 4096, 16384):
        num_warps, per_thread = launch_shape(block_words)
        assert per_thread == (2 <= block_words // (32 * num_warps) <= 4)
