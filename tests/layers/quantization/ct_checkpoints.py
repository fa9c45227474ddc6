"""compressed-tensors `pack-quantized` tensors and checkpoints produced by the
compressed-tensors package itself (its quantizer parameters and PackedQuantizationCompressor),
with its own decompression as the dequantized reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from int_group_checkpoints import LINEAR_NAMES
from safetensors.torch import save_file


def ct_scheme(num_bits: int, group_size: int | None, symmetric: bool) -> QuantizationScheme:
    strategy = "group" if group_size else "channel"
    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group_size)
    return QuantizationScheme(targets=["Linear"], weights=args)


def ct_compress(weight: torch.Tensor, scheme: QuantizationScheme) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the module's on-disk tensors, the weight compressed-tensors decompresses them to)."""
    args = scheme.weights
    rows, cols = weight.shape
    grouped = weight.reshape(rows, cols // args.group_size, -1) if args.group_size else weight.reshape(rows, 1, -1)
    scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    scale = scale.to(torch.float16).to(weight.dtype)  # checkpoints store 16-bit scales
    compressed = PackedQuantizationCompressor.compress(
        {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}, scheme
    )
    dequantized = PackedQuantizationCompressor.decompress(dict(compressed), scheme)["weight"]
    compressed["weight_scale"] = compressed["weight_scale"].to(torch.float16)
    return compressed, dequantized.float()


def write_ct_checkpoint(source: Path, target: Path, scheme: QuantizationScheme) -> torch.nn.Module:
    """Compress every decoder linear of `source` into `target`; returns the transformers model
    holding compressed-tensors' dequantized weights (float32)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    for name, module in model.named_modules():
        if name.split(".")[-1] not in LINEAR_NAMES:
            continue
        compressed, dequantized = ct_compress(module.weight.detach(), scheme)
        del state[f"{name}.weight"]
        state.update({f"{name}.{key}": value.contiguous() for key, value in compressed.items()})
        with torch.no_grad():
            module.weight.copy_(dequantized)
    target.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / "model.safetensors"))
    config = json.loads((Path(source) / "config.json").read_text())
    quant_config = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", ignore=["lm_head"],
        quantization_status="compressed",
    )
    config["quantization_config"] = {"quant_method": "compressed-tensors", **quant_config.model_dump(mode="json")}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return model
