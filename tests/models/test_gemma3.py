"""Gemma3ForCausalLM against transformers on tiny random fp32 models whose prompts are longer
than the sliding window (4 tokens), with linear rope scaling on the global layers, a
query_pre_attn_scalar that differs from head_dim and final logit softcapping.

Tolerance: max abs logit difference 1e-4 and logprobs within 1e-4 (fp32; the same math in a
different order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import hf_greedy, hf_logits, load_ours
from tiny_vlm_checkpoints import randomize_

from pagedllm import LLM, SamplingParams
from pagedllm.forward_context import set_forward_context
from pagedllm.layers.attention.layer import Attention
from pagedllm.models.registry import get_model_class

ATOL = 1e-4
VOCAB = 384
BLOCK_SIZE = 4
NUM_BLOCKS = 16
SLIDING_WINDOW = 4


def tiny_gemma3_text_config(**overrides: object) -> transformers.Gemma3TextConfig:
    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, final_logit_softcapping=5.0, initializer_range=0.2,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
        architectures=["Gemma3ForCausalLM"],
    )
    values.update(overrides)
    return transformers.Gemma3TextConfig(**values)


def build_pair(device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers model, ours), fp32 on device; ours built under the device, as the worker
    builds it, so that it picks that device's attention backend."""
    config = tiny_gemma3_text_config()
    hf_model = transformers.Gemma3ForCausalLM(config).eval()
    randomize_(hf_model, norm_mean=0.0)
    model = load_ours("Gemma3ForCausalLM", config, hf_model, device)
    return hf_model.to(device), model


def test_layers_declare_the_sliding_window_of_their_kind() -> None:
    _, model = build_pair()
    windows = [layer.self_attn.attn.kv_cache_spec().sliding_window for layer in model.model.layers]
    assert windows == [SLIDING_WINDOW, None, SLIDING_WINDOW]


def test_flat_batch_prefill_matches_transformers(make_attn_metadata: Callable) -> None:
    hf_model, model = build_pair()
    gen = torch.Generator().manual_seed(1)
    lens = [11, 3, 9]
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lens]
    metadata = make_attn_metadata(lens, lens, None, BLOCK_SIZE)
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad(), set_forward_context(metadata):
        logits = model.compute_logits(model(torch.cat(prompts), positions))
    expected = torch.cat([hf_logits(hf_model, p) for p in prompts])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


# (request, tokens it runs) per step: chunked prefill past the window, a mixed step, decodes.
SCHEDULE = [[(0, 7)], [(0, 5), (1, 9)], [(1, 2), (0, 1)], [(0, 1), (1, 1)], [(0, 1)]]


def test_paged_chunked_prefill_and_decode_match_transformers(make_attn_metadata: Callable) -> None:
    run_schedule_against_transformers("cpu", make_attn_metadata, ATOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paged_steps_on_the_triton_backend_match_transformers(make_attn_metadata: Callable) -> None:
    # fp32 on both sides; 2e-3 allows for TF32 or another summation order in the kernels.
    run_schedule_against_transformers("cuda", make_attn_metadata, 2e-3)


def run_schedule_against_transformers(device: str, make_attn_metadata: Callable, atol: float) -> None:
    hf_model, model = build_pair(device)
    gen = torch.Generator().manual_seed(2)
    seq_lens = [sum(n for step in SCHEDULE for r, n in step if r == req) for req in (0, 1)]
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen).to(device) for n in seq_lens]
    perm = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    needed = [-(-n // BLOCK_SIZE) for n in seq_lens]
    block_tables = [perm[: needed[0]], perm[needed[0] : sum(needed)]]
    for module in model.modules():
        if isinstance(module, Attention):
            spec = module.kv_cache_spec()
            module.kv_cache = torch.full(
                (2, NUM_BLOCKS, BLOCK_SIZE, spec.num_kv_heads, spec.head_size), float("nan"), device=device
            )
    expected = [hf_logits(hf_model, seq) for seq in sequences]
    done = [0, 0]
    for step in SCHEDULE:
        metadata = make_attn_metadata(
            [n for _, n in step], [done[r] + n for r, n in step], [block_tables[r] for r, _ in step], BLOCK_SIZE,
            device,
        )
        input_ids = torch.cat([sequences[r][done[r] : done[r] + n] for r, n in step])
        positions = torch.cat([torch.arange(done[r], done[r] + n, device=device) for r, n in step])
        with torch.no_grad(), set_forward_context(metadata):
            logits = model.compute_logits(model(input_ids, positions))
        want = torch.cat([expected[r][done[r] : done[r] + n] for r, n in step])
        torch.testing.assert_close(logits, want, atol=atol, rtol=0)
        for r, n in step:
            done[r] += n


@pytest.fixture(scope="module")
def gemma3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gemma3_text")
    model = transformers.Gemma3ForCausalLM(tiny_gemma3_text_config()).eval()
    randomize_(model, norm_mean=0.0)
    model.save_pretrained(path)
    return path


PROMPTS = [[5, 17, 99, 23, 8, 40, 41, 42, 43, 44, 45], list(range(30, 60)), [300, 7]]


def test_llm_greedy_tokens_equal_transformers(gemma3_checkpoint: Path) -> None:
    llm = LLM(str(gemma3_checkpoint), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 22)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(gemma3_checkpoint, PROMPTS, 10)


def test_llm_prompt_logprobs_match_transformers(gemma3_checkpoint: Path) -> None:
    llm = LLM(str(gemma3_checkpoint), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 22)
    prompt = PROMPTS[1]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3)
    output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(gemma3_checkpoint, dtype=torch.float32).eval()
    reference = torch.log_softmax(hf_logits(hf_model, torch.tensor(prompt)), dim=-1)
    for position in range(1, len(prompt)):
        for token_id, logprob in output.prompt_logprobs[position].items():
            assert math.isclose(logprob.logprob, reference[position - 1, token_id].item(), abs_tol=ATOL)


def test_attention_softcapping_is_rejected_with_the_fix() -> None:
    config = tiny_gemma3_text_config(attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0.*null"):
        get_model_class("Gemma3ForCausalLM")(config)
