"""Weight files, iterators and `get_model`: checkpoints of tiny random Llamas (transformers
save_pretrained / torch.save) read back must equal the transformers state_dict exactly."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM, PretrainedConfig

from pagedllm.config import LoadConfig, ModelConfig
from pagedllm.model_loader.loaders import get_model, model_weight_bytes, set_default_dtype
from pagedllm.model_loader.weight_utils import (
    find_weight_files,
    initialize_dummy_weights,
    pt_weights_iterator,
    safetensors_slices_iterator,
    safetensors_weights_iterator,
)


def _assert_same_state(weights: Iterable[tuple[str, torch.Tensor]], reference: dict[str, torch.Tensor]) -> None:
    loaded = dict(weights)
    assert sorted(loaded) == sorted(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def sharded_dir(llama: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sharded safetensors with an index, plus a consolidated copy the index does not name."""
    folder = tmp_path_factory.mktemp("sharded")
    llama.save_pretrained(folder, max_shard_size="50KB")
    save_file({"tok_embeddings.weight": torch.zeros(2, 2)}, str(folder / "consolidated.safetensors"))
    return folder


# --- find_weight_files ----------------------------------------------------------------------


def test_index_json_decides_the_shards_and_skips_consolidated(sharded_dir: Path) -> None:
    files, weight_format = find_weight_files(str(sharded_dir), "auto")
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    assert weight_format == "safetensors"
    assert [Path(f).name for f in files] == sorted(set(index["weight_map"].values()))
    assert len(files) > 1


def test_sharded_safetensors_iterate_to_the_hf_state_dict(llama: LlamaForCausalLM, sharded_dir: Path) -> None:
    files, _ = find_weight_files(str(sharded_dir), "safetensors")
    _assert_same_state(safetensors_weights_iterator(files), llama.state_dict())


def test_slices_read_only_the_requested_rows(llama: LlamaForCausalLM, sharded_dir: Path) -> None:
    files, _ = find_weight_files(str(sharded_dir), "safetensors")
    reference = llama.state_dict()
    for name, tensor_slice in safetensors_slices_iterator(files):
        assert list(tensor_slice.get_shape()) == list(reference[name].shape)
        torch.testing.assert_close(tensor_slice[0:2], reference[name][0:2], rtol=0, atol=0)


def test_index_naming_a_missing_shard_is_a_clear_error(llama: LlamaForCausalLM, tmp_path: Path) -> None:
    llama.save_pretrained(tmp_path, max_shard_size="50KB")
    (tmp_path / "model-00002-of-00010.safetensors").unlink()
    with pytest.raises(ValueError, match="names 1 shard.*model-00002-of-00010.safetensors.*incomplete"):
        find_weight_files(str(tmp_path), "auto")


def test_auto_prefers_safetensors_and_pt_reads_bin(llama: LlamaForCausalLM, tmp_path: Path, save_pt: Callable[..., None]) -> None:
    llama.save_pretrained(tmp_path)
    torch.save({}, tmp_path / "training_args.bin")  # trainer leftovers are never weights
    save_pt(llama, tmp_path)
    assert find_weight_files(str(tmp_path), "auto") == ([str(tmp_path / "model.safetensors")], "safetensors")
    assert find_weight_files(str(tmp_path), "pt") == ([str(tmp_path / "pytorch_model.bin")], "pt")


def test_folder_without_requested_weights_lists_its_files_and_suggests_a_format(llama: LlamaForCausalLM, tmp_path: Path) -> None:
    llama.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"load_format='pt'.*config.json.*model.safetensors.*Use load_format='safetensors'"):
        find_weight_files(str(tmp_path), "pt")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="load_format='auto'.*holds: config.json, generation_config.json.*'dummy'"):
        find_weight_files(str(tmp_path), "auto")


# --- .bin files ----------------------------------------------------------------------------


def test_sharded_bin_loads_with_weights_only(llama: LlamaForCausalLM, tmp_path: Path, save_pt: Callable[..., None]) -> None:
    save_pt(llama, tmp_path, num_shards=3)
    files, weight_format = find_weight_files(str(tmp_path), "auto")
    assert weight_format == "pt" and len(files) == 3
    _assert_same_state(pt_weights_iterator(files), llama.state_dict())


