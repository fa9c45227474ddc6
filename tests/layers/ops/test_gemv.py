"""The GEMV kernel equals F.linear in float32 on small shapes for every inner loop and fp8 mode (CPU, under the Triton interpreter, in a subprocess so TRITON_INTERPRET=1 is set
before Triton is imported), and decode-sized bf16 / fp8 / int8 matmuls on the GPU. The 8-bit
references are kernels.w8a8's: activations quantized per token (or with the static scale),
multiplied by the dequantized weight in float64 (on the GPU, int8 against torch._int_mm)."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import run_interpreted

_INTERPRETED_CHECK = """
import torch
from pagedllm.layers.ops.gemv import DOT, DOT_SWAPPED, FMA, GemvConfig, gemv
from pagedllm.layers.ops.split_k import split_count_buffer
from pagedllm.layers.quantization.kernels.w8a8 import (
    FP8_DTYPE, absmax_scale, fake_quantize_activation, quantize, quantize_activation,
)

torch.manual_seed(0)
# Ragged edges in N and K; every inner loop.
cases = [(1, 40, 300, FMA), (1, 64, 256, DOT), (3, 64, 256, DOT), (8, 70, 520, DOT_SWAPPED), (5, 16, 128, DOT),
         (1, 70, 520, FMA)]
for M, N, K, inner in cases:
    x = torch.randn(M, K)
    w = torch.randn(N, K)
    b = torch.randn(N)
    config = GemvConfig(block_n=16, block_k=64, inner=inner)
    expected = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
    got = gemv(x, w, b, config=config)
    assert got.shape == (M, N) and got.dtype == torch.float32
    # float32 sums of K <= 520 products of N(0,1) values: error well under 1e-3.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
# Split K: merged by the last split (a count buffer, left at zero) or by a second launch; the
# bias added once.
for M, N, K, inner, split_k, counted in [(1, 40, 300, FMA, 3, True), (3, 70, 520, DOT_SWAPPED, 4, True),
                                         (2, 48, 256, DOT, 2, False)]:
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    counts = split_count_buffer(N, x.device) if counted else None
    got = gemv(x, w, b, config=GemvConfig(block_n=16, block_k=64, inner=inner, split_k=split_k), split_counts=counts)
    expected = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
    assert counts is None or not counts.any()
x3 = torch.randn(2, 1, 96)
w = torch.randn(24, 96)
config = GemvConfig(block_n=16, block_k=32, inner=DOT)
torch.testing.assert_close(gemv(x3, w, config=config), torch.nn.functional.linear(x3, w), rtol=0, atol=1e-3)
for bad_rows in (torch.randn(9, 96), torch.randn(2, 96)):
    try:
        gemv(bad_rows, w, config=GemvConfig(block_n=16, block_k=32, inner=FMA))
    except ValueError as error:
        assert "at most 8 rows" in str(error) or "one row" in str(error)
    else:
        raise AssertionError("rows accepted")

# fp8 weights with per-channel scales; activations dynamic per token, or static.
# Split K too, its splits added by the last one (the count buffer) or by a second launch.
for M, N, K, inner, first, split_k, counted in [
    (1, 40, 300, FMA, False, 1, False), (4, 48, 256, DOT, False, 2, True),
    (2, 33, 200, DOT_SWAPPED, False, 2, False), (3, 40, 256, DOT_SWAPPED, True, 3, True),
]:
    x = torch.randn(M, K) * 3
    w = torch.randn(N, K)
    w_scale = absmax_scale(w, -1, FP8_DTYPE)
    w_q = quantize(w, w_scale, FP8_DTYPE)
    w_deq = w_q.double() * w_scale.double()
    b = torch.randn(N)
    config = GemvConfig(block_n=16, block_k=64, inner=inner, quantize_first=first, split_k=split_k)
    counts = split_count_buffer(N, x.device) if counted else None
    # quantize_first quantizes dynamic rows with per_token_quant, whose fp8 cast the
    # interpreter gets wrong (see gemv._round_to_e4m3): only its static path runs here.
    for static in (torch.tensor(0.02),) if first else (None, torch.tensor(0.02)):
        x_deq = fake_quantize_activation(x, FP8_DTYPE, static, None, True, None).double()
        expected = (x_deq @ w_deq.T + b.double()).float()
        got = gemv(x, w_q, b, weight_scale=w_scale, input_scale=static, config=config, split_counts=counts)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    # Activations quantized by a launch of their own (fp8 x, per-row scales).
    x_q, x_scale, _ = quantize_activation(x, FP8_DTYPE, None, None, True, None)
    expected = ((x_q.double() * x_scale.double()) @ w_deq.T).float()
    got = gemv(x_q, w_q, weight_scale=w_scale, input_scale=x_scale, config=config, out_dtype=torch.float32,
               split_counts=counts)
    assert counts is None or not counts.any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)

