"""How `LLM` turns its arguments into requests: the prompt list (a string, a prompt dict or a
list of token ids, or a sequence of them), one SamplingParams per prompt, and the checks of
vLLM arguments pagedllm takes at their default values only (LoRA, priority)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pagedllm.engine.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.inputs import PromptType


def as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt (a string, a prompt dict or a list of token ids) or a sequence of them."""
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    prompt_list = list(prompts)
    if prompt_list and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_list):
        return [prompt_list]
    return prompt_list


def whole_outputs(params: SamplingParams) -> SamplingParams:
    """LLM returns each request's whole output once, so a DELTA request (streaming's kind)
    runs as FINAL_ONLY, as in vLLM; the caller's object is left as it was."""
    if params.output_kind != RequestOutputKind.DELTA:
        return params
    params = params.clone()
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


def check_no_lora(lora_request: Any) -> None:
    requests = lora_request if isinstance(lora_request, (list, tuple)) else [lora_request]
    if any(request is not None for request in requests):
        raise ValueError(
            f"LoRA is not supported by pagedllm: lora_request must be None, got {lora_request!r}. "
            "Merge the adapter into the model's weights and load that checkpoint instead."
        )


def check_fcfs_priority(priority: Sequence[int] | None, num_prompts: int) -> None:
    if priority is None:
        return
    if len(priority) != num_prompts:
        raise ValueError(
            f"The lengths of prompts and priority must be the same: {num_prompts} prompts, {len(priority)} priorities."
        )
    if any(value != 0 for value in priority):
        raise ValueError(
            f"priority scheduling is not supported: requests run first come, first served, so priority must be "
            f"None or all zeros, got {list(priority)}."
        )


def params_per_prompt(
    sampling_params: SamplingParams | Sequence[SamplingParams], num_prompts: int
) -> list[SamplingParams]:
    """One SamplingParams per prompt (one given for all, or one each)."""
    if isinstance(sampling_params, SamplingParams):
        return [whole_outputs(sampling_params)] * num_prompts
    params = list(sampling_params)
    if len(params) != num_prompts:
        raise ValueError(
            f"Got {len(params)} sampling_params for {num_prompts} prompts; pass one "
            "SamplingParams, or one per prompt."
        )
    return [whole_outputs(p) for p in params]
