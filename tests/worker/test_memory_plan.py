"""The memory plan against what the engine then does on CPU (same sizing policy, estimated
weights within 5%), the KV cache capped at what can be used, and max_model_len='auto'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import make_tiny_checkpoint
from tiny_vl_models import tiny_vl_checkpoints  # noqa: F401 - a fixture

from pagedllm import LLM, SamplingParams
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.worker import memory_policy
from pagedllm.entrypoints.plan import parse_bytes, render_plan
from pagedllm.worker.memory_plan import MemoryPlan, plan_memory

TOLERANCE = 0.05


def _engine_figures(llm: LLM) -> tuple[int, int]:
    """(weight bytes of rank 0, KV tokens) of a running engine."""
    core = llm.llm_engine.engine_core
    weights = core.executor.collective_rpc("model_weight_bytes")[0]
    return weights, core.num_kv_blocks * core.config.cache_config.block_size


def _plan(model: Path | str, **kwargs) -> MemoryPlan:
    config = EngineArgs.from_kwargs(str(model), **kwargs).create_planning_config("cpu")
    return plan_memory(config)


@pytest.mark.parametrize(
    ("family", "tied", "engine_kwargs"),
    [
        ("llama", False, dict(kv_cache_memory_bytes=3 << 20)),
        ("llama", False, dict(kv_cache_memory_bytes=3 << 20, kv_cache_dtype="fp8")),  # twice the tokens
        ("qwen2", False, dict(kv_cache_memory_bytes=1 << 20, block_size=32)),
        ("qwen3", True, dict(max_num_seqs=4, max_model_len=200)),  # capped, default CPU budget
    ],
)
def test_cpu_plan_matches_the_engine_within_5_percent(tmp_path, monkeypatch, family, tied, engine_kwargs):
    monkeypatch.setenv("PAGEDLLM_CPU_KVCACHE_SPACE", "1")
    path = make_tiny_checkpoint(tmp_path / family, family, tie_word_embeddings=tied)
    kwargs = dict(skip_tokenizer_init=True, dtype="float32", **engine_kwargs)
    plan = _plan(path, **kwargs)
    assert plan.weights_source == "safetensors headers"
    llm = LLM(str(path), **kwargs)
    try:
        weights, tokens = _engine_figures(llm)
    finally:
        llm.shutdown()
    assert abs(plan.weights_bytes - weights) <= TOLERANCE * weights, (plan.weights_bytes, weights)
    assert abs(plan.kv.num_tokens - tokens) <= TOLERANCE * tokens, (plan.kv.num_tokens, tokens)


def test_plan_from_config_json_alone_equals_the_plan_from_headers(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "qwen3", "qwen3")
    from_headers = _plan(path, skip_tokenizer_init=True, dtype="float32")
    from_config = _plan(path, skip_tokenizer_init=True, dtype="float32", load_format="dummy")
    assert from_config.weights_source == "config.json shapes"
    assert from_config.weights_bytes == from_headers.weights_bytes


def test_kv_cache_is_capped_at_max_num_seqs_times_max_model_len_plus_headroom(tmp_path, caplog):
    path = make_tiny_checkpoint(tmp_path / "llama", "llama")
    common = dict(skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=64 << 20,
                  max_num_seqs=3, max_model_len=100, block_size=16)
    for headroom, expected_blocks in ((0.0, 3 * 7), (0.1, 3 * 7 + 3), (0.5, 3 * 7 + 11)):
        llm = LLM(str(path), kv_cache_headroom=headroom, **common)
        try:
            assert llm.llm_engine.engine_core.num_kv_blocks == expected_blocks
        finally:
            llm.shutdown()
    assert _plan(path, kv_cache_headroom=0.1, **common).kv.num_blocks == 3 * 7 + 3
    with pytest.raises(ValueError, match="kv_cache_headroom.*-0.5"):
        EngineArgs.from_kwargs(str(path), kv_cache_headroom=-0.5).create_engine_config()


def test_the_log_says_how_much_of_the_kv_budget_stays_free(tmp_path):
    import logging

    path = make_tiny_checkpoint(tmp_path / "llama", "llama")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("pagedllm")
    logger.addHandler(handler)
    try:
        llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 30,
                  max_num_seqs=2, max_model_len=64)
        llm.shutdown()
    finally:
        logger.removeHandler(handler)
    line = next(r for r in records if r.startswith("KV cache:"))
    assert "Capped at max_num_seqs x max_model_len plus 10% headroom" in line and "stays free" in line


@pytest.mark.parametrize("load_format", ["auto", "dummy"])
@pytest.mark.parametrize("limits", [None, {"image": 0, "video": 0}])
def test_vl_plan_leaves_out_a_vision_tower_the_limits_turn_off(tiny_vl_checkpoints, limits, load_format):  # noqa: F811
    """limit_mm_per_prompt 0 for every modality: the engine skips the tower's tensors unread,
    and the plan leaves them out too (within 5% of what the engine holds, either way), from
    the safetensors headers or from config.json alone (the tower's shapes from transformers'
    model built on the meta device)."""
    kwargs = dict(dtype="float32", kv_cache_memory_bytes=1 << 20, max_model_len=512, limit_mm_per_prompt=limits)
    plan = _plan(tiny_vl_checkpoints["qwen2_vl"], load_format=load_format, **kwargs)
    llm = LLM(str(tiny_vl_checkpoints["qwen2_vl"]), **kwargs)
    try:
        weights, _ = _engine_figures(llm)
    finally:
        llm.shutdown()
    assert abs(plan.weights_bytes - weights) <= TOLERANCE * weights, (plan.weights_bytes, weights)


@pytest.mark.parametrize("auto", ["auto", -1])
def test_max_model_len_auto_is_the_longest_request_the_kv_cache_holds(tmp_path, auto):
    path = make_tiny_checkpoint(tmp_path / "llama", "llama")  # the model's length is 512
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers x (K, V) x block x kv heads x head dim x fp32
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=auto,
              kv_cache_memory_bytes=10 * block_bytes)
    try:
        engine = llm.llm_engine
        assert engine.config.model_config.max_model_len == 160
        assert engine.config.scheduler_config.max_model_len == 160
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        output = llm.generate({"prompt_token_ids": list(range(3, 103))}, params, use_tqdm=False)[0]
        assert len(output.outputs[0].token_ids) == 60  # up to max_model_len
        with pytest.raises(ValueError, match="max_model_len is 160"):
            llm.generate({"prompt_token_ids": list(range(3, 203))}, params, use_tqdm=False)
    finally:
        llm.shutdown()
    # With room for the model's whole length, auto keeps it.
    roomy = LLM(str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=auto,
                kv_cache_memory_bytes=64 * block_bytes)
    try:
        assert roomy.llm_engine.config.model_config.max_model_len == 512
    finally:
        roomy.shutdown()
    # The plan picks the same length, and says when no block fits at all.
    def planned(kv_bytes: int):
        config = EngineArgs.from_kwargs(str(path), dtype="float32", max_model_len=auto,
                                        kv_cache_memory_bytes=kv_bytes).create_planning_config("cpu")
        return plan_memory(config)

    assert (planned(10 * block_bytes).max_model_len, planned(10 * block_bytes).fits) == (160, True)
    assert planned(64 * block_bytes).max_model_len == 512
    empty = planned(block_bytes // 2)
    assert not empty.fits and "holds no block" in empty.problems[0]


def test_gpu_plan_counts_cpu_offload_out_of_the_gpu_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    plain = plan_memory(EngineArgs.from_kwargs(str(tmp_path), load_format="dummy", max_model_len=8192)
                        .create_planning_config("cuda"), parse_bytes("24GiB"))
    offload = plan_memory(EngineArgs.from_kwargs(str(tmp_path), load_format="dummy", max_model_len=8192,
                                                 cpu_offload_gb=10).create_planning_config("cuda"), parse_bytes("24GiB"))
    assert plain.weights_bytes - offload.weights_bytes == 10 << 30 == offload.offloaded_bytes
    # The freed GPU memory goes to the KV cache (CUDA graphs are off with offloading, too).
    assert offload.kv.budget_bytes - plain.kv.budget_bytes >= 10 << 30


def test_sizing_policy_arithmetic():
    sizing = memory_policy.size_kv_cache(
        budget_bytes=1000 * 64, block_bytes=64, block_size=16, max_num_seqs=2, max_model_len=33, headroom=0.1
    )
    assert (sizing.budget_blocks, sizing.usable_blocks, sizing.num_blocks) == (1000, 6 + 1, 7)
    assert sizing.unused_budget_bytes == (1000 - 7) * 64
    assert memory_policy.largest_max_model_len(7, 16, 4096) == 112
    assert memory_policy.cuda_graph_bytes(1000, 100, (), 2) == 0
    assert memory_policy.cuda_graph_bytes(8192, 8192, (1, 2, 4), 2) == (
        4 + memory_policy.CUDA_GRAPH_FIXED_BYTES + memory_policy.CUDA_GRAPH_BYTES_PER_LAYER * 2 * 3
    )


LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}


def test_gpu_plan_of_a_real_size_model_names_the_settings_that_would_fit(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    config = EngineArgs.from_kwargs(str(tmp_path), load_format="dummy").create_planning_config("cuda")
    plan = plan_memory(config, parse_bytes("24GiB"))
    assert plan.weights_bytes == 8_030_261_248 * 2  # Llama-3.1-8B's parameters in bfloat16
    assert plan.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    assert not plan.fits
    text = "\n".join(plan.suggestions)
    assert f"max_model_len={plan.kv.budget_blocks * 16}" in text
    assert "tensor_parallel_size=2" in text and "quantization='fp8'" in text
    fp8_cache = EngineArgs.from_kwargs(str(tmp_path), load_format="dummy", kv_cache_dtype="fp8")
    fp8_plan = plan_memory(fp8_cache.create_planning_config("cuda"), parse_bytes("24GiB"))
    assert fp8_plan.kv_bytes_per_token == plan.kv_bytes_per_token // 2
    assert fp8_plan.kv_cache_dtype == "float8_e4m3fn" and plan.kv_cache_dtype == "bfloat16"
    # The suggestion states the fp8 cache's own plan: twice the tokens in the same budget.
    assert f"kv_cache_dtype='fp8' (8-bit KV cache): weights 14.96 GiB per rank, KV cache {fp8_plan.kv.num_tokens:,} tokens" in text
    assert "kv_cache_dtype" not in "\n".join(fp8_plan.suggestions)
    roomy = plan_memory(config, parse_bytes("80GiB"))
    assert roomy.fits and roomy.kv.num_tokens > 131072
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512MiB") == 512 << 20
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_bytes("lots")
    with pytest.raises(ValueError, match="did you mean 80GiB"):
        parse_bytes("80")
    assert "Settings that would fit:" in render_plan(plan, parse_bytes("24GiB"))