def test_old_non_zip_bin_loads_without_mmap(tmp_path: Path) -> None:
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(weights, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _assert_same_state(pt_weights_iterator([str(tmp_path / "pytorch_model.bin")]), weights)


class _RunsCode:
    """Unpickling this would call touch(marker): a pickle that executes code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


def test_bin_with_pickled_code_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match="Refusing to load .*pytorch_model.bin.*pickled Python objects"):
        list(pt_weights_iterator([str(path)]))
    assert not marker.exists()


# --- dummy weights -------------------------------------------------------------------------


class _WithIntsAndBuffers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)
        self.packed = torch.nn.Parameter(torch.full((4,), 7, dtype=torch.int32), requires_grad=False)
        self.bf16 = torch.nn.Parameter(torch.zeros(16, dtype=torch.bfloat16))
        self.register_buffer("cache", torch.full((3,), 5.0))


def test_dummy_weights_are_deterministic_and_in_range() -> None:
    first, second, other_seed = _WithIntsAndBuffers(), _WithIntsAndBuffers(), _WithIntsAndBuffers()
    initialize_dummy_weights(first)
    initialize_dummy_weights(second)
    initialize_dummy_weights(other_seed, seed=1)
    for (name, a), b, c in zip(first.named_parameters(), second.parameters(), other_seed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        if a.is_floating_point():
            assert a.min() >= -1e-3 and a.max() <= 1e-3 and a.abs().max() > 0, name
            assert not torch.equal(a, c), name
    assert torch.equal(first.packed, torch.zeros(4, dtype=torch.int32))
    assert torch.equal(first.cache, torch.full((3,), 5.0))  # buffers are computed, not loaded


# --- get_model -----------------------------------------------------------------------------


class _StrictLlama(LlamaForCausalLM):
    """transformers' Llama with the pagedllm model contract: built from (hf_config,
    quant_config), load_weights raises on unexpected names and returns what it filled."""

    def __init__(self, hf_config: PretrainedConfig, quant_config: Any = None) -> None:
        super().__init__(hf_config)
        self.processed = 0

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                raise ValueError(f"Unexpected checkpoint tensor {name!r}")
            with torch.no_grad():
                params[name].copy_(tensor)
            loaded.add(name)
        return loaded


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = types.ModuleType("pagedllm.models.registry")
    registry.get_model_class = lambda arch: _StrictLlama  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pagedllm.models.registry", registry)


def _model_config(path: Path, hf_config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> ModelConfig:
    return ModelConfig(
        model=str(path), model_path=str(path), gguf_file=None, tokenizer=str(path), tokenizer_mode="auto",
        trust_remote_code=False, revision=None, tokenizer_revision=None, skip_tokenizer_init=True,
        dtype=dtype, seed=0, max_model_len=128, max_logprobs=20, quantization=None, hf_config=hf_config,
    )


@pytest.mark.parametrize("load_format", ["auto", "safetensors"])
def test_get_model_loads_sharded_safetensors_exactly(
    fake_registry: None, llama: LlamaForCausalLM, sharded_dir: Path, load_format: str
) -> None:
    model = get_model(_model_config(sharded_dir, llama.config), LoadConfig(load_format=load_format), torch.device("cpu"))
    assert not model.training
    _assert_same_state(model.state_dict().items(), llama.state_dict())


def test_get_model_loads_bin_in_the_model_dtype_and_restores_the_default(
    fake_registry: None, llama: LlamaForCausalLM, tmp_path: Path, save_pt: Callable[..., None]
) -> None:
    save_pt(llama, tmp_path, num_shards=2)
    model = get_model(_model_config(tmp_path, llama.config, torch.bfloat16), LoadConfig(load_format="pt"), "cpu")
    assert torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = {name: t.to(torch.bfloat16) for name, t in llama.state_dict().items()}
    _assert_same_state(model.state_dict().items(), reference)


def test_default_dtype_is_restored_after_an_error() -> None:
    with pytest.raises(RuntimeError), set_default_dtype(torch.float16):
        assert torch.get_default_dtype() == torch.float16
        raise RuntimeError
    assert torch.get_default_dtype() == torch.float32


def test_get_model_dummy_needs_no_files_and_is_deterministic(fake_registry: None, llama: LlamaForCausalLM, tmp_path: Path) -> None:
    config = _model_config(tmp_path, llama.config)
    first = get_model(config, LoadConfig(load_format="dummy"), "cpu")
    second = get_model(config, LoadConfig(load_format="dummy"), "cpu")
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        assert a.abs().max() <= 1e-3


def test_missing_tensor_names_the_parameter_and_the_folder(fake_registry: None, llama: LlamaForCausalLM, tmp_path: Path) -> None:
    llama.config.save_pretrained(tmp_path)
    state = {k: v for k, v in llama.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{tmp_path} lacks 1 parameter.*model.layers.1.mlp.up_proj.weight"):
        get_model(_model_config(tmp_path, llama.config), LoadConfig(), "cpu")


def test_unexpected_tensor_names_it(fake_registry: None, llama: LlamaForCausalLM, tmp_path: Path) -> None:
    state = {**llama.state_dict(), "model.layers.0.extra.weight": torch.zeros(2)}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.0.extra.weight"):
        get_model(_model_config(tmp_path, llama.config), LoadConfig(), "cpu")


def test_sharded_state_without_rank_files_says_how_to_write_them(fake_registry: None, llama: LlamaForCausalLM, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no model-rank-.*pagedllm save-sharded"):
        get_model(_model_config(tmp_path, llama.config), LoadConfig(load_format="sharded_state"), "cpu")


def test_quant_methods_post_process_after_loading(fake_registry: None, llama: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[torch.nn.Module] = []

    class Method:
        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            assert layer.weight.abs().max() <= 1e-3  # called after the weights are in
            seen.append(layer)

    original_init = _StrictLlama.__init__

    def init_with_quant(self: _StrictLlama, hf_config: PretrainedConfig, quant_config: Any = None) -> None:
        original_init(self, hf_config, quant_config)
        self.model.layers[0].mlp.down_proj.quant_method = Method()

    monkeypatch.setattr(_StrictLlama, "__init__", init_with_quant)
    model = get_model(_model_config(tmp_path, llama.config), LoadConfig(load_format="dummy"), "cpu")
    assert seen == [model.model.layers[0].mlp.down_proj]


def test_model_weight_bytes_counts_tied_parameters_once() -> None:
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = torch.nn.ModuleDict({"embed": embedding, "head": head, "norm": torch.nn.LayerNorm(4, dtype=torch.bfloat16)})
    assert model_weight_bytes(model) == 10 * 4 * 4 + 2 * 4 * 2


# --- end to end with pagedllm's own models ---------------------------------------------------

E2E_ATOL = 1e-4  # fp32 logits; the same math in a different order


def _randomized(architecture: str, **overrides: Any) -> torch.nn.Module:
    import transformers

    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_class(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
        architectures=[architecture], **overrides,
    )
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        # Norms and biases random too (their init is 1 and 0), so a misplaced one shows.
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def _prefill_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of one request's prompt, run with no KV cache (as the profiling run does)."""
    from pagedllm.forward_context import AttentionMetadata, set_forward_context

    n = len(tokens)
    metadata = AttentionMetadata(
        num_actual_tokens=n, num_reqs=1, max_query_len=n, max_seq_len=n,
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_table=torch.zeros(1, 1, dtype=torch.int32),
        slot_mapping=torch.full((n,), -1, dtype=torch.int64),
        query_start_loc_cpu=[0, n], seq_lens_cpu=[n],
    )
    with torch.no_grad(), set_forward_context(metadata):
        return model.compute_logits(model(tokens, torch.arange(n)))


