"""One worker per tensor-parallel rank: owns the device, the model runner and the KV cache."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import (
    destroy_distributed,
    get_tp_group,
    init_custom_all_reduce,
    init_distributed,
)
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.layers.ops import triton_ops_available
from pagedllm.model_loader.loaders import model_weight_bytes
from pagedllm.worker import memory_profiler
from pagedllm.worker.model_runner import ModelRunner
from pagedllm.worker.precompile import hash_triton_in_background, precompile_kernels
from pagedllm.worker.profiler import StepProfiler
from pagedllm.worker.sleep_mode import SleepState, put_to_sleep, wake_up

logger = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        engine_config: EngineConfig,
        rank: int,
        local_rank: int,
        distributed_init_method: str | None = None,
        forked: bool = False,
        hosted_store: bool = False,
    ) -> None:
        """`distributed_init_method` (e.g. "tcp://127.0.0.1:29500") is where the ranks meet to
        form their process group; needed when tensor_parallel_size > 1. `forked`: this process
        was forked from the engine's, so torch runs on one CPU thread (the OpenMP thread pool
        the engine's process may hold does not survive a fork, and a parallel region over
        more threads would wait forever for the missing ones). `hosted_store`: the executor
        hosts the rendezvous store at `distributed_init_method` (parallel_state.host_store)."""
        self.forked = forked
        self.hosted_store = hosted_store
        self.config = engine_config
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = engine_config.parallel_config.tensor_parallel_size
        self.distributed_init_method = distributed_init_method
        self.device = engine_config.device_config.device
        self.model_runner: ModelRunner | None = None
        self._graph_reserve_bytes = 0
        # The start-up memory profile (CUDA only), kept for tests and tools to read.
        self.memory_profile: memory_profiler.MemoryProfile | None = None
        self._memory_baseline: memory_profiler.MemoryBaseline | None = None
        self._num_kv_blocks = 0
        self._sleep_state: SleepState | None = None
        self._profiler: StepProfiler | None = None
        self._triton_hashing: threading.Thread | None = None

    def init_device(self) -> None:
        start = time.perf_counter()
        if self.device.type == "cuda":
            # One rank uses the device the user named (cuda:1); several use one GPU each, in
            # CUDA_VISIBLE_DEVICES order.
            index = self.device.index if self.world_size == 1 and self.device.index is not None else self.local_rank
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
            if triton_ops_available("cuda"):
                self._triton_hashing = hash_triton_in_background()
            # Before anything of ours is allocated: what other processes use is not ours.
            self._memory_baseline = memory_profiler.take_memory_baseline(self.config, self.device)
        elif self.world_size > 1 and not self.forked:
            # N ranks on one CPU each take an equal share of the cores; torch's default (every
            # core per process) oversubscribes and runs several times slower.
            torch.set_num_threads(max(1, _num_usable_cpus() // self.world_size))
        if self.forked:
            torch.set_num_threads(1)
        if self.world_size > 1:
            if self.distributed_init_method is None:
                raise ValueError(
                    f"tensor_parallel_size={self.world_size} needs a distributed_init_method "
                    "(tcp://host:port) for the ranks to meet; the executor passes one."
                )
            if self.device.type == "cuda":
                # NVLink SHARP (multicast) all-reduce needs fabric support that many VMs and
                # containers lack, where NCCL then fails or wedges the GPUs; at inference
                # message sizes it gains little. A value the user set is kept.
                os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
                os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
            device_ready = time.perf_counter()
            init_distributed(
                self.world_size, self.rank, "nccl" if self.device.type == "cuda" else "gloo",
                self.distributed_init_method, self.local_rank, hosted_store=self.hosted_store,
            )
            group_joined = time.perf_counter()
            # NCCL builds its communicator at the first collective; do it now, so it is not
            # first met inside a CUDA graph capture, and a broken link fails at start-up.
            dist.all_reduce(torch.zeros(1, device=self.device), group=get_tp_group())
            communicator_built = time.perf_counter()
            init_custom_all_reduce(self.device, self.config.parallel_config.disable_custom_all_reduce)
            logger.info(
                "Rank %d: device %.2f s, joining the group %.2f s, first all-reduce %.2f s, "
                "peer-to-peer all-reduce set-up %.2f s.", self.rank, device_ready - start,
                group_joined - device_ready, communicator_built - group_joined,
                time.perf_counter() - communicator_built,
            )
        seed = self.config.model_config.seed
        if seed is not None:
            torch.manual_seed(seed)

    def load_model(self) -> None:
        self.model_runner = ModelRunner(self.config, self.device)
        self.model_runner.load_model()
        if self.world_size > 1:
            self._agree_on_sampling_seed(self.model_runner)

    def _agree_on_sampling_seed(self, runner: ModelRunner) -> None:
        """Every rank samples from the same all-gathered logits and appends the token it drew
        to its own copy of each request; the ranks stay in step only if they draw the same
        tokens, so they share rank 0's generator seed (seed=None draws a fresh one per rank)."""
        seed = torch.tensor(
            [runner.default_generator.initial_seed() % (1 << 63)], dtype=torch.int64, device=self.device
        )
        dist.broadcast(seed, src=0, group=get_tp_group())
        runner.default_generator.manual_seed(int(seed.item()))

    def compile_kernels(self) -> None:
        """Compiles the Triton kernels the engine's steps will launch, in parallel (CUDA only;
        see precompile.py), so that neither the profile nor the graph capture nor the first
        generate waits for a compiler."""
        if self.device.type == "cuda" and triton_ops_available("cuda"):
            # The ranks of one machine compile side by side: each takes its share of the cores.
            threads = max(1, _num_usable_cpus() // self.world_size)
            if self._triton_hashing is not None:
                self._triton_hashing.join()
            precompile_kernels(self._runner(), self._decode_batch_sizes(), threads)

    def determine_num_kv_blocks(self) -> int:
        runner = self._runner()
        weights_bytes = _device_weight_bytes(runner.model)
        if self.device.type == "cuda":
            assert self._memory_baseline is not None, "init_device() first"
            profile = memory_profiler.profile_cuda_memory(
                self.config, self.device, self._memory_baseline, weights_bytes, runner.profile_run
            )
            self.memory_profile = profile
            self._graph_reserve_bytes = memory_profiler.estimate_cuda_graph_bytes(
                self.config, profile.peak_activation_bytes
            )
            memory_profiler.log_cuda_budget(self.config, profile, self._graph_reserve_bytes)
            kv_bytes = self.config.cache_config.kv_cache_memory_bytes
            if kv_bytes is None:
                kv_bytes = max(0, profile.kv_budget_bytes - self._graph_reserve_bytes)
        else:
            # On CPU the budget is set by the user; a profiling forward of
            # max_num_batched_tokens would cost seconds and decide nothing.
            memory_profiler.log_cpu_budget(self.config, weights_bytes)
            kv_bytes = memory_profiler.cpu_kv_budget_bytes(self.config)
        sizing = memory_profiler.size_kv_cache(self.config, kv_bytes, runner.kv_cache_block_bytes())
        return memory_profiler.check_and_log_kv_cache(self.config, sizing, self.device)

    def _decode_batch_sizes(self) -> tuple[int, ...]:
        """The decode batches start-up compiles for: the CUDA graph sizes, or without graphs
        the sizes that take the few-row kernels."""
        compilation_config = self.config.compilation_config
        if compilation_config.use_cudagraph:
            return tuple(compilation_config.cudagraph_capture_sizes)
        return (1, 2, 3, 4, 5, 6, 7, 8)

    def kv_cache_block_bytes(self) -> int:
        """Bytes one block takes summed over this rank's attention layers."""
        return self._runner().kv_cache_block_bytes()

    def model_weight_bytes(self) -> int:
        """Bytes of this rank's parameters (what the memory profile counts as weights)."""
        return model_weight_bytes(self._runner().model)

    def kv_cache_bytes(self) -> int:
        return sum(cache.numel() * cache.element_size() for cache in self._runner().kv_caches)

    def graph_memory_bytes(self) -> int:
        graphs = self._runner().cuda_graphs
        return graphs.graph_memory_bytes if graphs is not None else 0

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._num_kv_blocks = num_blocks
        self._runner().initialize_kv_cache(num_blocks)

    def compile_or_warm_up_model(self) -> None:
        """Captures the decode CUDA graphs (nothing to do on CPU or with enforce_eager), then
        runs dummy steps so the first generate compiles no Triton kernel."""
        graph_bytes = self._runner().capture_cuda_graphs()
        self._runner().warm_up_kernels()
        if graph_bytes:
            logger.info(
                "CUDA graphs took %s (%s was reserved for them).",
                memory_profiler.format_gib(graph_bytes), memory_profiler.format_gib(self._graph_reserve_bytes),
            )

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._runner().execute_model(scheduler_output)

    def loaded_weight_bytes(self) -> int:
        """Bytes of tensor data this rank read from checkpoint files while loading (its shards
        of the sliced matrices plus the small tensors it reads whole)."""
        stats = getattr(self._runner().model, "load_stats", None)
        return 0 if stats is None else stats.bytes_read

    def save_sharded_state(self, path: str, pattern: str | None = None, max_size: int | None = None) -> list[str]:
        """Write this rank's parameters to `path` (see model_loader/sharded_state.py)."""
        from pagedllm.model_loader.sharded_state import save_rank_state

        model = self._runner().model
        assert model is not None
        return save_rank_state(model, path, self.rank, self.world_size, pattern, max_size,
                               self.config.model_config.quantization)

    def get_pid(self) -> int:
        return os.getpid()

    # --- LLM methods for RL frameworks and tools (collective_rpc, apply_model, sleep, profile) ---

    def run_callable(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """LLM.collective_rpc(callable): the function runs with this worker as first argument."""
        return function(self, *args, **kwargs)

    def apply_model(self, function: Any) -> Any:
        """LLM.apply_model: function(model) on this rank's model."""
        return function(self._runner().model)

    def sleep(self, level: int = 1) -> None:
        if self._sleep_state is None:
            self._sleep_state = put_to_sleep(self._runner(), level, self._num_kv_blocks)

    def wake_up(self, tags: list[str] | None = None) -> None:
        if self._sleep_state is not None and wake_up(self._runner(), self._sleep_state, tags):
            self._sleep_state = None

    def is_sleeping(self) -> bool:
        return self._sleep_state is not None

    def start_profile(self, trace_dir: str) -> None:
        if self._profiler is None:
            self._profiler = StepProfiler(trace_dir, self.rank, self.device)

    def stop_profile(self) -> None:
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None

    def shutdown(self) -> None:
        if self.model_runner is not None:
            self.model_runner.shutdown()
            self.model_runner = None
        if self.world_size > 1:
            destroy_distributed()

    def _runner(self) -> ModelRunner:
        if self.model_runner is None:
            raise RuntimeError("load_model() must run before this call.")
        return self.model_runner


def _device_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes resident on the GPU: with cpu_offload_gb, the offloaded ones live on the host."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.is_cuda)


def _num_usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
