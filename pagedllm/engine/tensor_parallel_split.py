"""Which tensor_parallel_size a model's layers can be split into, checked at start-up before any
worker starts (the layers would only fail later, inside the workers).

A size must divide the attention heads and the MLP width, and it must fit the KV heads (they
split, or each is replicated a whole number of times). A quantized checkpoint adds its own
units: the row-parallel layers (o_proj, down_proj) split their inputs in whole quantization
groups, and block-wise fp8 splits every layer in whole blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from pagedllm.config import text_config_of


@dataclass(frozen=True)
class _QuantizationUnits:
    input_unit: int
    """Rows a row-parallel rank's input must hold a multiple of (a group, a block's columns)."""
    output_unit: int
    """Columns a column-parallel rank's output must hold a multiple of (a block's rows)."""
    source: str
    """The quantization_config field that sets them, for the error message."""


def check_tensor_parallel_split(hf_config: PretrainedConfig, tp_size: int) -> None:
    """ValueError naming the size that does not divide and the sizes that work."""
    if tp_size == 1:
        return
    architecture = (getattr(hf_config, "architectures", None) or ["the model"])[0]
    units = _quantization_units(getattr(hf_config, "quantization_config", None))
    hf_config = text_config_of(hf_config)
    if getattr(hf_config, "num_attention_heads", None) is None:
        return  # not a decoder config this check understands; the layers check when built
    num_heads = int(hf_config.num_attention_heads)
    num_kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads)
    sizes = {"num_attention_heads": num_heads}
    intermediate_size = getattr(hf_config, "intermediate_size", None)
    if isinstance(intermediate_size, int):
        sizes["intermediate_size"] = intermediate_size
    # Inputs of the row-parallel layers and outputs of the column-parallel ones, per rank.
    row_inputs = {"o_proj": num_heads * head_dim, **({"down_proj": intermediate_size} if "intermediate_size" in sizes else {})}
    column_outputs = {"q_proj": num_heads * head_dim, **({"gate_proj": intermediate_size} if "intermediate_size" in sizes else {})}

    def problem_with(size: int) -> str | None:
        for name, value in sizes.items():
            if value % size:
                return f"{name} ({value}) of {architecture} is not divisible by tensor_parallel_size ({size})"
        if (num_kv_heads % size if size <= num_kv_heads else size % num_kv_heads):
            # Fewer KV heads than ranks is fine when each head is replicated a whole number of times.
            return (f"num_key_value_heads ({num_kv_heads}) of {architecture} and tensor_parallel_size ({size}) "
                    "do not divide one another")
        if units is None:
            return None
        for name, value in row_inputs.items():
            if (value // size) % units.input_unit:
                return (f"{name}'s input ({value}) split over tensor_parallel_size={size} gives {value // size} "
                        f"rows per rank, not a multiple of the checkpoint's {units.source} ({units.input_unit}): "
                        "quantization groups would straddle ranks")
        for name, value in column_outputs.items():
            if (value // size) % units.output_unit:
                return (f"{name}'s output ({value}) split over tensor_parallel_size={size} gives {value // size} "
                        f"columns per rank, not a multiple of the checkpoint's {units.source} "
                        f"({units.output_unit}): quantization blocks would straddle ranks")
        return None

    problem = problem_with(tp_size)
    if problem is None:
        return
    working = [size for size in range(1, num_heads + 1) if problem_with(size) is None]
    raise ValueError(
        f"{problem}, so the model cannot be split across {tp_size} ranks; use tensor_parallel_size in {working}."
    )


def _quantization_units(quantization_config: Any) -> _QuantizationUnits | None:
    """The split units a checkpoint's quantization_config imposes, or None (none, per channel,
    act order, or a format this check does not read; the layers then check when built)."""
    if quantization_config is None:
        return None
    config = dict(quantization_config) if isinstance(quantization_config, dict) else quantization_config.to_dict()
    method = str(config.get("quant_method", "")).lower().replace("_", "-")
    if method == "fp8":
        block = config.get("weight_block_size")
        if isinstance(block, (list, tuple)) and len(block) == 2:
            return _QuantizationUnits(int(block[1]), int(block[0]), "weight_block_size")
        return None
    if method in ("gptq", "awq"):
        group_size = config.get("group_size", config.get("q_group_size", -1))
        if method == "gptq" and config.get("desc_act"):
            return None  # act order: every rank keeps all groups' scales
        return _QuantizationUnits(int(group_size), 1, "group_size") if int(group_size) > 0 else None
    if method == "compressed-tensors":
        for group in (config.get("config_groups") or {}).values():
            weights = (group or {}).get("weights") or {}
            block = weights.get("block_structure")
            if isinstance(block, (list, tuple)) and len(block) == 2:
                return _QuantizationUnits(int(block[1]), int(block[0]), "block_structure")
            if weights.get("strategy") == "group" and weights.get("group_size") and not weights.get("actorder"):
                return _QuantizationUnits(int(weights["group_size"]), 1, "group_size")
    return None
