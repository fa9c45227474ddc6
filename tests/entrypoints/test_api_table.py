"""The committed API table in README.md is the one the code generates."""

from __future__ import annotations

from pathlib import Path

from pagedllm.entrypoints.api_table import build_table, committed_section

DOC = Path(__file__).resolve().parents[2] / "README.md"


def test_committed_table_equals_the_generated_one():
    assert committed_section(DOC.read_text(encoding="utf-8")) == build_table(), (
        "README.md is stale: run python -m pagedllm.entrypoints.api_table --write README.md"
    )


def test_every_supported_sampling_field_is_accepted_by_sampling_params():
    from pagedllm import SamplingParams
    from pagedllm.entrypoints.api_table import VLLM_SAMPLING_PARAMS, _present_names

    present = _present_names()["SamplingParams"]
    assert set(VLLM_SAMPLING_PARAMS) <= present
    SamplingParams(flat_logprobs=True, skip_clone=True, output_kind=1, extra_args={"x": 1}, truncate_prompt_tokens=3)
