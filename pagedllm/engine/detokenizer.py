"""Incremental detokenization of one completion, stop strings, and logprob decoding.

Text grows by decoding a short window of token ids: the window starts a few tokens back, so
decoders that treat the first token specially (sentencepiece's leading-space strip) see the
same context as a full decode, and the new text is the window's text minus the text the
window had before. A window whose text ends in U+FFFD is an unfinished multi-byte character
(a byte-fallback or byte-level token split it), so its text waits for the next token.
"""

from __future__ import annotations

from collections.abc import Callable

import tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pagedllm.engine.outputs import Logprob
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.scheduler_output import TokenLogprobs

# Prompt tokens decoded in front of the output, so its first token gets its leading space
# (and byte context) as in the full text, like vLLM.
_PROMPT_CONTEXT_TOKENS = 4
# The window start moves forward once it lags this many tokens behind the text already
# emitted: each move costs one extra decode, each lagging token a little decode length.
_WINDOW_MOVE_TOKENS = 16
_REPLACEMENT_CHAR = "\ufffd"


def _decode_function(
    tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool, spaces_between_special_tokens: bool
) -> Callable[[list[int]], str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer) and type(tokenizer)._decode is PreTrainedTokenizerFast._decode:
        # What PreTrainedTokenizerFast.decode does without its Python layers: a few
        # microseconds per call, and this runs once per token.
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode(ids: list[int]) -> str:
        # Clean-up rewrites text across window boundaries (" ." -> "."), which would break
        # the window arithmetic; vLLM's incremental text does not clean up either.
        return tokenizer.decode(
            ids,
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    return decode


class IncrementalDetokenizer:
    """The text of one completion, grown token by token, with stop-string checks.

    `output_text` equals `tokenizer.decode(output_token_ids, skip_special_tokens=...)` for
    byte-level BPE (for decoders that strip the first token's leading space, the text that
    decode(prompt + output) adds to decode(prompt), as vLLM gives), except that an unfinished multi-byte character at the very end waits for
    `flush()` (or `get_next_output_text(finished=True)`), and that a matched stop string
    truncates it.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self.params = params
        self.output_token_ids: list[int] = []
        self.output_text = ""
        self.stop_string: str | None = None
        """The stop string that ended the completion, once one matched."""
        self._decode = _decode_function(
            tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens
        )
        self._stop: list[str] = list(params.stop or [])
        # Token ids whose text is (or will be) in output_text, after the prompt context.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._window_text = self._decode(self._ids) if self._ids else ""
        """The text of _ids[_window_start:_read_offset]."""
        if self._window_text.endswith(_REPLACEMENT_CHAR):
            # A prompt ending inside a character would lend the output its first bytes;
            # decode the output on its own instead, as tokenizer.decode(output) does.
            self._ids, self._window_text = [], ""
        self._window_start = 0
        self._read_offset = len(self._ids)
        """Ids before this offset have their text in output_text."""
        self._previous_read_offset = self._read_offset
        self._num_streamed_chars = 0

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Appends sampled tokens and returns the stop string that matched, if any (then
        output_text ends right before it, or right after it with include_stop_str_in_output).

        stop_terminated: the last token is EOS or a stop token id that ended the request; as
        in vLLM its text is left out unless include_stop_str_in_output.
        """
        if not new_token_ids:
            return None
        self.output_token_ids.extend(new_token_ids)
        if not self.params.detokenize or self.stop_string is not None:
            return None
        to_decode = new_token_ids
        if stop_terminated and not self.params.include_stop_str_in_output:
            to_decode = new_token_ids[:-1]
        num_chars_before = len(self.output_text)
        for token_id in to_decode:
            self._ids.append(token_id)
            self.output_text += self._decode_next()
        if stop_terminated:
            self._flush_held_text()
        return self._check_stop(len(self.output_text) - num_chars_before)

    def _decode_next(self) -> str:
        text = self._decode(self._ids[self._window_start :])
        if text.endswith(_REPLACEMENT_CHAR) or len(text) < len(self._window_text):
            return ""
        new_text = text[len(self._window_text) :]
        self._previous_read_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._window_text = text
        if self._previous_read_offset - self._window_start >= _WINDOW_MOVE_TOKENS:
            # Restart the window at an earlier read offset, a token boundary whose text was
            # complete, keeping at least one token of context in front of the newest one.
            self._window_start = self._previous_read_offset
            self._window_text = self._decode(self._ids[self._window_start : self._read_offset])
        return new_text

    def flush(self) -> str | None:
        """At the end of the completion: emits text held back for an unfinished multi-byte
        character (as U+FFFD, which is what a full decode gives). The held text may complete
        a stop string (its last characters shared a token with the unfinished character), so
        it is checked like any new text; returns the stop string that matched, if any."""
        num_chars_before = len(self.output_text)
        self._flush_held_text()
        return self._check_stop(len(self.output_text) - num_chars_before)

    def _flush_held_text(self) -> None:
        if self.stop_string is not None or self._read_offset == len(self._ids):
            return
        text = self._decode(self._ids[self._window_start :])
        if len(text) > len(self._window_text):
            self.output_text += text[len(self._window_text) :]
        self._read_offset = len(self._ids)
        self._window_text = text

    def _check_stop(self, num_new_chars: int) -> str | None:
        # vLLM checks stop strings only once more than min_tokens tokens exist.
        if not self._stop or len(self.output_token_ids) <= self.params.min_tokens:
            return None
        if num_new_chars <= 0 or self.stop_string is not None:
            return None
        text = self.output_text
        best_index, best_stop = -1, None
        for stop in self._stop:
            # A match must end inside the new text, so it starts at most len(stop) - 1
            # characters before it.
            index = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
            if index != -1 and (best_stop is None or index < best_index):
                best_index, best_stop = index, stop
        if best_stop is None:
            return None
        end = best_index + len(best_stop) if self.params.include_stop_str_in_output else best_index
        self.output_text = text[:end]
        self.stop_string = best_stop
        return best_stop

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to stream: all of it, or (delta) what was not returned before. While not
        finished, the last output_text_buffer_length characters are held back, since they
        could be the start of a stop string that must not be shown."""
        if finished:
            self.flush()
        held = 0 if finished else self.params.output_text_buffer_length
        end = max(len(self.output_text) - held, 0)
        if not delta:
            return self.output_text[:end]
        start = self._num_streamed_chars
        if end <= start:
            return ""
        self._num_streamed_chars = end
        return self.output_text[start:end]


def decode_logprobs(
    tokenizer: PreTrainedTokenizerBase | None, token_logprobs: TokenLogprobs
) -> list[dict[int, Logprob]]:
    """vLLM's per-position dicts {token_id: Logprob}: the chosen token with its rank first,
    then the top-k with ranks 1..k (a chosen token that is also in the top-k appears once).
    decoded_token is each token decoded on its own (None without a tokenizer)."""
    unique_ids = list(dict.fromkeys(t for row in token_logprobs.token_ids for t in row))
    texts: dict[int, str | None]
    if tokenizer is None:
        texts = dict.fromkeys(unique_ids)
    else:
        texts = dict(zip(unique_ids, _decode_single_tokens(tokenizer, unique_ids)))
    positions = []
    for ids, logprobs, rank in zip(token_logprobs.token_ids, token_logprobs.logprobs, token_logprobs.ranks):
        entries = {ids[0]: Logprob(logprob=logprobs[0], rank=rank, decoded_token=texts[ids[0]])}
        for top_rank, (token_id, logprob) in enumerate(zip(ids[1:], logprobs[1:]), start=1):
            if token_id not in entries:
                entries[token_id] = Logprob(logprob=logprob, rank=top_rank, decoded_token=texts[token_id])
        positions.append(entries)
    return positions


def _decode_single_tokens(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer) and type(tokenizer)._decode is PreTrainedTokenizerFast._decode:
        # One call into Rust for all of them: logprobs=-1 asks for the whole vocabulary.
        return backend.decode_batch([[t] for t in token_ids], skip_special_tokens=False)
    return [tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
