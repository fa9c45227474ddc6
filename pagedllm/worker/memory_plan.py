"""`pagedllm plan`: the memory an engine would use, per rank, before anything is loaded.

It reads config.json and the checkpoint's headers (safetensors JSON headers, GGUF tensor
infos; a model without weight files, or a hub id, is planned from config.json's shapes) and
applies the engine's own sizing policy (memory_policy.py) to estimated figures: the
weights, the activation peak of the profiling forward, non-torch memory, and CUDA graphs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from pagedllm.config import EngineConfig
from pagedllm.layers.attention.kv_cache_spec import KVCacheSpec
from pagedllm.layers.vocab_embedding import pad_vocab_size
from pagedllm.worker import memory_policy
from pagedllm.worker.checkpoint_shapes import CheckpointTensor, read_checkpoint_tensors
from pagedllm.worker.memory_policy import KVCacheSizing

# Memory this process takes outside torch's allocator after start-up (kernel modules,
# library handles); NCCL's buffers add to it with several ranks.
NON_TORCH_BYTES = 256 << 20
# The end of a suggestion that would not make the plan fit by itself.
NOT_ENOUGH_ALONE = " (not enough alone)"
NCCL_BYTES = 512 << 20
# Bytes per logit row element live at the sampler's peak: float32 logits, probabilities,
# a full sort's values and int64 indices, and the float64 running mass of top-p.
_SAMPLER_BYTES_PER_LOGIT = 28
_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
    "U16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1,
}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_COLUMN_SPLIT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_SPLIT = ("o_proj", "down_proj")
_LINEAR = _COLUMN_SPLIT + _ROW_SPLIT


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    tensor_parallel_size: int
    dtype: str
    quantization: str | None
    weights_source: str
    """Where the weight shapes came from: safetensors headers, GGUF metadata or config.json."""
    weights_bytes_by_dtype: dict[str, int]
    """Per rank, by the dtype the engine holds them in."""
    offloaded_bytes: int
    """Of those, the bytes cpu_offload_gb keeps in host memory (not in the GPU budget)."""
    budget_bytes: int
    """Per rank: total * gpu_memory_utilization on a GPU; the CPU KV budget on CPU."""
    activation_peak_bytes: int
    non_torch_bytes: int
    cuda_graph_bytes: int
    kv_bytes_per_token: int
    kv_cache_dtype: str
    """The KV cache's element type ("bfloat16", "float8_e4m3fn", ...)."""
    max_model_len: int
    max_num_seqs: int
    kv: KVCacheSizing
    problems: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def weights_bytes(self) -> int:
        """On the device: cpu_offload_gb's share is left out."""
        return sum(self.weights_bytes_by_dtype.values()) - self.offloaded_bytes

    @property
    def fits(self) -> bool:
        return not self.problems


def plan_memory(engine_config: EngineConfig, gpu_memory_bytes: int | None = None) -> MemoryPlan:
    """The plan of `engine_config` (from EngineArgs.create_planning_config) on a GPU of
    `gpu_memory_bytes` (per rank), or on CPU when the config's device is the CPU."""
    tensors, source = read_checkpoint_tensors(engine_config)
    plan = _plan(engine_config, tensors, source, gpu_memory_bytes, fp8_weights=False)
    if plan.fits and plan.kv.max_concurrency(plan.max_model_len) >= plan.max_num_seqs:
        return plan
    return dataclasses.replace(plan, suggestions=_suggestions(engine_config, tensors, source, gpu_memory_bytes, plan))


