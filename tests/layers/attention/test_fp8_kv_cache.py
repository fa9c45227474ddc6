"""kv_cache_dtype="fp8": the cache stores float8_e4m3fn keys/values divided by per-layer scales
(the checkpoint's k_scale / v_scale, else 1.0) and holds 4x the tokens of a float32 cache in the
same bytes.

Accuracy, two tolerances: prompt logprobs equal transformers' with its keys and values (after
rope) rounded through e4m3 the same way, within 2e-3 (REFERENCE_TOLERANCE); and they stay
within 1.0 of the unquantized run (UNQUANTIZED_TOLERANCE: e4m3 keeps 3 mantissa bits, ~3%
error per cached element, and the tiny model's large weights, initializer_range 0.2, amplify
it to ~0.65 at worst among the top-5 logprobs; a cache read without its scale moves them by > 3).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pagedllm import LLM, SamplingParams


def fp8_kv_reference(path, prompt: list[int], scales: dict[int, tuple[float, float]]) -> torch.Tensor:
    """transformers' log_softmax with each layer's keys/values rounded to e4m3 after dividing by
    its (k, v) scale (default 1.0) and multiplied back, [len(prompt), vocab]."""
    def attention(module, query, key, value, *args, **kwargs):
        k_scale, v_scale = scales.get(module.layer_idx, (1.0, 1.0))
        key = (key / k_scale).clamp(-448, 448).to(FP8).float() * k_scale
        value = (value / v_scale).clamp(-448, 448).to(FP8).float() * v_scale
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("fp8_kv_reference", attention)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="fp8_kv_reference"
    ).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)


def max_error(engine: list[dict[int, float]], reference: torch.Tensor) -> float:
    return max(abs(v - reference[p, t].item()) for p, entry in enumerate(engine) for t, v in entry.items())

PROMPT = [(11 * i) % 380 + 3 for i in range(300)]
REFERENCE_TOLERANCE = 2e-3
UNQUANTIZED_TOLERANCE = 1.0
FP8 = torch.float8_e4m3fn


def make_llm(path, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory_bytes", 1 << 24)
    return LLM(str(path), skip_tokenizer_init=True, dtype="float32", **kwargs)


def prompt_logprobs(llm: LLM, prompt: list[int]) -> list[dict[int, float]]:
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5)
    output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    return [{t: lp.logprob for t, lp in entry.items()} for entry in output.prompt_logprobs[1:]]


def max_difference(a: list[dict[int, float]], b: list[dict[int, float]]) -> float:
    # The top-1 token of each row is in both (logprobs of the prompt token are always there).
    return max(abs(x[t] - y[t]) for x, y in zip(a, b) for t in x.keys() & y.keys())


def runner(llm: LLM):
    return llm.llm_engine.engine_core.executor.worker.model_runner


def test_fp8_cache_holds_four_times_the_float32_tokens(tiny_checkpoints) -> None:
    path = tiny_checkpoints["llama"]
    # 2 layers x K,V x 16 tokens x 2 heads x 16 dims: 8 KiB per block at float32, 2 KiB at fp8.
    kv_bytes = 128 << 10
    with pytest.raises(ValueError, match="max_model_len"):
        make_llm(path, kv_cache_memory_bytes=kv_bytes, max_model_len=320)
    llm = make_llm(path, kv_cache_memory_bytes=kv_bytes, max_model_len=320, kv_cache_dtype="fp8")
    assert llm.llm_engine.executor.collective_rpc("kv_cache_block_bytes")[0] == 2 << 10
    assert all(cache.dtype == torch.float8_e4m3fn for cache in runner(llm).kv_caches)
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("name", ["fp8", "fp8_e4m3"])
def test_fp8_cache_logprobs_stay_near_the_unquantized_run(tiny_checkpoints, name) -> None:
    path = tiny_checkpoints["llama"]
    plain = prompt_logprobs(make_llm(path), PROMPT[:64])
    fp8 = prompt_logprobs(make_llm(path, kv_cache_dtype=name), PROMPT[:64])
    assert max_error(fp8, fp8_kv_reference(path, PROMPT[:64], {})) < REFERENCE_TOLERANCE
    assert 0 < max_difference(plain, fp8) < UNQUANTIZED_TOLERANCE


def test_checkpoint_kv_scales_are_loaded_and_applied(tiny_checkpoints, tmp_path) -> None:
    source = tiny_checkpoints["llama"]
    target = tmp_path / "with_kv_scales"
    shutil.copytree(source, target)
    tensors = load_file(source / "model.safetensors")
    # compressed-tensors names for layer 0, the older single kv_scale for layer 1.
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor([0.02])
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor([0.03])
    tensors["model.layers.1.self_attn.kv_scale"] = torch.tensor(0.05)
    save_file(tensors, target / "model.safetensors")
    plain = prompt_logprobs(make_llm(source), PROMPT[:64])
    llm = make_llm(target, kv_cache_dtype="fp8")
    layers = runner(llm).attention_layers
    assert [s.item() for a in layers for s in (a.k_scale, a.v_scale)] == pytest.approx([0.02, 0.03, 0.05, 0.05])
    fp8 = prompt_logprobs(llm, PROMPT[:64])
    assert max_error(fp8, fp8_kv_reference(target, PROMPT[:64], {0: (0.02, 0.03), 1: (0.05, 0.05)})) < REFERENCE_TOLERANCE
    assert max_difference(plain, fp8) < UNQUANTIZED_TOLERANCE
    # The cache holds keys divided by the scale: small scales push them toward e4m3's range.
    assert (runner(llm).kv_caches[0][0].float().abs() > 10).any()


@pytest.mark.parametrize("names", [("self_attn.attn.k_scale", "self_attn.attn.v_scale"),
                                   ("self_attn.qkv_proj.k_scale", "self_attn.qkv_proj.v_scale")])
def test_kv_scales_under_vllm_parameter_names_load(tiny_checkpoints, tmp_path, names) -> None:
    """vLLM's own parameter names (a checkpoint saved from a vLLM model) set the same scales."""
    source = tiny_checkpoints["llama"]
    target = tmp_path / "vllm_names"
    shutil.copytree(source, target)
    tensors = load_file(source / "model.safetensors")
    for layer in range(2):
        tensors[f"model.layers.{layer}.{names[0]}"] = torch.tensor(0.02 + layer / 100)
        tensors[f"model.layers.{layer}.{names[1]}"] = torch.tensor(0.04)
    save_file(tensors, target / "model.safetensors")
    layers = runner(make_llm(target, kv_cache_dtype="fp8")).attention_layers
    assert [s.item() for a in layers for s in (a.k_scale, a.v_scale)] == pytest.approx([0.02, 0.04, 0.03, 0.04])


