"""engine/hf_config.py: vLLM's rules for dtype="auto" and the dtype names it accepts, and
hf_overrides of the rope settings under transformers 5."""

from __future__ import annotations

import pytest
import torch
import transformers

from pagedllm.engine.hf_config import apply_hf_overrides, resolve_dtype


def test_auto_dtype_follows_vllm_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert resolve_dtype("auto", torch.float32, cpu) == torch.float32
    assert resolve_dtype("auto", torch.float16, cpu) == torch.float32
    assert resolve_dtype("auto", torch.float16, cuda) == torch.float16
    assert resolve_dtype("half", torch.float32, cpu) == torch.float16
    with pytest.raises(ValueError, match="dtype='int3'"):
        resolve_dtype("int3", None, cpu)


def test_rope_overrides_reach_transformers_5_rope_parameters():
    config = transformers.LlamaConfig(rope_theta=10000.0)
    apply_hf_overrides(config, {"rope_theta": 50.0})
    assert config.rope_parameters["rope_theta"] == 50.0 and config.rope_theta == 50.0
    apply_hf_overrides(config, {"rope_scaling": {"type": "linear", "factor": 2.0}})
    assert config.rope_parameters == {"rope_theta": 50.0, "rope_type": "linear", "factor": 2.0}
    gemma = transformers.Gemma3TextConfig()
    apply_hf_overrides(gemma, {"rope_theta": 5.0})
    # Gemma 3's global layers take rope_theta; its sliding layers keep their own base.
    assert gemma.rope_parameters["full_attention"]["rope_theta"] == 5.0
    assert gemma.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0


def test_rope_theta_override_changes_the_logprobs_as_transformers(tiny_checkpoints):
    from pagedllm import LLM, SamplingParams

    path = tiny_checkpoints["llama"]
    prompt = list(range(10, 40))  # long enough for the rotary base to matter
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)

    def prompt_logprobs(**kwargs) -> torch.Tensor:
        llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=1 << 22, skip_tokenizer_init=True, **kwargs)
        try:
            output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        finally:
            llm.shutdown()
        return torch.tensor([row[token].logprob for row, token in zip(output.prompt_logprobs[1:], prompt[1:])])

    default = prompt_logprobs()
    overridden = prompt_logprobs(hf_overrides={"rope_theta": 50.0})
    assert not torch.allclose(default, overridden, atol=1e-3)
    hf_config = transformers.AutoConfig.from_pretrained(path)
    hf_config.rope_parameters["rope_theta"] = 50.0
    model = transformers.AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
    expected = logits.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(overridden, expected, rtol=0, atol=1e-4)


def test_max_model_len_takes_the_rope_scaling_factor_as_vllm_derives_it():
    from pagedllm.engine.hf_config import derive_max_model_len

    def llama(**rope):
        return transformers.LlamaConfig(max_position_embeddings=256, rope_parameters={"rope_theta": 10000.0, **rope})

    assert derive_max_model_len(llama(rope_type="default")) == 256
    assert derive_max_model_len(llama(rope_type="linear", factor=2.0)) == 512
    assert derive_max_model_len(llama(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)) == 256
    llama3 = llama(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
    assert derive_max_model_len(llama3) == 256  # llama3-type scaling: max_position_embeddings as given
