"""Llama / Mistral / Qwen2 / Qwen3 against transformers, on tiny random fp32 models.

Tolerance: max abs logit difference 1e-4 (fp32; the same math in a different order).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers
from tiny_models import hf_logits, load_ours

from pagedllm.forward_context import set_forward_context
from pagedllm.layers.attention.layer import Attention
from pagedllm.models.registry import get_model_class, supported_architectures

ATOL = 1e-4
VOCAB = 320
BLOCK_SIZE = 4
NUM_BLOCKS = 16

_SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6,
)
_LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
}
_YARN_ROPE = {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
    "original_max_position_embeddings": 64,
}
# id → (architecture, transformers config class, config overrides)
CASES = {
    "llama-gqa-untied": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=False)),
    "llama-tied-bias-headdim-mqa": (
        "LlamaForCausalLM", "LlamaConfig",
        dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=32,
             num_key_value_heads=1),
    ),
    "llama3-rope-scaling": (
        "LlamaForCausalLM", "LlamaConfig",
        dict(tie_word_embeddings=False, rope_parameters=_LLAMA3_ROPE),
    ),
    "llama-linear-rope": (
        "LlamaForCausalLM", "LlamaConfig",
        dict(tie_word_embeddings=False, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    ),
    "mistral-sliding-window": (
        "MistralForCausalLM", "MistralConfig", dict(tie_word_embeddings=False, sliding_window=5),
    ),
    "qwen2-tied-qkv-bias": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2-yarn": (
        "Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=False, rope_parameters=_YARN_ROPE),
    ),
    "qwen3-headdim-qknorm": (
        "Qwen3ForCausalLM", "Qwen3Config",
        dict(tie_word_embeddings=False, head_dim=32, num_hidden_layers=3),
    ),
}


def build_pair(case: str, device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers model, our model with its weights loaded), both fp32 on `device`; ours
    is built under the device, as the worker builds it, so it picks that device's backend."""
    architecture, config_name, overrides = CASES[case]
    config = getattr(transformers, config_name)(**{**_SMALL, **overrides}, architectures=[architecture])
    torch.manual_seed(0)
    hf_model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        # Random norms and biases too, so a misplaced one shows (their init is 1 and 0).
        for name, param in hf_model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return hf_model.to(device), load_ours(architecture, config, hf_model, device)


@pytest.mark.parametrize("case", list(CASES))
def test_flat_batch_prefill_without_cache_matches_transformers(case: str, make_attn_metadata: Callable) -> None:
    hf_model, model = build_pair(case)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (5, 9, 3)]
    metadata = make_attn_metadata([5, 9, 3], [5, 9, 3], None, BLOCK_SIZE)
    input_ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.no_grad(), set_forward_context(metadata):
        logits = model.compute_logits(model(input_ids, positions))
    expected = torch.cat([hf_logits(hf_model, p) for p in prompts])
    assert logits.shape == (17, VOCAB)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


# Each step lists (request, number of tokens it runs): chunked prefill, a mixed step, a
# two-token chunk over a longer cache, then single-token decodes (one request finishing early).
SCHEDULE = [
    [(0, 8)],
    [(0, 6), (1, 7)],
    [(1, 2), (0, 2)],
    [(0, 1), (1, 1)],
    [(1, 1), (0, 1)],
    [(0, 1)],
    [(0, 1)],
]


