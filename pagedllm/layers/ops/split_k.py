"""Split-K that adds its own partial sums: the epilogue shared by the GEMV kernels
(ops/gemv.py, quantization/kernels/triton_wNa16.py, int4_dot.py and int4_half2.py), with the
epilogues of ops/epilogue.py as an option.

A small weight read by one program per output tile leaves SMs idle, so K is split over
SPLIT_K programs. Each writes its float32 partial sums to a workspace [SPLIT_K, M, N]; the
last program of a tile to finish (an atomic count per tile, which it resets to zero) adds them
in split order and writes the output. One launch, no memset, and the same sums every run.
Without a count buffer a second launch adds them. The launchers take their workspace and
count arguments from `split_outputs` and finish with `finish_splits`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm.layers.ops import num_sms
from pagedllm.layers.ops.epilogue import EPILOGUE_NONE
from pagedllm.layers.ops.epilogue_kernels import store_tile
from pagedllm.layers.ops.pdl import pdl_launch_options, start_after_previous_kernel

# The narrowest output tile of the kernels that count: a count buffer holds one count per
# MIN_BLOCK_N output columns, for up to MAX_ROW_TILES tiles of rows.
MIN_BLOCK_N = 16
MAX_ROW_TILES = 16


def split_count_buffer(out_features: int, device: torch.device) -> torch.Tensor:
    """The count buffer a layer of `out_features` outputs passes to each of its launches; it
    is left at zero after every launch."""
    return torch.zeros(MAX_ROW_TILES * triton.cdiv(out_features, MIN_BLOCK_N), dtype=torch.int32, device=device)


@triton.jit
def store_or_merge(result, out_ptr, workspace_ptr, count_ptr, offs_m, offs_n, mask_m, mask_n, M, N,
                   stride_om, tile_id, pid_k, SPLIT_K: tl.constexpr, SELF_MERGE: tl.constexpr,
                   EPILOGUE: tl.constexpr = EPILOGUE_NONE, rope_cos=None, rope_sin=None):
    """Store [BLOCK_M, BLOCK_N] float32 sums: into out, or as split pid_k's partials; with
    SELF_MERGE the last split of tile `tile_id` adds every split's partials into out.
    EPILOGUE (rope_cos, rope_sin): ops/epilogue_kernels.py's store_tile, applied to the whole sums
    (split K then needs SELF_MERGE)."""
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        store_tile(result, out_ptr, offs_m, offs_n, mask_m, mask_n, N, stride_om, tile_id, EPILOGUE, rope_cos, rope_sin)
    else:
        partials = workspace_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(partials + pid_k * M * N, result, mask=mask)
        if SELF_MERGE:
            # acq_rel: this split's partials are visible before its count, and the last split
            # sees every other split's partials after it.
            if tl.atomic_add(count_ptr + tile_id, 1, sem="acq_rel") == SPLIT_K - 1:
                tl.atomic_xchg(count_ptr + tile_id, 0)
                total = tl.zeros(result.shape, dtype=tl.float32)
                for split in tl.static_range(SPLIT_K):
                    total += tl.load(partials + split * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                store_tile(total, out_ptr, offs_m, offs_n, mask_m, mask_n, N, stride_om, tile_id, EPILOGUE, rope_cos,
                           rope_sin)


@triton.jit
def k_tile_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, pid_k):
    """[start, end) of the K tiles split pid_k reads (empty for splits past the end)."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    tile_start = pid_k * tiles_per_split
    return tile_start, tl.minimum(tile_start + tiles_per_split, k_tiles)


def split_for(num_tiles: int, k_tiles: int, programs_per_sm: int, device: torch.device) -> int:
    """The split of K that gives about `programs_per_sm` programs per SM (1 when the output
    tiles alone do), every split at least one K tile."""
    target = programs_per_sm * num_sms(device)
    return even_split(k_tiles, triton.cdiv(target, num_tiles))


def even_split(k_tiles: int, split_k: int) -> int:
    """split_k lowered so that every split gets at least one K tile."""
    split_k = max(1, min(split_k, k_tiles))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split_k))


@triton.jit
def _sum_splits_kernel(workspace_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                       USE_PDL: tl.constexpr):
    start_after_previous_kernel(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        total += tl.load(workspace_ptr + split * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class SplitOutputs:
    """Where one launch of `split_k` programs per output tile writes (store_or_merge)."""

    # float32 [split_k, *out.shape] partial sums; `out` itself when K is not split.
    workspace: torch.Tensor
    # The layer's count buffer when the last split adds the partials, else `placeholder`
    # (never read: SELF_MERGE is off).
    counts: torch.Tensor
    self_merge: bool
    # The partials wait for a second launch (`finish_splits`).
    needs_sum: bool


def split_outputs(out: torch.Tensor, split_k: int, num_tiles: int, split_counts: torch.Tensor | None,
                  placeholder: torch.Tensor, sums_shape: tuple[int, ...] | None = None,
                  whole_sums_in_kernel: bool = False) -> SplitOutputs:
    """The workspace and count buffer for a launch writing `out` with `split_k` splits over
    `num_tiles` output tiles; pass the result's fields to the kernel and then to
    `finish_splits`. sums_shape: the sums' shape where it is not out's (a SiLU-and-mul
    launch's out has half the columns). whole_sums_in_kernel: the kernel's epilogue needs the
    whole sums (ops/epilogue.py), so splits must be added by the last split, not by a second
    launch: ValueError without the count buffer that allows it."""
    self_merge = split_k > 1 and split_counts is not None and num_tiles <= split_counts.numel()
    if whole_sums_in_kernel and split_k > 1 and not self_merge:
        raise ValueError(f"a GEMV epilogue with split_k={split_k} needs the layer's split_counts "
                         f"(a count buffer of at least {num_tiles} tiles).")
    sums_shape = tuple(out.shape) if sums_shape is None else sums_shape
    workspace = out if split_k == 1 else torch.empty((split_k, *sums_shape), dtype=torch.float32, device=out.device)
    return SplitOutputs(workspace, split_counts if self_merge else placeholder, self_merge,
                        needs_sum=split_k > 1 and not self_merge)


def finish_splits(outputs: SplitOutputs, out: torch.Tensor) -> None:
    """Add the partial sums into `out` when no split of the launch did (a second launch)."""
    if outputs.needs_sum:
        sum_splits(outputs.workspace, out)


def sum_splits(workspace: torch.Tensor, out: torch.Tensor) -> None:
    """out [M, N] (contiguous) = the sum of workspace [SPLIT_K, M, N] over splits, in order."""
    block = 1024
    _sum_splits_kernel[(triton.cdiv(out.numel(), block),)](
        workspace, out, out.numel(), SPLIT_K=workspace.shape[0], BLOCK=block, **pdl_launch_options(out.device))
