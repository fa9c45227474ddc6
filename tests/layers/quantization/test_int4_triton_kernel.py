"""The Triton int4/int8 weight-only GEMM against the reference path (dequantize, then
matmul). On the CPU it runs under TRITON_INTERPRET=1 with small shapes; the gpu-marked tests
run it compiled on CUDA. Tolerances: float32 1e-4 relative to the output scale (the same
products summed in another order, split-K partial sums added in split order); bf16/fp16 2e-2
relative (inputs rounded to 16 bits, products accumulated in float32 on both sides). The
one-row fp16-arithmetic kernel (kernels/int4_half2.py) is held to 1e-2 (bf16) and 2e-3 (fp16):
its output rounding (2**-8, 2**-11) plus fp16 sums of eight products; a misplaced nibble or
a lost power of two is off by O(1)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Chosen when Triton decorates the kernel: set before the kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from int_group_checkpoints import gptq_tensors, quantize  # noqa: E402

from pagedllm.layers.linear import MergedColumnParallelLinear  # noqa: E402
from pagedllm.layers.ops.epilogue import RopeEpilogue, SiluAndMulEpilogue  # noqa: E402
from pagedllm.layers.ops.split_k import split_count_buffer  # noqa: E402
from pagedllm.layers.quantization.gptq import GPTQConfig  # noqa: E402
from pagedllm.layers.quantization.kernels import int4_dot, int4_half2, int_dequant, triton_wNa16  # noqa: E402
from pagedllm.layers.quantization.kernels.int_group import dequantize, pack_internal, reference_matmul  # noqa: E402
from pagedllm.layers.quantization.kernels.triton_wNa16 import triton_int_group_matmul  # noqa: E402


def random_layout(k: int, n: int, bits: int, group_size: int, act_order: bool, device: str, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(k * 7 + n)
    num_groups = 1 if group_size == -1 else k // group_size
    q = torch.randint(0, 2**bits, (k, n), generator=generator)
    scales = (torch.rand(num_groups, n, generator=generator) * 0.02 + 0.001).to(dtype)
    zeros = torch.randint(0, 2**bits, (num_groups, n), generator=generator).to(dtype)
    perm = row_group = None
    if act_order:
        perm = torch.randperm(k, generator=generator).to(torch.int32).to(device)
        row_group = torch.sort(torch.randint(0, num_groups, (k,), generator=generator))[0].to(torch.int32).to(device)
    return pack_internal(q, bits).to(device), scales.to(device), zeros.to(device), perm, row_group


def assert_kernel_matches_reference(m, k, n, bits, group_size, act_order, device, dtype, rtol, self_merge=True,
                                    x_scale=1.0):
    qweight, scales, zeros, perm, row_group = random_layout(k, n, bits, group_size, act_order, device, dtype)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * x_scale).to(device=device, dtype=dtype)
    counts = split_count_buffer(n, torch.device(device)) if self_merge else None
    out = triton_int_group_matmul(x, qweight, scales, zeros, bits, group_size, perm, row_group, split_counts=counts)
    expected = reference_matmul(x.float(), qweight, scales.float(), zeros.float(), bits, group_size, perm, row_group)
    assert out.dtype == dtype and out.shape == (m, n)
    error = (out.float() - expected).abs().max().item()
    assert error <= rtol * expected.abs().max().item(), f"max error {error:.3e}"
    if counts is not None:
        assert not counts.any(), "split counts are left at zero for the next launch"


INTERPRETER_CASES = [
    # (m, k, n, bits, group_size, act_order)
    (1, 256, 64, 4, 128, False),    # decode: the one-row kernel, split-K
    (1, 64, 32, 8, -1, False),      # one row, 8-bit, per-channel
    (1, 64, 64, 4, 16, True),       # one row, act order
    (3, 64, 96, 4, -1, False),      # per-channel
    (5, 128, 64, 8, 32, False),     # 8-bit
    (2, 64, 64, 4, 16, True),       # act order: per-row groups
    (20, 64, 32, 4, 32, False),     # M tiles of 64
    (70, 128, 32, 4, 64, False),    # M tiles of 128
    (256, 128, 32, 4, 64, False),   # prefill: dequantized, then one matmul
    (256, 64, 64, 4, 16, True),     # prefill, act order
    (300, 96, 32, 8, 24, False),    # prefill, 8-bit, a group size no tile sits in
    (257, 64, 32, 4, -1, False),    # prefill, per-channel
    (4, 96, 32, 4, 24, False),      # a group size the tiles cannot sit in
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests cover CUDA")
@pytest.mark.parametrize("m, k, n, bits, group_size, act_order", INTERPRETER_CASES)
@pytest.mark.parametrize("self_merge", [True, False], ids=["splits-merged-by-the-last", "splits-summed-after"])
def test_interpreted_kernel_matches_reference(m, k, n, bits, group_size, act_order, self_merge):
    assert_kernel_matches_reference(m, k, n, bits, group_size, act_order, "cpu", torch.float32, 1e-4, self_merge)


DOT_CASES = [
    # (m, k, n, group_size): 4-bit, 16-bit activations, at most 16 rows
    (2, 512, 128, 128),     # decode, split K
    (3, 256, 96, -1),       # one group; columns past the last tile
    (16, 256, 64, 32),      # 16 rows, small groups
    (4, 208, 32, -1),       # one group, K not a multiple of 128: 16-row tiles
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests cover CUDA")
@pytest.mark.parametrize("m, k, n, group_size", DOT_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("self_merge", [True, False], ids=["splits-merged-by-the-last", "splits-summed-after"])
def test_interpreted_tensor_core_int4_kernel_matches_reference(m, k, n, group_size, dtype, self_merge):
    """kernels/int4_dot.py (which serves these shapes) with the interpreter's integer unpacking:
    the output rounded to 16 bits is all the error (a misplaced nibble is off by O(1))."""
    assert int4_dot.supports(m, k, 4, group_size, False, dtype)
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert_kernel_matches_reference(m, k, n, 4, group_size, False, "cpu", dtype, rtol, self_merge)


HALF2_CASES = [
    # (k, n, group_size, x_scale): one row, 4-bit, 16-bit activations
    (512, 128, 128, 1.0),     # split K, each split its own power of two
    (256, 96, -1, 1000.0),    # one group; columns past the last tile; x far above fp16's safe range
    (256, 64, 32, 1e-3),      # small groups; small x
    (208, 32, -1, 1.0),       # K not a multiple of 128: 16-row tiles
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests cover CUDA")
@pytest.mark.parametrize("k, n, group_size, x_scale", HALF2_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("self_merge", [True, False], ids=["splits-merged-by-the-last", "splits-summed-after"])
def test_interpreted_half2_int4_gemv_matches_reference(k, n, group_size, x_scale, dtype, self_merge):
    """kernels/int4_half2.py (which serves one 16-bit row) with the interpreter's emulation of
    its packed fp16 steps."""
    assert int4_half2.supports(1, k, 4, group_size, False, dtype)
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_kernel_matches_reference(1, k, n, 4, group_size, False, "cpu", dtype, rtol, self_merge, x_scale)


@pytest.mark.parametrize("k, n, group_size", [(512, 128, 128), (256, 64, -1)])
def test_half2_int4_gemv_with_silu_and_mul(k, n, group_size):
    """The one-row kernel with the activation in its epilogue (a gate_up layer: W stacks gate and
    up columns; split K merged by the last split). On the GPU: bit for bit the plain kernel
    followed by the silu_and_mul kernel. Under the interpreter: silu(gate) * up of the float32
    reference within the bf16 tolerance of the plain kernel's test."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qweight, scales, zeros, _, _ = random_layout(k, n, 4, group_size, False, device, torch.bfloat16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=torch.bfloat16)
    counts = split_count_buffer(n, torch.device(device))
    config = dict(int4_half2.default_config(n, k, group_size, torch.device(device)), BLOCK_N=32, SPLIT_K=2)
    got = int4_half2.int4_half2_gemv(x, qweight, scales, zeros, group_size, counts, config, epilogue=SiluAndMulEpilogue())
    assert got.shape == (1, n // 2) and not counts.any()
    if device == "cuda":
        from pagedllm.layers.ops.silu_and_mul import silu_and_mul

        plain = int4_half2.int4_half2_gemv(x, qweight, scales, zeros, group_size, counts, config)
        assert torch.equal(got, silu_and_mul(plain))
    else:
        gate, up = reference_matmul(x.float(), qweight, scales.float(), zeros.float(), 4, group_size).chunk(2, dim=-1)
        expected = torch.nn.functional.silu(gate) * up
        assert (got.float() - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()
    with pytest.raises(ValueError, match="split_counts"):
        int4_half2.int4_half2_gemv(x, qweight, scales, zeros, group_size, None, config, epilogue=SiluAndMulEpilogue())


def test_half2_int4_gemv_with_rope():
    """The one-row kernel with the rope in its epilogue (a qkv layer of heads of 32: two query
    heads, one key and one value head; split K merged by the last split). On the GPU: bit for
    bit the plain kernel followed by the rotary kernel. Under the interpreter: the float32
    reference rotated by the torch rope, within the plain kernel's bf16 tolerance."""
    from pagedllm.layers.rotary_embedding import get_rope

    device = "cuda" if torch.cuda.is_available() else "cpu"
    k, n, head = 512, 128, 32
    rope = get_rope(head, 64, {"rope_type": "default", "rope_theta": 100.0})
    cos, sin = rope.cos_cache.to(device), rope.sin_cache.to(device)
    qweight, scales, zeros, _, _ = random_layout(k, n, 4, 128, False, device, torch.bfloat16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=torch.bfloat16)
    positions = torch.tensor([37], device=device)
    counts = split_count_buffer(n, torch.device(device))
    config = dict(int4_half2.default_config(n, k, 128, torch.device(device)), BLOCK_N=32, SPLIT_K=2)
    epilogue = RopeEpilogue(positions, cos, sin, head, rotated_columns=3 * head)
    got = int4_half2.int4_half2_gemv(x, qweight, scales, zeros, 128, counts, config, epilogue=epilogue)
    assert got.shape == (1, n) and not counts.any()
    if device == "cuda":
        from pagedllm.layers.ops.rotary import apply_rotary

        expected = int4_half2.int4_half2_gemv(x, qweight, scales, zeros, 128, counts, config)
        apply_rotary(positions, expected[:, :2 * head], expected[:, 2 * head:3 * head], cos, sin, head, head)
        assert torch.equal(got, expected)
    else:
        plain = reference_matmul(x.float(), qweight, scales.float(), zeros.float(), 4, 128)
        q, k_, v = plain.split([2 * head, head, head], dim=-1)
        expected = torch.cat([*rope.forward_native(positions, q, k_), v], dim=-1)
        assert (got.float() - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()


def test_half2_int4_gemv_splits_long_rows_so_that_x_is_one_load():
    """A program finds the largest |x| of its rows in one load of at most MAX_SPLIT_ROWS rows:
    the default split keeps to that, and a config that does not is refused with the split
    that would work."""
    k = 8 * int4_half2.MAX_SPLIT_ROWS
    config = int4_half2.default_config(64, k, 128, torch.device("cpu"))
    tiles_per_split = -(-(k // config["BLOCK_K"]) // config["SPLIT_K"])
    assert tiles_per_split * config["BLOCK_K"] <= int4_half2.MAX_SPLIT_ROWS
    qweight, scales, zeros, _, _ = random_layout(k, 64, 4, 128, False, "cpu", torch.bfloat16)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    too_few = dict(config, SPLIT_K=2)
    with pytest.raises(ValueError, match="SPLIT_K >= 8"):
        int4_half2.int4_half2_gemv(x, qweight, scales, zeros, 128, config=too_few)


DEQUANT_CASES = [
    # (k, bits, group_size, act_order)
    (96, 4, 32, False),    # groups smaller than the 64-row tile: per-row scales
    (96, 8, 24, False),
    (96, 4, -1, False),    # one group, K not a multiple of the tile
    (96, 4, 16, True),     # act order
    (192, 4, 64, False),   # one row of scales per tile
    (256, 8, 128, False),
    (128, 4, -1, False),
]


@pytest.mark.parametrize("k, bits, group_size, act_order", DEQUANT_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_kernel_gives_the_reference_weight_bit_for_bit(k, bits, group_size, act_order, dtype):
    """The prefill path's scratch weight (kernels/int_dequant.py) equals int_group.dequantize
    exactly: (q - zero) * scale is exact in float32 and rounded once, as the reference's
    multiply in the scales' dtype rounds it. (Triton's interpreter truncates float32 to bf16
    instead of rounding: there the bf16 weight is held to one unit in its last place.)"""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qweight, scales, zeros, _, row_group = random_layout(k, 160, bits, group_size, act_order, device, dtype)
    weight = int_dequant.dequantize(qweight, scales, zeros, bits, group_size, row_group)
    expected = dequantize(qweight, scales, zeros, bits, group_size, row_group)
    assert weight.dtype == dtype
    if device == "cpu" and dtype == torch.bfloat16:
        torch.testing.assert_close(weight, expected, rtol=2**-7, atol=0)
    else:
        assert torch.equal(weight, expected)


@pytest.mark.gpu
def test_cuda_dequantize_kernel_gives_the_reference_weight_bit_for_bit():
    for case in DEQUANT_CASES:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            test_dequantize_kernel_gives_the_reference_weight_bit_for_bit(*case, dtype)


def test_prefill_rows_take_the_dequantized_matmul(monkeypatch):
    """From DEQUANT_MIN_ROWS rows on the matmul dequantizes once and multiplies densely; one
    row fewer, or any batch captured in a CUDA graph, stays in the Triton kernel."""
    qweight, scales, zeros, _, _ = random_layout(64, 32, 4, 32, False, "cpu", torch.float32)
    calls = []
    monkeypatch.setattr(triton_wNa16, "dequantize_matmul", lambda x, *args: calls.append(x.shape[0]) or x[:, :32])
    for m in (int_dequant.DEQUANT_MIN_ROWS - 1, int_dequant.DEQUANT_MIN_ROWS):
        triton_wNa16.triton_int_group_matmul(torch.zeros(m, 64), qweight, scales, zeros, 4, 32)
    assert calls == [int_dequant.DEQUANT_MIN_ROWS]
    # A CUDA graph capture keeps the in-tile kernel (no scratch weight in the graphs' pool).
    monkeypatch.setattr(triton_wNa16, "_in_graph_capture", lambda x: True)
    triton_wNa16.triton_int_group_matmul(torch.zeros(int_dequant.DEQUANT_MIN_ROWS, 64), qweight, scales, zeros, 4, 32)
    assert calls == [int_dequant.DEQUANT_MIN_ROWS]


def build_gptq_layer(act_order: bool, device: str = "cpu") -> tuple[MergedColumnParallelLinear, list]:
    torch.manual_seed(0)
    config = GPTQConfig.from_config({"bits": 4, "group_size": 16, "desc_act": act_order, "sym": False})
    with torch.device(device):
        layer = MergedColumnParallelLinear(64, [32, 48], quant_config=config, prefix="mlp.gate_up_proj")
    quantized = []
    for part, size in enumerate([32, 48]):
        g_idx = torch.randperm(64) // 16 if act_order else None
        qt = quantize(torch.randn(size, 64), 4, 16, False, g_idx)
        params = dict(layer.named_parameters())
        for name, tensor in gptq_tensors(qt, 4).items():
            params[name].weight_loader(params[name], tensor, part)
        quantized.append(qt)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, quantized


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests cover CUDA")
@pytest.mark.parametrize("act_order", [False, True])
def test_layer_through_the_kernel_matches_dequantized_weights(act_order):
    """A fused GPTQ layer (each part with its own act order) computed by the kernel."""
    layer, quantized = build_gptq_layer(act_order)
    assert layer.int_group_use_triton is False  # the CPU chooses the reference path
    layer.int_group_use_triton = True
    layer.int_group_split_counts = split_count_buffer(80, torch.device("cpu"))
    for rows in (1, 3):
        x = torch.randn(rows, 64)
        expected = torch.cat([x @ qt.dequantized.t() for qt in quantized], dim=-1)
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=0)


GPU_SHAPES = [(4096, 6144), (4096, 4096), (14336, 4096), (4096, 28672)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 8, 33, 64, 256])
@pytest.mark.parametrize("bits, group_size", [(4, 128), (4, 32), (4, -1), (8, 128)])
def test_cuda_kernel_matches_reference(dtype, m, bits, group_size):
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_kernel_matches_reference(m, 1024, 768, bits, group_size, False, "cuda", dtype, rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 256])
def test_cuda_kernel_matches_reference_at_llama_8b_shapes(k, n, m):
    assert_kernel_matches_reference(m, k, n, 4, 128, False, "cuda", torch.bfloat16, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_scale", [1000.0, 1e-4])
@pytest.mark.parametrize("group_size", [128, -1])
def test_cuda_half2_int4_gemv_keeps_large_and_small_x(dtype, x_scale, group_size):
    """The one-row fp16 kernel scales x by a power of two: no overflow, no lost precision."""
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_kernel_matches_reference(1, 4096, 1024, 4, group_size, False, "cuda", dtype, rtol, x_scale=x_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 256])
def test_cuda_kernel_act_order_matches_reference(m):
    assert_kernel_matches_reference(m, 512, 256, 4, 128, True, "cuda", torch.bfloat16, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_layer_chooses_the_kernel_and_matches(act_order):
    layer, quantized = build_gptq_layer(act_order, "cuda")
    assert layer.int_group_use_triton is True
    for rows in (1, 3):
        x = torch.randn(rows, 64, device="cuda")
        expected = torch.cat([x @ qt.dequantized.cuda().t() for qt in quantized], dim=-1)
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=0)
