"""Quantized tiny checkpoints and their float32 reference, for the quantization tests.

The fp8 packer follows the public description of quant_method "fp8" checkpoints (vLLM /
transformers "FP8" and "FineGrainedFP8"): each quantized linear keeps its name `...weight` as
float8_e4m3fn, with a scalar float32 `weight_scale` (per tensor, real = fp8 * scale) and, for
static activations, a scalar `input_scale`; or, block-wise, `weight_scale_inv`
[ceil(out/bn), ceil(in/bk)] (real = fp8 * scale_inv of the element's block).

The reference runs transformers on the same model with every quantized weight replaced by its
dequantized value and every quantized linear's input fake-quantized (independent code from the
engine's), all in float32.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = [(13 * i) % 380 + 3 for i in range(40)]


def is_quantized_linear(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEAR_SUFFIXES


def _fp8_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def calibration_input_amax(path: Path) -> dict[str, float]:
    """Largest |input| of each linear module over the calibration prompt (for static scales)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    amax: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEAR_SUFFIXES:
            def hook(_m, args, name=name):
                amax[name] = max(amax.get(name, 0.0), args[0].abs().max().item())
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.tensor([PROMPT[::-1]]))
    for handle in handles:
        handle.remove()
    return amax


def pack_fp8(
    source: Path, target: Path, *, static: bool = False, block: tuple[int, int] | None = None,
    ignored: tuple[str, ...] = ("lm_head",),
) -> Path:
    """Writes `source` (a float32 tiny checkpoint) as a quant_method "fp8" checkpoint."""
    tensors = load_file(source / "model.safetensors")
    input_amax = calibration_input_amax(source) if static else {}
    packed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not is_quantized_linear(name):
            packed[name] = tensor
            continue
        module = name.removesuffix(".weight")
        if block is None:
            scale = (tensor.abs().max() / FP8_MAX).float()
            packed[name] = _fp8_round(tensor, scale)
            packed[f"{module}.weight_scale"] = scale
            if static:
                packed[f"{module}.input_scale"] = torch.tensor(input_amax[module] / FP8_MAX)
        else:
            scale_inv = block_absmax(tensor, block) / FP8_MAX
            packed[name] = _fp8_round(tensor, expand_blocks(scale_inv, block, tensor.shape))
            packed[f"{module}.weight_scale_inv"] = scale_inv
    config = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    if block is not None:
        config["weight_block_size"] = list(block)
    config["ignored_layers"] = list(ignored)
    return write_checkpoint(source, target, packed, config)


def unpack_fp8(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The float32 weights an fp8 checkpoint stands for (scales removed)."""
    block = config.get("weight_block_size")
    out = {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".weight_scale_inv", ".input_scale")):
            continue
        module = name.removesuffix(".weight")
        if tensor.dtype != FP8:
            out[name] = tensor
        elif block is None:
            out[name] = tensor.float() * tensors[f"{module}.weight_scale"]
        else:
            scale = expand_blocks(tensors[f"{module}.weight_scale_inv"], tuple(block), tensor.shape)
            out[name] = tensor.float() * scale
    return out


def block_absmax(tensor: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = tensor.shape
    bn, bk = block
    result = torch.empty(math.ceil(rows / bn), math.ceil(cols / bk))
    for i in range(result.shape[0]):
        for j in range(result.shape[1]):
            result[i, j] = tensor[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].abs().max()
    return result


def expand_blocks(scale: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    bn, bk = block
    return scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[: shape[0], : shape[1]]


def write_checkpoint(source: Path, target: Path, tensors: dict[str, torch.Tensor], quant_config: dict | None) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, target / item.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, target / "model.safetensors")
    if quant_config is not None:
        config = json.loads((target / "config.json").read_text())
        config["quantization_config"] = quant_config
        (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


# ---- the float32 reference ------------------------------------------------------------
ActivationQuant = Callable[[torch.Tensor, str], torch.Tensor]


def fp8_per_token(x: torch.Tensor, _module: str) -> torch.Tensor:
    scale = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return _fp8_round(x, scale).float() * scale


def fp8_per_token_group(group: int) -> ActivationQuant:
    def quant(x: torch.Tensor, module: str) -> torch.Tensor:
        return fp8_per_token(x.unflatten(-1, (-1, group)), module).flatten(-2)
    return quant


def fp8_static(input_scales: dict[str, torch.Tensor]) -> ActivationQuant:
    def quant(x: torch.Tensor, module: str) -> torch.Tensor:
        scale = input_scales[module].float()
        return _fp8_round(x, scale).float() * scale
    return quant


def int8_per_token(x: torch.Tensor, _module: str) -> torch.Tensor:
    scale = (x.abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-12)
    return torch.round(x / scale).clamp(-128, 127) * scale


def reference_model(
    source: Path, weights: dict[str, torch.Tensor], activation_quant: ActivationQuant | None
) -> torch.nn.Module:
    """transformers' model of `source` with `weights` (dequantized, float32) and each quantized
    linear's input passed through `activation_quant`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model.load_state_dict(weights, strict=False)
    if activation_quant is not None:
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in LINEAR_SUFFIXES:
                module.register_forward_pre_hook(
                    lambda _m, args, name=name: (activation_quant(args[0], name),)
                )
    return model


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, prompt: list[int] = PROMPT) -> torch.Tensor:
    """[len(prompt), vocab] log_softmax of the model's logits."""
    return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)


