"""Compiles a `StructuredOutputsParams` into an xgrammar grammar, once per distinct spec."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedllm.engine.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Compiled grammars kept per engine; a JSON schema compiles in milliseconds to a second on a
# 150k vocabulary, and a batch usually repeats one spec, so a small LRU suffices.
_MAX_CACHED_GRAMMARS = 128


def spec_key(spec: StructuredOutputsParams) -> tuple[Any, ...]:
    """A hashable key naming what the spec constrains to (equal specs share one grammar)."""
    if spec.json is not None:
        # Not sorted: xgrammar emits the properties in the schema's order, as vLLM does.
        schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
        return ("json", schema, spec.disable_any_whitespace, spec.disable_additional_properties)
    if spec.json_object:
        return ("json_object", spec.disable_any_whitespace)
    if spec.regex is not None:
        return ("regex", spec.regex)
    if spec.choice is not None:
        return ("choice", tuple(spec.choice))
    if spec.grammar is not None:
        return ("grammar", spec.grammar)
    raise ValueError(f"StructuredOutputsParams constrains nothing: {spec!r}.")


def choice_grammar(choices: tuple[str, ...]) -> str:
    # JSON string escaping is valid EBNF string-literal escaping (\\, \", \n, \uXXXX).
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


class GrammarCompiler:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar

        self._xgr = xgrammar
        vocab_size = max(vocab_size, len(tokenizer))
        self.tokenizer_info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None
        )
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(self.tokenizer_info, max_threads=1)
        self._cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        logger.info("Structured outputs: xgrammar over %d tokens.", vocab_size)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar; ValueError naming the spec when it is invalid."""
        key = spec_key(spec)
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
            return compiled
        try:
            compiled = self._compile(key)
        except (RuntimeError, ValueError, TypeError) as error:
            kind = key[0]
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"structured_outputs {kind}={_short(key[1] if len(key) > 1 else True)} is invalid: {detail}"
            ) from None
        self._cache[key] = compiled
        if len(self._cache) > _MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return compiled

    def _compile(self, key: tuple[Any, ...]) -> Any:
        kind = key[0]
        if kind == "json":
            schema, no_whitespace = key[1], key[2]
            json.loads(schema)  # a JSONDecodeError (a ValueError) names the position
            # strict_mode: no properties beyond the schema's (xgrammar's and vLLM's default).
            return self._compiler.compile_json_schema(schema, any_whitespace=not no_whitespace, strict_mode=True)
        if kind == "json_object":
            # Any JSON object, never a bare array or scalar (vLLM's xgrammar backend does the same).
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=not key[1])
        if kind == "regex":
            return self._compiler.compile_regex(key[1])
        if kind == "choice":
            return self._compiler.compile_grammar(choice_grammar(key[1]))
        return self._compiler.compile_grammar(key[1])


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
