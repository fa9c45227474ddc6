"""EngineArgs.create_engine_config: dtype rules, context length, and option errors."""

from __future__ import annotations

import pytest
import torch
import transformers

from pagedllm.engine.arg_utils import EngineArgs


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    return path


def test_max_model_len_defaults_to_context_and_larger_is_an_error(bf16_checkpoint):
    config = EngineArgs.from_kwargs(str(bf16_checkpoint), load_format="dummy").create_engine_config()
    assert config.model_config.max_model_len == 256
    assert config.model_config.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"max_model_len=1000.*\(256"):
        EngineArgs.from_kwargs(str(bf16_checkpoint), load_format="dummy", max_model_len=1000).create_engine_config()


def test_unknown_option_is_a_type_error_and_bad_values_name_the_option(bf16_checkpoint):
    with pytest.raises(TypeError, match="max_num_seq"):
        EngineArgs.from_kwargs(str(bf16_checkpoint), max_num_seq=4).create_engine_config()
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineArgs.from_kwargs(str(bf16_checkpoint), gpu_memory_utilization=1.5).create_engine_config()
    with pytest.raises(ValueError, match="load_format"):
        EngineArgs.from_kwargs(str(bf16_checkpoint), load_format="zip").create_engine_config()
    with pytest.raises(ValueError, match="block_size"):
        EngineArgs.from_kwargs(str(bf16_checkpoint), block_size=12).create_engine_config()


def test_cpu_kv_cache_space_env_and_vllm_alias(bf16_checkpoint, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    config = EngineArgs.from_kwargs(str(bf16_checkpoint), load_format="dummy", device="cpu").create_engine_config()
    assert config.cache_config.cpu_kv_cache_bytes == 2 << 30
    monkeypatch.setenv("PAGEDLLM_CPU_KVCACHE_SPACE", "1")
    config = EngineArgs.from_kwargs(str(bf16_checkpoint), load_format="dummy", device="cpu").create_engine_config()
    assert config.cache_config.cpu_kv_cache_bytes == 1 << 30


def test_max_model_len_takes_vllms_human_readable_lengths():
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    for text, expected in [("1k", 1000), ("1K", 1024), ("25.6k", 25600), ("32K", 32768), ("-1", -1), ("auto", "auto"),
                           ("4096", 4096)]:
        assert parser.parse_args(["--max-model-len", text]).max_model_len == expected
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-model-len", "1.5K"])


def test_compilation_config_takes_vllms_compile_fields_and_this_packages_class():
    import dataclasses

    from pagedllm.config import CompilationConfig
    from pagedllm.engine.config_builder import _build_compilation_config

    base = dict(compilation_config=None, cudagraph_capture_sizes=None, max_seq_len_to_capture=None,
                enforce_eager=False, cpu_offload_gb=0)
    cuda = torch.device("cuda")
    ignored = _build_compilation_config({**base, "compilation_config": {"full_cuda_graph": True, "use_inductor": False}},
                                        cuda, 8, 512)
    assert ignored.cudagraph_capture_sizes == (1, 2, 4, 8)
    ours = CompilationConfig(cudagraph_capture_sizes=(1, 2))
    assert _build_compilation_config({**base, "compilation_config": ours}, cuda, 8, 512).cudagraph_capture_sizes == (1, 2)
    # Through EngineArgs, as LLM(compilation_config=...) passes it (the instance, not a dict).
    assert dataclasses.fields(EngineArgs) and EngineArgs(compilation_config=ours)._option_values()["compilation_config"] is ours
    off = _build_compilation_config({**base, "compilation_config": CompilationConfig(use_cudagraph=False)}, cuda, 8, 512)
    assert not off.use_cudagraph
    with pytest.raises(ValueError, match="unknown key"):
        _build_compilation_config({**base, "compilation_config": {"no_such_key": 1}}, cuda, 8, 512)
