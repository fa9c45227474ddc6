"""The LLM methods vLLM users and RL frameworks call: beam_search (against transformers),
enqueue / wait_for_completion, collective_rpc, apply_model, sleep / wake_up, get_metrics,
start_profile / stop_profile, reset_prefix_cache."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from tiny_models import make_tiny_checkpoint

from pagedllm import LLM, BeamSearchParams, SamplingParams
from pagedllm.engine.metrics import Counter, Histogram

PROMPTS = [[5, 17, 42, 7], [9, 3, 100, 200, 11]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("methods") / "model", "llama", seed=4)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(str(model_dir), dtype="float32", kv_cache_memory_bytes=1 << 22, skip_tokenizer_init=True)


def _greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.mark.parametrize("beam_width, length_penalty", [(3, 1.0), (2, 0.5)])
def test_beam_search_equals_transformers(llm, model_dir, beam_width, length_penalty):
    max_tokens = 5
    outputs = llm.beam_search(
        [{"prompt_token_ids": p} for p in PROMPTS],
        BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens, ignore_eos=True, length_penalty=length_penalty),
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, output in zip(PROMPTS, outputs):
        config = transformers.GenerationConfig(
            num_beams=beam_width, num_return_sequences=beam_width, max_new_tokens=max_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0, length_penalty=length_penalty, early_stopping=False,
        )
        with torch.no_grad():
            expected = model.generate(
                torch.tensor([prompt]), generation_config=config, return_dict_in_generate=True, output_scores=True
            )
        assert [s.tokens for s in output.sequences] == expected.sequences.tolist()
        # Same-length beams: HF scores sum / new_tokens ** lp, vLLM sum / all_tokens ** lp.
        hf_sums = expected.sequences_scores * max_tokens**length_penalty
        ours = torch.tensor([s.cum_logprob for s in output.sequences])
        torch.testing.assert_close(ours, hf_sums.float(), rtol=0, atol=1e-4)
        assert all(len(s.logprobs) == max_tokens for s in output.sequences)


def test_enqueue_then_wait_for_completion_equals_generate(llm):
    expected = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy(), use_tqdm=False)
    ids = llm.enqueue([{"prompt_token_ids": p} for p in PROMPTS], _greedy())
    # A generate call in between runs the engine; the enqueued results are kept for later.
    llm.generate({"prompt_token_ids": PROMPTS[0]}, _greedy(2), use_tqdm=False)
    outputs = llm.wait_for_completion(use_tqdm=False)
    assert [o.request_id for o in outputs] == ids
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]


def test_collective_rpc_and_apply_model(llm):
    assert llm.collective_rpc("get_pid") == [os.getpid()]
    assert llm.collective_rpc(lambda worker, offset: worker.rank + offset, args=(10,)) == [10]
    num_params = llm.apply_model(lambda model: sum(p.numel() for p in model.parameters()))
    assert num_params[0] > 0 and isinstance(num_params, list)


def test_llm_engine_takes_vllm_engine_args_and_has_its_accessors(model_dir):
    from pagedllm import EngineArgs
    from pagedllm.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs(model=str(model_dir), skip_tokenizer_init=True, dtype="float32",
                                                   kv_cache_memory_bytes=1 << 20, async_scheduling=False),
                                        usage_context=None)
    assert engine.vllm_config is engine.config
    assert engine.model_config is engine.config.model_config and engine.cache_config is engine.config.cache_config
    assert engine.cache_config.num_gpu_blocks == engine.engine_core.num_kv_blocks > 0
    assert not engine.vllm_config.scheduler_config.async_scheduling
    assert engine.vllm_config.parallel_config.disable_custom_all_reduce is False
    engine.add_request("one", {"prompt_token_ids": PROMPTS[0]}, SamplingParams(n=2, max_tokens=2))
    engine.add_request("two", {"prompt_token_ids": PROMPTS[1]}, SamplingParams(max_tokens=2))
    assert engine.get_num_unfinished_requests() == 2
    engine.abort_request("two")
    assert engine.get_num_unfinished_requests() == 1
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.get_num_unfinished_requests() == 0
    assert engine.collective_rpc("get_pid") == [os.getpid()]
    with pytest.raises(TypeError, match="max_num_seqs"):
        LLMEngine.from_engine_args(EngineArgs(model=str(model_dir)), max_num_seqs=4)
    engine.shutdown()


def test_vllm_options_of_absent_features_are_accepted_when_they_leave_them_off(model_dir):
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory_bytes=1 << 20, skip_tokenizer_init=True,
              enable_lora=False, pipeline_parallel_size=1, speculative_config=None, scheduling_policy="fcfs",
              task="generate", model_impl="auto")
    assert llm.model_config is llm.llm_engine.config.model_config and llm.model_config.max_model_len == 512
    llm.shutdown()
    with pytest.raises(ValueError, match="enable_lora=True is not supported .*LoRA.*pass False"):
        LLM(str(model_dir), enable_lora=True)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 is not supported .*tensor_parallel_size"):
        LLM(str(model_dir), pipeline_parallel_size=2)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_and_wake_up_keep_outputs(llm, level):
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)]
    llm.sleep(level=level)
    assert llm.collective_rpc("is_sleeping") == [True]
    with pytest.raises(ValueError, match="wake_up"):
        llm.generate(prompts, _greedy(), use_tqdm=False)
    llm.wake_up()
    after = [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)]
    assert after == before


def test_get_metrics_counts_requests_and_tokens(llm):
    def by_name(metrics):
        return {(m.name, tuple(sorted(m.labels.items()))): m for m in metrics}

    before = by_name(llm.get_metrics())
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy(4), use_tqdm=False)
    after = by_name(llm.get_metrics())
    generated = after[("vllm:generation_tokens", ())]
    assert isinstance(generated, Counter)
    assert generated.value - before[("vllm:generation_tokens", ())].value == 8
    key = ("vllm:request_success", (("finished_reason", "length"),))
    assert after[key].value - before[key].value == 2
    ttft = after[("vllm:time_to_first_token_seconds", ())]
    assert isinstance(ttft, Histogram) and ttft.count >= 2 and ttft.buckets["+Inf"] == ttft.count

    def grew(name):
        new, old = after[(name, ())], before[(name, ())]
        return new.count - old.count, new.sum - old.sum, new.buckets["+Inf"] - old.buckets["+Inf"]

    # Per request, as vLLM's own engine-metrics test reads them: two prompts of 4 tokens each.
    assert grew("vllm:request_generation_tokens") == (2, 8, 2)
    assert grew("vllm:request_prompt_tokens") == (2, sum(map(len, PROMPTS)), 2)
    assert grew("vllm:request_params_n") == (2, 2, 2)
    assert grew("vllm:request_params_max_tokens") == (2, 8, 2)
    assert grew("vllm:inter_token_latency_seconds")[0] == 2 * 3  # between each request's 4 tokens
    for name in ("vllm:request_decode_time_seconds", "vllm:request_inference_time_seconds"):
        assert grew(name)[0] == 2


def test_profile_writes_a_trace_and_needs_the_directory(llm, tmp_path, monkeypatch):
    monkeypatch.delenv("PAGEDLLM_TORCH_PROFILER_DIR", raising=False)
    monkeypatch.delenv("VLLM_TORCH_PROFILER_DIR", raising=False)
    with pytest.raises(ValueError, match="PAGEDLLM_TORCH_PROFILER_DIR"):
        llm.start_profile()
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path))
    llm.start_profile()
    llm.generate({"prompt_token_ids": PROMPTS[0]}, _greedy(2), use_tqdm=False)
    llm.stop_profile()
    assert any(name.endswith(".json") or ".pt.trace" in name for name in os.listdir(tmp_path))


def test_reset_prefix_cache_forgets_cached_prefixes(llm):
    long_prompt = {"prompt_token_ids": list(range(3, 40))}
    llm.generate(long_prompt, _greedy(1), use_tqdm=False)
    assert llm.reset_prefix_cache() is True
    assert llm.generate(long_prompt, _greedy(1), use_tqdm=False)[0].num_cached_tokens == 0


def test_lora_request_none_and_zero_priority_are_accepted_others_refused(llm):
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)]
    same = llm.generate(prompts, _greedy(), use_tqdm=False, lora_request=None, priority=[0, 0])
    assert [o.outputs[0].token_ids for o in same] == expected
    assert llm.generate(prompts, _greedy(), use_tqdm=False, lora_request=[None, None], priority=None)
    with pytest.raises(ValueError, match="LoRA is not supported"):
        llm.generate(prompts, _greedy(), use_tqdm=False, lora_request=object())
    with pytest.raises(ValueError, match="priority scheduling is not supported"):
        llm.generate(prompts, _greedy(), use_tqdm=False, priority=[1, 0])
    with pytest.raises(ValueError, match="lengths of prompts and priority"):
        llm.generate(prompts, _greedy(), use_tqdm=False, priority=[0])
    ids = llm.enqueue(prompts, _greedy(), lora_request=None, priority=[0, 0])
    assert [o.outputs[0].token_ids for o in llm.wait_for_completion(use_tqdm=False)] == expected and len(ids) == 2
    with pytest.raises(ValueError, match="LoRA is not supported"):
        llm.enqueue(prompts, _greedy(), lora_request=object())
    assert not llm.llm_engine.has_unfinished_requests()  # refused before any request was added


def test_beam_search_takes_lora_none_and_a_concurrency_limit(llm):
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    together = llm.beam_search(prompts, params, lora_request=None, concurrency_limit=None)
    one_at_a_time = llm.beam_search(prompts, params, concurrency_limit=1)
    assert [[s.tokens for s in o.sequences] for o in one_at_a_time] == [[s.tokens for s in o.sequences] for o in together]
    with pytest.raises(ValueError, match="LoRA is not supported"):
        llm.beam_search(prompts, params, lora_request=object())
    with pytest.raises(ValueError, match="concurrency_limit"):
        llm.beam_search(prompts, params, concurrency_limit=0)


def test_use_tqdm_may_be_a_tqdm_like_factory(llm):
    import io

    from tqdm import tqdm

    bars = []

    def factory(*args, **kwargs):
        bars.append(tqdm(*args, file=io.StringIO(), **kwargs))
        return bars[-1]

    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy(), use_tqdm=factory)
    assert len(outputs) == 2 and len(bars) == 1
    assert bars[0].n == bars[0].total == 2 and bars[0].desc == "Processed prompts"
    llm.enqueue([{"prompt_token_ids": PROMPTS[0]}], _greedy())
    llm.wait_for_completion(use_tqdm=factory)
    assert len(bars) == 2 and bars[1].n == 1
