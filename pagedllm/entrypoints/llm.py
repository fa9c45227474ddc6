"""`LLM`: the offline entry point, with vLLM's names."""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pagedllm import envs
from pagedllm.config import ModelConfig
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.metrics import Metric
from pagedllm.engine.outputs import RequestOutput
from pagedllm.engine.sampling_params import BeamSearchParams, SamplingParams
from pagedllm.entrypoints.beam_search import BeamSearchOutput, run_beam_search
from pagedllm.entrypoints.llm_requests import (
    as_prompt_list,
    check_fcfs_priority,
    check_no_lora,
    params_per_prompt,
)
from pagedllm.entrypoints.chat_utils import (
    ChatMessage,
    ChatTemplateContentFormat,
    conversations_to_prompts,
)
from pagedllm.inputs import PromptType

logger = logging.getLogger(__name__)

POOLING_METHODS = ("encode", "embed", "classify", "score", "reward")

ProgressBarFactory = Callable[..., Any]
"""A tqdm-like class or function: called with total=, desc=, dynamic_ncols=; the bar it returns
gets update(n), set_postfix_str(text, refresh=) and close()."""


class LLM:
    """Generates text from prompts with a paged KV cache and continuous batching.

    Takes the keyword arguments of vLLM's `LLM` (model, tokenizer, dtype, max_model_len,
    max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, kv_cache_memory_bytes,
    enable_prefix_caching, block_size, load_format, download_dir, revision, seed,
    generation_config, hf_overrides, cpu_offload_gb, ...); `model=None` uses the embedded
    default model (SmolLM2-135M-Instruct).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine.from_engine_args(model, **kwargs)
        self._request_counter = itertools.count()
        self._enqueued: list[str] = []
        self._finished_aside: dict[str, RequestOutput] = {}
        """Enqueued requests that finished while another call ran the engine."""
        self._sleeping = False
        # Workers are released when the LLM is garbage-collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, self.llm_engine.shutdown)

    @property
    def model_config(self) -> ModelConfig:
        """vLLM's `llm.model_config`: the model's resolved settings (max_model_len, dtype, ...)."""
        return self.llm_engine.model_config

    def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.llm_engine.get_tokenizer()

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's defaults overridden by the model's generation_config.json (temperature,
        top_p, top_k, min_p, repetition_penalty, max_new_tokens as max_tokens), unless
        generation_config='vllm'. generate and chat use it when no params are given."""
        return self.llm_engine.get_default_sampling_params()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | ProgressBarFactory = True,
        lora_request: Any = None,
        priority: Sequence[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Completes every prompt; the outputs are in the order of the prompts. A prompt is a
        string, a list of token ids, or a prompt dict. Every prompt is checked before any work
        starts: a bad one raises ValueError naming its index.
        `use_tqdm` may be a tqdm-like factory used instead of tqdm, as in vLLM. `lora_request`
        must be None (no LoRA) and `priority` None or all zeros (first-come, first-served).
        `tokenization_kwargs` go to the tokenizer (e.g. {'add_special_tokens': False})."""
        request_ids = self._add_requests(prompts, sampling_params, lora_request, priority, tokenization_kwargs)
        return self._run_engine(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[ChatMessage] | list[list[ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | ProgressBarFactory = True,
        lora_request: Any = None,
        chat_template: str | None = None,
        chat_template_content_format: ChatTemplateContentFormat = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to each conversation, then generates (vLLM's
        arguments, in vLLM's order). Message content may be OpenAI content parts (text,
        image_url, image_pil, video) for a multi-modal model; mm_processor_kwargs apply to every
        conversation's items. `tools` (JSON schemas) go to the template as transformers' `tools`.
        continue_final_message=True needs add_generation_prompt=False."""
        check_no_lora(lora_request)
        prompts = self.preprocess_chat(
            messages, chat_template, add_generation_prompt, continue_final_message, chat_template_kwargs,
            mm_processor_kwargs, tools, chat_template_content_format,
        )
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, tokenization_kwargs=tokenization_kwargs)

    def preprocess_chat(
        self,
        messages: list[ChatMessage] | list[list[ChatMessage]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_content_format: ChatTemplateContentFormat = "auto",
    ) -> list[PromptType]:
        """The prompts LLM.chat would generate from (text and token ids per conversation, and
        the multi-modal items of its content parts)."""
        mm_processor = self.llm_engine.input_processor.mm_processor
        adapter = mm_processor.adapter if mm_processor is not None else None
        placeholders = {m: adapter.placeholder_text(m) for m in adapter.modalities} if adapter else {}
        return conversations_to_prompts(
            self.get_tokenizer(), messages, chat_template, add_generation_prompt,
            continue_final_message, chat_template_kwargs, placeholders, mm_processor_kwargs,
            tools, chat_template_content_format,
        )

    def beam_search(
        self,
        prompts: Sequence[PromptType],
        params: BeamSearchParams,
        lora_request: Any = None,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search (see entrypoints/beam_search.py): one BeamSearchOutput per prompt,
        its beam_width best sequences first. `concurrency_limit` prompts at most are searched
        at a time (None: all of them)."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}.")
        check_no_lora(lora_request)
        if concurrency_limit is not None and (not isinstance(concurrency_limit, int) or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be None or an integer >= 1, got {concurrency_limit!r}.")
        prompt_list = as_prompt_list(prompts)
        probe = SamplingParams(max_tokens=1)
        for prompt in prompt_list:
            self.llm_engine.process_input(prompt, probe)  # a bad prompt fails before any step
        beam_prompts = [self.llm_engine.input_processor.as_token_prompt(prompt) for prompt in prompt_list]
        tokenizer = self.get_tokenizer()
        chunk = concurrency_limit or max(len(beam_prompts), 1)
        outputs: list[BeamSearchOutput] = []
        for start in range(0, len(beam_prompts), chunk):
            outputs += run_beam_search(
                lambda batch, step_params: self.generate(batch, step_params, use_tqdm=False),
                beam_prompts[start : start + chunk], params, self.llm_engine.eos_token_id,
                tokenizer.decode if tokenizer is not None else None,
            )
        return outputs

    def enqueue(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | ProgressBarFactory = False,
        lora_request: Any = None,
        priority: Sequence[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[str]:
        """Queues prompts without running them; `wait_for_completion()` runs and returns them."""
        request_ids = self._add_requests(prompts, sampling_params, lora_request, priority, tokenization_kwargs)
        self._enqueued.extend(request_ids)
        return request_ids

    def wait_for_completion(self, use_tqdm: bool | ProgressBarFactory = True) -> list[RequestOutput]:
        """Runs every enqueued request to the end; outputs in the order they were enqueued."""
        request_ids, self._enqueued = self._enqueued, []
        return self._run_engine(request_ids, use_tqdm)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """Forgets every cached prefix; False (with a warning) while requests hold blocks."""
        return self.llm_engine.scheduler.reset_prefix_cache()

    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        timeout: float | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Runs a Worker method (by name) or a callable (worker, *args, **kwargs) on every rank;
        returns the results in rank order (LLMEngine.collective_rpc)."""
        return self.llm_engine.collective_rpc(method, timeout, args, kwargs)

    def apply_model(self, func: Callable[[Any], Any]) -> list[Any]:
        """func(model) on each rank's model (torch.nn.Module); the results in rank order."""
        return self.llm_engine.executor.collective_rpc("apply_model", (func,))

    def sleep(self, level: int = 1) -> None:
        """Frees device memory while idle: level 1 keeps the weights in host memory and frees
        the KV cache; level 2 frees both (weights reload from the checkpoint on wake_up)."""
        if self.llm_engine.has_unfinished_requests():
            raise ValueError("LLM.sleep() needs an idle engine; wait for the running requests first.")
        if level not in (1, 2):
            raise ValueError(f"sleep(level={level!r}): use level=1 or level=2.")
        self.reset_prefix_cache()  # the cached KV is about to be freed
        self.collective_rpc("sleep", args=(level,))
        self._sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restores the weights and the KV cache ("weights", "kv_cache"; default both)."""
        self.collective_rpc("wake_up", args=(tags,))
        self._sleeping = any(self.collective_rpc("is_sleeping"))

    def get_metrics(self) -> list[Metric]:
        """Engine counters, gauges and latency histograms with vLLM's names (vllm:...)."""
        return self.llm_engine.get_metrics()

    def start_profile(self) -> None:
        """Starts a torch profiler on every rank; traces go to PAGEDLLM_TORCH_PROFILER_DIR."""
        trace_dir = envs.torch_profiler_dir()
        if trace_dir is None:
            raise ValueError(
                "LLM.start_profile() needs PAGEDLLM_TORCH_PROFILER_DIR (or VLLM_TORCH_PROFILER_DIR) "
                "set to the folder the traces go to."
            )
        self.collective_rpc("start_profile", args=(trace_dir,))

    def stop_profile(self) -> None:
        self.collective_rpc("stop_profile")

    def shutdown(self) -> None:
        self._finalizer()

    def _add_requests(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        lora_request: Any = None,
        priority: Sequence[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[str]:
        if self._sleeping:
            raise ValueError("The engine is asleep: call LLM.wake_up() before generating.")
        prompt_list = as_prompt_list(prompts)
        check_no_lora(lora_request)
        check_fcfs_priority(priority, len(prompt_list))
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = params_per_prompt(sampling_params, len(prompt_list))
        processed = []
        for index, (prompt, params) in enumerate(zip(prompt_list, params_list)):
            try:
                processed.append(self.llm_engine.process_input(prompt, params, tokenization_kwargs))
            except ValueError as error:
                where = f"Prompt {index}: " if len(prompt_list) > 1 else ""
                raise ValueError(f"{where}{error}") from None
        request_ids = []
        for item, params in zip(processed, params_list):
            request_id = str(next(self._request_counter))
            self.llm_engine.add_request(request_id, item, params)
            request_ids.append(request_id)
        return request_ids

    def _run_engine(self, request_ids: list[str], use_tqdm: bool | ProgressBarFactory) -> list[RequestOutput]:
        wanted = set(request_ids)
        finished = {r: self._finished_aside.pop(r) for r in request_ids if r in self._finished_aside}
        progress = None
        if use_tqdm:
            # As vLLM: a callable use_tqdm is a tqdm-like factory used instead of tqdm.
            factory = use_tqdm if callable(use_tqdm) else tqdm
            progress = factory(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True)
        start = time.perf_counter()
        num_output_tokens = 0
        try:
            while len(finished) < len(wanted) and self.llm_engine.has_unfinished_requests():
                for output in self.llm_engine.step(return_unfinished=False):
                    if output.finished and output.request_id not in wanted:
                        self._finished_aside[output.request_id] = output
                    elif output.finished:
                        finished[output.request_id] = output
                        num_output_tokens += sum(len(c.token_ids) for c in output.outputs)
                        if progress is not None:
                            progress.update(1)
                            elapsed = max(time.perf_counter() - start, 1e-9)
                            progress.set_postfix_str(f"output {num_output_tokens / elapsed:.1f} toks/s", refresh=False)
        except BaseException:
            self.llm_engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            if progress is not None:
                progress.close()
        return [finished[request_id] for request_id in request_ids]


def _pooling_refusal(name: str) -> Callable[..., Any]:
    def refuse(self: LLM, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(
            f"LLM.{name}() runs pooling models (embeddings, classifiers, rewards); pagedllm runs "
            "generative models only: use LLM.generate() or LLM.chat()."
        )

    refuse.__name__ = name
    refuse.__doc__ = "Refused: pooling models are not supported (ValueError)."
    return refuse


# vLLM's pooling-model methods exist so that calling one says why it cannot work.
for _name in POOLING_METHODS:
    setattr(LLM, _name, _pooling_refusal(_name))
