"""One worker per tensor-parallel rank: owns the device, the model runner and the KV cache."""

from __future__ import annotations

import logging

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.model_loader.loaders import model_weight_bytes
from pagedllm.worker import memory_profiler
from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, engine_config: EngineConfig, rank: int, local_rank: int) -> None:
        self.config = engine_config
        self.rank = rank
        self.local_rank = local_rank
        self.device = engine_config.device_config.device
        self.model_runner: ModelRunner | None = None
        self._graph_reserve_bytes = 0

    def init_device(self) -> None:
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        seed = self.config.model_config.seed
        if seed is not None:
            torch.manual_seed(seed)

    def load_model(self) -> None:
        self.model_runner = ModelRunner(self.config, self.device)
        self.model_runner.load_model()

    def determine_num_kv_blocks(self) -> int:
        runner = self._runner()
        if self.device.type == "cuda":
            profile = memory_profiler.profile_cuda_memory(
                self.config, self.device, model_weight_bytes(runner.model), runner.profile_run
            )
            kv_bytes = profile.kv_cache_bytes
            if self.config.cache_config.kv_cache_memory_bytes is None:
                self._graph_reserve_bytes = memory_profiler.estimate_cuda_graph_bytes(self.config, profile)
                kv_bytes = max(0, kv_bytes - self._graph_reserve_bytes)
        else:
            # On CPU the budget is set by the user; a profiling forward of
            # max_num_batched_tokens would cost seconds and decide nothing.
            kv_bytes = memory_profiler.cpu_kv_cache_bytes(self.config)
        return memory_profiler.num_kv_blocks_for(
            self.config, kv_bytes, runner.kv_cache_block_bytes(), self.device
        )

    def kv_cache_block_bytes(self) -> int:
        """Bytes one block takes summed over this rank's attention layers."""
        return self._runner().kv_cache_block_bytes()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._runner().initialize_kv_cache(num_blocks)

    def compile_or_warm_up_model(self) -> None:
        """Captures the decode CUDA graphs (nothing to do on CPU or with enforce_eager)."""
        graph_bytes = self._runner().capture_cuda_graphs()
        if graph_bytes:
            logger.info(
                "CUDA graphs took %s (%s was reserved for them).",
                memory_profiler.format_gib(graph_bytes), memory_profiler.format_gib(self._graph_reserve_bytes),
            )

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._runner().execute_model(scheduler_output)

    def shutdown(self) -> None:
        if self.model_runner is not None:
            self.model_runner.shutdown()
            self.model_runner = None

    def _runner(self) -> ModelRunner:
        if self.model_runner is None:
            raise RuntimeError("load_model() must run before this call.")
        return self.model_runner
