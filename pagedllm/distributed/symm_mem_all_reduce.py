"""All-reduce of small messages through PyTorch symmetric memory: every rank maps every other
rank's buffer (CUDA IPC / driver VMM, no NVLink multicast needed), so a one-shot all-reduce is
one kernel in which each rank reads all peers' copies and sums them. At decode sizes (a few KB
to a few MB) that beats NCCL's ring, whose latency is several launches and hops; it is
captured in CUDA graphs like any kernel.

A message is copied into this rank's symmetric buffer and reduced into a new tensor by one
kernel, `symm_mem::one_shot_all_reduce_copy_out` (or, on a torch without it, a copy and then
`one_shot_all_reduce_out`: two launches, 64 more per decode step of Llama-3.1-8B). Larger
messages (prefill) go to NCCL, whose ring moves less data per rank; the one-shot kernel reads
world_size copies, which at 1 MiB and two ranks is still a few microseconds over NVLink.

The all-reduces that a residual add and RMSNorm follow (each layer's o and down projections)
run instead fused with them, one kernel that exchanges the rows through a second symmetric
buffer (all_reduce_rms_norm.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pagedllm import envs
from pagedllm.layers.ops import num_sms

MAX_BYTES = 1 << 20
MAX_FUSED_ROWS = 64
"""Rows of the fused all-reduce + RMSNorm: one program each, and each spins until the same
row's program on every peer has sent its packets. On two H200s (132 SMs) a 128-row call hung
while 79 rows ran, so the fused path stops at 64 rows and at half the SM count; more rows (a
prefill) take the one-shot all-reduce and the norm kernel."""
# The dtypes PyTorch's one-shot kernel is built for.
_DTYPES = (torch.bfloat16, torch.float32)


class SymmMemAllReduce:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int = MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        if not hasattr(torch.ops, "symm_mem") or not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out"):
            raise RuntimeError("this torch has no symm_mem one-shot all-reduce")
        self.group_name = group.group_name
        self.max_bytes = max_bytes
        symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        self._copy_and_reduce = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.fuses_norms = envs.fuse_all_reduce_rms_norm()
        # The fused kernel's exchange buffer: [2 slots][world_size senders][region], each
        # region max_bytes of payload as 8-byte packets (4 bytes of data, 4 of flag).
        self.region_words = max_bytes // 4
        self.exchange = symm_mem.empty(2 * self.world_size * self.region_words, dtype=torch.int64, device=device)
        # A stale flag must never equal an epoch. The caller's collective after this
        # constructor (init_custom_all_reduce) keeps peers from writing before the zeroing.
        self.exchange.zero_()
        handle = symm_mem.rendezvous(self.exchange, self.group_name)
        self.exchange_ptrs = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
        self.max_fused_rows = min(MAX_FUSED_ROWS, num_sms(device) // 2)
        self.row_epochs = torch.zeros(self.max_fused_rows, dtype=torch.int32, device=device)

    def accepts(self, x: torch.Tensor) -> bool:
        num_bytes = x.numel() * x.element_size()
        # 16-byte multiples: the kernel moves 16-byte vectors per thread.
        return x.is_cuda and x.dtype in _DTYPES and 0 < num_bytes <= self.max_bytes and num_bytes % 16 == 0 and x.is_contiguous()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks (x itself, or a new tensor)."""
        num_bytes = x.numel() * x.element_size()
        staged = self.buffer[:num_bytes].view(x.dtype).view(x.shape)
        if self._copy_and_reduce:
            out = torch.empty_like(x)
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(staged, x, "sum", self.group_name, out)
            return out
        staged.copy_(x)
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, x)
        return x

    def fuses_rms_norm(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """Whether all_reduce_add_rms_norm takes these: decode-sized bf16 rows."""
        return (
            self.fuses_norms and x.is_cuda and x.dtype == torch.bfloat16 and residual.dtype == x.dtype
            and x.dim() == 2 and residual.shape == x.shape and x.is_contiguous() and residual.is_contiguous()
            and x.shape[1] % 2 == 0 and 0 < x.shape[0] <= self.max_fused_rows
            and x.numel() * x.element_size() <= self.max_bytes
        )

    def all_reduce_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: residual += the sum of x over the ranks; x = rms_norm(residual) * weight.
        Returns (x, residual). Only for what fuses_rms_norm accepts."""
        from pagedllm.distributed.all_reduce_rms_norm import all_reduce_add_rms_norm

        return all_reduce_add_rms_norm(
            x, residual, weight, eps, self.exchange_ptrs, self.row_epochs, self.region_words, self.rank
        )
