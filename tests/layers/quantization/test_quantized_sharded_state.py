"""save-sharded of a quantized model writes its 8-bit weights and scales, and
load_format="sharded_state" gives the same prompt logprobs, bit for bit (vLLM #41174 lost the
quantization on this path), fp8 KV cache scales included."""

from __future__ import annotations

import glob

import pytest
import torch
from quant_reference import engine_prompt_logprobs, pack_fp8
from safetensors.torch import load_file, save_file

from pagedllm import LLM
from pagedllm.entrypoints.save_sharded import save_sharded_checkpoint

COMMON = dict(skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 24)


@pytest.mark.parametrize("kind", ["dynamic-fp8", "fp8-checkpoint"])
def test_sharded_state_keeps_quantized_weights_and_scales(tiny_checkpoints, tmp_path, kind) -> None:
    source = tiny_checkpoints["llama"]
    options = {"quantization": "fp8"} if kind == "dynamic-fp8" else {}
    if kind == "fp8-checkpoint":
        source = pack_fp8(source, tmp_path / "fp8", static=True)
        # With an fp8 KV cache and its checkpoint scales, which the sharded state must keep.
        tensors = load_file(source / "model.safetensors")
        tensors.update({f"model.layers.{i}.self_attn.kv_scale": torch.tensor(0.03) for i in range(2)})
        save_file(tensors, source / "model.safetensors")
        options = {"kv_cache_dtype": "fp8"}
    expected = engine_prompt_logprobs(LLM(str(source), **COMMON, **options))
    output = tmp_path / "sharded"
    save_sharded_checkpoint(str(source), str(output), 1, dtype="float32", **options)
    saved = {}
    for path in glob.glob(str(output / "model-rank-0-part-*.safetensors")):
        saved.update(load_file(path))
    prefix = "model.layers.0.self_attn.qkv_proj."
    assert saved[prefix + "weight"].dtype == torch.float8_e4m3fn
    assert saved[prefix + "weight_scale"].shape == (128, 1)
    if kind == "fp8-checkpoint":
        assert saved[prefix + "input_scale"].shape == (1,)
        assert saved["model.layers.1.self_attn.attn.v_scale"].item() == pytest.approx(0.03)
    loaded = LLM(str(output), load_format="sharded_state", **COMMON, **options)
    assert engine_prompt_logprobs(loaded) == expected


def test_the_save_sharded_command_takes_the_quantization_option(tiny_checkpoints, tmp_path, capsys) -> None:
    """`pagedllm save-sharded --quantization fp8` (every engine option, as vLLM's
    save_sharded_state takes them) saves the fp8 weights, and prints a load line that keeps
    the option."""
    from pagedllm.entrypoints.cli import main

    source = tiny_checkpoints["llama"]
    output = tmp_path / "sharded"
    assert main(["save-sharded", "--model", str(source), "--quantization", "fp8", "--dtype", "float32",
                 "--output", str(output), "--distributed-executor-backend", "uni"]) == 0
    assert "quantization='fp8'" in capsys.readouterr().out
    saved = {}
    for path in glob.glob(str(output / "model-rank-0-part-*.safetensors")):
        saved.update(load_file(path))
    assert saved["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.float8_e4m3fn
    expected = engine_prompt_logprobs(LLM(str(source), quantization="fp8", **COMMON))
    loaded = LLM(str(output), load_format="sharded_state", quantization="fp8", **COMMON)
    assert engine_prompt_logprobs(loaded) == expected
    # Its sharded_state.json records the method, so loading without it names the fix.
    with pytest.raises(ValueError, match="quantized with quantization='fp8'.*loaded with quantization=None.*pass quantization='fp8'"):
        LLM(str(output), load_format="sharded_state", **COMMON)
