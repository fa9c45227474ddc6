"""Qwen2-VL family on a GPU: image prompts with CUDA graphs for decode give transformers'
greedy tokens, and the profiled peak grows with max_pixels and vanishes with limit 0.
Run with `pytest -m gpu tests/gpu/test_multimodal_gpu.py` on a GPU machine."""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_vl_models import IMAGE_PLACEHOLDER, make_tiny_vl_checkpoint, random_image, token_type_kwargs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _release(llm) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_gpu_image_batch_with_cuda_graphs_equals_transformers(tmp_path, tiny_bpe_tokenizer_dir, family):
    import transformers

    from pagedllm import LLM, SamplingParams

    path = make_tiny_vl_checkpoint(tmp_path / family, tiny_bpe_tokenizer_dir, family)
    llm = LLM(str(path), dtype="float32", max_model_len=512)
    runner = llm.llm_engine.executor.worker.model_runner
    assert runner.cuda_graphs is not None
    images = [random_image(40 + 12 * i, 90 - 8 * i, seed=i) for i in range(4)]
    prompts = [{"prompt": f"look {IMAGE_PLACEHOLDER} at this", "multi_modal_data": {"image": img}} for img in images]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts + ["text only prompt"], params, use_tqdm=False)
    processed = [llm.llm_engine.process_input(p, params) for p in prompts]
    _release(llm)

    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).cuda().eval()
    for output, item in zip(outputs, processed):
        ids = torch.tensor([item.prompt_token_ids], device="cuda")
        feature = item.mm_inputs.features[0]
        with torch.no_grad():
            ref = model.generate(input_ids=ids, **token_type_kwargs(model, ids), max_new_tokens=8, do_sample=False,
                                 eos_token_id=None, pad_token_id=0,
                                 **{k: v.cuda() for k, v in feature.data.items()})
        assert list(output.outputs[0].token_ids) == ref[0, ids.shape[1]:].tolist()


def test_gpu_profiled_peak_follows_max_pixels_and_limits(tmp_path, tiny_bpe_tokenizer_dir):
    from pagedllm import LLM

    path = make_tiny_vl_checkpoint(tmp_path / "vl", tiny_bpe_tokenizer_dir, "qwen2_5_vl")

    def peak(**kwargs) -> int:
        # The profile taken at start-up (profile_run needs the KV cache not to exist yet).
        llm = LLM(str(path), dtype="float32", max_model_len=1024, max_num_batched_tokens=256, enforce_eager=True, **kwargs)
        result = llm.llm_engine.executor.worker.memory_profile.peak_activation_bytes
        _release(llm)
        return result

    large = peak(limit_mm_per_prompt={"image": 1, "video": 0}, mm_processor_kwargs={"max_pixels": 28 * 28 * 2048})
    small = peak(limit_mm_per_prompt={"image": 1, "video": 0}, mm_processor_kwargs={"max_pixels": 28 * 28 * 64})
    off = peak(limit_mm_per_prompt={"image": 0, "video": 0})
    assert large > small >= off
