"""SamplingParams validates like vLLM's: bad values are ValueErrors naming the field."""

from __future__ import annotations

import logging
import math

import pytest

from pagedllm import SamplingParams
from pagedllm.engine.sampling_params import SamplingType


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(frequency_penalty=-2.5), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(logprobs=-3), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_defaults_and_normalisation_follow_vllm():
    params = SamplingParams(stop="###", top_k=-1)
    assert params.max_tokens == 16 and params.temperature == 1.0 and params.n == 1
    assert params.stop == ["###"] and params.top_k == 0 and params.stop_token_ids == []
    assert SamplingParams(temperature=0.0).greedy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "n must be at least 1, got 0."),
        (dict(temperature=-1.0), "temperature must be non-negative, got -1.0."),
        (dict(max_tokens=0), "max_tokens must be at least 1, got 0."),
        (dict(top_k=-2), "top_k must be 0 (disable), or at least 1, got -2."),
        (dict(repetition_penalty=0.0), "repetition_penalty must be greater than zero, got 0.0."),
        (dict(min_tokens=5, max_tokens=2), "min_tokens must be less than or equal to max_tokens=2, got 5."),
        (dict(stop=["a", ""]), "stop cannot contain an empty string."),
        (dict(repetition_penalty=math.inf), "repetition_penalty must be a finite number, got inf."),
        (dict(temperature=math.nan), "temperature must be a finite number, got nan."),
    ],
)
def test_error_messages_start_with_vllms_words(kwargs, message):
    with pytest.raises(ValueError) as error:
        SamplingParams(**kwargs)
    assert str(error.value).startswith(message)


def test_greedy_resets_the_filters_as_vllm():
    params = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.3)
    assert (params.top_p, params.top_k, params.min_p) == (1.0, 0, 0.0)
    random = SamplingParams(temperature=0.7, top_p=0.5, top_k=5, min_p=0.3)
    assert (random.top_p, random.top_k, random.min_p) == (0.5, 5, 0.3)


def test_tiny_positive_temperature_is_raised_to_001_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pagedllm.engine.sampling_params"):
        params = SamplingParams(temperature=1e-3)
    assert params.temperature == 0.01 and params.sampling_type is SamplingType.RANDOM
    assert "raised to 0.01" in caplog.text
    assert SamplingParams(temperature=0.0).temperature == 0.0


def test_seed_minus_one_logprobs_true_and_sampling_type_follow_vllm():
    params = SamplingParams(seed=-1, logprobs=True, prompt_logprobs=True)
    assert params.seed is None and params.logprobs == 1 and params.prompt_logprobs == 1
    assert params.logprobs is not True
    assert SamplingParams(temperature=0).sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=0, seed=3).sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=0.8).sampling_type is SamplingType.RANDOM
    assert SamplingParams(temperature=0.8, seed=3).sampling_type is SamplingType.RANDOM_SEED
    assert [t.value for t in SamplingType] == [0, 1, 2]


def test_from_optional_reads_none_as_the_default():
    params = SamplingParams.from_optional(
        n=None, temperature=None, top_p=None, presence_penalty=None, frequency_penalty=None,
        repetition_penalty=None, top_k=None, seed=None, stop=None, max_tokens=None, logit_bias={"5": 200},
    )
    assert (params.n, params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (1, 1.0, 1.0, 0, 1.0)
    assert params.max_tokens is None  # None keeps its meaning: up to max_model_len
    assert params.logit_bias == {5: 100.0} and params.stop == []
    assert SamplingParams.from_optional(temperature=0.5, max_tokens=7).max_tokens == 7
