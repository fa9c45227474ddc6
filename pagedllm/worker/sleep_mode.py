"""`LLM.sleep()` / `wake_up()` on one worker: give the device memory back between uses (an RL
trainer needs it while the engine idles), as vLLM's sleep mode.

Level 1 copies the weights to pinned host memory and frees the KV cache; level 2 frees both
and reloads the weights from the checkpoint on wake-up. CUDA graphs hold the old addresses,
so they are dropped on sleep and captured again on wake-up. The KV cache comes back zeroed
(its content was lost, so the engine resets the prefix cache before sleeping)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

WAKE_UP_TAGS = ("weights", "kv_cache")


@dataclass
class SleepState:
    level: int
    num_kv_blocks: int
    host_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    """Level 1: parameter and buffer name -> host copy."""
    asleep: set[str] = field(default_factory=lambda: set(WAKE_UP_TAGS))
    """What is still released ("weights", "kv_cache")."""


def _empty_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def put_to_sleep(runner: ModelRunner, level: int, num_kv_blocks: int) -> SleepState:
    if level not in (1, 2):
        raise ValueError(f"sleep(level={level!r}): use level=1 (weights to host memory) or 2 (weights dropped).")
    assert runner.model is not None
    state = SleepState(level=level, num_kv_blocks=num_kv_blocks)
    runner.cuda_graphs = None
    for layer in runner.attention_layers:
        layer.kv_cache = None
    runner.kv_caches = []
    runner.drop_requests()
    pin = runner.device.type == "cuda"
    if level == 1:
        for name, tensor in [*runner.model.named_parameters(), *runner.model.named_buffers()]:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
            host.copy_(tensor.data)
            state.host_weights[name] = host
            tensor.data = host
    else:
        # Emptied in place, so the memory returns even where another object still holds the
        # module (the weights are read again from the checkpoint on wake_up).
        for tensor in [*runner.model.parameters(), *runner.model.buffers()]:
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        runner.model = None
        runner.attention_layers = []
    _empty_device_cache(runner.device)
    logger.info("Asleep at level %d: weights %s, KV cache freed.", level, "in host memory" if level == 1 else "dropped")
    return state


def wake_up(runner: ModelRunner, state: SleepState, tags: list[str] | None) -> bool:
    """Restores what `tags` names (default: everything); returns True once fully awake."""
    tags = list(WAKE_UP_TAGS) if tags is None else list(tags)
    unknown = sorted(set(tags) - set(WAKE_UP_TAGS))
    if unknown:
        raise ValueError(f"wake_up(tags={tags!r}): unknown tag(s) {unknown}; use {list(WAKE_UP_TAGS)}.")
    if "weights" in tags and "weights" in state.asleep:
        if state.level == 1:
            assert runner.model is not None
            for name, tensor in [*runner.model.named_parameters(), *runner.model.named_buffers()]:
                tensor.data = state.host_weights[name].to(runner.device)
            state.host_weights.clear()
        else:
            runner.load_model()
        state.asleep.discard("weights")
    if "kv_cache" in tags and "kv_cache" in state.asleep:
        if "weights" in state.asleep and state.level == 2:
            raise ValueError("wake_up(tags=['kv_cache']) after sleep(level=2) needs the weights first: wake_up(tags=['weights']).")
        runner.initialize_kv_cache(state.num_kv_blocks)
        state.asleep.discard("kv_cache")
    if not state.asleep:
        runner.capture_cuda_graphs()
        return True
    return False
