"""`StructuredOutputsParams`: what a request's output is constrained to (vLLM's class of the
same name, carried by SamplingParams.structured_outputs; compiled by structured_output/)."""

from __future__ import annotations

from dataclasses import dataclass

_CONSTRAINT_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Constrains the output to a JSON schema, a regex, one of some choices, an EBNF grammar, or
    any JSON object (exactly one of them), as vLLM's class of the same name. Compiled with
    xgrammar; an invalid one is a ValueError when the request is added."""

    json: str | dict | None = None
    """A JSON schema (dict or JSON text)."""
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    """An EBNF grammar (GBNF, with a `root` rule)."""
    json_object: bool | None = None
    """Any JSON object."""
    disable_fallback: bool = False
    """Accepted for vLLM compatibility (there is one backend, so nothing to fall back to)."""
    disable_any_whitespace: bool = False
    """JSON without free whitespace between tokens (compact output)."""
    disable_additional_properties: bool = False
    """JSON objects may not have properties beyond the schema's."""
    whitespace_pattern: str | None = None
    """Accepted for vLLM compatibility; ignored (xgrammar has no such option)."""
    structural_tag: str | None = None
    """Refused: structural tags (tool calls) are not supported."""

    def __post_init__(self) -> None:
        if isinstance(self.json, type) and hasattr(self.json, "model_json_schema"):
            self.json = self.json.model_json_schema()  # a pydantic model class, as vLLM allows
        given = [name for name in _CONSTRAINT_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"StructuredOutputsParams needs exactly one of {', '.join(_CONSTRAINT_FIELDS)}, got "
                f"{given or 'none'}."
            )
        if self.structural_tag is not None:
            raise ValueError("StructuredOutputsParams.structural_tag is not supported; use json, regex, choice or grammar.")
        if self.choice is not None and (
            not isinstance(self.choice, (list, tuple)) or not self.choice or not all(isinstance(c, str) for c in self.choice)
        ):
            raise ValueError(f"StructuredOutputsParams.choice must be a non-empty list of strings, got {self.choice!r}.")