# int8 weights with per-channel scales and symmetric int8 activations: per token (quantized by
# per_token_quant first), static, or quantized already. Sums of int8 products are exact.
for M, N, K, inner, split_k, counted in [
    (1, 40, 300, DOT_SWAPPED, 1, False), (4, 48, 256, DOT, 2, True), (3, 40, 520, DOT_SWAPPED, 3, True),
    (1, 33, 200, FMA, 2, False),
]:
    x = torch.randn(M, K) * 3
    w = torch.randn(N, K)
    w_scale = absmax_scale(w, -1, torch.int8)
    w_q = quantize(w, w_scale, torch.int8)
    w_deq = w_q.double() * w_scale.double()
    b = torch.randn(N)
    config = GemvConfig(block_n=16, block_k=64, inner=inner, split_k=split_k)
    counts = split_count_buffer(N, x.device) if counted else None
    for static in (None, torch.tensor(0.02)):
        x_q, x_scale, _ = quantize_activation(x, torch.int8, static, None, True, None)
        expected = ((x_q.double() * x_scale.double()) @ w_deq.T + b.double()).float()
        got = gemv(x, w_q, b, weight_scale=w_scale, input_scale=static, config=config, split_counts=counts)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
        got = gemv(x_q, w_q, b, weight_scale=w_scale, input_scale=x_scale.expand(M, 1), config=config,
                   out_dtype=torch.float32, split_counts=counts)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    assert counts is None or not counts.any()
print("ok")
"""


def test_gemv_matches_linear_under_the_triton_interpreter():
    run_interpreted(_INTERPRETED_CHECK)


_EPILOGUE_CHECK = """
import torch
import torch.nn.functional as F
from pagedllm.layers.ops.epilogue import RopeEpilogue, SiluAndMulEpilogue
from pagedllm.layers.ops.gemv import DOT, DOT_SWAPPED, FMA, GemvConfig, gemv
from pagedllm.layers.ops.split_k import split_count_buffer
from pagedllm.layers.quantization.kernels.w8a8 import FP8_DTYPE, absmax_scale, quantize, quantize_activation
from pagedllm.layers.rotary_embedding import get_rope

torch.manual_seed(0)
# A stacked [gate; up] weight of 2 * 40 rows (ragged against every tile), and a qkv weight of
# 2 query heads, 1 key and 1 value head of 16 features (q and k rotated, v not).
head, q_size, kv_size = 16, 32, 16
rope = get_rope(head, 64, {"rope_type": "default", "rope_theta": 100.0})

def silu_reference(product, positions):
    gate, up = product.chunk(2, dim=-1)
    return (F.silu(gate) * up).float()

def rope_reference(product, positions):
    q, k, v = product.float().split([q_size, kv_size, kv_size], dim=-1)
    q, k = rope.forward_native(positions, q, k)
    return torch.cat([q, k, v], dim=-1)

# (epilogue, its reference, the weight's outputs, the result's width)
def epilogues(positions):
    return [(SiluAndMulEpilogue(), silu_reference, 80, 40),
            (RopeEpilogue(positions, rope.cos_cache, rope.sin_cache, head, q_size + kv_size), rope_reference, 64, 64)]

# Every inner loop; tiles of fewer rope pairs than a head half, as many, and two heads' worth;
# split K, the last split adding the partial sums before the epilogue (its counts left at zero).
for M, inner, block_n, split_k in [(1, FMA, 8, 1), (1, FMA, 16, 1), (3, DOT, 32, 1), (8, DOT_SWAPPED, 64, 1),
                                   (1, FMA, 16, 3), (4, DOT_SWAPPED, 32, 2), (8, DOT_SWAPPED, 64, 2)]:
    x, positions = torch.randn(M, 300), torch.randint(0, 64, (M,))
    for epilogue, reference, outputs, width in epilogues(positions):
        w, b = torch.randn(outputs, 300) / 10, torch.randn(outputs)
        counts = split_count_buffer(outputs, x.device)
        got = gemv(x, w, b, config=GemvConfig(block_n=block_n, block_k=64, inner=inner, split_k=split_k),
                   split_counts=counts, epilogue=epilogue)
        assert got.shape == (M, width), got.shape
        assert not counts.any()
        expected = reference(F.linear(x.double(), w.double(), b.double()), positions)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)

