"""Multi-modal inputs as vLLM takes them: limits, placeholder checks, processor kwargs,
the processed-input cache, chat content parts, and text-only mode."""

from __future__ import annotations

import base64
import io
import shutil

import pytest
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.engine.request import Request
from tiny_vl_models import IMAGE_PLACEHOLDER, random_image, tiny_vl_checkpoints  # noqa: F401 (fixture)

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _image_prompt(num_placeholders: int, num_images: int, seed: int = 0, **extra) -> dict:
    return {
        "prompt": "look " + IMAGE_PLACEHOLDER * num_placeholders + " now",
        "multi_modal_data": {"image": [random_image(56, 84, seed + i) for i in range(num_images)]},
        **extra,
    }


def _big_image_prompt(seed: int) -> dict:
    # 200x200 is 16 placeholder tokens: with the text, the prompt fills two 16-token blocks.
    return {"prompt": "look " + IMAGE_PLACEHOLDER + " and tell me what is in the picture please now",
            "multi_modal_data": {"image": random_image(200, 200, seed)}}


def test_more_items_than_the_limit_is_a_value_error_naming_modality_and_limit(llm):
    with pytest.raises(ValueError, match=r"3 image item\(s\).*at most 2.*limit_mm_per_prompt"):
        llm.generate(_image_prompt(3, 3), GREEDY, use_tqdm=False)


def test_limit_zero_turns_a_modality_off(llm):
    frames = [random_image(28, 28, 0)] * 2
    with pytest.raises(ValueError, match=r"video.*at most 0.*turns the modality off"):
        llm.generate({"prompt": "<|vision_start|><|video_pad|><|vision_end|>", "multi_modal_data": {"video": frames}},
                     GREEDY, use_tqdm=False)


def test_placeholders_and_items_must_match_in_number(llm):
    with pytest.raises(ValueError, match=r"2 image placeholder\(s\) but 1 image item"):
        llm.generate(_image_prompt(2, 1), GREEDY, use_tqdm=False)


