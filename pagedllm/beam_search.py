"""vLLM's module path for the beam search outputs (`vllm.beam_search`)."""

from pagedllm.entrypoints.beam_search import BeamSearchOutput, BeamSearchSequence, beam_search_score

__all__ = ["BeamSearchOutput", "BeamSearchSequence", "beam_search_score"]