@pytest.mark.parametrize("case", list(CASES))
def test_paged_chunked_prefill_and_decode_match_transformers(case: str, make_attn_metadata: Callable) -> None:
    run_schedule_against_transformers(case, "cpu", make_attn_metadata, ATOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", [c for c in CASES if "sliding" not in c])
def test_paged_steps_on_cuda_backend_match_transformers(case: str, make_attn_metadata: Callable) -> None:
    # fp32 on both sides; 2e-3 allows for TF32 or a different summation order in the kernels.
    run_schedule_against_transformers(case, "cuda", make_attn_metadata, 2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_built_under_cuda_picks_the_triton_backend() -> None:
    _, model = build_pair("llama-gqa-untied", "cuda")
    names = {m.impl.name for m in model.modules() if isinstance(m, Attention)}
    assert names == {"TRITON_PAGED"}


def run_schedule_against_transformers(case: str, device: str, make_attn_metadata: Callable, atol: float) -> None:
    hf_model, model = build_pair(case, device)
    gen = torch.Generator().manual_seed(2)
    seq_lens = [sum(n for step in SCHEDULE for r, n in step if r == req) for req in (0, 1)]
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen) for n in seq_lens]
    # Non-contiguous, shuffled physical blocks for each request.
    perm = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    blocks_needed = [-(-n // BLOCK_SIZE) for n in seq_lens]
    block_tables = [perm[: blocks_needed[0]], perm[blocks_needed[0] : sum(blocks_needed)]]
    for module in model.modules():
        if isinstance(module, Attention):
            spec = module.kv_cache_spec()
            # NaN in unwritten slots: reading any slot this request never wrote poisons it.
            module.kv_cache = torch.full(
                (2, NUM_BLOCKS, BLOCK_SIZE, spec.num_kv_heads, spec.head_size), float("nan"),
                device=device,
            )
    sequences = [seq.to(device) for seq in sequences]
    expected = [hf_logits(hf_model, seq) for seq in sequences]
    done = [0, 0]
    for step in SCHEDULE:
        reqs = [r for r, _ in step]
        query_lens = [n for _, n in step]
        new_lens = [done[r] + n for r, n in step]
        num_padding = 1 if max(query_lens) == 1 else 0  # a padded decode batch, as for CUDA graphs
        metadata = make_attn_metadata(
            query_lens, new_lens, [block_tables[r] for r in reqs], BLOCK_SIZE, device,
            num_padding_tokens=num_padding,
        )
        padding = torch.zeros(num_padding, dtype=torch.long, device=device)
        input_ids = torch.cat([sequences[r][done[r] : done[r] + n] for r, n in step] + [padding])
        positions = torch.cat([torch.arange(done[r], done[r] + n, device=device) for r, n in step] + [padding])
        with torch.no_grad(), set_forward_context(metadata):
            logits = model.compute_logits(model(input_ids, positions))
        want = torch.cat([expected[r][done[r] : done[r] + n] for r, n in step])
        torch.testing.assert_close(logits[: len(want)], want, atol=atol, rtol=0)
        for r, n in step:
            done[r] += n


def test_unexpected_checkpoint_tensor_is_named_in_the_error() -> None:
    hf_model, model = build_pair("llama-gqa-untied")
    weights = list(hf_model.state_dict().items())
    weights.append(("model.layers.0.self_attn.rogue_proj.weight", torch.zeros(4, 4)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.rogue_proj\.weight"):
        model.load_weights(weights)


def test_a_checkpoint_with_missing_and_unexpected_tensors_names_both() -> None:
    from pagedllm.model_loader.loaders import load_weights_strict

    hf_model, model = build_pair("llama-gqa-untied")
    weights = [(n, t) for n, t in hf_model.state_dict().items() if n != "model.layers.1.mlp.up_proj.weight"]
    weights.append(("model.extra.weight", torch.zeros(4, 4)))
    with pytest.raises(ValueError, match=r"lacks 1 parameter.*up_proj.*model\.extra\.weight"):
        load_weights_strict(model, weights, "the test checkpoint")


def test_tied_model_ignores_checkpoint_lm_head_copy() -> None:
    hf_model, model = build_pair("qwen2-tied-qkv-bias")
    weights = dict(hf_model.state_dict())
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    loaded = model.load_weights(weights.items())
    assert "lm_head.weight" not in loaded
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_fused_parameter_counts_as_loaded_only_with_all_its_parts() -> None:
    hf_model, model = build_pair("llama-gqa-untied")
    weights = [(n, t) for n, t in hf_model.state_dict().items() if n != "model.layers.1.self_attn.v_proj.weight"]
    loaded = model.load_weights(weights)
    assert set(dict(model.named_parameters())) - loaded == {"model.layers.1.self_attn.qkv_proj.weight"}


def test_unknown_architecture_lists_supported_ones() -> None:
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as error:
        get_model_class("GPT2LMHeadModel")
    for architecture in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert architecture in str(error.value)
        assert architecture in supported_architectures()


def test_wrong_checkpoint_shape_names_the_tensor() -> None:
    hf_model, model = build_pair("llama-gqa-untied")
    weights = dict(hf_model.state_dict())
    weights["model.norm.weight"] = torch.ones(63)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(63,\)"):
        model.load_weights(weights.items())
