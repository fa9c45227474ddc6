"""Structured outputs on the embedded SmolLM2-135M-Instruct (a real tokenizer of 49k tokens,
byte-level BPE from GGUF metadata)."""

from __future__ import annotations

import json
import re

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import StructuredOutputsParams

pytest.importorskip("gguf")

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "climate": {"enum": ["hot", "mild", "cold"]},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 2},
    },
    "required": ["city", "population", "climate", "landmarks"],
}


@pytest.mark.slow
def test_embedded_model_outputs_parse_against_each_spec():
    try:
        llm = LLM(kv_cache_memory_bytes=1 << 27, max_model_len=512)
    except ValueError as error:
        pytest.skip(str(error))
    messages = [{"role": "user", "content": "Describe Paris as JSON."}]
    # Compact JSON: free whitespace lets a small model pad until max_tokens.
    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    params = SamplingParams(temperature=0, max_tokens=120, structured_outputs=spec)
    text = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    value = json.loads(text)
    assert set(value) == set(SCHEMA["properties"])
    assert value["climate"] in ("hot", "mild", "cold") and isinstance(value["population"], int)

    date = r"\d{4}-\d{2}-\d{2}"
    outputs = llm.generate(
        ["The date of the moon landing was", "Is the sky blue? Answer:"],
        [
            SamplingParams(temperature=0, max_tokens=30, structured_outputs=StructuredOutputsParams(regex=date)),
            SamplingParams(temperature=0.8, seed=0, max_tokens=10, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
        ],
        use_tqdm=False,
    )
    assert re.fullmatch(date, outputs[0].outputs[0].text)
    assert outputs[1].outputs[0].text in ("yes", "no")
    llm.shutdown()