def test_a_bad_request_leaves_the_others_running(llm):
    engine = llm.llm_engine
    engine.add_request("good-0", _image_prompt(1, 1), GREEDY)
    with pytest.raises(ValueError, match="limit_mm_per_prompt"):
        engine.add_request("bad", _image_prompt(3, 3), GREEDY)
    engine.add_request("good-1", "plain text", GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert sorted(finished) == ["good-0", "good-1"]
    assert all(len(o.outputs[0].token_ids) == 4 for o in finished.values())


def test_processor_kwargs_change_the_number_of_vision_tokens(llm, tiny_vl_checkpoints):
    image = random_image(200, 200, seed=9)
    prompt = {"prompt": IMAGE_PLACEHOLDER, "multi_modal_data": {"image": image}}
    default = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    smaller = llm.generate({**prompt, "mm_processor_kwargs": {"max_pixels": 28 * 28 * 4}}, GREEDY, use_tqdm=False)[0]
    # 200x200 at the checkpoint's max_pixels (28*28*16) is 4x4 merged tokens; at 28*28*4, 2x2.
    assert len(default.prompt_token_ids) - 2 == 16
    assert len(smaller.prompt_token_ids) - 2 == 4
    engine_level = LLM(str(tiny_vl_checkpoints["qwen2_vl"]), dtype="float32", max_model_len=512,
                       mm_processor_kwargs={"max_pixels": 28 * 28 * 4})
    assert len(engine_level.generate(prompt, GREEDY, use_tqdm=False)[0].prompt_token_ids) - 2 == 4
    engine_level.shutdown()


def test_unknown_processor_kwarg_is_a_value_error(llm):
    with pytest.raises(ValueError, match="max_dynamic_patch.*min_pixels"):
        llm.generate(_image_prompt(1, 1, mm_processor_kwargs={"max_dynamic_patch": 4}), GREEDY, use_tqdm=False)


def test_a_repeated_image_is_processed_once(llm):
    processor = llm.llm_engine.input_processor.mm_processor
    before = processor.num_processed_items
    prompt = _image_prompt(1, 1, seed=123)
    first = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    second = llm.generate(_image_prompt(1, 1, seed=123), GREEDY, use_tqdm=False)[0]
    assert processor.num_processed_items == before + 1
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    # Other processor kwargs are another cache entry.
    llm.generate(_image_prompt(1, 1, seed=123, mm_processor_kwargs={"max_pixels": 28 * 28 * 4}), GREEDY, use_tqdm=False)
    assert processor.num_processed_items == before + 2


def test_input_cache_off_with_zero_gib(tiny_vl_checkpoints, monkeypatch):
    monkeypatch.setenv("VLLM_MM_INPUT_CACHE_GIB", "0")
    engine = LLM(str(tiny_vl_checkpoints["qwen2_vl"]), dtype="float32", max_model_len=512)
    processor = engine.llm_engine.input_processor.mm_processor
    for _ in range(2):
        engine.generate(_image_prompt(1, 1, seed=5), GREEDY, use_tqdm=False)
    assert processor.num_processed_items == 2 and len(processor.cache) == 0
    engine.shutdown()


def test_different_images_at_the_same_positions_hash_differently(llm):
    processor = llm.llm_engine.input_processor
    kv = llm.llm_engine.scheduler.kv_cache_manager
    hashes = []
    for seed in (1, 2, 1):
        processed = processor.process(_big_image_prompt(seed), GREEDY)
        request = Request(f"hash-{seed}-{len(hashes)}", processed.prompt_token_ids, GREEDY, None, 4)
        request.mm_features = processed.mm_inputs.features
        hashes.append(kv._block_hashes(request, 2))
        kv.free(request)
    assert hashes[0] == hashes[2]
    assert hashes[0][0] != hashes[1][0]


def test_prefix_cache_reuses_the_same_image_but_not_another(llm):
    stats = llm.llm_engine.scheduler.kv_cache_manager.prefix_cache_stats

    def run(seed: int) -> tuple[list[int], int]:
        hits_before = stats.num_hit_tokens
        output = llm.generate(_big_image_prompt(seed), GREEDY, use_tqdm=False)[0]
        assert len(output.prompt_token_ids) > 32
        return output.outputs[0].token_ids, stats.num_hit_tokens - hits_before

    first, _ = run(40)
    again, hits_again = run(40)
    _, hits_other = run(41)
    assert hits_again >= 32 and again == first
    assert hits_other == 0


def test_chat_content_parts_equal_the_placeholder_prompt(llm, tmp_path):
    image = random_image(56, 56, seed=77)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    image.save(tmp_path / "picture.png")
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    outputs = []
    for part in (
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "image_url", "image_url": {"url": f"file://{tmp_path / 'picture.png'}"}},
        {"type": "image_pil", "image_pil": image},
    ):
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "what is it"}]}]
        outputs.append(llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template)[0])
    direct = llm.generate({"prompt": f"user: {IMAGE_PLACEHOLDER}\nwhat is it\nassistant:",
                           "multi_modal_data": {"image": image}}, GREEDY, use_tqdm=False)[0]
    for output in outputs:
        assert output.prompt_token_ids == direct.prompt_token_ids
        assert output.outputs[0].token_ids == direct.outputs[0].token_ids


