"""When the decode-step kernels are launched with programmatic dependent launch (ops/pdl.py):
only on CUDA devices of compute capability 9.0 or later, never under the interpreter or with a
Triton that lacks it, and PAGEDLLM_PDL=0 turns it off. The kernels' own behaviour with it on
is a GPU test (tests/gpu/test_step_loop_gpu.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from pagedllm.layers.ops import pdl  # noqa: E402

ON = {"USE_PDL": True, "launch_pdl": True}
OFF = {"USE_PDL": False}
CUDA = torch.device("cuda", 0)


@pytest.fixture
def hopper(monkeypatch):
    """A compiled (not interpreted) run on a CUDA device of compute capability 9.0."""
    monkeypatch.setattr(pdl, "INTERPRETED", False)
    monkeypatch.setattr(pdl, "gdc_wait", lambda: None)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("PAGEDLLM_PDL", raising=False)
    monkeypatch.delenv("VLLM_PDL", raising=False)
    pdl._cuda_launch_options.cache_clear()
    yield
    pdl._cuda_launch_options.cache_clear()


def test_cuda_devices_that_have_it_launch_with_pdl(hopper) -> None:
    assert pdl.pdl_launch_options(CUDA) == ON
    assert pdl.pdl_launch_options(torch.device("cpu")) == OFF


@pytest.mark.parametrize("name", ["PAGEDLLM_PDL", "VLLM_PDL"])
def test_the_environment_turns_it_off_for_the_process(hopper, monkeypatch, name) -> None:
    monkeypatch.setenv(name, "0")
    assert pdl.pdl_launch_options(CUDA) == OFF
    # Read once per process and device: later launches do not read the environment again.
    monkeypatch.setenv(name, "1")
    assert pdl.pdl_launch_options(CUDA) == OFF
    pdl._cuda_launch_options.cache_clear()
    assert pdl.pdl_launch_options(CUDA) == ON


def test_older_gpus_interpreter_and_old_tritons_launch_plainly(hopper, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert pdl.pdl_launch_options(CUDA) == OFF
    pdl._cuda_launch_options.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(pdl, "INTERPRETED", True)
    assert pdl.pdl_launch_options(CUDA) == OFF
    monkeypatch.setattr(pdl, "INTERPRETED", False)
    monkeypatch.setattr(pdl, "gdc_wait", None)
    assert pdl.pdl_launch_options(CUDA) == OFF
