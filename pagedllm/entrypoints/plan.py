"""`pagedllm plan --model M [--gpu-memory 80GiB] [--tensor-parallel-size N] [engine options] [--json]`:
prints what the engine would do with memory, per rank, without loading weights or touching a
GPU (the estimator is worker/memory_plan.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import torch

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.worker.memory_plan import NOT_ENOUGH_ALONE, MemoryPlan, plan_memory
from pagedllm.worker.memory_policy import format_gib

_DEFAULT_GPU_MEMORY = "80GiB"


def add_plan_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "plan",
        help="print the memory plan (weights, activations, KV cache) without loading the model",
        description="Reads config.json and the checkpoint's headers only; needs no GPU.",
    )
    parser.add_argument("--gpu-memory", type=str, default=None,
                        help=f"memory of one GPU, e.g. 80GiB (default: the visible GPU's, else {_DEFAULT_GPU_MEMORY})")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    # Plans are for a GPU unless --device cpu; --device is among the engine options.
    EngineArgs.add_cli_args(parser)
    return parser


def build_plan(args: argparse.Namespace) -> tuple[MemoryPlan, int | None]:
    engine_args = EngineArgs.from_cli_args(args)
    device = "cpu" if engine_args.device == "cpu" else "cuda"
    gpu_memory = None
    if device == "cuda":
        gpu_memory = parse_bytes(args.gpu_memory) if args.gpu_memory else default_gpu_memory_bytes()
        gpu_memory = gpu_memory or parse_bytes(_DEFAULT_GPU_MEMORY)
    config = engine_args.create_planning_config(device)
    return plan_memory(config, gpu_memory), gpu_memory


def run_plan(args: argparse.Namespace) -> int:
    plan, gpu_memory = build_plan(args)
    if args.json:
        print(json.dumps(plan_to_dict(plan, gpu_memory), indent=2))
    else:
        print(render_plan(plan, gpu_memory))
    return 0


def plan_to_dict(plan: MemoryPlan, gpu_memory: int | None) -> dict[str, Any]:
    data = dataclasses.asdict(plan)
    data.update(
        gpu_memory_bytes=gpu_memory,
        weights_bytes=plan.weights_bytes,
        num_kv_blocks=plan.kv.num_blocks,
        kv_cache_tokens=plan.kv.num_tokens,
        kv_cache_bytes=plan.kv.kv_cache_bytes,
        max_concurrency=round(plan.kv.max_concurrency(plan.max_model_len), 3),
        fits=plan.fits,
        kv=dict(
            data["kv"],
            num_tokens=plan.kv.num_tokens,
            kv_cache_bytes=plan.kv.kv_cache_bytes,
            unused_budget_bytes=plan.kv.unused_budget_bytes,
            max_concurrency=round(plan.kv.max_concurrency(plan.max_model_len), 3),
        ),
    )
    return data


def render_plan(plan: MemoryPlan, gpu_memory: int | None) -> str:
    where = (f"GPU of {format_gib(gpu_memory or 0)}" if plan.device == "cuda" else "CPU")
    lines = [
        f"Memory plan per rank ({plan.tensor_parallel_size} rank(s), {where}, dtype {plan.dtype}"
        f"{', quantization ' + plan.quantization if plan.quantization else ''}"
        f"{', KV cache ' + plan.kv_cache_dtype if plan.kv_cache_dtype != plan.dtype else ''}; "
        f"weights from {plan.weights_source}):",
        f"  budget                 {format_gib(plan.budget_bytes)}",
        f"  weights                {format_gib(plan.weights_bytes)}  ("
        + ", ".join(f"{name} {format_gib(size)}" for name, size in sorted(plan.weights_bytes_by_dtype.items()))
        + (f"; {format_gib(plan.offloaded_bytes)} of them in host memory (cpu_offload_gb)" if plan.offloaded_bytes else "")
        + ")",
    ]
    if plan.device == "cuda":
        lines += [
            f"  activation peak        {format_gib(plan.activation_peak_bytes)}  (estimate)",
            f"  non-torch memory       {format_gib(plan.non_torch_bytes)}  (estimate)",
            f"  CUDA graphs            {format_gib(plan.cuda_graph_bytes)}  (estimate)",
        ]
    kv = plan.kv
    lines += [
        f"  KV cache budget        {format_gib(kv.budget_bytes)}",
        f"  KV cache per token     {plan.kv_bytes_per_token / 1024:.1f} KiB  ({kv.block_bytes / 1024:.1f} KiB per block of {kv.block_size})",
        f"  KV cache               {kv.num_blocks:,} blocks, {kv.num_tokens:,} tokens, {format_gib(kv.kv_cache_bytes)}"
        + (f"  (capped at max_num_seqs x max_model_len + headroom; {format_gib(kv.unused_budget_bytes)} stays free)"
           if kv.num_blocks < kv.budget_blocks else ""),
        f"  max concurrency        {kv.max_concurrency(plan.max_model_len):.2f}x requests of max_model_len {plan.max_model_len:,}"
        f" (max_num_seqs {plan.max_num_seqs})",
    ]
    lines.append("Fits." if plan.fits else "Does not fit: " + "; ".join(plan.problems) + ".")
    if plan.suggestions:
        if plan.fits:
            heading = "Settings that would help:"
        elif all(suggestion.endswith(NOT_ENOUGH_ALONE) for suggestion in plan.suggestions):
            heading = "Settings that would help (none is enough alone):"
        else:
            heading = "Settings that would fit:"
        lines.append(heading)
        lines += [f"  - {suggestion}" for suggestion in plan.suggestions]
    return "\n".join(lines)


def default_gpu_memory_bytes() -> int | None:
    """The visible GPU's memory, or None without one."""
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[1])
    return None


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '81920MiB', '8.5e10' -> bytes (GiB/MiB binary, GB/MB decimal)."""
    units = {"tib": 1 << 40, "gib": 1 << 30, "mib": 1 << 20, "kib": 1 << 10, "tb": 10**12, "gb": 10**9,
             "mb": 10**6, "kb": 10**3, "t": 1 << 40, "g": 1 << 30, "m": 1 << 20, "k": 1 << 10, "b": 1}
    cleaned = text.strip().lower().replace(" ", "")
    for unit, scale in units.items():
        if cleaned.endswith(unit):
            number = cleaned[: -len(unit)]
            break
    else:
        number, scale = cleaned, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"--gpu-memory={text!r} is not a size; use e.g. 80GiB, 24GB or 40960MiB.") from None
    if value <= 0:
        raise ValueError(f"--gpu-memory={text!r} must be positive, e.g. 80GiB.")
    if scale == 1 and value < 1 << 20:
        raise ValueError(f"--gpu-memory={text!r} has no unit and is under 1 MiB; did you mean {text.strip()}GiB?")
    return int(value)


if __name__ == "__main__":
    from pagedllm.entrypoints.cli import main

    sys.exit(main(["plan", *sys.argv[1:]]))
