"""Runs the model for one step: keeps each request's tokens and block table, builds the flat
input batch, sets the forward context, computes logits and samples. It never sees text."""

from __future__ import annotations

import logging

import torch
from torch import nn

from pagedllm.config import EngineConfig
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from pagedllm.forward_context import set_forward_context
from pagedllm.layers.attention.kv_cache_spec import KVCacheSpec
from pagedllm.layers.attention.layer import Attention
from pagedllm.layers.sampler import Sampler, SamplingMetadata, compute_prompt_logprobs, to_token_logprobs
from pagedllm.model_loader.loaders import get_model
from pagedllm.worker.cuda_graphs import CUDAGraphRunner
from pagedllm.worker.multimodal_runner import MultiModalRunner, supports_multimodal
from pagedllm.worker.input_batch import (
    CachedRequestState,
    HostStager,
    StepInputs,
    build_profile_inputs,
    build_step_inputs,
)

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, engine_config: EngineConfig, device: torch.device) -> None:
        self.config = engine_config
        self.model_config = engine_config.model_config
        self.device = device
        self.block_size = engine_config.cache_config.block_size
        self.vocab_size = self.model_config.vocab_size
        # Learned from the requests: the engine resolves EOS from the tokenizer.
        self.eos_token_id: int | None = None
        self.requests: dict[str, CachedRequestState] = {}
        self.sampler = Sampler()
        self.stager = HostStager(device)
        self.default_generator = torch.Generator(device=device)
        seed = self.model_config.seed
        if seed is None:
            self.default_generator.seed()
        else:
            self.default_generator.manual_seed(seed)
        self.model: nn.Module | None = None
        self.attention_layers: list[Attention] = []
        self.kv_caches: list[torch.Tensor] = []
        self.cuda_graphs: CUDAGraphRunner | None = None
        self.mm_runner: MultiModalRunner | None = None

    def load_model(self) -> None:
        self.model = get_model(self.model_config, self.config.load_config, self.device)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        if supports_multimodal(self.model):
            self.mm_runner = MultiModalRunner(self.model, self.device)

    def kv_cache_specs(self) -> list[KVCacheSpec]:
        return [layer.kv_cache_spec() for layer in self.attention_layers]

    def kv_cache_block_bytes(self) -> int:
        return sum(spec.page_size_bytes(self.block_size) for spec in self.kv_cache_specs())

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocates each layer's cache once, [2, num_blocks, block_size, kv_heads, head_size],
        and binds it to the layer."""
        self.kv_caches = []
        for layer, spec in zip(self.attention_layers, self.kv_cache_specs()):
            shape = (2, num_blocks, self.block_size, spec.num_kv_heads, spec.head_size)
            # Every slot is written before it is read, so the CPU cache need not be touched
            # now (a 4 GiB default would otherwise be paged in at start-up).
            allocate = torch.zeros if self.device.type == "cuda" else torch.empty
            cache = allocate(shape, dtype=spec.dtype, device=self.device)
            layer.kv_cache = cache
            self.kv_caches.append(cache)

    def capture_cuda_graphs(self) -> int:
        """Captures the decode graphs of compilation_config; returns the bytes they took."""
        compilation_config = self.config.compilation_config
        if not compilation_config.use_cudagraph or self.device.type != "cuda":
            return 0
        assert self.model is not None and self.kv_caches, "initialize_kv_cache() first"
        max_blocks = -(-self.model_config.max_model_len // self.block_size)
        self.cuda_graphs = CUDAGraphRunner(
            self.model, compilation_config.cudagraph_capture_sizes, max_blocks, self.device
        )
        self.cuda_graphs.capture()
        return self.cuda_graphs.graph_memory_bytes

    @torch.inference_mode()
    def profile_run(self) -> None:
        """One forward at the largest step (max_num_batched_tokens) and the sampler at
        max_num_seqs rows, before the KV cache exists, so peak activation memory is seen."""
        scheduler_config = self.config.scheduler_config
        inputs = build_profile_inputs(
            scheduler_config.max_num_batched_tokens, self.model_config.max_model_len, self.device
        )
        # The encoder's peak, and its outputs held through the text forward as in a real step.
        encoder_outputs = self.mm_runner.profile_encoder(self.config) if self.mm_runner is not None else []
        hidden_states = self._forward(inputs)
        del encoder_outputs
        num_rows = min(scheduler_config.max_num_seqs, hidden_states.shape[0])
        logits = self._compute_logits(hidden_states[:num_rows])
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1)
        metadata = SamplingMetadata.build(
            params=[params] * num_rows,
            prompt_token_ids=[[0]] * num_rows,
            output_token_ids=[[]] * num_rows,
            generators=[None] * num_rows,
            default_generator=self.default_generator,
            eos_token_id=self.eos_token_id,
            vocab_size=self.vocab_size,
            device=self.device,
        )
        self.sampler(logits, metadata)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        inputs = build_step_inputs(scheduler_output, self.requests, self.block_size, self.stager)
        inputs_embeds = None
        if self.mm_runner is not None:
            inputs_embeds = self.mm_runner.prepare(inputs)
        hidden_states = self._forward(inputs, inputs_embeds)

        sample_rows, sample_req_ids = [], []
        for req_id, start, query_start, query_len in zip(
            inputs.req_ids, inputs.start_positions, inputs.query_starts, inputs.query_lens
        ):
            state = self.requests[req_id]
            state.num_computed_tokens = start + query_len
            # A request samples once it has caught up with every token it knows; a prompt
            # prefilled in chunks samples only after its last chunk.
            if state.num_computed_tokens == len(state.token_ids):
                sample_rows.append(query_start + query_len - 1)
                sample_req_ids.append(req_id)

        output = ModelRunnerOutput(sampled_token_ids={req_id: [] for req_id in inputs.req_ids})
        output.prompt_logprobs = self._prompt_logprobs(inputs, hidden_states)
        if sample_req_ids:
            if len(sample_req_ids) == len(inputs.req_ids):
                # Every request samples (the usual case): its last row is query_start_loc - 1,
                # already on the device, so no host list is copied (which would wait for the
                # forward to finish before the sampler's work could be queued).
                rows = inputs.attn_metadata.query_start_loc[1:].long() - 1
            else:
                rows = torch.tensor(sample_rows, device=self.device)
            self._sample(hidden_states[rows], sample_req_ids, output)
        return output

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
            if self.mm_runner is not None:
                self.mm_runner.remove_request(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            if self.mm_runner is not None:
                self.mm_runner.add_request(new)
            self.eos_token_id = new.eos_token_id
            generator = None
            if new.sampling_params.seed is not None:
                generator = torch.Generator(device=self.device)
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                sampling_params=new.sampling_params,
                block_ids=list(new.block_ids),
                generator=generator,
                num_computed_tokens=new.num_computed_tokens,
            )
        for cached in scheduler_output.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _forward(self, inputs: StepInputs, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        assert self.model is not None, "load_model() first"
        # Graphs are captured on input ids and 1-D positions: steps with merged embeddings or
        # M-RoPE [3, T] positions run eagerly.
        if self.cuda_graphs is not None and inputs_embeds is None and inputs.positions.ndim == 1:
            batch_size = self.cuda_graphs.padded_size(inputs)
            if batch_size is not None:
                return self.cuda_graphs.run(inputs, batch_size)
        with set_forward_context(inputs.attn_metadata):
            if inputs_embeds is not None:
                return self.model(inputs.input_ids, inputs.positions, inputs_embeds)
            return self.model(inputs.input_ids, inputs.positions)

    def _compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        return self.model.compute_logits(hidden_states).float()

    def _sample(self, last_hidden_states: torch.Tensor, req_ids: list[str], output: ModelRunnerOutput) -> None:
        logits = self._compute_logits(last_hidden_states)
        states = [self.requests[req_id] for req_id in req_ids]
        for state in states:
            if state.generator is not None:
                # Seeding by (seed, output length) makes a seeded request's samples independent
                # of batch composition and of preemption (a resumed request gets no replay).
                num_output = len(state.token_ids) - state.num_prompt_tokens
                state.generator.manual_seed(_step_seed(state.sampling_params.seed, num_output))
        # Token histories are copied only for rows that read them (penalties, min_tokens):
        # copying every row's context each step would cost O(batch x context) per token.
        prompt_ids, output_ids = [], []
        for state in states:
            params = state.sampling_params
            penalized = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
            prompt_ids.append(state.token_ids[: state.num_prompt_tokens] if penalized else ())
            counts_output = penalized or params.min_tokens > 0
            output_ids.append(state.token_ids[state.num_prompt_tokens :] if counts_output else ())
        metadata = SamplingMetadata.build(
            params=[s.sampling_params for s in states],
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            generators=[s.generator for s in states],
            default_generator=self.default_generator,
            eos_token_id=self.eos_token_id,
            vocab_size=self.vocab_size,
            device=self.device,
        )
        sampler_output = self.sampler(logits, metadata)
        sampled = sampler_output.sampled_token_ids.tolist()
        for state, token_id in zip(states, sampled):
            state.token_ids.append(token_id)
            output.sampled_token_ids[state.req_id] = [token_id]
        if sampler_output.logprobs is not None:
            per_row = to_token_logprobs(sampler_output.logprobs)
            for row, state in enumerate(states):
                if state.sampling_params.logprobs is not None:
                    output.logprobs[state.req_id] = _row_logprobs(per_row, row, state.sampling_params.logprobs)

    def _prompt_logprobs(self, inputs: StepInputs, hidden_states: torch.Tensor) -> dict[str, TokenLogprobs]:
        """Logprobs of the prompt tokens this step's positions predict: the logits at position
        p score prompt token p + 1."""
        results: dict[str, TokenLogprobs] = {}
        for req_id, start, query_start, query_len in zip(
            inputs.req_ids, inputs.start_positions, inputs.query_starts, inputs.query_lens
        ):
            state = self.requests[req_id]
            num_logprobs = state.sampling_params.prompt_logprobs
            end = min(start + query_len, state.num_prompt_tokens - 1)
            if num_logprobs is None or start >= end:
                continue
            rows = hidden_states[query_start : query_start + end - start]
            targets = torch.tensor(state.token_ids[start + 1 : end + 1], device=self.device)
            results[req_id] = compute_prompt_logprobs(self._compute_logits(rows), targets, num_logprobs)
        return results

    def shutdown(self) -> None:
        self.cuda_graphs = None
        for layer in self.attention_layers:
            layer.kv_cache = None
        self.kv_caches = []
        self.requests.clear()


def _step_seed(seed: int | None, num_output_tokens: int) -> int:
    return ((seed or 0) * 1_000_003 + num_output_tokens * 0x9E3779B9) % (1 << 63)


def _row_logprobs(per_row: TokenLogprobs, row: int, num_logprobs: int) -> TokenLogprobs:
    """One request's slice of a batched TokenLogprobs, trimmed to the top-k it asked for
    (the chosen token first)."""
    keep = None if num_logprobs == -1 else num_logprobs + 1
    return TokenLogprobs(
        token_ids=[per_row.token_ids[row][:keep]],
        logprobs=[per_row.logprobs[row][:keep]],
        ranks=[per_row.ranks[row]],
    )
