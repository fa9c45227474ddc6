"""The attention layer models use: reshapes heads and hands the step to the backend chosen
once for the engine; it never looks at the device itself."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.forward_context import get_forward_context
from pagedllm.layers.attention.kv_cache_spec import KVCacheSpec
from pagedllm.layers.attention.selector import get_attn_backend
from pagedllm.layers.quantization.base import LoadedWeight, loaded_shape


class Attention(nn.Module):
    """Attention over this rank's heads. `num_heads` and `num_kv_heads` are per-rank counts.

    `kv_cache` ([2, num_blocks, block_size, num_kv_heads, head_size]) is bound by the model
    runner once the cache is allocated; until then (the profiling run) it is None and
    attention stays within each request's current tokens.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        prefix: str = "",
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{prefix}: {num_heads} query heads cannot share {self.num_kv_heads} key/value "
                "heads evenly; num_attention_heads must be a multiple of num_key_value_heads."
            )
        self.scale = scale
        self.prefix = prefix
        self.sliding_window = sliding_window
        self.kv_cache_dtype = torch.get_default_dtype()
        backend = get_attn_backend(torch.get_default_device(), self.kv_cache_dtype)
        self.impl = backend(sliding_window=sliding_window)
        self.kv_cache: torch.Tensor | None = None
        # Per-tensor scales of an fp8 KV cache (cached = real / scale): the checkpoint's
        # k_scale / v_scale when it has them, else 1.0. Unused with a model-dtype cache.
        # Buffers, not parameters: checkpoints may lack them; saved with the sharded state.
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32))

    def load_kv_scale(self, name: str, loaded: LoadedWeight) -> None:
        """Sets "k_scale" or "v_scale" from a checkpoint tensor of shape [], [1] or one per kv
        head (their largest: this cache keeps one scale per tensor)."""
        if not isinstance(loaded, torch.Tensor):
            loaded = loaded[tuple(slice(None) for _ in loaded_shape(loaded))]
        getattr(self, name).fill_(loaded.float().max().item())

    def set_kv_cache_dtype(self, dtype: torch.dtype) -> None:
        """The cache's element type (the model dtype, or float8_e4m3fn for kv_cache_dtype="fp8");
        set by the model runner before the cache is sized."""
        self.kv_cache_dtype = dtype

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query [T, num_heads * head_size]; key, value [T, num_kv_heads * head_size]
        → [T, num_heads * head_size]."""
        num_tokens = query.shape[0]
        output = self.impl.forward(
            query.reshape(num_tokens, self.num_heads, self.head_size),
            key.reshape(num_tokens, self.num_kv_heads, self.head_size),
            value.reshape(num_tokens, self.num_kv_heads, self.head_size),
            self.kv_cache,
            get_forward_context().attn_metadata,
            self.scale,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
        return output.reshape(num_tokens, self.num_heads * self.head_size)

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            dtype=self.kv_cache_dtype,
            sliding_window=self.sliding_window,
        )

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_size={self.head_size}, "
            f"backend={self.impl.name}, sliding_window={self.sliding_window}"
        )