def _plan(
    config: EngineConfig, tensors: list[CheckpointTensor], source: str, gpu_memory_bytes: int | None, fp8_weights: bool
) -> MemoryPlan:
    model_config, cache_config = config.model_config, config.cache_config
    scheduler_config = config.scheduler_config
    tp_size = config.parallel_config.tensor_parallel_size
    on_gpu = config.device_config.device.type == "cuda"
    # quantization='fp8' on a 16-bit checkpoint quantizes its linear weights when loading.
    fp8_weights = fp8_weights or model_config.quantization == "fp8"
    weights = weights_bytes_per_rank(config, tensors, fp8_weights)
    offloaded = offloaded_bytes(config, tensors, weights) if on_gpu else 0
    weights_bytes = sum(weights.values()) - offloaded
    block_bytes = kv_block_bytes(config)
    activation = graph = non_torch = 0
    if on_gpu:
        if gpu_memory_bytes is None:
            raise ValueError("A GPU plan needs the GPU's memory: pass --gpu-memory (e.g. 80GiB).")
        budget = int(gpu_memory_bytes * cache_config.gpu_memory_utilization)
        activation = estimate_activation_bytes(config)
        non_torch = NON_TORCH_BYTES + (NCCL_BYTES if tp_size > 1 else 0)
        if config.compilation_config.use_cudagraph:
            graph = memory_policy.cuda_graph_bytes(
                activation, scheduler_config.max_num_batched_tokens,
                config.compilation_config.cudagraph_capture_sizes, model_config.num_hidden_layers,
            )
        kv_budget = cache_config.kv_cache_memory_bytes
        if kv_budget is None:
            kv_budget = budget - weights_bytes - activation - non_torch - graph
    else:
        kv_budget = cache_config.kv_cache_memory_bytes or cache_config.cpu_kv_cache_bytes
        budget = kv_budget
    kv = memory_policy.size_kv_cache(
        kv_budget, block_bytes, cache_config.block_size, scheduler_config.max_num_seqs,
        model_config.max_model_len, cache_config.kv_cache_headroom,
    )
    problems = []
    max_model_len = model_config.max_model_len
    if model_config.max_model_len_auto and kv.num_blocks:
        # The engine sizes the cache first, then takes the longest request it holds.
        max_model_len = memory_policy.largest_max_model_len(kv.num_blocks, cache_config.block_size, max_model_len)
    if kv_budget <= 0:
        problems.append(
            f"weights, activations, non-torch memory and CUDA graphs take "
            f"{memory_policy.format_gib(budget - kv_budget)} of a {memory_policy.format_gib(budget)} budget: "
            "nothing is left for the KV cache"
        )
    elif model_config.max_model_len_auto and kv.num_blocks == 0:
        problems.append(f"the KV cache budget ({memory_policy.format_gib(kv_budget)}) holds no block of "
                        f"{kv.block_bytes:,} bytes, so max_model_len='auto' finds no length")
    elif not model_config.max_model_len_auto and kv.num_tokens < model_config.max_model_len:
        problems.append(
            f"the KV cache holds {kv.num_tokens:,} tokens, less than one request of max_model_len "
            f"{model_config.max_model_len:,}"
        )
    return MemoryPlan(
        device=config.device_config.device.type,
        tensor_parallel_size=tp_size,
        dtype=str(model_config.dtype).removeprefix("torch."),
        quantization="fp8" if fp8_weights else model_config.quantization,
        weights_source=source,
        weights_bytes_by_dtype=weights,
        offloaded_bytes=offloaded,
        budget_bytes=budget,
        activation_peak_bytes=activation,
        non_torch_bytes=non_torch,
        cuda_graph_bytes=graph,
        kv_bytes_per_token=block_bytes // cache_config.block_size,
        kv_cache_dtype=str(cache_config.element_dtype(model_config.dtype)).removeprefix("torch."),
        max_model_len=max_model_len,
        max_num_seqs=scheduler_config.max_num_seqs,
        kv=kv,
        problems=problems,
    )


