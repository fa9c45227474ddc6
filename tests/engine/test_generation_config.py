"""generation_config.json as vLLM reads it: every EOS id stops, its sampling fields are the
defaults of LLM.get_default_sampling_params(); and the everyday engine options."""

from __future__ import annotations

import json

import pytest
from tiny_models import make_tiny_checkpoint

from pagedllm import LLM, SamplingParams
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.generation_config import load_generation_defaults

PROMPT = {"prompt_token_ids": [5, 17, 42, 7]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("genconf") / "model", "llama", seed=3)


def _write_generation_config(folder, **fields) -> None:
    (folder / "generation_config.json").write_text(json.dumps(fields))


def test_sampling_fields_become_defaults_and_vllm_mode_ignores_them(tmp_path):
    _write_generation_config(
        tmp_path, eos_token_id=[2, 9], temperature=0.6, top_k=20, top_p=0.95, min_p=0.1,
        repetition_penalty=1.05, max_new_tokens=33, do_sample=True,
    )
    auto = load_generation_defaults("auto", str(tmp_path), 2)
    assert auto.eos_token_ids == {2, 9}
    assert auto.sampling_overrides == {
        "temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.1, "repetition_penalty": 1.05, "max_tokens": 33,
    }
    vllm = load_generation_defaults("vllm", str(tmp_path), 2)
    assert vllm.sampling_overrides == {} and vllm.eos_token_ids == {2, 9}
    folder = load_generation_defaults(str(tmp_path), None, None)
    assert folder.sampling_overrides["top_k"] == 20
    missing = load_generation_defaults("auto", str(tmp_path / "nothing"), [2, 3])
    assert missing.eos_token_ids == {2, 3} and missing.sampling_overrides == {}


def test_every_generation_config_eos_id_stops_like_eos(model_dir, tmp_path):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = LLM(str(model_dir), dtype="float32", kv_cache_memory_bytes=1 << 22, skip_tokenizer_init=True)
    tokens = plain.generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0].token_ids
    plain.shutdown()
    # A folder whose generation config lists the 4th greedy token as a second EOS id.
    stop_token = tokens[3]
    assert stop_token not in tokens[:3]
    config_dir = tmp_path / "gen"
    config_dir.mkdir()
    _write_generation_config(config_dir, eos_token_id=[2, stop_token], temperature=0.0, max_new_tokens=12)
    llm = LLM(
        str(model_dir), dtype="float32", kv_cache_memory_bytes=1 << 22, skip_tokenizer_init=True,
        generation_config=str(config_dir),
    )
    defaults = llm.get_default_sampling_params()
    assert defaults.temperature == 0.0 and defaults.max_tokens == 12
    # No params: the generation config's defaults (greedy, 12 tokens) apply.
    output = llm.generate(PROMPT, use_tqdm=False)[0].outputs[0]
    assert output.token_ids == tokens[:4]
    assert output.finish_reason == "stop" and output.stop_reason is None
    # ignore_eos ignores every EOS id.
    assert llm.generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0].token_ids == tokens
    # min_tokens bans the extra EOS id too.
    banned = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, min_tokens=6), use_tqdm=False)
    assert stop_token not in banned[0].outputs[0].token_ids[:6]
    llm.shutdown()


def test_hf_overrides_dict_and_callable(model_dir):
    config = EngineArgs.from_kwargs(str(model_dir), hf_overrides={"rope_theta": 5000.0}).create_engine_config()
    assert config.model_config.hf_config.rope_theta == 5000.0

    def shorter(hf_config):
        hf_config.max_position_embeddings = 128
        return hf_config

    config = EngineArgs.from_kwargs(str(model_dir), hf_overrides=shorter).create_engine_config()
    assert config.model_config.max_model_len == 128
    with pytest.raises(ValueError, match="hf_overrides"):
        EngineArgs.from_kwargs(str(model_dir), hf_overrides=[1]).create_engine_config()


def test_everyday_options_are_accepted_or_refused_clearly(model_dir):
    config = EngineArgs.from_kwargs(
        str(model_dir), disable_custom_all_reduce=True, max_seq_len_to_capture=64,
        cudagraph_capture_sizes=[1, 2], device="cpu",
    ).create_engine_config()
    assert config.parallel_config.disable_custom_all_reduce
    assert config.compilation_config.max_seq_len_to_capture == 64
    with pytest.raises(ValueError, match="tokenizer_mode='mistral'"):
        EngineArgs.from_kwargs(str(model_dir), tokenizer_mode="mistral").create_engine_config()
    with pytest.raises(ValueError, match="cpu_offload_gb"):
        EngineArgs.from_kwargs(str(model_dir), cpu_offload_gb=1, device="cpu").create_engine_config()
    with pytest.raises(ValueError, match="generation_config"):
        EngineArgs.from_kwargs(str(model_dir), generation_config="nowhere").create_engine_config()
