"""Multi-dimensional rotary embedding (M-RoPE) of the Qwen2-VL family.

Each token has three positions (temporal, height, width); the rotary frequencies are split
into `mrope_section` groups and group i rotates by position row i % 3. Text tokens have equal
rows, which makes M-RoPE exactly ordinary rope: so 1-D positions (decode steps, text-only
prompts) take the plain rope path, and CUDA graphs of decode keep 1-D inputs.
"""

from __future__ import annotations

import torch

from pagedllm.layers.rotary_embedding import RotaryEmbedding, _default_inv_freq


class MRotaryEmbedding(RotaryEmbedding):
    def __init__(
        self, head_size: int, max_position: int, base: float, mrope_section: list[int]
    ) -> None:
        if 2 * sum(mrope_section) != head_size:
            raise ValueError(
                f"rope_parameters['mrope_section']={mrope_section} must sum to head_dim / 2 = {head_size // 2}."
            )
        super().__init__(head_size, head_size, max_position, _default_inv_freq(base, head_size))
        self.mrope_section = list(mrope_section)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (plain rope) or [3, T] (M-RoPE); query/key as in RotaryEmbedding."""
        if positions.ndim == 1:
            return super().forward(positions, query, key)
        cos = self._sectioned(self.cos_cache, positions).to(query.dtype)
        sin = self._sectioned(self.sin_cache, positions).to(query.dtype)
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
        sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _sectioned(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        per_row = table[positions]  # [3, T, head_size // 2]
        parts = per_row.split(self.mrope_section, dim=-1)
        return torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)