@torch.no_grad()
def reference_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def engine_greedy(llm, prompt: list[int], max_tokens: int) -> list[int]:
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return list(llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids)


def engine_prompt_logprobs(llm, prompt: list[int] = PROMPT, top: int = 5) -> list[dict[int, float]]:
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=top)
    output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    return [{t: lp.logprob for t, lp in entry.items()} for entry in output.prompt_logprobs[1:]]


def max_logprob_error(engine: list[dict[int, float]], reference: torch.Tensor) -> float:
    """Largest |engine - reference| over every logprob the engine returned (position p's entry
    is the distribution after p tokens: reference row p - 1)."""
    return max(
        abs(value - reference[position, token].item())
        for position, entry in enumerate(engine)
        for token, value in entry.items()
    )


# ---- compressed-tensors checkpoints, written by the compressed-tensors package ------------
def pack_compressed_tensors(
    source: Path, target: Path, weights: dict, input_activations: dict | None, fmt: str,
) -> Path:
    """Quantizes every linear but lm_head with compressed-tensors' own lifecycle
    (apply_quantization_config → scales calibrated here → ModelCompressor.compress_model →
    save_pretrained → update_config), so the files are exactly what llm-compressor writes."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    input_amax = calibration_input_amax(source)
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**weights),
        input_activations=QuantizationArgs(**input_activations) if input_activations else None,
    )
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status=QuantizationStatus.FROZEN
    )
    apply_quantization_config(model, config, show_progress=False)
    qmax = FP8_MAX if weights["type"] == "float" else 127.0
    for name, module in model.named_modules():
        if not hasattr(module, "weight_scale"):
            continue
        if weights["strategy"] == "block":
            amax = block_absmax(module.weight.detach(), tuple(weights["block_structure"]))
        elif weights["strategy"] == "channel":
            amax = module.weight.abs().amax(1, keepdim=True)
        else:
            amax = module.weight.abs().max().reshape(1)
        module.weight_scale.data = (amax / qmax).to(module.weight_scale.dtype)
        if hasattr(module, "input_scale"):
            module.input_scale.data = torch.tensor([input_amax[name] / qmax], dtype=module.input_scale.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(target)
    compressor.update_config(str(target))
    for item in source.iterdir():
        if item.name not in ("model.safetensors", "config.json"):
            shutil.copy(item, target / item.name)
    return target


def unpack_compressed_tensors(
    tensors: dict[str, torch.Tensor], block: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """float32 weights of a symmetric 8-bit compressed-tensors checkpoint (`block`: the weights'
    block_structure, for block-wise scales)."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".input_scale", ".input_zero_point", ".weight_zero_point")):
            continue
        if tensor.dtype in (FP8, torch.int8):
            scale = tensors[name.removesuffix(".weight") + ".weight_scale"].float()
            if block is not None:
                scale = expand_blocks(scale, block, tensor.shape)
            tensor = tensor.float() * scale
        out[name] = tensor
    return out


def int8_static(input_scales: dict[str, torch.Tensor]) -> ActivationQuant:
    def quant(x: torch.Tensor, module: str) -> torch.Tensor:
        scale = input_scales[module].float()
        return torch.round(x / scale).clamp(-128, 127) * scale
    return quant
