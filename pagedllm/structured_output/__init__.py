"""Structured outputs: grammars compiled with xgrammar in the engine process, one matcher per
request, and the per-step token bitmask the sampler applies (see manager.py)."""

from pagedllm.structured_output.manager import StructuredOutputManager

__all__ = ["StructuredOutputManager"]
