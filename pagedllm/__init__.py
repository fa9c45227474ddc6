"""pagedllm: an LLM inference engine with a paged KV cache and continuous batching.

The public API mirrors vLLM's: `from pagedllm import LLM, SamplingParams`."""

from __future__ import annotations

import logging

from pagedllm import envs
from pagedllm.engine.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.engine.sampling_params import (
    BeamSearchParams,
    GuidedDecodingParams,
    RequestOutputKind,
    SamplingParams,
    StructuredOutputsParams,
)
from pagedllm.inputs import TextPrompt, TokensPrompt


def _configure_logging() -> None:
    # Like vLLM, the package logs its start-up decisions at INFO to stderr by default; an
    # application that configures the "pagedllm" logger itself keeps its own handlers.
    package_logger = logging.getLogger(__name__)
    if package_logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    package_logger.addHandler(handler)
    package_logger.setLevel(envs.logging_level())
    package_logger.propagate = False


_configure_logging()


def __getattr__(name: str) -> object:
    # LLM pulls in torch and transformers; import it on first use so `import pagedllm` is cheap.
    if name == "LLM":
        from pagedllm.entrypoints.llm import LLM

        return LLM
    if name in ("AsyncLLM", "AsyncLLMEngine"):  # vLLM v1 keeps AsyncLLMEngine as an alias
        from pagedllm.engine.async_llm import AsyncLLM

        return AsyncLLM
    if name in ("EngineArgs", "AsyncEngineArgs"):  # vLLM exports both; one class here
        from pagedllm.engine.arg_utils import EngineArgs

        return EngineArgs
    if name == "LLMEngine":
        from pagedllm.engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "ModelRegistry":
        from pagedllm.models.registry import ModelRegistry

        return ModelRegistry
    raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")


__all__ = [
    "BeamSearchParams",
    "GuidedDecodingParams",
    "RequestOutputKind",
    "StructuredOutputsParams",
    "LLM",
    "AsyncLLM",
    "AsyncLLMEngine",
    "LLMEngine",
    "ModelRegistry",
    "EngineArgs",
    "AsyncEngineArgs",
    "CompletionOutput",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "TextPrompt",
    "TokensPrompt",
]
__version__ = "0.1.0"
