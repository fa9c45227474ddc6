"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of a decode step.

A decode step is a chain of ~330 short kernels, and each pays its launch and its ramp-up while
the GPU drains the kernel before it. A kernel launched with PDL is scheduled as soon as every
program of the kernel before it has started (they call `gdc_launch_dependents` first), and
waits in `gdc_wait` until that kernel has finished and its writes are visible. Everything a
kernel does before its wait must not depend on, nor write, memory the kernel before it
touches: the GEMVs only load their own weights there, which no kernel writes.

`USE_PDL` is a constexpr of each such kernel; `pdl_kwargs(device)` gives it with the matching
launch option, so a kernel waits exactly when it was launched early.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagedllm import envs
from pagedllm.layers.ops.fp8_rows import INTERPRETED

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def _device_supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL (CUDA, Hopper or later, a Triton with
    grid dependency control, and PAGEDLLM_PDL not 0)."""
    if device.type != "cuda" or INTERPRETED or gdc_wait is None or not envs.programmatic_dependent_launch():
        return False
    return _device_supports_pdl(device.index if device.index is not None else torch.cuda.current_device())


def pdl_kwargs(device: torch.device) -> dict[str, bool]:
    """Keyword arguments of a launch on `device` of a kernel with a USE_PDL constexpr: the
    constexpr, and launch_pdl where it is on (older Tritons do not know the option)."""
    use_pdl = pdl_enabled(device)
    return {"USE_PDL": True, "launch_pdl": True} if use_pdl else {"USE_PDL": False}


@triton.jit
def allow_next_kernel(USE_PDL: tl.constexpr):
    """Let the next kernel on the stream be scheduled now (it waits for this one's results)."""
    if USE_PDL:
        gdc_launch_dependents()


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """Block until the kernel before this one has finished and its writes are visible."""
    if USE_PDL:
        gdc_wait()
