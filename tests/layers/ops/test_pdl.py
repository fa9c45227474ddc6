"""When the decode-step kernels are launched with programmatic dependent launch (ops/pdl.py):
only on CUDA devices that have it, never under the interpreter, and PAGEDLLM_PDL=0 turns it
off. The kernels' own behaviour with it on is a GPU test (tests/gpu/test_step_loop_gpu.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from pagedllm.layers.ops import pdl  # noqa: E402

ON = {"USE_PDL": True, "launch_pdl": True}
OFF = {"USE_PDL": False}


@pytest.fixture
def hopper(monkeypatch):
    """A compiled (not interpreted) run on a device of compute capability 9.0."""
    monkeypatch.setattr(pdl, "INTERPRETED", False)
    monkeypatch.setattr(pdl, "gdc_wait", lambda: None)
    monkeypatch.setattr(pdl, "_device_supports_pdl", lambda device_index: True)
    monkeypatch.delenv("PAGEDLLM_PDL", raising=False)
    monkeypatch.delenv("VLLM_PDL", raising=False)


def test_cuda_devices_that_have_it_launch_with_pdl(hopper) -> None:
    assert pdl.pdl_launch_options(torch.device("cuda", 0)) == ON
    assert pdl.pdl_launch_options(torch.device("cpu")) == OFF


@pytest.mark.parametrize("value", ["0", "false"])
def test_the_environment_turns_it_off(hopper, monkeypatch, value) -> None:
    monkeypatch.setenv("PAGEDLLM_PDL", value)
    assert pdl.pdl_launch_options(torch.device("cuda", 0)) == OFF


def test_older_gpus_interpreter_and_old_tritons_launch_plainly(hopper, monkeypatch) -> None:
    monkeypatch.setattr(pdl, "_device_supports_pdl", lambda device_index: False)
    assert pdl.pdl_launch_options(torch.device("cuda", 0)) == OFF
    monkeypatch.setattr(pdl, "_device_supports_pdl", lambda device_index: True)
    monkeypatch.setattr(pdl, "INTERPRETED", True)
    assert pdl.pdl_launch_options(torch.device("cuda", 0)) == OFF
    monkeypatch.setattr(pdl, "INTERPRETED", False)
    monkeypatch.setattr(pdl, "gdc_wait", None)
    assert pdl.pdl_launch_options(torch.device("cuda", 0)) == OFF
