"""`LLM.beam_search`, vLLM's algorithm: every step, each live beam is extended by one token
with its top 2 * beam_width logprobs (one engine request per beam, so the prefix cache shares
the beams' common KV), and the beam_width best continuations of each prompt survive. A beam
that ends in EOS is set aside as completed; at the end, completed and live beams are ranked
together by cum_logprob / len(tokens) ** length_penalty."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.outputs import Logprob, RequestOutput
from pagedllm.engine.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class BeamSearchSequence:
    """One beam: the prompt and output tokens, the logprobs of each output step, and its
    cumulative logprob (vLLM's class of the same name)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: None = None
    multi_modal_data: Any = None
    mm_processor_kwargs: dict[str, Any] | None = None


@dataclass
class BeamSearchOutput:
    """The beam_width best sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


@dataclass
class _Instance:
    beams: list[BeamSearchSequence]
    completed: list[BeamSearchSequence] = field(default_factory=list)


def beam_search_score(tokens: list[int], cum_logprob: float, eos_token_id: int | None, length_penalty: float) -> float:
    """vLLM's get_beam_search_score: the length counts the prompt, not a final EOS."""
    length = len(tokens) - (1 if eos_token_id is not None and tokens[-1] == eos_token_id else 0)
    return cum_logprob / (length**length_penalty)


def run_beam_search(
    generate: Callable[[list[dict], SamplingParams], list[RequestOutput]],
    prompts: Sequence[dict[str, Any]],
    params: BeamSearchParams,
    eos_token_id: int | None,
    decode: Callable[[list[int]], str] | None,
) -> list[BeamSearchOutput]:
    """`prompts`: token-id prompt dicts (their ids before any multi-modal expansion); their
    other keys (multi_modal_data, mm_processor_kwargs, ...) go with every step's request, so a
    multi-modal beam keeps its items."""
    def score(beam: BeamSearchSequence) -> float:
        return beam_search_score(beam.tokens, beam.cum_logprob, eos_token_id, params.length_penalty)

    step_params = SamplingParams(
        logprobs=2 * params.beam_width, max_tokens=1, temperature=params.temperature, detokenize=False
    )
    instances = []
    for prompt in prompts:
        extra = {key: value for key, value in prompt.items() if key != "prompt_token_ids"}
        first = BeamSearchSequence(tokens=list(prompt["prompt_token_ids"]), logprobs=[],
                                   multi_modal_data=extra.get("multi_modal_data"),
                                   mm_processor_kwargs=extra.get("mm_processor_kwargs"))
        instances.append((_Instance(beams=[first]), extra))
    for _ in range(params.max_tokens):
        live = [(instance, extra, beam) for instance, extra in instances for beam in instance.beams]
        if not live:
            break
        results = generate([{**extra, "prompt_token_ids": beam.tokens} for _, extra, beam in live], step_params)
        candidates: dict[int, list[BeamSearchSequence]] = {id(instance): [] for instance, _ in instances}
        for (instance, _, beam), result in zip(live, results):
            step_logprobs = result.outputs[0].logprobs[0]
            for token_id, logprob in step_logprobs.items():
                extended = BeamSearchSequence(
                    tokens=beam.tokens + [token_id],
                    logprobs=beam.logprobs + [step_logprobs],
                    cum_logprob=beam.cum_logprob + logprob.logprob,
                    multi_modal_data=beam.multi_modal_data,
                    mm_processor_kwargs=beam.mm_processor_kwargs,
                )
                if token_id == eos_token_id and not params.ignore_eos:
                    extended.finish_reason = "stop"
                    instance.completed.append(extended)
                else:
                    candidates[id(instance)].append(extended)
        for instance, _ in instances:
            instance.beams = sorted(candidates[id(instance)], key=score, reverse=True)[: params.beam_width]
    outputs = []
    for instance, _ in instances:
        for beam in instance.beams:
            beam.finish_reason = beam.finish_reason or "length"
        best = sorted(instance.completed + instance.beams, key=score, reverse=True)[: params.beam_width]
        for beam in best:
            if decode is not None:
                beam.text = decode(beam.tokens)
        outputs.append(BeamSearchOutput(sequences=best))
    return outputs
