"""TRITON_PAGED attention against a plain-torch reference (gather + SDPA), on a CUDA GPU.

Every case draws fresh random inputs, fills the output with NaN before the call (so an
unwritten row fails), fills every cache slot that no request owns with NaN (so a read past a
sequence or outside a request's blocks fails) and gives requests shuffled, non-contiguous block
ids. Error measure: max|out - ref| / max|ref| and ||out - ref|| / ||ref|| against an fp32
reference computed from the same low-precision K/V; bounds per dtype in _TOLERANCES.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from pagedllm.forward_context import AttentionMetadata

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (max abs err / max abs ref, Frobenius relative error). bf16 keeps 8 mantissa bits: P and the
# output are rounded to it (2^-9 relative each); fp16 keeps 11; fp32 uses IEEE dots.
_TOLERANCES = {
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (5e-3, 2e-3),
    torch.float32: (1e-4, 2e-5),
}


@dataclass
class Batch:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kv_cache: torch.Tensor
    """Cache before the call: history K/V, NaN in every slot no request owns and in the slots
    the call must write."""
    expected_cache: torch.Tensor
    metadata: AttentionMetadata
    scale: float


def make_batch(
    query_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device = "cuda",
    num_padding_rows: int = 0,
    num_blocks: int | None = None,
    max_blocks_per_req: int | None = None,
    generator: torch.Generator | None = None,
) -> Batch:
    """Random mixed batch: request i has query_lens[i] new tokens at the end of seq_lens[i]."""
    assert len(query_lens) == len(seq_lens) and all(0 < q <= s for q, s in zip(query_lens, seq_lens))
    blocks_per_req = [math.ceil(s / block_size) for s in seq_lens]
    needed = sum(blocks_per_req)
    num_blocks = num_blocks or needed + 5
    max_blocks_per_req = max_blocks_per_req or max(blocks_per_req)
    assert num_blocks >= needed and max_blocks_per_req >= max(blocks_per_req)
    cpu = dict(device="cpu", generator=generator)
    order = torch.randperm(num_blocks, **cpu)
    block_table = torch.zeros(len(seq_lens), max_blocks_per_req, dtype=torch.int32)
    cursor = 0
    for i, n in enumerate(blocks_per_req):
        block_table[i, :n] = order[cursor : cursor + n].to(torch.int32)
        cursor += n

    shape = (2, num_blocks, block_size, num_kv_heads, head_size)
    kv_cache = torch.full(shape, float("nan"), dtype=dtype)
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_size)
    num_real = sum(query_lens)
    num_tokens = num_real + num_padding_rows
    query = torch.randn(num_tokens, num_heads, head_size, **cpu).to(dtype)
    # key and value as strided views of one tensor, as a fused qkv projection hands them over.
    kv = torch.randn(num_tokens, 2, num_kv_heads, head_size, **cpu).to(dtype)
    key, value = kv[:, 0], kv[:, 1]
    slot_mapping = torch.full((num_tokens,), -1, dtype=torch.int64)
    expected = None
    row = 0
    new_slots = []
    for i, (q_len, s_len) in enumerate(zip(query_lens, seq_lens)):
        positions = torch.arange(s_len)
        slots = block_table[i, positions // block_size].long() * block_size + positions % block_size
        history = slots[: s_len - q_len]
        flat[:, history] = torch.randn(2, len(history), num_kv_heads, head_size, **cpu).to(dtype)
        slot_mapping[row : row + q_len] = slots[s_len - q_len :]
        new_slots.append(slots[s_len - q_len :])
        row += q_len
    expected = kv_cache.clone()
    expected_flat = expected.view(2, num_blocks * block_size, num_kv_heads, head_size)
    all_new = torch.cat(new_slots)
    expected_flat[0, all_new] = key[:num_real]
    expected_flat[1, all_new] = value[:num_real]

    query_start_loc = [0]
    for q_len in query_lens:
        query_start_loc.append(query_start_loc[-1] + q_len)
    metadata = AttentionMetadata(
        num_actual_tokens=num_real,
        num_reqs=len(query_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=block_table.to(device),
        slot_mapping=slot_mapping.to(device),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=list(seq_lens),
    )
    kv = kv.to(device)
    return Batch(
        query=query.to(device),
        key=kv[:, 0],
        value=kv[:, 1],
        kv_cache=kv_cache.to(device),
        expected_cache=expected.to(device),
        metadata=metadata,
        scale=head_size**-0.5,
    )


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor | None,
    md: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """fp32 causal attention of the first num_actual_tokens rows: each request's K/V gathered
    from its blocks (or taken from key/value when kv_cache is None), the query at row j of
    request i placed at position seq_len - query_len + j; with sliding_window it sees only
    keys above position - sliding_window."""
    num_heads = query.shape[1]
    out = torch.empty(md.num_actual_tokens, num_heads, query.shape[2], dtype=torch.float32, device=query.device)
    for i in range(md.num_reqs):
        q_start, q_end = md.query_start_loc_cpu[i], md.query_start_loc_cpu[i + 1]
        q_len, s_len = q_end - q_start, md.seq_lens_cpu[i]
        if kv_cache is None:
            k, v = key[q_start:q_end], value[q_start:q_end]
        else:
            block_size = kv_cache.shape[2]
            positions = torch.arange(s_len, device=query.device)
            slots = md.block_table[i, positions // block_size].long() * block_size + positions % block_size
            flat = kv_cache.flatten(1, 2)
            k, v = flat[0, slots], flat[1, slots]
        group = num_heads // k.shape[1]
        k = k.float().transpose(0, 1).repeat_interleave(group, dim=0)
        v = v.float().transpose(0, 1).repeat_interleave(group, dim=0)
        q = query[q_start:q_end].float().transpose(0, 1)
        q_pos = s_len - q_len + torch.arange(q_len, device=query.device)
        key_pos = torch.arange(s_len, device=query.device)[None, :]
        visible = key_pos <= q_pos[:, None]
        if sliding_window is not None:
            visible &= key_pos > q_pos[:, None] - sliding_window
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
        out[q_start:q_end] = o.transpose(0, 1)
    return out


def relative_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (out.float() - ref).abs()
    max_rel = (diff.max() / ref.abs().max()).item()
    fro_rel = (diff.norm() / ref.norm()).item()
    return max_rel, fro_rel


def run_and_check(
    batch: Batch, dtype: torch.dtype, label: str, sliding_window: int | None = None, **backend_kwargs
) -> None:
    from pagedllm.layers.attention.backends.triton_paged import TritonPagedAttention

    md = batch.metadata
    output = torch.full_like(batch.query, float("nan"))
    kv_cache = batch.kv_cache.clone()
    result = TritonPagedAttention(sliding_window=sliding_window, **backend_kwargs).forward(
        batch.query, batch.key, batch.value, kv_cache, md, batch.scale, output=output
    )
    torch.cuda.synchronize()
    assert result.data_ptr() == output.data_ptr()
    # The cache write is a copy: bit-exact, NaN slots included.
    assert torch.equal(kv_cache.nan_to_num(7.0), batch.expected_cache.nan_to_num(7.0)), "kv cache mismatch"
    real = output[: md.num_actual_tokens]
    assert not real.isnan().any(), f"{label}: {real.isnan().sum().item()} output values unwritten or NaN"
    assert (output[md.num_actual_tokens :] == 0).all(), "padding rows must be zeroed"
    ref = reference_attention(
        batch.query, batch.key, batch.value, batch.expected_cache, md, batch.scale, sliding_window
    )
    max_rel, fro_rel = relative_errors(real, ref)
    print(f"ERR {label}: max_rel={max_rel:.2e} fro_rel={fro_rel:.2e}")
    max_bound, fro_bound = _TOLERANCES[dtype]
    assert max_rel < max_bound and fro_rel < fro_bound, (label, max_rel, fro_rel)


# name: (query_lens, seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype, padding rows)
_CASES = {
    "prefill": ([17, 64, 130, 3], [17, 64, 130, 3], 16, 8, 128, 16, torch.bfloat16, 0),
    "prefill_mha_d64_fp16": ([100, 37, 250], [100, 37, 250], 4, 4, 64, 16, torch.float16, 0),
    "chunked_with_history": ([33, 128, 5], [100, 1000, 4000], 16, 8, 128, 16, torch.bfloat16, 0),
    "chunked_gqa4_d256": ([70, 9], [300, 2100], 8, 2, 256, 16, torch.bfloat16, 0),
    "decode_short": ([1] * 8, [1, 2, 15, 16, 17, 63, 64, 65], 16, 8, 128, 16, torch.bfloat16, 0),
    "decode_long": ([1] * 4, [1000, 4097, 16384, 32768], 16, 8, 128, 16, torch.bfloat16, 0),
    "decode_long_gqa8_fp16": ([1] * 3, [32000, 5, 777], 32, 4, 128, 16, torch.float16, 0),
    "decode_d256_bs32": ([1] * 5, [3, 31, 32, 33, 3000], 8, 4, 256, 32, torch.bfloat16, 0),
    "mixed_padding": ([1, 37, 1, 200, 1, 16], [5000, 37, 1, 700, 33, 16], 16, 8, 128, 16, torch.bfloat16, 3),
    "mixed_mha_d64_bs32": ([1, 90, 1], [2000, 150, 64], 8, 8, 64, 32, torch.float16, 2),
    "mixed_gqa2_bs64": ([5, 1, 300], [700, 9000, 300], 8, 4, 128, 64, torch.bfloat16, 0),
    "mixed_gqa3_d96": ([1, 50, 1], [600, 80, 1], 6, 2, 96, 16, torch.float16, 1),
    "mixed_gqa7_bs8": ([1, 20], [300, 45], 7, 1, 128, 8, torch.bfloat16, 0),
    "mixed_d32_fp32": ([1, 40, 1], [100, 60, 7], 4, 2, 32, 16, torch.float32, 0),
}


@pytest.mark.parametrize("name", list(_CASES))
def test_paged_attention_matches_gather_sdpa_reference(name: str) -> None:
    query_lens, seq_lens, h, hkv, d, bs, dtype, padding = _CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    batch = make_batch(query_lens, seq_lens, h, hkv, d, bs, dtype, num_padding_rows=padding, generator=gen)
    run_and_check(batch, dtype, name)


# name: (query_lens, seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype, window)
_WINDOW_CASES = {
    "window_mixed": ([1, 300, 1, 40, 1], [5000, 300, 100, 1000, 4], 16, 8, 128, 16, torch.bfloat16, 256),
    "window_unaligned_d64": ([130, 1, 7], [130, 777, 2000], 8, 2, 64, 16, torch.float16, 100),
    "window_decode_long": ([1, 1], [32768, 1000], 16, 8, 128, 16, torch.bfloat16, 4096),
    "window_of_one": ([20, 1], [50, 9], 4, 4, 64, 16, torch.float16, 1),
}


@pytest.mark.parametrize("name", list(_WINDOW_CASES))
def test_sliding_window_matches_reference(name: str) -> None:
    query_lens, seq_lens, h, hkv, d, bs, dtype, window = _WINDOW_CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    batch = make_batch(query_lens, seq_lens, h, hkv, d, bs, dtype, num_padding_rows=1, generator=gen)
    run_and_check(batch, dtype, name, sliding_window=window)


@pytest.mark.parametrize("max_decode_splits", [1, 4])
def test_decode_matches_reference_with_few_or_no_splits(max_decode_splits: int) -> None:
    gen = torch.Generator().manual_seed(max_decode_splits)
    batch = make_batch([1] * 4, [1, 100, 2049, 8000], 16, 8, 128, 16, torch.bfloat16, generator=gen)
    run_and_check(batch, torch.bfloat16, f"decode_splits<={max_decode_splits}", max_decode_splits=max_decode_splits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_profiling_run_without_cache_is_causal_within_each_request(dtype: torch.dtype) -> None:
    from pagedllm.layers.attention.backends.triton_paged import TritonPagedAttention

    gen = torch.Generator().manual_seed(3)
    lens = [1, 77, 300, 16]
    batch = make_batch(lens, lens, 16, 8, 128, 16, dtype, num_padding_rows=4, generator=gen)
    md = batch.metadata
    output = torch.full_like(batch.query, float("nan"))
    TritonPagedAttention().forward(batch.query, batch.key, batch.value, None, md, batch.scale, output=output)
    ref = reference_attention(batch.query, batch.key, batch.value, None, md, batch.scale)
    real = output[: md.num_actual_tokens]
    assert not real.isnan().any()
    max_rel, fro_rel = relative_errors(real, ref)
    print(f"ERR profiling_{dtype}: max_rel={max_rel:.2e} fro_rel={fro_rel:.2e}")
    assert max_rel < _TOLERANCES[dtype][0] and fro_rel < _TOLERANCES[dtype][1]


def test_decode_step_replays_in_a_cuda_graph_at_new_lengths() -> None:
    """Captured once, replayed with other seq_lens (up to 20k), block tables and inputs: the
    grid must not depend on any of them."""
    from pagedllm.layers.attention.backends.triton_paged import TritonPagedAttention

    backend = TritonPagedAttention()
    shape = dict(num_heads=16, num_kv_heads=8, head_size=128, block_size=16, dtype=torch.bfloat16)
    num_blocks, table_width = 3000, 1300
    gen = torch.Generator().manual_seed(11)
    static = make_batch([1] * 8, [5] * 8, **shape, num_blocks=num_blocks, max_blocks_per_req=table_width, generator=gen)
    md = static.metadata
    kv_cache = static.kv_cache.clone()
    output = torch.zeros_like(static.query)

    def step() -> None:
        backend.forward(static.query, static.key, static.value, kv_cache, md, static.scale, output=output)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for seq_lens in ([1, 7, 300, 4000, 20000, 16, 17, 999], [12000, 1, 2, 3, 64, 65, 5000, 128]):
        new = make_batch(
            [1] * 8, seq_lens, **shape, num_blocks=num_blocks, max_blocks_per_req=table_width, generator=gen
        )
        static.query.copy_(new.query)
        static.key.copy_(new.key)
        static.value.copy_(new.value)
        kv_cache.copy_(new.kv_cache)
        md.seq_lens.copy_(new.metadata.seq_lens)
        md.block_table.copy_(new.metadata.block_table)
        md.slot_mapping.copy_(new.metadata.slot_mapping)
        output.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(kv_cache.nan_to_num(7.0), new.expected_cache.nan_to_num(7.0))
        assert not output.isnan().any()
        ref = reference_attention(new.query, new.key, new.value, new.expected_cache, new.metadata, new.scale)
        max_rel, fro_rel = relative_errors(output, ref)
        print(f"ERR cuda_graph {seq_lens}: max_rel={max_rel:.2e} fro_rel={fro_rel:.2e}")
        assert max_rel < _TOLERANCES[torch.bfloat16][0] and fro_rel < _TOLERANCES[torch.bfloat16][1]


@pytest.mark.parametrize("sliding_window", [None, 100])
def test_matches_torch_sdpa_backend(sliding_window: int | None) -> None:
    """Same inputs through the CPU-reference backend (run on the GPU): both bf16, so the bound
    covers the rounding of both."""
    torch_sdpa = pytest.importorskip("pagedllm.layers.attention.backends.torch_sdpa")
    from pagedllm.layers.attention.backends.triton_paged import TritonPagedAttention

    gen = torch.Generator().manual_seed(5)
    batch = make_batch(
        [1, 37, 1, 120], [3000, 37, 9, 500], 16, 8, 128, 16, torch.bfloat16, num_padding_rows=2, generator=gen
    )
    md = batch.metadata
    ours = TritonPagedAttention(sliding_window=sliding_window).forward(
        batch.query, batch.key, batch.value, batch.kv_cache.clone(), md, batch.scale
    )
    theirs = torch_sdpa.TorchSDPAAttention(sliding_window=sliding_window).forward(
        batch.query, batch.key, batch.value, batch.kv_cache.clone(), md, batch.scale
    )
    assert not ours.isnan().any() and not theirs.isnan().any()
    max_rel, fro_rel = relative_errors(ours, theirs.float())
    print(f"ERR vs TorchSDPAAttention window={sliding_window}: max_rel={max_rel:.2e} fro_rel={fro_rel:.2e}")
    assert max_rel < 2e-2 and fro_rel < 1e-2
