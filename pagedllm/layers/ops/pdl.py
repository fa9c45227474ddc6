"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of a decode step.

A batch-1 decode step is a chain of ~230 short kernels. Launched plainly, each one's programs
are scheduled only once the kernel before has drained, so every link pays the launch and the
ramp-up with the GPU idle. A kernel launched with PDL is scheduled as soon as every program of
the kernel before it has called `griddepcontrol.launch_dependents`, and its programs then
block in `griddepcontrol.wait` until that kernel has finished and its writes are visible.

Every kernel here waits first (`wait_for_previous_kernel`) and touches no memory before, so it
sees every earlier kernel's writes as under plain stream order (the wait is transitive: the
kernel before waited for its own predecessor). Where it lets the next kernel in decides how far
ahead the GPU schedules:
- the GEMVs and decode attention call `allow_next_kernel` after their main loop, so the next
  kernel's programs are placed while their last programs finish, on SMs that are then free;
- the small kernels (norms, argmax, rope, quantizers, merges) right after their wait
  (`start_after_previous_kernel`), so the next kernel is placed while they run.
Measured on an H200 against plain launches in the same run (BENCHMARKS.md, the fourteenth
run): batch-1 decode gains 6% with fp8 weights and 3% with bf16, int4 is unchanged. Letting every
kernel in at its start instead (so a waiting kernel let the one after it in, and kernels two
and three links ahead were placed while a GEMV ran) cost int4 25% and bf16 3%.

A kernel takes `USE_PDL` as a constexpr; `pdl_launch_options(device)` gives it with the
matching launch option, so a kernel waits exactly when it was launched that way.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from pagedllm import envs
from pagedllm.layers.ops import INTERPRETED

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control
    gdc_launch_dependents = gdc_wait = None


_PLAIN: Mapping[str, bool] = MappingProxyType({"USE_PDL": False})
_PDL: Mapping[str, bool] = MappingProxyType({"USE_PDL": True, "launch_pdl": True})


def pdl_launch_options(device: torch.device) -> Mapping[str, bool]:
    """Keyword arguments for a launch on `device` of a kernel with a USE_PDL constexpr: PDL on
    CUDA GPUs of compute capability 9.0 or later with a Triton that has grid dependency
    control, unless PAGEDLLM_PDL=0. (Older Tritons do not know the launch_pdl option.)"""
    if device.type != "cuda" or INTERPRETED:
        return _PLAIN
    return _cuda_launch_options(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_launch_options(device_index: int) -> Mapping[str, bool]:
    """Decided at a process's first launch on the device: reading PAGEDLLM_PDL took 3 µs, a
    cost every eager launch would pay (about 300 per step)."""
    if gdc_wait is None or not envs.programmatic_dependent_launch():
        return _PLAIN
    if torch.version.cuda is None or torch.cuda.get_device_capability(device_index) < (9, 0):
        return _PLAIN
    return _PDL


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """First in a kernel: block until the kernel before this one has finished and its writes
    are visible."""
    if USE_PDL:
        gdc_wait()


@triton.jit
def allow_next_kernel(USE_PDL: tl.constexpr):
    """Let the next kernel on the stream be scheduled once every program of this one has
    called this (or exited)."""
    if USE_PDL:
        gdc_launch_dependents()


@triton.jit
def start_after_previous_kernel(USE_PDL: tl.constexpr):
    """First in a small kernel: wait for the kernel before, then let the next one be scheduled."""
    wait_for_previous_kernel(USE_PDL)
    allow_next_kernel(USE_PDL)
