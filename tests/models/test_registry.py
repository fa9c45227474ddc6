"""vLLM's ModelRegistry: the supported architectures, and an out-of-tree family registered by
class or by "module:Class" that LLM then builds."""

from __future__ import annotations

from tiny_models import hf_greedy, make_tiny_checkpoint

from pagedllm import LLM, ModelRegistry, SamplingParams
from pagedllm.models import registry
from pagedllm.models.llama import LlamaForCausalLM


class MyLlama(LlamaForCausalLM):
    """An out-of-tree family: here the Llama layout under another architecture name."""


def test_registered_families_are_built_by_llm(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(registry, "_REGISTERED", {})
    assert "LlamaForCausalLM" in ModelRegistry.get_supported_archs()
    path = make_tiny_checkpoint(tmp_path / "mine", "llama", seed=2)
    expected = hf_greedy(path, [[5, 6, 7, 8]], 4)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["MyLlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    for model_cls in (MyLlama, f"{__name__}:MyLlama"):
        ModelRegistry.register_model("MyLlamaForCausalLM", model_cls)
        assert "MyLlamaForCausalLM" in ModelRegistry.get_supported_archs()
        llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22)
        out = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0, max_tokens=4,
                                                                                 ignore_eos=True), use_tqdm=False)
        assert [list(out[0].outputs[0].token_ids)] == expected
        llm.shutdown()
