"""The fused Triton kernels of layers/ops (RMSNorm with the residual add, rope, SiLU-and-mul)
against the torch code they replace (each module's forward_native), on a CUDA GPU.

Error measure: distance in units in the last place (ulps) of the output dtype. The fused
residual add must be bit-identical (same roundings). RMSNorm sums squares in another order
than torch, so a normalised value can round 1 ulp apart and the weight multiply can make that
2 ulps; norms and SiLU are held to at most 2 ulps anywhere and at most 1% of elements not
bit-identical (measured on an H100 at Llama-3.1-8B shapes: 100% identical). fp32: rtol/atol
1e-5. Rope: the compiler fuses one product with the add (an FMA, one rounding fewer than
torch's three), so about 20% of bf16/fp16 results differ, by up to one rounding of a product;
near cancellation that is many ulps of the result, so rope is held to
|out - ref| <= 2 * eps * (|x1| + |x2|) per rotated pair (|cos|, |sin| <= 1), every dtype.
"""

from __future__ import annotations

import gc

import pytest
import torch

from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.rotary_embedding import get_rope

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
_INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise count of representable values between a and b (0 = bit-identical, with
    +0 == -0), via the sign-magnitude bit patterns mapped to a monotonic integer line."""
    assert a.dtype == b.dtype and a.shape == b.shape

    def line(t: torch.Tensor) -> torch.Tensor:
        int_type = _INT_OF[t.dtype]
        bits = t.contiguous().view(int_type).to(torch.int64)
        return torch.where(bits >= 0, bits, torch.iinfo(int_type).min - bits)

    return (line(a) - line(b)).abs()


def assert_matches(out: torch.Tensor, ref: torch.Tensor, max_ulps: int = 2, fp32_tol: float = 1e-5) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=fp32_tol, atol=fp32_tol)
        return
    ulps = ulp_distance(out, ref)
    assert int(ulps.max()) <= max_ulps, f"{int(ulps.max())} ulps apart"
    mismatched = float((ulps > 0).float().mean())
    assert mismatched <= 0.01, f"{mismatched:.2%} of elements not bit-identical"


def assert_rope_matches(out: torch.Tensor, ref: torch.Tensor, before: torch.Tensor, head_size: int,
                        rotary_dim: int) -> None:
    """out/ref/before [T, heads * head_size]: rotated features within the bound above, the
    features past rotary_dim (partial rotary) bit-identical to the input."""
    assert out.shape == ref.shape == before.shape and out.dtype == ref.dtype
    num_tokens, half = out.shape[0], rotary_dim // 2
    out, ref, before = (t.reshape(num_tokens, -1, head_size) for t in (out, ref, before))
    x = before.float()
    pair_magnitude = x[..., :half].abs() + x[..., half:rotary_dim].abs()
    bound = 2 * torch.finfo(out.dtype).eps * torch.cat([pair_magnitude, pair_magnitude], dim=-1)
    diff = (out[..., :rotary_dim].float() - ref[..., :rotary_dim].float()).abs()
    assert bool((diff <= bound).all()), f"max excess {float((diff - bound).max())}"
    assert torch.equal(out[..., rotary_dim:], before[..., rotary_dim:])


def _built_on_cuda(factory):
    with torch.device("cuda"):
        return factory()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (37, 4096), (5, 320), (3, 7, 128)])
def test_rms_norm_matches_torch_within_one_ulp(dtype, shape):
    torch.manual_seed(0)
    norm = _built_on_cuda(lambda: RMSNorm(shape[-1], eps=1e-5)).to(dtype)
    norm.weight.data.normal_()
    x = torch.randn(shape, device="cuda", dtype=dtype) * 3
    out = norm(x)
    assert_matches(out, norm.forward_native(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_per_head_views_of_a_qkv_output(dtype):
    """Qwen3's q_norm/k_norm read [T, H, D] views of the fused qkv output (row stride > H*D)."""
    torch.manual_seed(0)
    tokens, heads, head_size, kv_heads = 9, 16, 128, 4
    norm = _built_on_cuda(lambda: RMSNorm(head_size, eps=1e-6)).to(dtype)
    norm.weight.data.normal_()
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, device="cuda", dtype=dtype)
    q = qkv[:, : heads * head_size].reshape(tokens, heads, head_size)
    k = qkv[:, heads * head_size : (heads + kv_heads) * head_size].reshape(tokens, kv_heads, head_size)
    assert not q.is_contiguous() and q.data_ptr() == qkv.data_ptr()
    for view in (q, k):
        out = norm(view)
        assert out.is_contiguous()
        assert_matches(out, norm.forward_native(view.contiguous()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 130])
