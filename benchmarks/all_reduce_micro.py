"""What the fused all-reduce + residual add + RMSNorm costs at decode sizes on two GPUs, against
the local add + RMSNorm that one GPU runs in its place: CUDA graphs of one rank's share of
Llama-3.1-8B's o and down projections (bf16, one row, K = 2048 and 7168, N = 4096) for every
layer, each followed by (a) the fused all-reduce + norm or (b) the local norm; then the norms
alone, (c) fused and (d) local. Kernels are launched as the engine launches them (PDL where
the engine uses it). Prints µs per call on each rank, median over replays that start together
(a barrier before each):

    PYTHONPATH=. python3 benchmarks/all_reduce_micro.py [--layers 32] [--replays 50]

(a) - (b) is what the two-GPU step pays per call, 2 x layers calls a step, over what one GPU
pays for its norm.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import graph_seconds_per_call
from pagedllm.executor.base import get_open_port

HIDDEN, O_IN, DOWN_IN, EPS = 4096, 2048, 7168, 1e-5


def _rank_main(rank: int, port: int, layers: int, replays: int) -> None:
    from pagedllm.distributed import parallel_state
    from pagedllm.layers.ops.fused_rms_norm import fused_add_rms_norm
    from pagedllm.layers.ops.gemv import gemv

    parallel_state.init_distributed(2, rank, "nccl", f"tcp://127.0.0.1:{port}", rank)
    device = torch.device("cuda", rank)
    torch.set_default_device(device)
    parallel_state.init_custom_all_reduce(device, disable=False)
    fused = parallel_state.get_custom_all_reduce()
    if fused is None or not fused.fuses_norms:
        raise RuntimeError("the fused all-reduce + RMSNorm is unavailable on these GPUs")
    torch.manual_seed(rank)
    # Distinct weights per layer, as in the model, so no GEMV reads from a warm L2.
    o_weights = [torch.randn(HIDDEN, O_IN, dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    down_weights = [torch.randn(HIDDEN, DOWN_IN, dtype=torch.bfloat16) * 0.01 for _ in range(layers)]
    attention_out = torch.randn(1, O_IN, dtype=torch.bfloat16)
    mlp_hidden = torch.randn(1, DOWN_IN, dtype=torch.bfloat16)
    residual = torch.randn(1, HIDDEN, dtype=torch.bfloat16)
    norm_weight = torch.ones(HIDDEN, dtype=torch.bfloat16)
    hidden = torch.randn(1, HIDDEN, dtype=torch.bfloat16)

    def norm(x: torch.Tensor, all_reduce: bool) -> None:
        if all_reduce:
            fused.all_reduce_add_rms_norm(x, residual, norm_weight, EPS)
        else:
            fused_add_rms_norm(x, residual, norm_weight, EPS)

    def projection_then_norm(call: int, all_reduce: bool) -> None:
        # Calls alternate between a layer's o and down projections.
        layer, is_down = divmod(call, 2)
        if is_down:
            norm(gemv(mlp_hidden, down_weights[layer]), all_reduce)
        else:
            norm(gemv(attention_out, o_weights[layer]), all_reduce)

    calls = 2 * layers

    def us_per_call(fn) -> float:
        return graph_seconds_per_call(fn, calls, replays, before_replay=dist.barrier) * 1e6

    rounds = [
        us_per_call(lambda call: projection_then_norm(call, True))
        - us_per_call(lambda call: projection_then_norm(call, False))
        for _ in range(2)
    ]
    fused_alone = us_per_call(lambda call: norm(hidden, True))
    local_alone = us_per_call(lambda call: norm(hidden, False))
    for turn in range(2):
        if turn == rank:
            print(f"rank {rank}: all-reduce per call over the local norm, among the GEMVs: "
                  f"{rounds[0]:.2f}, {rounds[1]:.2f} µs; alone: fused {fused_alone:.2f} µs, "
                  f"local norm {local_alone:.2f} µs; {calls} calls a step: "
                  f"{min(rounds) * calls / 1e3:.3f}-{max(rounds) * calls / 1e3:.3f} ms", flush=True)
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--replays", type=int, default=50)
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("all_reduce_micro.py needs two GPUs")
    mp.spawn(_rank_main, args=(get_open_port(), args.layers, args.replays), nprocs=2)


if __name__ == "__main__":
    main()
