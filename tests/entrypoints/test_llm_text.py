"""End to end with a real (tiny, trained) BPE tokenizer: text, stop strings, chat, logprobs,
seeds, and model resolution from a hub id."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import make_tiny_chat_checkpoint

from pagedllm import LLM, SamplingParams



@pytest.fixture(scope="module")
def text_model(tmp_path_factory, tiny_bpe_tokenizer_dir) -> Path:
    return make_tiny_chat_checkpoint(tmp_path_factory.mktemp("text_model") / "model", tiny_bpe_tokenizer_dir)


@pytest.fixture(scope="module")
def llm(text_model) -> LLM:
    return LLM(str(text_model), dtype="float32", kv_cache_memory_bytes=1 << 24)


PROMPTS = ["hello world", "the paged attention model", "café naïve 中文 🙂", "stop"]


def test_text_is_the_decoded_tokens_and_prompt_is_kept(llm):
    tokenizer = llm.get_tokenizer()
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.prompt == prompt
        assert output.prompt_token_ids == tokenizer.encode(prompt)
        completion = output.outputs[0]
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.finish_reason == "length" and completion.stop_reason is None


def test_stop_string_cuts_the_text_and_finishes_with_stop(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0].text
    assert len(full) > 6
    stop = full[3:6]
    stopped = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert stopped.text == full[: full.index(stop)]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    kept = llm.generate(
        PROMPTS[1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_stop_token_ids_and_eos_finish_with_stop(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    tokens = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = tokens[4]
    stopped = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == tokens[: tokens.index(stop_id) + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id
    held = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id], min_tokens=tokens.index(stop_id) + 2),
        use_tqdm=False,
    )[0].outputs[0]
    assert stop_id not in held.token_ids[: tokens.index(stop_id) + 2]


def test_logprobs_are_transformers_log_softmax_of_the_generated_tokens(llm, text_model):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    output = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    completion = output.outputs[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([output.prompt_token_ids + completion.token_ids])
        reference = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    start = len(output.prompt_token_ids) - 1
    total = 0.0
    for step, (token_id, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = reference[start + step]
        assert len(entry) == 3 + (token_id not in row.topk(3).indices.tolist())
        assert entry[token_id].rank == 1  # greedy picks the top token
        for candidate, logprob in entry.items():
            assert math.isclose(logprob.logprob, row[candidate].item(), abs_tol=1e-4)
            assert logprob.decoded_token == llm.get_tokenizer().decode([candidate])
        total += entry[token_id].logprob
    assert math.isclose(completion.cumulative_logprob, total, abs_tol=1e-5)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm, text_model):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], seeded, use_tqdm=False)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [unseeded, seeded, unseeded], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=124, max_tokens=12, ignore_eos=True)
    assert llm.generate(PROMPTS[0], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone
    # The engine seed makes unseeded sampling reproducible across engines.
    first = LLM(str(text_model), dtype="float32", kv_cache_memory_bytes=1 << 22, seed=7)
    second = LLM(str(text_model), dtype="float32", kv_cache_memory_bytes=1 << 22, seed=7)
    runs = [[o.outputs[0].token_ids for o in engine.generate(PROMPTS, unseeded, use_tqdm=False)] for engine in (first, second)]
    assert runs[0] == runs[1]


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "hello world"}]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    chat_output = llm.chat(messages, params, use_tqdm=False)[0]
    rendered = "<s>user: hello world\n<s>assistant:"
    assert chat_output.prompt == rendered
    expected = llm.generate({"prompt_token_ids": llm.get_tokenizer().encode(rendered, add_special_tokens=False)}, params, use_tqdm=False)
    assert chat_output.outputs[0].token_ids == expected[0].outputs[0].token_ids
    two = llm.chat([messages, [{"role": "user", "content": "stop"}]], params, use_tqdm=False)
    assert len(two) == 2


def test_skip_tokenizer_init_returns_tokens_without_text(text_model):
    engine = LLM(str(text_model), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 22)
    assert engine.get_tokenizer() is None
    output = engine.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert output.outputs[0].text == "" and len(output.outputs[0].token_ids) == 3


def test_hub_id_is_resolved_offline_from_the_cache(text_model, tmp_path, monkeypatch, llm):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny-org--tiny-qwen3"
    shutil.copytree(text_model, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_llm = LLM("tiny-org/tiny-qwen3", download_dir=str(tmp_path), dtype="float32", kv_cache_memory_bytes=1 << 22)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert hub_llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids == \
        llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        LLM("tiny-org/absent", download_dir=str(tmp_path))
    # The cache as the environment names it when the LLM is made (a monkeypatch after import).
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    env_llm = LLM("tiny-org/tiny-qwen3", dtype="float32", kv_cache_memory_bytes=1 << 22)
    assert env_llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids == \
        llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    env_llm.shutdown()


def test_a_request_whose_output_fails_ends_with_error_while_the_others_finish(llm, monkeypatch):
    from pagedllm.engine import output_processor

    original = output_processor.OutputProcessor._append_tokens

    def breaks_for_seed_666(self, completion, output):
        if completion.params.seed == 666:
            raise RuntimeError("detokenizer broke")
        return original(self, completion, output)

    monkeypatch.setattr(output_processor.OutputProcessor, "_append_tokens", breaks_for_seed_666)
    bad = SamplingParams(max_tokens=4, seed=666, ignore_eos=True)
    good = SamplingParams(max_tokens=4, ignore_eos=True)
    outputs = llm.generate(PROMPTS[:3], [good, bad, good], use_tqdm=False)
    assert outputs[1].outputs[0].finish_reason == "error" and "detokenizer broke" in outputs[1].error
    for output in (outputs[0], outputs[2]):
        assert output.outputs[0].finish_reason == "length" and len(output.outputs[0].token_ids) == 4
    assert not llm.llm_engine.has_unfinished_requests()


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_TEMPLATE = (
    "{% if tools %}<s>tools:{% for tool in tools %} {{ tool['function']['name'] }}{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def test_chat_passes_tools_to_the_template(llm):
    messages = [{"role": "user", "content": "hello world"}]
    prompt = llm.preprocess_chat(messages, chat_template=TOOL_TEMPLATE, tools=TOOLS)[0]["prompt"]
    assert prompt == "<s>tools: get_weather\n<s>user: hello world\n<s>assistant:"
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    output = llm.chat(messages, params, use_tqdm=False, chat_template=TOOL_TEMPLATE, tools=TOOLS)[0]
    assert output.prompt == prompt
    assert llm.chat(messages, params, use_tqdm=False, chat_template=TOOL_TEMPLATE)[0].prompt.startswith("<s>user:")


def test_continue_final_message_needs_add_generation_prompt_false(llm):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the paged"}]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt are not compatible"):
        llm.chat(messages, params, use_tqdm=False, continue_final_message=True)
    output = llm.chat(messages, params, use_tqdm=False, continue_final_message=True, add_generation_prompt=False)[0]
    assert output.prompt == "<s>user: hello\n<s>assistant: the paged"


def test_chat_template_content_format_and_lora_request(llm):
    parts_template = (
        "{% for m in messages %}<s>{{ m['role'] }}:{% for part in m['content'] %} {{ part['text'] }}{% endfor %}"
        "{{ '\\n' }}{% endfor %}<s>assistant:"
    )
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}]
    # "auto" sees the loop over the content and hands the template the parts; "openai" forces it.
    for content_format in ("auto", "openai"):
        prompts = llm.preprocess_chat(messages, parts_template, chat_template_content_format=content_format)
        assert prompts[0]["prompt"] == "<s>user: hello world\n<s>assistant:"
    # A string template gets the text parts joined by newlines, as before.
    assert llm.preprocess_chat(messages)[0]["prompt"] == "<s>user: hello\nworld\n<s>assistant:"
    assert llm.preprocess_chat(messages, chat_template_content_format="string")[0]["prompt"].startswith("<s>user: hello\nworld")
    with pytest.raises(ValueError, match="chat_template_content_format='xml'"):
        llm.preprocess_chat(messages, chat_template_content_format="xml")
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    assert llm.chat(messages, params, use_tqdm=False, lora_request=None)
    with pytest.raises(ValueError, match="LoRA is not supported"):
        llm.chat(messages, params, use_tqdm=False, lora_request=object())


def test_token_id_lists_are_prompts_and_tokenization_kwargs_reach_the_tokenizer(llm):
    tokenizer = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = [tokenizer.encode(p) for p in PROMPTS[:2]]
    expected = llm.generate([{"prompt_token_ids": i} for i in ids], greedy, use_tqdm=False)
    [single] = llm.generate(ids[0], greedy, use_tqdm=False)  # one prompt of token ids, as vLLM takes it
    batch = llm.generate(ids, greedy, use_tqdm=False)
    assert single.prompt_token_ids == ids[0] and single.outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in batch] == [o.outputs[0].token_ids for o in expected]

    text = "the paged attention model"
    [truncated] = llm.generate(text, greedy, use_tqdm=False, tokenization_kwargs={"truncation": True, "max_length": 2})
    assert truncated.prompt_token_ids == tokenizer.encode(text)[:2]
    with pytest.raises(ValueError, match="tokenization_kwargs"):
        llm.generate(text, greedy, use_tqdm=False, tokenization_kwargs="truncation")


def test_delta_params_still_give_whole_outputs(llm):
    from pagedllm import RequestOutputKind

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    [delta] = llm.generate(PROMPTS[0], params, use_tqdm=False)
    [whole] = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert delta.outputs[0].token_ids == whole.outputs[0].token_ids and delta.outputs[0].text == whole.outputs[0].text
    assert params.output_kind == RequestOutputKind.DELTA  # the caller's object is left alone