# fp8 weights: rows quantized by their producer (fp8 rows, per-row scales), or in the kernel
# with a static scale (one row).
x = torch.randn(4, 256)
x_q, x_scale, _ = quantize_activation(x, FP8_DTYPE, None, None, True, None)
static = torch.tensor(0.02)
x_s = quantize(x[:1], static, FP8_DTYPE).double() * 0.02
positions = torch.tensor([5, 40, 3, 63])
for epilogue, reference, outputs, width in epilogues(positions):
    w = torch.randn(outputs, 256)
    w_scale = absmax_scale(w, -1, FP8_DTYPE)
    w_q = quantize(w, w_scale, FP8_DTYPE)
    w_deq = w_q.double() * w_scale.double()
    got = gemv(x_q, w_q, weight_scale=w_scale, input_scale=x_scale, out_dtype=torch.float32, epilogue=epilogue,
               config=GemvConfig(block_n=32, block_k=64, inner=DOT_SWAPPED))
    torch.testing.assert_close(got, reference((x_q.double() * x_scale.double()) @ w_deq.T, positions),
                               rtol=1e-5, atol=1e-4)
    one_row = epilogue if isinstance(epilogue, SiluAndMulEpilogue) else epilogues(positions[:1])[1][0]
    got = gemv(x[:1], w_q, weight_scale=w_scale, input_scale=static, epilogue=one_row,
               config=GemvConfig(block_n=16, block_k=64, inner=FMA))
    torch.testing.assert_close(got, reference(x_s @ w_deq.T, positions[:1]), rtol=1e-5, atol=1e-4)

# Refused: a split the kernel cannot merge itself; outputs that are not whole heads.
for bad, message in [(dict(config=GemvConfig(block_n=16, block_k=64, inner=FMA, split_k=2),
                           epilogue=SiluAndMulEpilogue()), "split_counts"),
                     (dict(epilogue=RopeEpilogue(positions[:1], rope.cos_cache, rope.sin_cache, head, 32)),
                      "whole heads")]:
    try:
        gemv(x[:1], torch.randn(60 if message == "whole heads" else 80, 256), **bad)
    except ValueError as error:
        assert message in str(error), error
    else:
        raise AssertionError(f"accepted: {bad}")
