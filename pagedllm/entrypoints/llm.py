"""`LLM`: the offline entry point, with vLLM's names."""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.outputs import RequestOutput
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.inputs import PromptType

logger = logging.getLogger(__name__)

ChatMessage = dict[str, Any]


class LLM:
    """Generates text from prompts with a paged KV cache and continuous batching.

    Takes the keyword arguments of vLLM's `LLM` (model, tokenizer, dtype, max_model_len,
    max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, kv_cache_memory_bytes,
    enable_prefix_caching, block_size, load_format, download_dir, revision, seed, ...);
    `model=None` uses the embedded default model (SmolLM2-135M-Instruct).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine.from_engine_args(model, **kwargs)
        self._request_counter = itertools.count()
        # Workers are released when the LLM is garbage-collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, self.llm_engine.shutdown)

    def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.llm_engine.get_tokenizer()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Completes every prompt; the outputs are in the order of the prompts. Every prompt is
        checked before any work starts: a bad one raises ValueError naming its index."""
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params_list = self._params_per_prompt(sampling_params, len(prompt_list))
        processed = []
        for index, (prompt, params) in enumerate(zip(prompt_list, params_list)):
            try:
                processed.append(self.llm_engine.process_input(prompt, params))
            except ValueError as error:
                where = f"Prompt {index}: " if len(prompt_list) > 1 else ""
                raise ValueError(f"{where}{error}") from None
        request_ids = []
        for item, params in zip(processed, params_list):
            request_id = str(next(self._request_counter))
            self.llm_engine.add_request(request_id, item, params)
            request_ids.append(request_id)
        return self._run_engine(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[ChatMessage] | list[list[ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to each conversation, then generates. Message
        content may be OpenAI content parts (text, image_url, image_pil, video) for a
        multi-modal model; mm_processor_kwargs apply to every conversation's items."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("LLM.chat needs a tokenizer; do not pass skip_tokenizer_init=True.")
        if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("The tokenizer has no chat template; pass chat_template=... to LLM.chat.")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptType] = []
        for conversation in conversations:
            conversation, mm_data = self._parse_content_parts(conversation)
            text = tokenizer.apply_chat_template(
                conversation,
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
            # The template already holds the special tokens (BOS and role markers).
            token_ids = tokenizer.encode(text, add_special_tokens=False)
            prompt: dict[str, Any] = {"prompt": text, "prompt_token_ids": token_ids}
            if mm_data:
                prompt["multi_modal_data"] = mm_data
            if mm_processor_kwargs is not None:
                prompt["mm_processor_kwargs"] = mm_processor_kwargs
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def shutdown(self) -> None:
        self._finalizer()

    def _parse_content_parts(self, conversation: list[ChatMessage]) -> tuple[list[ChatMessage], dict[str, Any]]:
        """OpenAI content parts (text, image_url, image_pil, video) → messages with string
        content holding the model's placeholders, and the items by modality."""
        from pagedllm.multimodal.inputs import parse_chat_content

        mm_processor = self.llm_engine.input_processor.mm_processor
        adapter = mm_processor.adapter if mm_processor is not None else None
        placeholders = {m: adapter.placeholder_text(m) for m in adapter.modalities} if adapter else {}
        parsed: list[ChatMessage] = []
        mm_data: dict[str, list[Any]] = {}
        for message in conversation:
            content = message.get("content")
            if content is None or isinstance(content, str):
                parsed.append(message)
                continue
            text, items = parse_chat_content(content, placeholders)
            for modality, values in items.items():
                mm_data.setdefault(modality, []).extend(values)
            parsed.append({**message, "content": text})
        return parsed, mm_data

    @staticmethod
    def _params_per_prompt(
        sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        params = list(sampling_params)
        if len(params) != num_prompts:
            raise ValueError(
                f"Got {len(params)} sampling_params for {num_prompts} prompts; pass one "
                "SamplingParams, or one per prompt."
            )
        return params

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        progress = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        num_output_tokens = 0
        try:
            while self.llm_engine.has_unfinished_requests():
                for output in self.llm_engine.step(return_unfinished=False):
                    if output.finished:
                        finished[output.request_id] = output
                        num_output_tokens += sum(len(c.token_ids) for c in output.outputs)
                        progress.update(1)
                        elapsed = progress.format_dict["elapsed"] or 1e-9
                        progress.set_postfix_str(f"output {num_output_tokens / elapsed:.1f} toks/s", refresh=False)
        except BaseException:
            self.llm_engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            progress.close()
        return [finished[request_id] for request_id in request_ids]