def test_fused_add_rms_norm_works_in_place_and_matches_torch(dtype, num_tokens):
    torch.manual_seed(0)
    norm = _built_on_cuda(lambda: RMSNorm(4096, eps=1e-5)).to(dtype)
    norm.weight.data.normal_()
    x = torch.randn(num_tokens, 4096, device="cuda", dtype=dtype)
    residual = torch.randn(num_tokens, 4096, device="cuda", dtype=dtype) * 4
    ref_out, ref_residual = norm.forward_native(x.clone(), residual.clone())
    out, new_residual = norm(x, residual)
    assert out is x and new_residual is residual
    assert torch.equal(new_residual, ref_residual)  # the add rounds exactly as torch's does
    assert_matches(out, ref_out)


def _llama3_rope(head_size: int, partial_rotary_factor: float = 1.0):
    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
              "partial_rotary_factor": partial_rotary_factor}
    return _built_on_cuda(lambda: get_rope(head_size, 131072, params))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_tokens, heads, kv_heads, head_size, partial",
    [(1, 32, 8, 128, 1.0), (77, 32, 8, 128, 1.0), (5, 12, 3, 64, 1.0), (6, 8, 2, 128, 0.5)],
)
def test_rope_rotates_qkv_views_in_place_like_torch(dtype, num_tokens, heads, kv_heads, head_size, partial):
    """q and k are the views of the fused qkv output the model passes; v and, with partial
    rotary, the features past rotary_dim must stay untouched."""
    torch.manual_seed(0)
    rope = _llama3_rope(head_size, partial)
    assert rope.rotary_dim == int(head_size * partial)
    q_size, kv_size = heads * head_size, kv_heads * head_size
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device="cuda", dtype=dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    positions = torch.randint(0, 131072, (num_tokens,), device="cuda")
    positions[0] = 0
    before = qkv.clone()
    ref_q, ref_k = rope.forward_native(positions, q.clone(), k.clone())
    out_q, out_k = rope(positions, q, k)
    assert out_q.data_ptr() == qkv.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert torch.equal(v, before[:, q_size + kv_size :])
    assert_rope_matches(out_q, ref_q.view(out_q.shape), before[:, :q_size], head_size, rope.rotary_dim)
    assert_rope_matches(out_k, ref_k.view(out_k.shape), before[:, q_size : q_size + kv_size], head_size,
                        rope.rotary_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 14336), (33, 2 * 200), (2, 3, 2 * 64)])
