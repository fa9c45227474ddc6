"""vLLM's module path for the sampling classes: `from pagedllm.sampling_params import
StructuredOutputsParams` works like `from vllm.sampling_params import ...`."""

from pagedllm.engine.sampling_params import (
    BeamSearchParams,
    GuidedDecodingParams,
    RequestOutputKind,
    SamplingParams,
    SamplingType,
    StructuredOutputsParams,
)

__all__ = [
    "BeamSearchParams",
    "GuidedDecodingParams",
    "RequestOutputKind",
    "SamplingParams",
    "SamplingType",
    "StructuredOutputsParams",
]