def test_unknown_kv_cache_dtype_is_a_value_error_listing_the_choices(tiny_checkpoints) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'.*'auto', 'fp8', 'fp8_e4m3'"):
        make_llm(tiny_checkpoints["llama"], kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="e5m2 format is not implemented.*'fp8'"):
        make_llm(tiny_checkpoints["llama"], kv_cache_dtype="fp8_e5m2")
    # vLLM's calculate_kv_scales: False (its default) is accepted, True is refused with the reason.
    make_llm(tiny_checkpoints["llama"], kv_cache_dtype="fp8", calculate_kv_scales=False)
    with pytest.raises(ValueError, match="calculate_kv_scales=True is not supported.*checkpoint"):
        make_llm(tiny_checkpoints["llama"], kv_cache_dtype="fp8", calculate_kv_scales=True)


def test_fp8_cache_without_a_scale_would_miss_the_tolerance(tiny_checkpoints, tmp_path) -> None:
    """The tolerance discriminates: scales of 0.02 applied on write but ignored on read change
    logprobs far beyond it."""
    from pagedllm.layers.attention.backends import torch_sdpa

    target = tmp_path / "scaled"
    shutil.copytree(tiny_checkpoints["llama"], target)
    tensors = load_file(target / "model.safetensors")
    for layer in range(2):
        tensors[f"model.layers.{layer}.self_attn.kv_scale"] = torch.tensor(0.02)
    save_file(tensors, target / "model.safetensors")
    plain = prompt_logprobs(make_llm(tiny_checkpoints["llama"]), PROMPT[:64])
    original = torch_sdpa.from_cache_dtype
    torch_sdpa.from_cache_dtype = lambda x, dtype, scale: original(x, dtype, None)
    try:
        broken = prompt_logprobs(make_llm(target, kv_cache_dtype="fp8"), PROMPT[:64])
    finally:
        torch_sdpa.from_cache_dtype = original
    assert max_difference(plain, broken) > 3 * UNQUANTIZED_TOLERANCE
