"""torch profiler traces of the steps between `LLM.start_profile()` and `stop_profile()`."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, trace_dir: str, rank: int, device: torch.device) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        os.makedirs(trace_dir, exist_ok=True)
        self.trace_dir = trace_dir
        self._profiler = torch.profiler.profile(
            activities=activities,
            record_shapes=True,
            with_stack=False,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(trace_dir, worker_name=f"rank{rank}"),
        )
        self._profiler.start()
        logger.info("Profiling to %s.", trace_dir)

    def stop(self) -> None:
        self._profiler.stop()
        logger.info("Profiler trace written to %s.", self.trace_dir)
