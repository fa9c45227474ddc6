"""Runs the model for one step: keeps each request's tokens and block table, builds the flat
input batch, sets the forward context, computes logits and samples. It never sees text."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from pagedllm.config import EngineConfig
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)
from pagedllm.forward_context import set_forward_context
from pagedllm.layers.attention.kv_cache_spec import KVCacheSpec
from pagedllm.layers.attention.layer import Attention
from pagedllm.layers.sampler import Sampler, SamplingMetadata, compute_prompt_logprobs
from pagedllm.model_loader.loaders import get_model
from pagedllm.worker.cuda_graphs import CUDAGraphRunner
from pagedllm.worker.input_batch import (
    HostStager,
    InputBatch,
    StepInputs,
    build_profile_inputs,
    build_step_inputs,
)
from pagedllm.worker.multimodal_runner import MultiModalRunner, supports_multimodal
from pagedllm.worker.step_output import InFlightStep

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
        self.eos_token_ids: frozenset[int] = frozenset()
        self.input_batch = self._new_input_batch()
        self._cached_metadata: tuple[tuple[int, bytes], SamplingMetadata] | None = None
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
        self.async_scheduling = engine_config.scheduler_config.async_scheduling
        self._in_flight: InFlightStep | None = None
        """The last step run, whose sampled ids may not have reached the host yet."""
        self.mm_runner: MultiModalRunner | None = None

    def load_model(self) -> None:
        self.model = get_model(self.model_config, self.config.load_config, self.device)
        if self.config.load_config.cpu_offload_bytes:
            from pagedllm.worker.cpu_offload import offload_weights_to_cpu

            offload_weights_to_cpu(self.model, self.config.load_config.cpu_offload_bytes, self.device)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        kv_cache_dtype = self.config.cache_config.element_dtype(self.model_config.dtype)
        if kv_cache_dtype != self.model_config.dtype:
            for layer in self.attention_layers:
                layer.set_kv_cache_dtype(kv_cache_dtype)
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
    def warm_up_kernels(self) -> None:
        """Runs three small dummy steps over KV blocks 0-2 (a prefill of 17 tokens with random
        sampling; its decode mixed with a greedy 15-token prefill; that request's decode alone,
        all greedy) so that the Triton kernels the first real steps use (paged prefill, cache
        writes, random and greedy sampling on float32 and model-dtype logits) compile during
        start-up, not in the user's first generate. The blocks keep garbage, which every real
        request overwrites before reading (prefix-cache entries only come from real steps)."""
        if self.device.type == "cuda":
            self.run_dummy_steps()
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def run_dummy_steps(self) -> None:
        if not self.kv_caches or self.kv_caches[0].shape[1] < 3:
            return
        random = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=2, ignore_eos=True)
        greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        first, second = "__pagedllm_warm_up_0__", "__pagedllm_warm_up_1__"

        def new(req_id: str, num_tokens: int, block_ids: list[int], params: SamplingParams) -> NewRequestData:
            return NewRequestData(req_id, [0] * num_tokens, num_tokens, params, block_ids, 0, self.eos_token_id)

        self.execute_model(SchedulerOutput([new(first, 17, [0, 1], random)], [], {first: 17}, 17))
        self.execute_model(SchedulerOutput(
            [new(second, 15, [2], greedy)], [CachedRequestData(first, [], 17)], {first: 1, second: 15}, 16
        ))
        self.execute_model(SchedulerOutput([], [CachedRequestData(second, [], 15)], {second: 1}, 1))
        self.execute_model(SchedulerOutput([], [], {}, 0, finished_req_ids={first, second}))
        self._in_flight = None
        self._cached_metadata = None

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
        """Runs one step. With async scheduling it returns the output of the step before
        (empty on the first), read only once this step's work is queued on the device;
        without, this step's own output."""
        self._update_states(scheduler_output)
        previous = self._in_flight
        if scheduler_output.is_empty:
            self._in_flight = None
            return previous.resolve() if previous is not None else ModelRunnerOutput(sampled_token_ids={})
        batch = self.input_batch
        previous_sampled = previous.device_sampled if previous is not None else None
        inputs = build_step_inputs(scheduler_output, batch, self.block_size, self.stager, previous_sampled)
        # After build_step_inputs: decode rows' ids (sampled by the step in flight) are already
        # on the device; the merge overwrites only the placeholder rows of prefill chunks.
        inputs_embeds = self.mm_runner.prepare(inputs) if self.mm_runner is not None else None
        hidden_states = self._forward(inputs, inputs_embeds)

        batch.num_computed_tokens[inputs.rows] = inputs.start_positions + inputs.query_lens
        output = ModelRunnerOutput(sampled_token_ids={req_id: [] for req_id in inputs.req_ids})
        output.prompt_logprobs = self._prompt_logprobs(inputs, hidden_states)
        step = InFlightStep(output=output)
        if len(inputs.samples):
            # The sampling rows came to the device with the step's inputs: no host list is
            # copied here (which would wait for the forward before the sampler is queued).
            assert inputs.sample_token_rows is not None
            last_hidden_states = hidden_states[inputs.sample_token_rows]
            step = self._sample(last_hidden_states, inputs.rows[inputs.samples], output, previous, scheduler_output)
        self._in_flight = step
        if not self.async_scheduling:
            self._in_flight = None
            return step.resolve()
        return previous.resolve() if previous is not None else ModelRunnerOutput(sampled_token_ids={})

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in scheduler_output.finished_req_ids:
            batch.remove(req_id)
            if self.mm_runner is not None:
                self.mm_runner.remove_request(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            if self.mm_runner is not None:
                self.mm_runner.add_request(new)
            self.eos_token_id = new.eos_token_id
            self.eos_token_ids = new.eos_token_ids
            generator = None
            if new.sampling_params.seed is not None:
                generator = torch.Generator(device=self.device)
            batch.add(new.req_id, new.token_ids, new.num_prompt_tokens, new.block_ids,
                      new.num_computed_tokens, new.sampling_params, generator)
        for cached in scheduler_output.scheduled_cached_reqs:
            row = batch.row_of[cached.req_id]
            batch.append_blocks(row, cached.new_block_ids)
            batch.num_computed_tokens[row] = cached.num_computed_tokens

    def _forward(self, inputs: StepInputs, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        assert self.model is not None, "load_model() first"
        max_seq_len_to_capture = self.config.compilation_config.max_seq_len_to_capture
        # Graphs are captured on input ids and 1-D positions: steps with merged embeddings or
        # M-RoPE [3, T] positions run eagerly.
        if (
            self.cuda_graphs is not None
            and inputs_embeds is None
            and inputs.positions.ndim == 1
            and inputs.attn_metadata.max_seq_len <= max_seq_len_to_capture
        ):
            batch_size = self.cuda_graphs.padded_size(inputs)
            if batch_size is not None:
                return self.cuda_graphs.run(inputs, batch_size)
        with set_forward_context(inputs.attn_metadata):
            if inputs_embeds is not None:
                return self.model(inputs.input_ids, inputs.positions, inputs_embeds)
            return self.model(inputs.input_ids, inputs.positions)

    def _compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        # In the model's dtype: the sampler casts them to float32 only when it edits them.
        return self.model.compute_logits(hidden_states)

    def _sample(
        self, last_hidden_states: torch.Tensor, rows: np.ndarray, output: ModelRunnerOutput,
        previous: InFlightStep | None, scheduler_output: SchedulerOutput,
    ) -> InFlightStep:
        logits = self._compute_logits(last_hidden_states)
        batch = self.input_batch
        reads_history = bool(batch.reads_history[rows].any())
        if previous is not None and reads_history:
            # These rows read their earlier tokens on the host: wait for the step before
            # (already queued ahead of this one, so the device stays busy meanwhile).
            previous.resolve()
        output_lens = batch.num_tokens[rows] - batch.num_prompt_tokens[rows]
        for row, num_output in zip(rows[batch.seeded[rows]].tolist(), output_lens[batch.seeded[rows]].tolist()):
            # Seeding by (seed, output length) makes a seeded request's samples independent
            # of batch composition and of preemption (a resumed request gets no replay).
            generator = batch.generators[row]
            assert generator is not None
            generator.manual_seed(_step_seed(batch.sampling_params[row].seed, num_output))
        # Reused while the same rows sample and no row's metadata depends on its tokens so far
        # (penalties, an unmet min_tokens): then this step does no per-request work here.
        per_step = reads_history or bool((batch.min_tokens[rows] > output_lens).any())
        key = (batch.version, rows.tobytes())
        if not per_step and self._cached_metadata is not None and self._cached_metadata[0] == key:
            metadata = self._cached_metadata[1]
        else:
            metadata = self._build_sampling_metadata(rows)
            self._cached_metadata = None if per_step else (key, metadata)
        # The grammar bitmask changes every step, so it is set on the (possibly reused) metadata.
        metadata.grammar_bitmask = None
        if scheduler_output.grammar_bitmask is not None:
            req_ids = [batch.req_ids[row] for row in rows.tolist()]
            metadata.grammar_bitmask = grammar_bitmask_rows(scheduler_output, req_ids, self.device)
        sampler_output = self.sampler(logits, metadata)
        return InFlightStep.start(output, batch, rows, sampler_output.sampled_token_ids, sampler_output.logprobs)

    def _build_sampling_metadata(self, rows: np.ndarray) -> SamplingMetadata:
        batch = self.input_batch
        params = [batch.sampling_params[row] for row in rows.tolist()]
        # Token histories are copied only for rows that read them (penalties, min_tokens):
        # copying every row's context each step would cost O(batch x context) per token.
        prompt_ids, output_ids = [], []
        for row, p in zip(rows.tolist(), params):
            history = bool(batch.reads_history[row])
            prompt_ids.append(batch.prompt_ids(row).tolist() if history else ())
            output_ids.append(batch.output_ids(row).tolist() if history or p.min_tokens > 0 else ())
        return SamplingMetadata.build(
            params=params,
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            generators=[batch.generators[row] for row in rows.tolist()],
            default_generator=self.default_generator,
            eos_token_id=self.eos_token_id,
            vocab_size=self.vocab_size,
            device=self.device,
            extra_eos_token_ids=self.eos_token_ids,
        )

    def _prompt_logprobs(self, inputs: StepInputs, hidden_states: torch.Tensor) -> dict[str, TokenLogprobs]:
        """Logprobs of the prompt tokens this step's positions predict: the logits at position
        p score prompt token p + 1."""
        results: dict[str, TokenLogprobs] = {}
        batch = self.input_batch
        # One array test per step; the loop runs only over the rows that asked.
        for index in np.flatnonzero(batch.wants_prompt_logprobs[inputs.rows]).tolist():
            row = int(inputs.rows[index])
            num_logprobs = batch.sampling_params[row].prompt_logprobs
            start, query_start = int(inputs.start_positions[index]), int(inputs.query_starts[index])
            end = min(start + int(inputs.query_lens[index]), int(batch.num_prompt_tokens[row]) - 1)
            if start >= end:
                continue
            req_id = inputs.req_ids[index]
            rows = hidden_states[query_start : query_start + end - start]
            targets = torch.from_numpy(batch.token_ids[row, start + 1 : end + 1].astype(np.int64)).to(self.device)
            results[req_id] = compute_prompt_logprobs(self._compute_logits(rows), targets, num_logprobs)
        return results

    def _new_input_batch(self) -> InputBatch:
        max_model_len = self.model_config.max_model_len
        return InputBatch(
            self.config.scheduler_config.max_num_seqs, max_model_len, -(-max_model_len // self.block_size)
        )

    def drop_requests(self) -> None:
        """Forgets every request (sleep mode frees the KV cache they live in)."""
        self.input_batch = self._new_input_batch()
        self._in_flight = None
        self._cached_metadata = None
        if self.mm_runner is not None:
            self.mm_runner.requests.clear()

    def shutdown(self) -> None:
        self.cuda_graphs = None
        for layer in self.attention_layers:
            layer.kv_cache = None
        self.kv_caches = []
        self.input_batch = InputBatch(0, 0, 0)
        self._in_flight = None


def grammar_bitmask_rows(scheduler_output: SchedulerOutput, req_ids: list[str], device: torch.device) -> torch.Tensor | None:
    """The step's structured-output bitmask in sampling-row order; unconstrained rows allow
    every token (-1 words)."""
    rows_of = scheduler_output.structured_output_request_ids
    bitmask = scheduler_output.grammar_bitmask
    if not any(req_id in rows_of for req_id in req_ids):
        return None
    full = np.full((len(req_ids), bitmask.shape[1]), -1, dtype=np.int32)
    for row, req_id in enumerate(req_ids):
        source = rows_of.get(req_id)
        if source is not None:
            full[row] = bitmask[source]
    return torch.from_numpy(full).to(device)


def _step_seed(seed: int | None, num_output_tokens: int) -> int:
    return ((seed or 0) * 1_000_003 + num_output_tokens * 0x9E3779B9) % (1 << 63)
