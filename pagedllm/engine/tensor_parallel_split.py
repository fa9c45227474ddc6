"""Which tensor_parallel_size a model's layers can be split into, checked at start-up before any
worker starts (the layers would only fail later, inside the workers).

A size must divide the attention heads and the MLP width, and it must fit the KV heads (they
split, or each is replicated a whole number of times). A quantized checkpoint adds its own
units: the row-parallel layers (o_proj, down_proj) split their inputs in whole quantization
groups, and block-wise fp8 splits every layer in whole blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PretrainedConfig

from pagedllm.config import text_config_of

if TYPE_CHECKING:
    from pagedllm.layers.quantization.base import TensorParallelUnits


def check_tensor_parallel_split(hf_config: PretrainedConfig, tp_size: int) -> None:
    """ValueError naming the size that does not divide and the sizes that work."""
    if tp_size == 1:
        return
    architecture = (getattr(hf_config, "architectures", None) or ["the model"])[0]
    units = _quantization_units(hf_config)
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
        if units is None or size == 1:
            return None  # one rank holds whole layers: a last partial group is its own
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


def _quantization_units(hf_config: PretrainedConfig) -> TensorParallelUnits | None:
    """The units of the checkpoint's own quantization (from its quantization_config), read by
    the scheme's QuantizationConfig; None for an unquantized checkpoint."""
    from pagedllm.layers.quantization import (
        checkpoint_quant_config,
        quantization_config_class,
        resolve_quantization,
    )

    method = resolve_quantization(None, hf_config)
    if method is None:
        return None
    return quantization_config_class(method).from_config(checkpoint_quant_config(hf_config) or {}).tensor_parallel_units()
