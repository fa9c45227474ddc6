"""`StructuredOutputManager`: one xgrammar matcher per constrained request, advanced with the
tokens each step accepts, and the token bitmask of the requests a step schedules.

The engine core calls, per step: `grammar_bitmask(scheduler_output)` after scheduling (it
sets the SchedulerOutput's `grammar_bitmask` and `structured_output_request_ids`), then
`accept_tokens(outputs)` after the step's tokens are known. The bitmask of a step depends
only on tokens accepted before it, so an asynchronous loop may compute step N+1's while
step N runs once step N's tokens have been accepted."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from pagedllm.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.engine.scheduler import EngineCoreOutput
    from pagedllm.engine.scheduler_output import SchedulerOutput
    from pagedllm.structured_output.compiler import GrammarCompiler

logger = logging.getLogger(__name__)


class StructuredOutputManager:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, stop_token_ids: Iterable[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self._compiler: GrammarCompiler | None = None
        self._matchers: dict[str, Any] = {}

    def _get_compiler(self) -> GrammarCompiler:
        # xgrammar's tokenizer table is built on first use, so engines that never see a
        # constrained request pay nothing.
        if self._compiler is None:
            if self.tokenizer is None:
                raise ValueError(
                    "structured_outputs needs the tokenizer; do not pass skip_tokenizer_init=True."
                )
            from pagedllm.structured_output.compiler import GrammarCompiler

            self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.stop_token_ids)
        return self._compiler

    @property
    def num_words(self) -> int:
        """int32 words per bitmask row."""
        return (self._get_compiler().vocab_size + 31) // 32

    def validate(self, params: SamplingParams) -> None:
        """Compiles the request's grammar now (cached): an invalid one is a ValueError before
        any work starts."""
        if params.structured_outputs is not None:
            self._get_compiler().compile(params.structured_outputs)

    def add_request(self, request_id: str, params: SamplingParams) -> None:
        if params.structured_outputs is None:
            return
        import xgrammar

        compiled = self._get_compiler().compile(params.structured_outputs)
        self._matchers[request_id] = xgrammar.GrammarMatcher(compiled)

    def remove_requests(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._matchers.pop(request_id, None)

    def has_requests(self) -> bool:
        return bool(self._matchers)

    def grammar_bitmask(self, scheduler_output: SchedulerOutput) -> None:
        """Fills the bitmask of the scheduled constrained requests into scheduler_output: one
        int32 row per request (bit j of word i allows token 32 i + j)."""
        if not self._matchers:
            return
        req_ids = [r for r in scheduler_output.num_scheduled_tokens if r in self._matchers]
        if not req_ids:
            return
        bitmask = np.empty((len(req_ids), self.num_words), dtype=np.int32)
        for row, req_id in enumerate(req_ids):
            self._matchers[req_id].fill_next_token_bitmask(bitmask, row)
        scheduler_output.grammar_bitmask = bitmask
        scheduler_output.structured_output_request_ids = {req_id: row for row, req_id in enumerate(req_ids)}

    def accept_tokens(self, outputs: list[EngineCoreOutput]) -> None:
        """Advances each constrained request's matcher with its new tokens; forgets finished ones."""
        if not self._matchers:
            return
        for output in outputs:
            matcher = self._matchers.get(output.request_id)
            if matcher is None:
                continue
            for token_id in output.new_token_ids:
                if matcher.is_terminated():
                    break
                if not matcher.accept_token(token_id):
                    logger.warning(
                        "Request %s: token %d does not fit its grammar (was the grammar's only "
                        "option banned, e.g. by min_tokens or ignore_eos?); it is no longer constrained.",
                        output.request_id, token_id,
                    )
                    self._matchers.pop(output.request_id)
                    break
            if output.finished:
                self._matchers.pop(output.request_id, None)