def kv_block_bytes(config: EngineConfig) -> int:
    """One block over the rank's attention layers, from the layers' own KVCacheSpec."""
    model_config = config.model_config
    tp_size = config.parallel_config.tensor_parallel_size
    # Fewer KV heads than ranks: each rank holds one replicated head.
    spec = KVCacheSpec(max(1, model_config.num_key_value_heads // tp_size), model_config.head_dim,
                       config.cache_config.element_dtype(model_config.dtype))
    return model_config.num_hidden_layers * spec.page_size_bytes(config.cache_config.block_size)


def estimate_activation_bytes(config: EngineConfig) -> int:
    """The profiling forward's peak (max_num_batched_tokens tokens) plus the sampler's at
    max_num_seqs rows over the whole vocabulary."""
    model_config, scheduler_config = config.model_config, config.scheduler_config
    tp_size = config.parallel_config.tensor_parallel_size
    tokens = scheduler_config.max_num_batched_tokens
    hidden, head_dim = model_config.hidden_size, model_config.head_dim
    heads = model_config.num_attention_heads // tp_size
    kv_heads = max(1, model_config.num_key_value_heads // tp_size)
    intermediate = int(getattr(model_config.text_config, "intermediate_size", 4 * hidden)) // tp_size
    per_token = 3 * hidden + (2 * heads + 2 * kv_heads) * head_dim + 3 * intermediate
    rows = min(scheduler_config.max_num_seqs, tokens)
    sampler = rows * model_config.vocab_size * _SAMPLER_BYTES_PER_LOGIT
    return tokens * per_token * model_config.dtype.itemsize + sampler


def weights_bytes_per_rank(config: EngineConfig, tensors: list[CheckpointTensor], fp8_weights: bool) -> dict[str, int]:
    """Bytes per dtype one rank holds: float tensors in the engine's dtype (fp8 for linear
    weights when planning fp8), quantized ones as stored; split tensors divided by rank."""
    model_config = config.model_config
    tp_size = config.parallel_config.tensor_parallel_size
    dtype_name = str(model_config.dtype).removeprefix("torch.")
    tied = bool(getattr(model_config.hf_config, "tie_word_embeddings", False))
    skipped = _skipped_vision_prefixes(config)
    by_dtype: dict[str, int] = {}
    for tensor in tensors:
        if (tied and tensor.name.startswith("lm_head.")) or tensor.name.startswith(skipped):
            continue
        numel = _numel_per_rank(tensor, model_config.num_key_value_heads, tp_size)
        is_linear_weight = tensor.name.endswith(".weight") and any(f".{n}." in tensor.name for n in _LINEAR)
        if tensor.dtype not in _FLOAT_DTYPES:
            name, size = tensor.dtype.lower(), _SAFETENSORS_DTYPE_BYTES.get(tensor.dtype, 1)
        elif fp8_weights and is_linear_weight:
            name, size = "float8_e4m3fn", 1
        else:
            name, size = dtype_name, model_config.dtype.itemsize
        by_dtype[name] = by_dtype.get(name, 0) + numel * size
    return by_dtype


def _skipped_vision_prefixes(config: EngineConfig) -> tuple[str, ...]:
    """The vision tower's checkpoint prefixes when limit_mm_per_prompt turns every modality off
    (the family then skips those tensors unread: models/utils.builds_vision_tower)."""
    multimodal_config = config.model_config.multimodal_config
    if multimodal_config is None or not multimodal_config.is_text_only:
        return ()
    from pagedllm.models.registry import get_model_class

    return tuple(getattr(get_model_class(config.model_config.architecture), "vision_checkpoint_prefixes", ()))


def offloaded_bytes(config: EngineConfig, tensors: list[CheckpointTensor], weights: dict[str, int]) -> int:
    """What cpu_offload_gb moves to host memory (worker/cpu_offload.py): up to its budget, of
    everything but the vocabulary matrices."""
    budget = config.load_config.cpu_offload_bytes
    if budget <= 0:
        return 0
    vocabulary = sum(
        _numel_per_rank(t, config.model_config.num_key_value_heads, config.parallel_config.tensor_parallel_size)
        * config.model_config.dtype.itemsize
        for t in tensors if t.name.endswith(("embed_tokens.weight", "lm_head.weight"))
    )
    return min(budget, max(0, sum(weights.values()) - vocabulary))


def _numel_per_rank(tensor: CheckpointTensor, num_kv_heads: int, tp_size: int) -> int:
    numel = math.prod(tensor.shape)
    if tp_size == 1 or not tensor.shape:
        return numel
    if tensor.name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return pad_vocab_size(tensor.shape[0], tp_size) // tp_size * math.prod(tensor.shape[1:])
    if any(f".{n}." in tensor.name for n in ("k_proj", "v_proj")):
        return numel * max(1, num_kv_heads // tp_size) // num_kv_heads
    if any(f".{n}." in tensor.name for n in _COLUMN_SPLIT):
        return numel // tp_size
    if any(f".{n}." in tensor.name for n in _ROW_SPLIT) and tensor.name.endswith(".weight"):
        return numel // tp_size  # a row-parallel bias is added once, whole, on every rank
    return numel


def _suggestions(
    config: EngineConfig, tensors: list[CheckpointTensor], source: str, gpu_memory_bytes: int | None, plan: MemoryPlan
) -> list[str]:
    """Settings that would make the plan fit (or hold max_num_seqs requests at once), each with
    its numbers, from re-planning with that one setting changed."""
    from pagedllm.engine.tensor_parallel_split import check_tensor_parallel_split

    def replan(changed: EngineConfig, fp8: bool = False) -> MemoryPlan:
        return _plan(changed, tensors, source, gpu_memory_bytes, fp8_weights=fp8)

    def with_scheduler(**changes: int) -> EngineConfig:
        scheduler = dataclasses.replace(config.scheduler_config, **changes)
        model = dataclasses.replace(config.model_config, max_model_len=scheduler.max_model_len)
        return dataclasses.replace(config, scheduler_config=scheduler, model_config=model)

    suggestions = []
    tokens = plan.kv.budget_blocks * plan.kv.block_size
    if not plan.fits and tokens > 0:
        suggestions.append(f"max_model_len={tokens} (the longest one request can use; or max_model_len='auto')")
    if not plan.fits:
        for tp_size in (2, 4, 8, 16):
            if tp_size <= plan.tensor_parallel_size:
                continue
            try:
                check_tensor_parallel_split(config.model_config.hf_config, tp_size)
            except ValueError:
                continue
            parallel = dataclasses.replace(config.parallel_config, tensor_parallel_size=tp_size)
            other = replan(dataclasses.replace(config, parallel_config=parallel))
            if other.fits:
                suggestions.append(_fix(f"tensor_parallel_size={tp_size}", other))
                break
        if plan.quantization is None and plan.dtype in ("bfloat16", "float16") and plan.device == "cuda":
            other = replan(config, fp8=True)
            suggestions.append(_fix("quantization='fp8' (8-bit weights)", other, ok=other.fits))
        if config.cache_config.cache_dtype == "auto" and config.model_config.dtype.itemsize > 1:
            cache = dataclasses.replace(config.cache_config, cache_dtype="fp8")
            other = replan(dataclasses.replace(config, cache_config=cache))
            suggestions.append(_fix("kv_cache_dtype='fp8' (8-bit KV cache)", other, ok=other.fits))
    max_num_seqs = plan.max_num_seqs
    if plan.fits:
        # Everything starts, but not every scheduled request can reach max_model_len at once.
        fitting = int(plan.kv.max_concurrency(plan.max_model_len))
        if 0 < fitting < max_num_seqs:
            suggestions.append(
                f"max_num_seqs={fitting}: that many requests of max_model_len {plan.max_model_len:,} fit at "
                f"once (with {max_num_seqs}, requests beyond {fitting} may be preempted)"
            )
        return suggestions
    while max_num_seqs > 1:
        max_num_seqs //= 2
        other = replan(with_scheduler(max_num_seqs=max_num_seqs, max_model_len=plan.max_model_len))
        if other.fits:
            suggestions.append(_fix(f"max_num_seqs={max_num_seqs}", other))
            break
    return suggestions


def _fix(setting: str, plan: MemoryPlan, ok: bool = True) -> str:
    verdict = "" if ok else NOT_ENOUGH_ALONE
    return (
        f"{setting}: weights {memory_policy.format_gib(plan.weights_bytes)} per rank, KV cache "
        f"{plan.kv.num_tokens:,} tokens ({plan.kv.max_concurrency(plan.max_model_len):.2f}x max_model_len){verdict}"
    )
