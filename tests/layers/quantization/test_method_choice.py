"""Which quantization method an engine uses (layers/quantization/__init__.py): the checkpoint's
own, `quantization=` checked against it, vLLM's Marlin kernel names as their checkpoint
formats, and errors that name the choices."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pagedllm.layers.quantization import resolve_quantization


def _hf_config(quant_method: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(quantization_config=None if quant_method is None else {"quant_method": quant_method})


def test_the_checkpoint_decides_and_a_matching_option_agrees() -> None:
    assert resolve_quantization(None, _hf_config("gptq")) == "gptq"
    assert resolve_quantization("GPTQ", _hf_config("gptq")) == "gptq"
    assert resolve_quantization("compressed_tensors", _hf_config("compressed-tensors")) == "compressed-tensors"
    assert resolve_quantization(None, _hf_config()) is None
    assert resolve_quantization("fp8", _hf_config()) == "fp8"


@pytest.mark.parametrize(("name", "method", "other"), [("gptq_marlin", "gptq", "awq"), ("awq_marlin", "awq", "gptq")])
def test_vllm_marlin_names_run_their_checkpoint_format(name: str, method: str, other: str) -> None:
    assert resolve_quantization(name, _hf_config(method)) == method
    with pytest.raises(ValueError, match=f"quantization='{name}' contradicts the checkpoint.*'{other}'"):
        resolve_quantization(name, _hf_config(other))


def test_an_unknown_method_lists_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="'fp8', 'compressed-tensors', 'gptq', 'awq'"):
        resolve_quantization("bitsandbytes", _hf_config())
