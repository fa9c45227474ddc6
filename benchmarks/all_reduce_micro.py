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
import socket
import statistics
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN, O_IN, DOWN_IN, EPS = 4096, 2048, 7168, 1e-5


def _median_graph_us(step: Callable[[], None], replays: int) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(replays):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


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

    def projections(all_reduce: bool) -> Callable[[], None]:
        def step() -> None:
            for o, down in zip(o_weights, down_weights):
                norm(gemv(attention_out, o), all_reduce)
                norm(gemv(mlp_hidden, down), all_reduce)
        return step

    def norms_alone(all_reduce: bool) -> Callable[[], None]:
        def step() -> None:
            for _ in range(2 * layers):
                norm(hidden, all_reduce)
        return step

    calls = 2 * layers
    rounds = []
    for _ in range(2):
        with_fused = _median_graph_us(projections(True), replays)
        with_local = _median_graph_us(projections(False), replays)
        rounds.append((with_fused - with_local) / calls)
    fused_alone = _median_graph_us(norms_alone(True), replays) / calls
    local_alone = _median_graph_us(norms_alone(False), replays) / calls
    for turn in range(2):
        if turn == rank:
            print(f"rank {rank}: all-reduce per call over the local norm, among the GEMVs: "
                  f"{rounds[0]:.2f}, {rounds[1]:.2f} µs; alone: fused {fused_alone:.2f} µs, "
                  f"local norm {local_alone:.2f} µs; {calls} calls a step: "
                  f"{min(rounds) * calls / 1e3:.3f}-{max(rounds) * calls / 1e3:.3f} ms", flush=True)
        dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--replays", type=int, default=50)
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("all_reduce_micro.py needs two GPUs")
    mp.spawn(_rank_main, args=(_free_port(), args.layers, args.replays), nprocs=2)


if __name__ == "__main__":
    main()
