"""CUDA graphs for decode steps: one graph per batch size in compilation_config, sharing one
memory pool; a decode batch is padded up to the next captured size and replayed.

Everything a graph reads lives in static buffers sized for the largest captured batch. Padded
rows have slot -1 (no KV write) and a sequence length of 1 over block 0; their outputs are
ignored.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pagedllm.forward_context import AttentionMetadata, set_forward_context
from pagedllm.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _StaticBuffers:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor


class CUDAGraphRunner:
    def __init__(self, model: nn.Module, capture_sizes: tuple[int, ...], max_blocks_per_req: int, device: torch.device) -> None:
        self.model = model
        self.capture_sizes = sorted(capture_sizes)
        self.device = device
        max_size = self.capture_sizes[-1]
        self.buffers = _StaticBuffers(
            input_ids=torch.zeros(max_size, dtype=torch.int64, device=device),
            positions=torch.zeros(max_size, dtype=torch.int64, device=device),
            slot_mapping=torch.full((max_size,), -1, dtype=torch.int64, device=device),
            query_start_loc=torch.arange(max_size + 1, dtype=torch.int32, device=device),
            seq_lens=torch.ones(max_size, dtype=torch.int32, device=device),
            block_table=torch.zeros((max_size, max_blocks_per_req), dtype=torch.int32, device=device),
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.graph_memory_bytes = 0

    @property
    def max_batch_size(self) -> int:
        return self.capture_sizes[-1]

    def _metadata(self, batch_size: int) -> AttentionMetadata:
        b = self.buffers
        return AttentionMetadata(
            num_actual_tokens=batch_size,
            num_reqs=batch_size,
            max_query_len=1,
            max_seq_len=1,
            query_start_loc=b.query_start_loc[: batch_size + 1],
            seq_lens=b.seq_lens[:batch_size],
            block_table=b.block_table[:batch_size],
            slot_mapping=b.slot_mapping[:batch_size],
            query_start_loc_cpu=list(range(batch_size + 1)),
            seq_lens_cpu=[1] * batch_size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures largest first so the smaller graphs reuse the pool's memory."""
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        sizes = sorted(self.capture_sizes, reverse=True)
        for batch_size in tqdm(sizes, desc="Capturing CUDA graphs", unit="graph"):
            self.graphs[batch_size] = self._capture_one(batch_size, pool)
        torch.cuda.synchronize(self.device)
        self.graph_memory_bytes = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
        logger.info(
            "Captured %d CUDA graphs (decode batch sizes %s) in %.1f s, using %.2f GiB.",
            len(sizes), _describe_sizes(self.capture_sizes), time.perf_counter() - start,
            self.graph_memory_bytes / (1 << 30),
        )

    def _capture_one(self, batch_size: int, pool: tuple[int, int]) -> torch.cuda.CUDAGraph:
        input_ids = self.buffers.input_ids[:batch_size]
        positions = self.buffers.positions[:batch_size]
        # No warm-up forward before the capture: the start-up compile pass (precompile.py) has
        # already compiled and loaded every Triton kernel these steps launch, and a warm-up
        # forward per size was half of the capture time (1.0 s of 2.2 s for Llama-3.1-8B).
        with set_forward_context(self._metadata(batch_size)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch_size] = self.model(input_ids, positions)
        return graph

    def padded_size(self, inputs: StepInputs) -> int | None:
        """The captured size to replay for this step, or None when it must run eagerly."""
        metadata = inputs.attn_metadata
        if metadata.max_query_len != 1 or metadata.num_reqs > self.max_batch_size:
            return None
        return self.capture_sizes[bisect.bisect_left(self.capture_sizes, metadata.num_reqs)]

    def run(self, inputs: StepInputs, batch_size: int) -> torch.Tensor:
        metadata = inputs.attn_metadata
        num_reqs = metadata.num_reqs
        b = self.buffers
        b.input_ids[:num_reqs].copy_(inputs.input_ids, non_blocking=True)
        b.positions[:num_reqs].copy_(inputs.positions, non_blocking=True)
        b.slot_mapping[:num_reqs].copy_(metadata.slot_mapping, non_blocking=True)
        b.slot_mapping[num_reqs:batch_size].fill_(-1)
        b.seq_lens[:num_reqs].copy_(metadata.seq_lens, non_blocking=True)
        b.seq_lens[num_reqs:batch_size].fill_(1)
        width = metadata.block_table.shape[1]
        b.block_table[:num_reqs, :width].copy_(metadata.block_table, non_blocking=True)
        b.block_table[num_reqs:batch_size].zero_()
        self.graphs[batch_size].replay()
        return self.outputs[batch_size][:num_reqs]


def _describe_sizes(sizes: list[int]) -> str:
    if len(sizes) <= 6:
        return str(sizes)
    return f"[{sizes[0]}, {sizes[1]}, {sizes[2]}, ..., {sizes[-1]}]"