def test_silu_and_mul_matches_torch_within_one_ulp(dtype, shape):
    torch.manual_seed(0)
    act = _built_on_cuda(SiluAndMul)
    x = torch.randn(shape, device="cuda", dtype=dtype) * 4
    out = act(x)
    assert out.is_contiguous() and out.shape == (*shape[:-1], shape[-1] // 2)
    assert_matches(out, act.forward_native(x))


def test_every_kernel_accepts_zero_tokens():
    norm = _built_on_cuda(lambda: RMSNorm(64))
    rope = _llama3_rope(32)
    act = _built_on_cuda(SiluAndMul)
    empty = torch.empty(0, 64, device="cuda")
    assert norm(empty).shape == (0, 64)
    out, residual = norm(empty, empty.clone())
    assert out.shape == residual.shape == (0, 64)
    q, k = rope(torch.empty(0, dtype=torch.int64, device="cuda"), torch.empty(0, 128, device="cuda"),
                torch.empty(0, 64, device="cuda"))
    assert q.shape == (0, 128) and k.shape == (0, 64)
    assert act(torch.empty(0, 256, device="cuda")).shape == (0, 128)


def test_kernels_replay_in_a_cuda_graph_on_new_inputs():
    """Grids come from shapes only and nothing syncs with the host, so a captured decode step
    replays correctly on inputs copied into its static buffers."""
    torch.manual_seed(0)
    dtype, tokens, hidden, heads, kv_heads, head_size = torch.bfloat16, 4, 512, 4, 2, 128
    norm = _built_on_cuda(lambda: RMSNorm(hidden)).to(dtype)
    norm.weight.data.normal_()
    rope = _llama3_rope(head_size)
    act = _built_on_cuda(SiluAndMul)
    qkv_width = (heads + 2 * kv_heads) * head_size
    static = {
        "x": torch.randn(tokens, hidden, device="cuda", dtype=dtype),
        "h": torch.randn(tokens, hidden, device="cuda", dtype=dtype),
        "residual": torch.randn(tokens, hidden, device="cuda", dtype=dtype),
        "qkv": torch.randn(tokens, qkv_width, device="cuda", dtype=dtype),
        "positions": torch.zeros(tokens, dtype=torch.int64, device="cuda"),
        "gate_up": torch.randn(tokens, 2 * hidden, device="cuda", dtype=dtype),
    }

    def step(b):
        normed = norm(b["x"])
        norm(b["h"], b["residual"])
        q, k, _ = b["qkv"].split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
        rope(b["positions"], q, k)
        return normed, act(b["gate_up"])

    step({name: t.clone() for name, t in static.items()})  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step(static)

    fresh = {name: torch.randn_like(t) for name, t in static.items() if t.is_floating_point()}
    fresh["positions"] = torch.tensor([5, 700, 3, 99999], device="cuda")
    for name, t in fresh.items():
        static[name].copy_(t)
    graph.replay()
    torch.cuda.synchronize()

    assert_matches(graph_out[0], norm.forward_native(fresh["x"]))
    ref_h, ref_residual = norm.forward_native(fresh["h"], fresh["residual"])
    assert_matches(static["h"], ref_h)
    assert torch.equal(static["residual"], ref_residual)
    q_size, kv_size = heads * head_size, kv_heads * head_size
    q, k, _ = fresh["qkv"].split([q_size, kv_size, kv_size], dim=-1)
    ref_q, ref_k = rope.forward_native(fresh["positions"], q, k)
    assert_rope_matches(static["qkv"][:, :q_size], ref_q, q, head_size, head_size)
    assert_rope_matches(static["qkv"][:, q_size : q_size + kv_size], ref_k, k, head_size, head_size)
    assert_matches(graph_out[1], act.forward_native(fresh["gate_up"]))


def test_layers_pick_triton_on_cuda_and_torch_on_cpu():
    for device, expect_triton in (("cuda", True), ("cpu", False)):
        with torch.device(device):
            norm, act, rope = RMSNorm(64), SiluAndMul(), get_rope(32, 64, {"rope_theta": 10000.0})
        assert (norm._forward_impl == norm._forward_triton) is expect_triton
        assert (rope._forward_impl == rope._forward_triton) is expect_triton
        assert (act._forward_impl != act.forward_native) is expect_triton


def test_tiny_llama_on_cuda_gives_transformers_greedy_tokens(tmp_path):
    from tiny_models import hf_greedy, make_tiny_checkpoint

    from pagedllm import LLM, SamplingParams

    prompts = [[5, 17, 99, 23, 8], list(range(30, 90)), [300]]
    path = make_tiny_checkpoint(tmp_path / "llama", "llama")
    expected = hf_greedy(path, prompts, 10)
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.3)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
