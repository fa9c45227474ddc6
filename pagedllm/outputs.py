"""vLLM's module path for the output classes (`vllm.outputs`)."""

from pagedllm.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput

__all__ = ["CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput"]
