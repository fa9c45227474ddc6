"""AsyncLLM: the engine core in its own process, outputs streamed to asyncio consumers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from tiny_models import make_tiny_checkpoint

pytest.importorskip("zmq")  # the GPU machine runs the suite from source, maybe without pyzmq

from pagedllm import LLM, AsyncLLM, SamplingParams  # noqa: E402
from pagedllm.engine.arg_utils import EngineArgs  # noqa: E402
from pagedllm.engine.async_llm import _RequestStream  # noqa: E402
from pagedllm.engine.core_client import EngineDeadError  # noqa: E402
from pagedllm.engine.sampling_params import RequestOutputKind, StructuredOutputsParams  # noqa: E402

ENGINE_OPTIONS = dict(dtype="float32", device="cpu", max_model_len=256, kv_cache_memory_bytes=1 << 22, enable_prefix_caching=False)
PROMPTS = ["hello world", "the paged attention model", "café naïve 中文 🙂"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_bpe_tokenizer_dir):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("async_llm") / "model", "qwen3", vocab_size=512,
        tokenizer_dir=tiny_bpe_tokenizer_dir, seed=5,
    )


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(model_dir), **ENGINE_OPTIONS))
    yield engine
    engine.shutdown()


async def _final(engine, prompt, params, request_id):
    final = None
    async for output in engine.generate(prompt, params, request_id):
        final = output
    return final


def test_concurrent_requests_equal_llm_generate(engine, model_dir):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    llm = LLM(str(model_dir), **ENGINE_OPTIONS)
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    llm.shutdown()

    async def run():
        return await asyncio.gather(*(_final(engine, p, params, f"r{i}") for i, p in enumerate(PROMPTS)))

    for got, want in zip(asyncio.run(run()), expected):
        assert got.finished and got.prompt_token_ids == want.prompt_token_ids
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].text == want.outputs[0].text
        # Same process layout differs (a second process), same float32 CPU kernels: close values.
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


def test_outputs_are_cumulative_and_stop_strings_apply(engine):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def run():
        outputs = [o async for o in engine.generate(PROMPTS[1], params, "cumulative")]
        full = outputs[-1].outputs[0].text
        stop = full[4:7]
        stopped = await _final(engine, PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]), "stopped")
        return outputs, full, stop, stopped

    outputs, full, stop, stopped = asyncio.run(run())
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    assert lengths == sorted(lengths) and lengths[-1] == 20 and outputs[-1].finished
    assert all(not o.finished for o in outputs[:-1])
    assert stopped.outputs[0].text == full[: full.index(stop)]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop


def test_output_kinds_delta_and_final_only(engine):
    """vLLM's streaming pattern: DELTA outputs carry only what is new (their concatenation is
    the cumulative output), FINAL_ONLY yields the last output alone."""
    base = dict(temperature=0, max_tokens=12, ignore_eos=True)

    async def run():
        cumulative = await _final(engine, PROMPTS[0], SamplingParams(**base), "whole")
        deltas = [o async for o in engine.generate(PROMPTS[0], SamplingParams(**base, output_kind=RequestOutputKind.DELTA), "delta")]
        finals = [o async for o in engine.generate(PROMPTS[0], SamplingParams(**base, output_kind=RequestOutputKind.FINAL_ONLY), "final")]
        return cumulative, deltas, finals

    cumulative, deltas, finals = asyncio.run(run())
    assert sum(len(o.outputs[0].token_ids) for o in deltas) == 12
    assert [t for o in deltas for t in o.outputs[0].token_ids] == cumulative.outputs[0].token_ids
    assert "".join(o.outputs[0].text for o in deltas) == cumulative.outputs[0].text
    assert deltas[-1].finished and not any(o.finished for o in deltas[:-1])
    assert len(finals) == 1 and finals[0].outputs[0].token_ids == cumulative.outputs[0].token_ids


def test_delta_outputs_waiting_for_a_slow_consumer_are_merged():
    from pagedllm.engine.outputs import CompletionOutput, RequestOutput

    def delta(tokens, text, finished):
        completion = CompletionOutput(0, text, tokens, None, None, "length" if finished else None)
        return RequestOutput("r", None, [1], None, [completion], finished)

    async def run():
        stream = _RequestStream(aggregate=True)
        stream.put(delta([5], "a", False))
        stream.put(delta([6, 7], "bc", True))
        return await asyncio.wait_for(stream.get(), 1)

    merged = asyncio.run(run())
    assert merged.outputs[0].token_ids == [5, 6, 7] and merged.outputs[0].text == "abc" and merged.finished


def test_logits_processors_are_refused_across_processes(engine):
    params = SamplingParams(max_tokens=2, logits_processors=[lambda ids, logits: logits])
    with pytest.raises(ValueError, match="logits_processors"):
        engine.process_input(PROMPTS[0], params)


def test_bad_prompt_raises_and_others_go_on(engine):
    async def run():
        with pytest.raises(ValueError, match="max_model_len"):
            await _final(engine, {"prompt_token_ids": [5] * 300}, SamplingParams(), "too-long")
        return await _final(engine, PROMPTS[0], SamplingParams(temperature=0, max_tokens=3), "fine")

    assert len(asyncio.run(run()).outputs[0].token_ids) >= 1


def test_abort_frees_the_kv_blocks(engine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def run():
        generator = engine.generate(PROMPTS[0] * 8, params, "long")
        await generator.__anext__()
        assert engine.scheduler_stats.kv_cache_usage > 0
        await engine.abort("long")
        with pytest.raises(StopAsyncIteration):
            await generator.__anext__()
        deadline = time.monotonic() + 10
        while engine.scheduler_stats.num_running_reqs or engine.scheduler_stats.kv_cache_usage:
            assert time.monotonic() < deadline, engine.scheduler_stats
            await asyncio.sleep(0.01)

    asyncio.run(run())


def test_a_request_id_reused_right_after_an_abort_gets_only_its_own_tokens(engine):
    """The aborted request's outputs already on their way from the engine core (and its step
    in flight) must not reach the new request of the same id."""
    short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def run():
        expected = await _final(engine, PROMPTS[2], short, "fresh")
        for _ in range(3):
            async for output in engine.generate(PROMPTS[0], SamplingParams(temperature=0.8, seed=1, max_tokens=200,
                                                                           ignore_eos=True), "reused"):
                if len(output.outputs[0].token_ids) >= 5:
                    await engine.abort("reused")
            again = await _final(engine, PROMPTS[2], short, "reused")
            assert again.outputs[0].token_ids == expected.outputs[0].token_ids
            assert again.outputs[0].finish_reason == "length"

    asyncio.run(run())


def test_prompt_and_grammar_validation_and_output_fields_match_llm_engine(engine):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}

    async def run():
        with pytest.raises(ValueError, match="Unknown key"):
            await _final(engine, {"prompt": "hi", "promt_token_ids": [1]}, SamplingParams(max_tokens=2), "typo")
        with pytest.raises(ValueError, match="invalid"):
            bad = StructuredOutputsParams(json={"type": "no-such-type"})
            await _final(engine, "hi", SamplingParams(max_tokens=2, structured_outputs=bad), "bad-schema")
        constrained = SamplingParams(
            temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        )
        return await _final(engine, PROMPTS[0], constrained, "json")

    output = asyncio.run(run())
    assert output.outputs[0].finish_reason == "stop"
    assert isinstance(json.loads(output.outputs[0].text)["ok"], bool)
    # RequestOutput fields LLMEngine fills (this engine runs without prefix caching).
    assert output.num_cached_tokens == 0
    metrics = output.metrics
    assert metrics.arrival_time <= metrics.first_token_time <= metrics.finished_time


def test_generation_config_defaults_and_every_eos_id_apply(engine, model_dir, tmp_path):
    prompt = PROMPTS[1] * 4  # over one KV block, so a second run hits the prefix cache
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = asyncio.run(_final(engine, prompt, greedy, "greedy")).outputs[0].token_ids
    stop_token = next(t for i, t in enumerate(tokens[2:], 2) if t not in tokens[:i])
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [2, stop_token], "temperature": 0.0, "max_new_tokens": 12})
    )
    options = {**ENGINE_OPTIONS, "enable_prefix_caching": True}
    configured = AsyncLLM.from_engine_args(EngineArgs(model=str(model_dir), generation_config=str(tmp_path), **options))
    try:
        defaults = configured.get_default_sampling_params()
        assert defaults.temperature == 0.0 and defaults.max_tokens == 12

        async def run():
            first = await _final(configured, prompt, None, "defaults")
            second = await _final(configured, prompt, None, "again")
            return first, second

        first, second = asyncio.run(run())
    finally:
        configured.shutdown()
    # No params: greedy from the generation config, stopped at its second EOS id like EOS.
    end = tokens.index(stop_token) + 1
    assert first.outputs[0].token_ids == tokens[:end]
    assert first.outputs[0].finish_reason == "stop" and first.outputs[0].stop_reason is None
    assert first.num_cached_tokens == 0 and second.num_cached_tokens > 0
    assert second.outputs[0].token_ids == tokens[:end]


def test_a_failure_or_abort_right_after_an_output_still_ends_the_stream():
    # The server's Ctrl-C path: the engine fails the streams while an output waits for its
    # consumer. The consumer gets that output, then the failure (or, aborted, the end), and
    # never waits for an output that will not come.
    pending = object()

    async def run():
        failed = _RequestStream()
        failed.put(pending)
        failed.fail(EngineDeadError("The engine was shut down."))
        assert await asyncio.wait_for(failed.get(), 1) is pending
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(failed.get(), 1)

        aborted = _RequestStream()
        aborted.put(pending)
        aborted.abort()
        assert await asyncio.wait_for(aborted.get(), 1) is pending
        assert await asyncio.wait_for(aborted.get(), 1) is None

        live = _RequestStream()
        live.put(pending)
        assert await asyncio.wait_for(live.get(), 1) is pending
        with pytest.raises(asyncio.TimeoutError):  # a live stream waits for its next output
            await asyncio.wait_for(live.get(), 0.05)

    asyncio.run(run())


def test_dead_engine_core_fails_pending_requests(engine):
    # Runs last: it kills the module's engine.
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def run():
        generator = engine.generate(PROMPTS[0], params, "doomed")
        await generator.__anext__()
        os.kill(engine.engine_core.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="died"):
            async for _ in generator:
                pass
        with pytest.raises(EngineDeadError):
            await engine.check_health()
        assert engine.errored

    asyncio.run(run())


def test_engine_core_exits_when_the_front_process_is_killed(model_dir, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from pagedllm import AsyncLLM
        from pagedllm.engine.arg_utils import EngineArgs
        if __name__ == "__main__":
            engine = AsyncLLM.from_engine_args(EngineArgs(model={str(model_dir)!r}, **{ENGINE_OPTIONS!r}))
            print(engine.engine_core.pid, flush=True)
            time.sleep(600)
    """)
    (tmp_path / "front.py").write_text(script)
    front = subprocess.Popen([sys.executable, str(tmp_path / "front.py")], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        core_pid = int(front.stdout.readline())
        front.kill()
        front.wait()
        deadline = time.monotonic() + 15
        while _alive(core_pid):
            assert time.monotonic() < deadline, f"engine core {core_pid} outlived its front process"
            time.sleep(0.1)
    finally:
        front.kill()


def test_bad_input_found_by_the_engine_core_is_a_value_error(model_dir):
    """The engine core sizes the KV cache in its own process: its ValueError comes back as one,
    with the message that names the option (`serve` then exits 2 with one line)."""
    options = {**ENGINE_OPTIONS, "kv_cache_memory_bytes": 1000}
    with pytest.raises(ValueError, match="kv_cache_memory_bytes") as error:
        AsyncLLM.from_engine_args(EngineArgs(model=str(model_dir), **options))
    assert "Traceback" not in str(error.value)


def test_a_script_without_a_main_guard_is_told_to_add_one(model_dir, tmp_path):
    """The spawned engine core imports the script again, which starts a second engine there."""
    script = textwrap.dedent(f"""
        from pagedllm import AsyncLLM
        from pagedllm.engine.arg_utils import EngineArgs
        engine = AsyncLLM.from_engine_args(EngineArgs(model={str(model_dir)!r}, **{ENGINE_OPTIONS!r}))
    """)
    (tmp_path / "unguarded.py").write_text(script)
    result = subprocess.run([sys.executable, str(tmp_path / "unguarded.py")], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode != 0
    assert 'put that code under `if __name__ == "__main__":`' in result.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"
