"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.distributed.communication import tensor_model_parallel_all_reduce
from pagedllm.distributed.parallel_state import get_custom_all_reduce
from pagedllm.layers.ops import triton_ops_available


class RMSNorm(nn.Module):
    """Normalises in float32 and scales in the input dtype, as transformers' LlamaRMSNorm does,
    so bf16 outputs match it bit for bit.

    all_reduce_before_add: in the residual form, x is this rank's partial sum (from a
    RowParallelLinear with reduce_results=False) and is all-reduced first. On CUDA at decode
    sizes the all-reduce, the add and the norm are one kernel (distributed/
    all_reduce_rms_norm.py)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, all_reduce_before_add: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.variance_epsilon = eps
        self.all_reduce_before_add = all_reduce_before_add
        # Chosen once, like the attention backend: on CUDA one fused Triton kernel per call
        # (in place when a residual is given), elsewhere the torch code below, the reference.
        self._forward_impl = self.forward_native
        if triton_ops_available(torch.get_default_device().type):
            from pagedllm.layers.ops.fused_rms_norm import fused_add_rms_norm, rms_norm

            self._rms_norm_kernel, self._fused_add_rms_norm_kernel = rms_norm, fused_add_rms_norm
            self._forward_impl = self._forward_triton
        self._quantize_to: torch.dtype | None = None

    def quantize_output(self, dtype: torch.dtype) -> bool:
        """From now on return the output quantized per token to `dtype` (a QuantizedActivation
        for the fp8 linear layer this norm feeds); only the Triton path can. Returns whether
        it will."""
        if self._forward_impl != self._forward_triton:
            return False
        self._quantize_to = dtype
        return True

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(input_dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with `residual`: (norm(x + residual), x + residual), the add done in the
        input dtype like the decoder layers of transformers. On CUDA the residual form reuses
        the buffers of x and residual for its two results: callers must not read them after."""
        return self._forward_impl(x, residual)

    def forward_native(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The torch implementation (CPU, and the reference of the Triton kernels)."""
        if residual is None:
            return self._norm(x)
        if self.all_reduce_before_add:
            x = tensor_model_parallel_all_reduce(x)
        x = x + residual
        return self._norm(x), x

    def _forward_triton(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._rms_norm_kernel(x, self.weight, self.variance_epsilon, self._quantize_to)
        if self.all_reduce_before_add:
            custom = get_custom_all_reduce()
            if self._quantize_to is None and custom is not None and custom.fuses_rms_norm(x, residual):
                return custom.all_reduce_add_rms_norm(x, residual, self.weight, self.variance_epsilon)
            x = tensor_model_parallel_all_reduce(x)
        return self._fused_add_rms_norm_kernel(x, residual, self.weight, self.variance_epsilon, self._quantize_to)

    def extra_repr(self) -> str:
        impl = "triton" if self._forward_impl == self._forward_triton else "torch"
        quantized = f", quantize_to={self._quantize_to}" if self._quantize_to is not None else ""
        reduced = ", all_reduce_before_add=True" if self.all_reduce_before_add else ""
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, impl={impl}{quantized}{reduced}"
