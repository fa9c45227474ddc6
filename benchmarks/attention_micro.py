"""Micro-benchmark of the TRITON_PAGED kernels on Qwen3-0.6B-like heads (16 q, 8 kv, D 128), or
Llama-3.1-8B's (32 q, 8 kv) with --model llama.

Decode, launched as the engine launches it (the backend's split count, splits merged by the last
to finish): achieved GB/s of KV read (each request's K and V read once) against a
device-to-device copy measured in the same run (bytes read + written). Each timing is the
median of CUDA-graph replays; inputs rotate over enough independent caches to exceed L2, and
the cache holds random data with shuffled block ids. Prefill: TFLOP/s of causal attention
(4 * D * H * visible pairs), with torch's SDPA (flash, contiguous K/V) beside it.

    python benchmarks/attention_micro.py [--sweep] [--model llama] [--batches 1 64] [--contexts 4096 32768] [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.common import graph_seconds_per_call
from pagedllm.layers.attention.ops.common import TileConfig
from pagedllm.layers.attention.ops.decode_attention import DecodeConfig, decode_config, paged_decode_attention
from pagedllm.layers.attention.ops.prefill_attention import paged_prefill_attention

NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 8, 128, 16
NUM_HEADS_BY_MODEL = {"qwen3": 16, "llama": 32}
DTYPE = torch.bfloat16
L2_BYTES = 50 * 2**20
ELEM = 2


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy."""
    src = torch.randn(2**30, dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    seconds = graph_seconds_per_call(lambda i: dst.copy_(src), 1, replays=20)
    del src, dst
    return 2 * 2**31 / seconds


def read_bandwidth() -> float:
    """Bytes read per second by a sum over 2 GiB: the ceiling for decode, which only reads."""
    src = torch.randn(2**30, dtype=DTYPE, device="cuda")
    total = torch.empty((), dtype=torch.float32, device="cuda")
    seconds = graph_seconds_per_call(lambda i: torch.sum(src, 0, dtype=torch.float32, out=total), 1, replays=20)
    del src
    return 2**31 / seconds


def decode_case(batch: int, context: int, configs: list[tuple[str, DecodeConfig, int]],
                split_counters: torch.Tensor, num_heads: int) -> list[dict]:
    kv_bytes = batch * context * NUM_KV_HEADS * HEAD_SIZE * ELEM * 2
    num_sets = max(1, -(-4 * L2_BYTES // kv_bytes))
    blocks_per_req = context // BLOCK_SIZE
    num_blocks = num_sets * batch * blocks_per_req
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, dtype=DTYPE, device="cuda")
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(num_sets, batch, blocks_per_req)
    query = torch.randn(num_sets, batch, num_heads, HEAD_SIZE, dtype=DTYPE, device="cuda")
    out = torch.empty_like(query)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    results = []
    for label, config, num_splits in configs:
        def fn(i: int) -> None:
            s = i % num_sets
            paged_decode_attention(
                out[s], query[s], kv_cache, tables[s], query_start_loc, seq_lens, batch,
                HEAD_SIZE**-0.5, num_splits, config=config, split_counters=split_counters,
            )

        seconds = graph_seconds_per_call(fn, num_sets)
        results.append(dict(kind="decode", batch=batch, context=context, config=label, splits=num_splits,
                            us=seconds * 1e6, gbps=kv_bytes / seconds / 1e9))
    del kv_cache
    return results


def prefill_case(
    query_len: int, context: int, configs: list[TileConfig | None], num_heads: int, head_size: int = HEAD_SIZE
) -> list[dict]:
    seq_len = query_len + context
    blocks = -(-seq_len // BLOCK_SIZE)
    kv_cache = torch.randn(2, blocks, BLOCK_SIZE, NUM_KV_HEADS, head_size, dtype=DTYPE, device="cuda")
    table = torch.randperm(blocks, device="cuda").to(torch.int32)[None]
    query = torch.randn(query_len, num_heads, head_size, dtype=DTYPE, device="cuda")
    out = torch.empty_like(query)
    qsl = torch.tensor([0, query_len], dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")

    pairs = query_len * context + query_len * (query_len + 1) / 2
    flops = 4 * pairs * head_size * num_heads
    rows = []
    for config in configs:
        def ours(i: int) -> None:
            paged_prefill_attention(out, query, kv_cache[0], kv_cache[1], table, qsl, seq_lens, 1, head_size**-0.5,
                                    kv_from_cache=True, skip_decode=False, config=config)

        seconds = graph_seconds_per_call(ours, 1, replays=10)
        label = (
            "default" if config is None
            else f"m{config.block_m}n{config.block_n}w{config.num_warps}s{config.num_stages}"
        )
        rows.append(dict(kind="prefill", head_size=head_size, query_len=query_len, context=context, config=label,
                         us=seconds * 1e6, tflops=flops / seconds / 1e12))
    row = rows[0]
    if context == 0:
        q = query.transpose(0, 1)[None]
        k = torch.randn(1, NUM_KV_HEADS, query_len, head_size, dtype=DTYPE, device="cuda")
        v = torch.randn_like(k)
        try:
            sdpa = graph_seconds_per_call(lambda i: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 1, 10)
            row["sdpa_tflops"] = flops / sdpa / 1e12
        except RuntimeError as error:  # a reference number only; never fail the run over it
            print(f"torch SDPA skipped: {error}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="--sweep-decode and --sweep-prefill")
    parser.add_argument("--sweep-decode", action="store_true", help="also try other decode tiles and split counts")
    parser.add_argument("--sweep-prefill", action="store_true", help="also try other prefill tiles and head sizes")
    parser.add_argument("--model", choices=sorted(NUM_HEADS_BY_MODEL), default="qwen3", help="query heads")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    num_heads = NUM_HEADS_BY_MODEL[args.model]
    sweep_decode = args.sweep or args.sweep_decode
    sweep_prefill = args.sweep or args.sweep_prefill
    from pagedllm.layers.attention.backends.triton_paged import TritonPagedAttention

    backend = TritonPagedAttention()
    device = torch.device("cuda")
    copy_bps = copy_bandwidth()
    read_bps = read_bandwidth()
    rows: list[dict] = []
    for batch in args.batches:
        for context in args.contexts:
            auto = backend.num_decode_splits(batch, NUM_KV_HEADS, device)
            default = decode_config(HEAD_SIZE, DTYPE)
            configs = [("default", default, auto)]
            if sweep_decode:
                # default twice: the spread between the two is the noise floor of the table.
                configs.append(("default", default, auto))
            if sweep_decode:
                for splits in sorted({max(1, auto // 4), max(1, auto // 2), auto * 2} - {auto}):
                    configs.append(("default", default, min(splits, 128)))
                for bn, warps, stages in ((128, 4, 3), (64, 8, 3), (32, 4, 4), (128, 8, 2), (64, 4, 4)):
                    configs.append((f"n{bn}w{warps}s{stages}", DecodeConfig(bn, warps, stages), auto))
            rows += decode_case(batch, context, configs, backend.split_counters(device), num_heads)
            torch.cuda.empty_cache()
    prefill_configs: list[TileConfig | None] = [None]
    if sweep_prefill:
        prefill_configs += [TileConfig(128, 64, 8, 2), TileConfig(64, 64, 4, 3), TileConfig(128, 32, 4, 3),
                            TileConfig(64, 32, 4, 3), TileConfig(64, 64, 4, 4)]
    for query_len, context in ((8192, 0), (2048, 30720)):
        rows += prefill_case(query_len, context, prefill_configs, num_heads)
    if sweep_prefill:
        other_head_sizes = {
            64: [None, TileConfig(64, 64, 4, 3), TileConfig(128, 32, 4, 3), TileConfig(64, 128, 4, 3)],
            256: [None, TileConfig(64, 32, 4, 3), TileConfig(64, 64, 8, 2), TileConfig(32, 64, 4, 2)],
        }
        for head_size, configs in other_head_sizes.items():
            rows += prefill_case(8192, 0, configs, num_heads, head_size)

    print(f"\ncopy bandwidth (read+write): {copy_bps / 1e9:.0f} GB/s, read-only (sum): {read_bps / 1e9:.0f} GB/s "
          f"on {torch.cuda.get_device_name()}")
    print(f"{'batch':>5} {'context':>7} {'config':>10} {'splits':>6} {'us':>9} {'GB/s':>7} {'% copy':>6} {'% read':>6}")
    for r in rows:
        if r["kind"] == "decode":
            print(f"{r['batch']:>5} {r['context']:>7} {r['config']:>10} {r['splits']:>6} {r['us']:>9.1f} "
                  f"{r['gbps']:>7.0f} {100 * r['gbps'] * 1e9 / copy_bps:>6.1f} "
                  f"{100 * r['gbps'] * 1e9 / read_bps:>6.1f}")
    for r in rows:
        if r["kind"] == "prefill":
            extra = f", torch SDPA (contiguous K/V) {r['sdpa_tflops']:.0f} TFLOP/s" if "sdpa_tflops" in r else ""
            print(f"prefill D={r['head_size']} q={r['query_len']} ctx={r['context']} {r['config']}: {r['us']:.0f} us, "
                  f"{r['tflops']:.0f} TFLOP/s{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_gbps=copy_bps / 1e9, read_gbps=read_bps / 1e9, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