@pytest.mark.parametrize(
    ("architecture", "overrides", "checkpoint"),
    [
        ("LlamaForCausalLM", dict(tie_word_embeddings=False), "sharded_safetensors"),
        ("Qwen2ForCausalLM", dict(tie_word_embeddings=True), "sharded_bin"),
    ],
)
def test_get_model_matches_transformers_logits(
    architecture: str, overrides: dict[str, Any], checkpoint: str, tmp_path: Path, save_pt: Callable[..., None]
) -> None:
    hf_model = _randomized(architecture, **overrides)
    if checkpoint == "sharded_safetensors":
        hf_model.save_pretrained(tmp_path, max_shard_size="50KB")
    else:
        save_pt(hf_model, tmp_path, num_shards=2)
    model = get_model(_model_config(tmp_path, hf_model.config), LoadConfig(), torch.device("cpu"))
    state = hf_model.state_dict()
    attention = model.model.layers[1].self_attn
    expected_qkv = torch.cat([state[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    torch.testing.assert_close(attention.qkv_proj.weight, expected_qkv, rtol=0, atol=0)
    tokens = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens.unsqueeze(0)).logits[0]
    torch.testing.assert_close(_prefill_logits(model, tokens), expected, rtol=0, atol=E2E_ATOL)


def test_real_model_loads_from_lazy_safetensors_slices(tmp_path: Path) -> None:
    """The layers' weight_loaders take safe_open slices as well as tensors, which is what lets
    a tensor-parallel rank read only its shard from disk."""
    from pagedllm.models.registry import get_model_class

    hf_model = _randomized("LlamaForCausalLM", tie_word_embeddings=False)
    hf_model.save_pretrained(tmp_path, max_shard_size="50KB")
    files, _ = find_weight_files(str(tmp_path), "safetensors")
    model = get_model_class("LlamaForCausalLM")(hf_model.config)
    assert model.load_weights(safetensors_slices_iterator(files)) == set(dict(model.named_parameters()))
    tokens = torch.arange(7)
    with torch.no_grad():
        expected = hf_model(tokens.unsqueeze(0)).logits[0]
    torch.testing.assert_close(_prefill_logits(model.eval(), tokens), expected, rtol=0, atol=E2E_ATOL)


def test_real_model_dummy_load_in_bfloat16_runs(tmp_path: Path) -> None:
    hf_model = _randomized("Qwen2ForCausalLM", tie_word_embeddings=False)
    config = _model_config(tmp_path, hf_model.config, torch.bfloat16)
    first = get_model(config, LoadConfig(load_format="dummy"), "cpu")
    second = get_model(config, LoadConfig(load_format="dummy"), "cpu")
    assert {p.dtype for p in first.parameters()} == {torch.bfloat16}
    logits = _prefill_logits(first, torch.arange(5))
    assert logits.shape == (5, 256) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, _prefill_logits(second, torch.arange(5)), rtol=0, atol=0)


@pytest.mark.gpu
def test_get_model_builds_on_cuda_in_bfloat16_and_restores_defaults(tmp_path: Path) -> None:
    hf_model = _randomized("LlamaForCausalLM", tie_word_embeddings=False)
    hf_model.save_pretrained(tmp_path, max_shard_size="50KB")
    config = _model_config(tmp_path, hf_model.config, torch.bfloat16)
    model = get_model(config, LoadConfig(), torch.device("cuda"))
    assert torch.get_default_dtype() == torch.float32
    assert torch.empty(1).device.type == "cpu"  # the default device is restored too
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.bfloat16)}
    state = hf_model.state_dict()
    expected_qkv = torch.cat([state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    torch.testing.assert_close(model.model.layers[0].self_attn.qkv_proj.weight.cpu(), expected_qkv.to(torch.bfloat16), rtol=0, atol=0)
    assert model_weight_bytes(model) == sum(t.numel() * 2 for t in state.values())


def test_a_missing_tensor_of_a_fused_layer_is_named_by_its_checkpoint_names(tmp_path: Path) -> None:
    """qkv_proj is filled from q_proj, k_proj and v_proj: the error names those, one of which
    the checkpoint lacks."""
    from safetensors.torch import load_file
    from tiny_models import make_tiny_checkpoint

    from pagedllm import LLM

    path = make_tiny_checkpoint(tmp_path / "llama", "llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 1 parameter.*qkv_proj\.weight \(from model\.layers\.0\.self_attn\.q_proj\.weight"):
        LLM(str(path), skip_tokenizer_init=True, dtype="float32")


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from tiny_models import make_tiny_checkpoint

    from pagedllm import LLM

    path = make_tiny_checkpoint(tmp_path / "llama", "llama")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight of shape \(3, 3\)"):
        LLM(str(path), skip_tokenizer_init=True, dtype="float32")
