"""GPTQ checkpoints written in the on-disk layout (tests' own packer), run by `LLM` with the
method detected from config.json, against transformers holding the dequantized weights in
float32: prompt logprobs within 1e-4, greedy tokens equal."""

from __future__ import annotations

import json

import pytest
from int_group_checkpoints import assert_engine_matches_reference, write_quantized_checkpoint
from tiny_models import make_tiny_checkpoint

from pagedllm import LLM


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gptq") / "src", "llama", seed=1)


@pytest.mark.parametrize(
    "variant",
    [
        dict(bits=4, sym=True),
        dict(bits=4, sym=False),
        dict(bits=8, sym=False, group_size=-1),
        dict(bits=4, sym=False, desc_act=True),
    ],
    ids=["4bit-sym", "4bit-asym", "8bit-asym-per-channel", "4bit-desc-act-g-idx"],
)
def test_gptq_checkpoint_matches_dequantized_transformers(source, tmp_path, variant):
    reference = write_quantized_checkpoint(source, tmp_path / "gptq", "gptq", **variant)
    assert_engine_matches_reference(tmp_path / "gptq", reference)


def test_modules_to_not_convert_leaves_layers_in_full_precision(source, tmp_path):
    """A checkpoint that keeps the MLP unquantized: the loader expects plain weights there."""
    reference = write_quantized_checkpoint(source, tmp_path / "gptq", "gptq", bits=4)
    config = _keep_mlp_unquantized(tmp_path / "gptq", reference)
    config["quantization_config"]["modules_to_not_convert"] = ["mlp"]
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    assert_engine_matches_reference(tmp_path / "gptq", reference)


def _keep_mlp_unquantized(folder, reference) -> dict:
    """The checkpoint's MLP as plain weights; returns its config.json, to be edited."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    for key in [k for k in state if ".mlp." in k]:
        del state[key]
    for name, tensor in reference.state_dict().items():
        if ".mlp." in name:
            state[name] = tensor.contiguous()
    save_file(state, str(folder / "model.safetensors"))
    return json.loads((folder / "config.json").read_text())


def test_modules_in_block_to_quantize_leaves_the_others_in_full_precision(source, tmp_path):
    """GPTQModel's and AutoRound's list of the block's quantized layers (here attention only)."""
    folder = tmp_path / "gptq"
    reference = write_quantized_checkpoint(source, folder, "gptq", bits=4)
    config = _keep_mlp_unquantized(folder, reference)
    config["quantization_config"]["modules_in_block_to_quantize"] = [
        ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"]]
    (folder / "config.json").write_text(json.dumps(config))
    assert_engine_matches_reference(folder, reference)
    # A fused layer listed in part cannot be loaded as one matrix.
    config["quantization_config"]["modules_in_block_to_quantize"] = [["self_attn.q_proj"], ["self_attn.o_proj"]]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="only some parts of the fused layer"):
        LLM(str(folder), skip_tokenizer_init=True, dtype="float32")


@pytest.mark.parametrize("file_name, method", [("quantize_config.json", "gptq"), ("quant_config.json", "awq")])
def test_a_quantization_config_beside_config_json_is_read(source, tmp_path, file_name, method):
    """Older AutoGPTQ and AutoAWQ checkpoints keep their config in a file of its own."""
    folder = tmp_path / method
    reference = write_quantized_checkpoint(source, folder, method, bits=4)
    config = json.loads((folder / "config.json").read_text())
    quantization = config.pop("quantization_config")
    quantization.pop("quant_method")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / file_name).write_text(json.dumps(quantization))
    assert_engine_matches_reference(folder, reference)


def test_quantization_option_contradicting_checkpoint_is_a_value_error(source, tmp_path):
    write_quantized_checkpoint(source, tmp_path / "gptq", "gptq", bits=4)
    with pytest.raises(ValueError, match="gptq"):
        LLM(str(tmp_path / "gptq"), skip_tokenizer_init=True, dtype="float32", quantization="awq")


def test_unsupported_bits_is_a_value_error_naming_the_supported_ones():
    from pagedllm.layers.quantization.gptq import GPTQConfig

    with pytest.raises(ValueError, match=r"bits=3.*\(4, 8\)"):
        GPTQConfig.from_config({"quant_method": "gptq", "bits": 3, "group_size": 128, "desc_act": False})
