"""fp8 end to end on a tiny llama: dynamic fp8 (quantized while loading) and quant_method "fp8"
checkpoints (per tensor, dynamic or static activations; block-wise), against transformers running
the same model with the dequantized weights and fake-quantized activations in float32.

Tolerance: 2e-3 on every returned logprob. The engine and the reference round the same values,
so they differ only by float32 summation order, except where an activation lands on an fp8
rounding boundary; a wrong scale layout or a missed rounding moves logprobs by > 1e-2 (the
unquantized model itself is > 1e-2 away, checked below)."""

from __future__ import annotations

import pytest
import torch
from quant_reference import (
    FP8_MAX,
    PROMPT,
    engine_greedy,
    engine_prompt_logprobs,
    fp8_per_token,
    fp8_per_token_group,
    fp8_static,
    is_quantized_linear,
    max_logprob_error,
    pack_fp8,
    reference_greedy,
    reference_logprobs,
    reference_model,
    unpack_fp8,
)
from safetensors.torch import load_file

from pagedllm import LLM

TOLERANCE = 2e-3
GREEDY_TOKENS = 8


def make_llm(path, **kwargs) -> LLM:
    return LLM(str(path), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 24, **kwargs)


def check_against_reference(llm: LLM, model: torch.nn.Module, unquantized_path) -> None:
    engine = engine_prompt_logprobs(llm)
    reference = reference_logprobs(model)
    assert max_logprob_error(engine, reference) < TOLERANCE
    plain = reference_logprobs(reference_model(unquantized_path, {}, None))
    assert max_logprob_error(engine, plain) > 5 * TOLERANCE, "quantization changed nothing measurable"
    assert engine_greedy(llm, PROMPT[:10], GREEDY_TOKENS) == reference_greedy(model, PROMPT[:10], GREEDY_TOKENS)


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    return tiny_checkpoints["llama"]


def test_fp8_packer_round_trips(llama, tmp_path) -> None:
    for kwargs in ({}, {"block": (16, 32)}):
        path = pack_fp8(llama, tmp_path / str(len(kwargs)), **kwargs)
        config = {"weight_block_size": [16, 32]} if kwargs else {}
        packed = load_file(path / "model.safetensors")
        unpacked = unpack_fp8(packed, config)
        original = load_file(llama / "model.safetensors")
        assert unpacked.keys() == original.keys()
        for name, tensor in original.items():
            # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the block's largest value.
            bound = tensor.abs().max() * 2**-4 if is_quantized_linear(name) else 0
            assert (unpacked[name] - tensor).abs().max() <= bound
        repacked = pack_fp8(llama, tmp_path / "again", **kwargs)
        again = load_file(repacked / "model.safetensors")
        assert all(torch.equal(again[k].float(), packed[k].float()) for k in packed)


def test_dynamic_fp8_matches_per_channel_reference(llama) -> None:
    llm = make_llm(llama, quantization="fp8")
    weights = {}
    for name, tensor in load_file(llama / "model.safetensors").items():
        if is_quantized_linear(name):
            scale = tensor.abs().amax(1, keepdim=True) / FP8_MAX
            tensor = (tensor / scale).to(torch.float8_e4m3fn).float() * scale
        weights[name] = tensor
    check_against_reference(llm, reference_model(llama, weights, fp8_per_token), llama)
    qkv = llm.llm_engine.engine_core.executor.worker.model_runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == (128, 1)


def test_the_load_log_states_the_weight_bytes(llama, caplog) -> None:
    """The log line gives the exact bytes, so even a tiny model shows fp8's saving: each linear
    weight drops from 4 bytes a value (float32) to 1 plus its per-channel scales."""
    import re

    logged = {}
    for quantization in (None, "fp8"):
        caplog.clear()
        with caplog.at_level("INFO", logger="pagedllm.model_loader.loaders"):
            make_llm(llama, quantization=quantization)
        [line] = [r.getMessage() for r in caplog.records if "of weights" in r.getMessage()]
        logged[quantization] = int(re.search(r"of weights \(([\d,]+) bytes\)", line).group(1).replace(",", ""))
        assert ("quantization fp8" in line) == (quantization == "fp8")
    linear = sum(t.numel() for n, t in load_file(llama / "model.safetensors").items() if is_quantized_linear(n))
    assert logged[None] - logged["fp8"] == pytest.approx(3 * linear, rel=0.02)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_fp8_per_tensor_checkpoint_matches_reference(llama, tmp_path, static) -> None:
    path = pack_fp8(llama, tmp_path / "fp8", static=static)
    packed = load_file(path / "model.safetensors")
    weights = unpack_fp8(packed, {})
    if static:
        scales = {k.removesuffix(".input_scale"): v for k, v in packed.items() if k.endswith(".input_scale")}
        activation_quant = fp8_static(scales)
    else:
        activation_quant = fp8_per_token
    check_against_reference(make_llm(path), reference_model(llama, weights, activation_quant), llama)


def test_fp8_block_checkpoint_matches_reference(llama, tmp_path) -> None:
    block = (16, 32)  # not square, so transposed block scales would be caught
    path = pack_fp8(llama, tmp_path / "fp8-block", block=block)
    weights = unpack_fp8(load_file(path / "model.safetensors"), {"weight_block_size": list(block)})
    model = reference_model(llama, weights, fp8_per_token_group(block[1]))
    check_against_reference(make_llm(path), model, llama)


def test_quantization_option_contradicting_fp8_checkpoint_names_both(llama, tmp_path) -> None:
    path = pack_fp8(llama, tmp_path / "fp8")
    with pytest.raises(ValueError, match="'compressed-tensors'.*'fp8'"):
        make_llm(path, quantization="compressed-tensors")