def test_text_only_mode_skips_the_vision_tower(tiny_vl_checkpoints, tmp_path, caplog):
    source = tiny_vl_checkpoints["qwen2_5_vl"]
    stripped = tmp_path / "no_vision"
    shutil.copytree(source, stripped)
    tensors = load_file(stripped / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".visual." not in k and not k.startswith("visual.")},
              stripped / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("INFO"):
        text_only = LLM(str(stripped), dtype="float32", max_model_len=512, limit_mm_per_prompt={"image": 0, "video": 0})
    assert "vision tower is not built" in caplog.text
    model = text_only.llm_engine.executor.worker.model_runner.model
    assert model.model.visual is None
    with pytest.raises(ValueError, match="at most 0"):
        text_only.generate(_image_prompt(1, 1), GREEDY, use_tqdm=False)
    got = text_only.generate("some plain text", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    text_only.shutdown()
    full = LLM(str(source), dtype="float32", max_model_len=512)
    assert full.generate("some plain text", GREEDY, use_tqdm=False)[0].outputs[0].token_ids == got
    full.shutdown()


def test_profiling_encodes_the_largest_allowed_items(tiny_vl_checkpoints):
    def profiled_rows(**kwargs) -> list[int]:
        engine = LLM(str(tiny_vl_checkpoints["qwen2_vl"]), dtype="float32", max_model_len=512, **kwargs)
        runner = engine.llm_engine.executor.worker.model_runner
        rows = [t.shape[0] for t in runner.mm_runner.profile_encoder(engine.llm_engine.config)]
        engine.shutdown()
        return rows

    # Largest image at max_pixels 28*28*16: 16 tokens; a 4-token budget still encodes one.
    assert profiled_rows(limit_mm_per_prompt={"image": 3, "video": 0}) == [16, 16, 16]
    assert profiled_rows(limit_mm_per_prompt={"image": 3, "video": 0}, mm_processor_kwargs={"max_pixels": 28 * 28 * 4}) == [4, 4, 4]
    assert profiled_rows(limit_mm_per_prompt={"image": 5, "video": 0}, max_num_batched_tokens=32) == [16, 16]
    assert profiled_rows(limit_mm_per_prompt={"image": 0, "video": 0}) == []


def test_limits_are_validated_at_start_up(tiny_vl_checkpoints, caplog):
    path = str(tiny_vl_checkpoints["qwen2_vl"])
    with pytest.raises(ValueError, match=r"limit_mm_per_prompt\['image'\] must be an integer >= 0"):
        LLM(path, limit_mm_per_prompt={"image": -1})
    with pytest.raises(ValueError, match="needs a 'count'"):
        LLM(path, limit_mm_per_prompt={"image": {"width": 64}})
    # vLLM's forms: {"count": n} (with its dummy-size keys), and a limit for a modality the model
    # lacks, which is ignored with a warning.
    with caplog.at_level("WARNING"):
        engine = LLM(path, dtype="float32", max_model_len=256,
                     limit_mm_per_prompt={"image": {"count": 1, "width": 64, "height": 64}, "audio": 0})
    assert "limit_mm_per_prompt['audio'] is ignored" in caplog.text
    config = engine.llm_engine.model_config.multimodal_config
    assert config.limit_of("image") == 1 and "audio" not in config.limit_per_prompt
    with pytest.raises(ValueError, match="at most 1 image"):
        engine.generate({"prompt": f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER}",
                         "multi_modal_data": {"image": [random_image(28, 28, 0)] * 2}}, GREEDY, use_tqdm=False)
    engine.shutdown()


def test_text_model_rejects_multi_modal_data(tiny_checkpoints):
    engine = LLM(str(tiny_checkpoints["qwen2"]), dtype="float32", max_model_len=256)
    with pytest.raises(ValueError, match="text-only model"):
        engine.generate({"prompt": "hi", "multi_modal_data": {"image": random_image(28, 28, 0)}}, GREEDY, use_tqdm=False)
    engine.shutdown()


def test_scheduler_budgets_encoder_work_per_step(tiny_vl_checkpoints):
    # 24 tokens per step: the chunk [0, 24) would start both 16-token images (32 encoder
    # tokens), so it stops where the second begins.
    engine = LLM(str(tiny_vl_checkpoints["qwen2_vl"]), dtype="float32", max_model_len=512, max_num_batched_tokens=24,
                 enable_prefix_caching=False)
    prompt = {"prompt": IMAGE_PLACEHOLDER + IMAGE_PLACEHOLDER + " two",
              "multi_modal_data": {"image": [random_image(200, 200, 1), random_image(200, 200, 2)]}}
    scheduler = engine.llm_engine.scheduler
    processed = engine.llm_engine.process_input(prompt, GREEDY)
    engine.llm_engine.add_request("budget", processed, GREEDY)
    first_step = scheduler.schedule()
    [num_scheduled] = first_step.num_scheduled_tokens.values()  # the scheduler's id is "budget-<admission>"
    assert num_scheduled == processed.mm_inputs.features[1].placeholder.offset
    engine.llm_engine.abort_request("budget")
    engine.shutdown()


def test_text_only_mode_does_not_read_the_vision_matrices(tiny_vl_checkpoints):
    path = tiny_vl_checkpoints["qwen2_vl"]
    tensors = load_file(path / "model.safetensors")
    vision_matrix_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if ".visual." in k and t.ndim >= 2)
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    engine = LLM(str(path), dtype="float32", max_model_len=512, limit_mm_per_prompt={"image": 0, "video": 0})
    bytes_read = engine.llm_engine.executor.collective_rpc("loaded_weight_bytes")[0]
    engine.shutdown()
    assert bytes_read <= total_bytes - vision_matrix_bytes
