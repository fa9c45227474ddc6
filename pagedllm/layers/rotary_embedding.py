"""Rotary position embedding (neox style: rotate_half, as transformers' Llama does).

cos/sin are tabulated once per model in float32 for every position, then cast to the
activations' dtype at use, exactly as transformers casts them, so bf16 results match it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedllm.layers.ops import triton_ops_available

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters_of(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope settings of a config as one flat dict with at least rope_theta and rope_type.

    transformers 5 keeps them in `config.rope_parameters` (nested by layer type for models
    that mix attention kinds); older config.json files have `rope_theta` plus `rope_scaling`
    (whose type key may be "type").
    """
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params and all(isinstance(value, dict) for value in params.values()):
        if layer_type not in params:
            raise ValueError(
                f"rope_parameters are given per layer type ({', '.join(params)}); "
                f"pass one of them as layer_type, not {layer_type!r}."
            )
        params = params[layer_type]
    if not params:
        params = getattr(hf_config, "rope_scaling", None) or {}
    params = dict(params)
    params["rope_type"] = params.pop("type", None) or params.get("rope_type") or "default"
    if params["rope_type"] == "mrope":
        # Qwen2-VL's older config.json: default frequencies; the M-RoPE sections are applied by
        # layers/mrope.py from params["mrope_section"].
        params["rope_type"] = "default"
    if params.get("rope_theta") is None:
        params["rope_theta"] = float(getattr(hf_config, "rope_theta", None) or 10000.0)
    partial = getattr(hf_config, "partial_rotary_factor", None)
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        original = getattr(hf_config, "original_max_position_embeddings", None)
        params.setdefault(
            "original_max_position_embeddings",
            original or getattr(hf_config, "max_position_embeddings", None),
        )
    return params


def _default_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return 1.0 / (base**exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(base: float, rotary_dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, scale cos/sin by mscale."""
    factor = params["factor"]
    original = params["original_max_position_embeddings"]
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return rotary_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1.0 / pos_freqs
    ) * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Applies rope to the first `rotary_dim` features of every head of q and k."""

    def __init__(
        self, head_size: int, rotary_dim: int, max_position: int, inv_freq: torch.Tensor,
        attention_scaling: float = 1.0,
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        device = torch.get_default_device()
        self.register_buffer("cos_cache", (freqs.cos() * attention_scaling).to(device), persistent=False)
        self.register_buffer("sin_cache", (freqs.sin() * attention_scaling).to(device), persistent=False)
        # Chosen once from the device the model is built on: on CUDA one Triton launch rotates
        # q and k in place; elsewhere the torch code below (the reference) returns new tensors.
        self._forward_impl = self.forward_native
        if triton_ops_available(device.type):
            from pagedllm.layers.ops.rotary import apply_rotary

            self._apply_rotary_kernel = apply_rotary
            self._forward_impl = self._forward_triton

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], -1, self.head_size)
        x_rot = x[..., : self.rotary_dim]
        half = self.rotary_dim // 2
        rotated_half = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        out = (x_rot * cos) + (rotated_half * sin)
        if self.rotary_dim < self.head_size:
            out = torch.cat((out, x[..., self.rotary_dim :]), dim=-1)
        return out.flatten(1)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; query [T, H * head_size]; key [T, Hkv * head_size]. On CUDA query and
        key are rotated in place and returned; elsewhere new tensors are returned."""
        return self._forward_impl(positions, query, key)

    def forward_native(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch implementation (CPU, and the reference of the Triton kernel)."""
        cos = self.cos_cache.index_select(0, positions).to(query.dtype)
        sin = self.sin_cache.index_select(0, positions).to(query.dtype)
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
        sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _forward_triton(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._apply_rotary_kernel(
            positions, query, key, self.cos_cache, self.sin_cache, self.head_size, self.rotary_dim
        )

    def extra_repr(self) -> str:
        impl = "triton" if self._forward_impl == self._forward_triton else "torch"
        return (
            f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, "
            f"max_position={self.max_position}, impl={impl}"
        )


def scaled_context_length(rope_parameters: dict[str, Any], length: int) -> int:
    """A context of `length` positions as vLLM scales it: linear scaling stretches it by its
    factor, YaRN extends original_max_position_embeddings by it; other rope types (llama3's
    included) leave it as given."""
    factor = rope_parameters.get("factor")
    rope_type = rope_parameters.get("rope_type")
    if rope_type not in ("linear", "yarn") or not isinstance(factor, (int, float)) or factor <= 1:
        return length
    if rope_type == "yarn":
        length = int(rope_parameters.get("original_max_position_embeddings") or length)
    return int(length * factor)


def get_rope(head_size: int, max_position: int, rope_parameters: dict[str, Any]) -> RotaryEmbedding:
    """A rope table for positions 0..max_position-1 (more for YaRN, which extends the context
    to original_max_position_embeddings * factor)."""
    rope_type = rope_parameters.get("rope_type", "default")
    base = float(rope_parameters.get("rope_theta", 10000.0))
    rotary_dim = int(head_size * rope_parameters.get("partial_rotary_factor", 1.0))
    inv_freq = _default_inv_freq(base, rotary_dim)
    attention_scaling = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / rope_parameters["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_parameters)
    elif rope_type == "yarn":
        inv_freq, attention_scaling = _yarn_inv_freq(base, rotary_dim, rope_parameters)
        extended = int(rope_parameters["original_max_position_embeddings"] * rope_parameters["factor"])
        max_position = max(max_position, extended)
    elif rope_type != "default":
        raise ValueError(
            f"rope_type={rope_type!r} (config.json rope_parameters / rope_scaling) is not "
            f"supported; supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    return RotaryEmbedding(head_size, rotary_dim, max_position, inv_freq, attention_scaling)