print("ok")
"""


def test_gemv_epilogues_under_the_triton_interpreter():
    run_interpreted(_EPILOGUE_CHECK)


_GPU_SHAPES = [(4096, 6144), (4096, 4096), (14336, 4096), (512, 1000)]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize(("in_features", "out_features"), _GPU_SHAPES)
def test_gemv_matches_linear_on_the_gpu(rows, in_features, out_features):
    from pagedllm.layers.ops.gemv import gemv

    torch.manual_seed(0)
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) / in_features**0.5
    bias = torch.randn(out_features, device="cuda", dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    got = gemv(x, w, bias)
    # Both accumulate in float32 and round once to bf16 (relative step 2^-8 on |y| ~ 1-4).
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("rows", [1, 4, 8])
@pytest.mark.parametrize(("in_features", "out_features"), [*_GPU_SHAPES, (4096, 28672)])
def test_8bit_gemv_matches_the_dequantized_product_on_the_gpu(qdtype, rows, in_features, out_features):
    from pagedllm.layers.ops.gemv import gemv
    from pagedllm.layers.quantization.kernels.per_token_quant import per_token_quant
    from pagedllm.layers.quantization.kernels.w8a8 import absmax_scale, int_mm_int8, quantize

    torch.manual_seed(0)
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(out_features, in_features, device="cuda", dtype=torch.float32) / in_features**0.5
    w_scale = absmax_scale(w, -1, qdtype)
    w_q = quantize(w, w_scale, qdtype)
    x_q, x_scale = per_token_quant(x, qdtype)
    expected = (x_q.double() * x_scale.double()) @ (w_q.double() * w_scale.double()).T
    got = gemv(x, w_q, weight_scale=w_scale)
    # The same 8-bit operands; float32 (int8: exact integer) sums, then one bf16 rounding
    # (2^-9 relative).
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=2e-2)
    if qdtype == torch.int8:
        expected_int_mm = int_mm_int8(x_q, x_scale, None, w_q, w_scale, None, None, torch.float32)
        torch.testing.assert_close(got.float(), expected_int_mm, rtol=1e-2, atol=2e-2)


def _gpu_operands(rows: int, out_features: int, weight_dtype: torch.dtype):
    """x [rows, 4096] bf16, a weight [out_features, 4096] of weight_dtype (8-bit: quantized per
    channel) and its scale (None for bf16), on the GPU."""
    from pagedllm.layers.quantization.kernels.w8a8 import absmax_scale, quantize

    torch.manual_seed(0)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(out_features, 4096, device="cuda", dtype=torch.float32) / 64
    if weight_dtype == torch.bfloat16:
        return x, w.to(torch.bfloat16), None
    scale = absmax_scale(w, -1, weight_dtype)
    return x, quantize(w, scale, weight_dtype), scale


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.int8], ids=["bf16", "fp8", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("intermediate", [14336, 1000])
def test_silu_and_mul_epilogue_equals_the_two_launches_on_the_gpu(weight_dtype, rows, intermediate):
    """The gate_up GEMV with the activation in its epilogue gives, bit for bit, what the plain
    GEMV followed by the silu_and_mul kernel gives (both round the sums to bf16 first)."""
    from pagedllm.layers.ops.epilogue import SiluAndMulEpilogue
    from pagedllm.layers.ops.gemv import gemv
    from pagedllm.layers.ops.silu_and_mul import silu_and_mul

    x, w, scale = _gpu_operands(rows, 2 * intermediate, weight_dtype)
    expected = silu_and_mul(gemv(x, w, weight_scale=scale))
    got = gemv(x, w, weight_scale=scale, epilogue=SiluAndMulEpilogue())
    assert got.shape == (rows, intermediate)
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.int8], ids=["bf16", "fp8", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_rope_epilogue_equals_the_two_launches_on_the_gpu(weight_dtype, rows):
    """Llama-3.1-8B's qkv projection with the rope in its epilogue gives the plain GEMV followed
    by the rotary kernel (ops/rotary.py) on its q and k: the same roundings, except that the
    compiler may fuse one product of a pair with the add in one kernel and not the other (the
    rotary kernel's docstring): so each value is within one rounding of a product and one of
    the result, 2^-7 (|x1| + |x2|), and most are bit-identical (89% on the H200)."""
    from pagedllm.layers.ops.epilogue import RopeEpilogue
    from pagedllm.layers.ops.gemv import gemv
    from pagedllm.layers.ops.rotary import apply_rotary
    from pagedllm.layers.rotary_embedding import get_rope

    head, q_size, kv_size = 128, 4096, 1024
    rope = get_rope(head, 8192, {"rope_type": "default", "rope_theta": 500000.0})
    rope.cos_cache, rope.sin_cache = rope.cos_cache.cuda(), rope.sin_cache.cuda()
    x, w, scale = _gpu_operands(rows, q_size + 2 * kv_size, weight_dtype)
    positions = torch.randint(0, 8192, (rows,), device="cuda")
    plain = gemv(x, w, weight_scale=scale)
    expected = plain.clone()
    apply_rotary(positions, expected[:, :q_size], expected[:, q_size:q_size + kv_size], rope.cos_cache,
                 rope.sin_cache, head, head)
    got = gemv(x, w, weight_scale=scale,
               epilogue=RopeEpilogue(positions, rope.cos_cache, rope.sin_cache, head, q_size + kv_size))
    partners = plain.view(rows, -1, 2, head // 2).flip(2).reshape(rows, -1)
    error = (got.float() - expected.float()).abs()
    bound = 2**-7 * (plain.float().abs() + partners.float().abs())
    identical = (got == expected).float().mean().item()
    assert bool((error <= bound).all()), f"max error {error.max().item():.3e}, {identical:.1%} identical"
    assert identical > 0.5, f"{identical:.1%} identical"
