"""Qwen2-VL and Qwen2.5-VL against transformers on tiny random weights, float32 on CPU:
greedy tokens equal transformers' argmax decoding with one image, two images and a video, and
prompt logprobs agree to 1e-4 (absolute; float32 sums over 64-wide layers differ by ~1e-6)."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tiny_vl_models import (  # noqa: F401 (fixture)
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    hf_greedy_vl,
    processed_inputs,
    random_image,
    tiny_vl_checkpoints,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
MAX_TOKENS = 6
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family_llm(request, tiny_vl_checkpoints):
    path = tiny_vl_checkpoints[request.param]
    llm = LLM(str(path), dtype="float32", max_model_len=512, enforce_eager=True)
    yield path, llm
    llm.shutdown()


def _greedy(max_tokens: int = MAX_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def test_one_image_matches_transformers(family_llm):
    path, llm = family_llm
    image = random_image(60, 90, seed=1)
    prompt = f"hello {IMAGE_PLACEHOLDER} what is this"
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, _greedy(prompt_logprobs=0), use_tqdm=False)[0]
    token_ids, tensors = processed_inputs(llm, prompt, {"image": image})
    expected, reference_logprobs = hf_greedy_vl(path, token_ids, tensors, MAX_TOKENS)
    assert list(out.outputs[0].token_ids) == expected
    assert out.prompt_token_ids == token_ids
    ours = [next(iter(entry.values())).logprob for entry in out.prompt_logprobs[1:]]
    theirs = reference_logprobs[torch.arange(len(token_ids) - 1), torch.tensor(token_ids[1:])]
    torch.testing.assert_close(torch.tensor(ours), theirs, atol=LOGPROB_ATOL, rtol=0)


def _assert_greedy_equals_transformers(family_llm, prompt: str, mm_data: dict) -> None:
    path, llm = family_llm
    out = llm.generate({"prompt": prompt, "multi_modal_data": mm_data}, _greedy(), use_tqdm=False)[0]
    token_ids, tensors = processed_inputs(llm, prompt, mm_data)
    expected, _ = hf_greedy_vl(path, token_ids, tensors, MAX_TOKENS)
    assert list(out.outputs[0].token_ids) == expected


def test_two_images_match_transformers(family_llm):
    images = [random_image(84, 56, seed=2), random_image(40, 120, seed=3)]
    _assert_greedy_equals_transformers(family_llm, f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER} compare them",
                                       {"image": images})


def test_video_matches_transformers(family_llm):
    frames = [random_image(56, 56, seed=10 + i) for i in range(4)]
    _assert_greedy_equals_transformers(family_llm, f"watch {VIDEO_PLACEHOLDER} now", {"video": frames})


@pytest.mark.parametrize("prompt", [f"watch {VIDEO_PLACEHOLDER} now", VIDEO_PLACEHOLDER])
def test_a_video_longer_than_the_text_after_it_matches_transformers(family_llm, prompt):
    """Eight small frames: the video's time positions run past the positions of the text that
    follows it, so decoding must continue from the last prompt token, not from the largest."""
    frames = [random_image(56, 56, seed=40 + i) for i in range(8)]
    _assert_greedy_equals_transformers(family_llm, prompt, {"video": frames})


def test_batch_mixing_text_and_images_gives_each_alone(family_llm):
    _, llm = family_llm
    prompts = [
        "just some text here",
        {"prompt": f"look {IMAGE_PLACEHOLDER} there", "multi_modal_data": {"image": random_image(70, 50, seed=4)}},
        {"prompt": f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER} two",
         "multi_modal_data": {"image": [random_image(30, 30, seed=5), random_image(90, 40, seed=6)]}},
    ]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)]
    alone = [llm.generate(p, _greedy(), use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


def test_synchronous_scheduling_gives_the_async_tokens(family_llm):
    """The async step loop takes decode input ids from the device while image rows of a
    prefill chunk get merged embeddings in the same step; without it both come from the host.
    A short first prompt decodes while the later image prompts prefill in small chunks."""
    path, llm = family_llm
    prompts = [
        "hi",
        {"prompt": f"look {IMAGE_PLACEHOLDER} there", "multi_modal_data": {"image": random_image(70, 50, seed=8)}},
        {"prompt": f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER}",
         "multi_modal_data": {"image": [random_image(30, 60, seed=9), random_image(50, 50, seed=10)]}},
    ]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)]
    sync = LLM(str(path), dtype="float32", max_model_len=512, async_scheduling=False, max_num_batched_tokens=8,
               enforce_eager=True)
    assert [o.outputs[0].token_ids for o in sync.generate(prompts, _greedy(), use_tqdm=False)] == expected
    sync.shutdown()
    chunked_async = LLM(str(path), dtype="float32", max_model_len=512, max_num_batched_tokens=8, enforce_eager=True)
    assert [o.outputs[0].token_ids for o in chunked_async.generate(prompts, _greedy(), use_tqdm=False)] == expected
    chunked_async.shutdown()


def test_chunked_prefill_splits_an_image_and_encodes_it_once(tiny_vl_checkpoints):
    path = tiny_vl_checkpoints["qwen2_5_vl"]
    image = random_image(84, 84, seed=7)
    prompt = {"prompt": f"a {IMAGE_PLACEHOLDER} b", "multi_modal_data": {"image": image}}
    whole = LLM(str(path), dtype="float32", max_model_len=512, enable_prefix_caching=False)
    expected = whole.generate(prompt, _greedy(), use_tqdm=False)[0].outputs[0].token_ids
    whole.shutdown()
    chunked = LLM(str(path), dtype="float32", max_model_len=512, max_num_batched_tokens=4, enable_prefix_caching=False)
    out = chunked.generate(prompt, _greedy(), use_tqdm=False)[0]
    runner = chunked.llm_engine.executor.worker.model_runner.mm_runner
    assert len(out.prompt_token_ids) > 3 * 4  # the image's 9 tokens span three chunks
    assert out.outputs[0].token_ids == expected
    assert runner.num_encoder_calls == 1
    chunked.shutdown()


def test_pre_4_52_checkpoint_names_load(tiny_vl_checkpoints, tmp_path):
    """Hub checkpoints saved before transformers 4.52 name tensors visual.* and model.layers.*."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = tiny_vl_checkpoints["qwen2_vl"]
    legacy = tmp_path / "legacy"
    shutil.copytree(source, legacy)
    renamed = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        name = name.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        renamed[name] = tensor
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    prompt = {"prompt": f"a {IMAGE_PLACEHOLDER} b", "multi_modal_data": {"image": random_image(50, 70, seed=8)}}
    outputs = []
    for path in (source, legacy):
        llm = LLM(str(path), dtype="float32", max_model_len=256)
        outputs.append(llm.generate(prompt, _greedy(), use_tqdm=False)[0].outputs[0].token_ids)
        llm.shutdown()
    assert outputs[0] == outputs[1]


def test_beam_search_keeps_the_images(family_llm):
    """Each beam step sends the prompt's items along: one beam is greedy decoding."""
    from pagedllm import BeamSearchParams

    _, llm = family_llm
    prompt = {"prompt": f"look {IMAGE_PLACEHOLDER} there", "multi_modal_data": {"image": random_image(70, 50, seed=11)}}
    [beams] = llm.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=4, ignore_eos=True))
    greedy = llm.generate(prompt, _greedy(4), use_tqdm=False)[0].outputs[0].token_ids
    assert beams.sequences[0].tokens[-4:] == list(greedy)
    assert beams.sequences[0].multi_modal_data is prompt["multi_modal_data"]
