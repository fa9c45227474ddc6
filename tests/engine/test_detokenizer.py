"""The incremental detokenizer against tokenizer.decode, stop strings, streaming, and
logprob decoding, on a tiny byte-level BPE (and a sentencepiece-style byte-fallback) tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pagedllm.engine.detokenizer import IncrementalDetokenizer, decode_logprobs
from pagedllm.engine.outputs import Logprob
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.scheduler_output import TokenLogprobs

# "龙" and "𝄞" are not in the tokenizer's training text, so they become raw byte tokens.
_TEXT_PIECES = ["hello", "world", "café", "naïve", "中文", "你好", "🙂", "👍🏽", "龙", "𝄞", "x", "!", "\n", "  ", "12"]


@pytest.fixture(scope="module")
def tokenizer(tiny_bpe_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_bpe_tokenizer_dir)


def random_text(rng: random.Random, max_pieces: int = 12) -> str:
    return "".join(rng.choice(_TEXT_PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(1, max_pieces)))


def feed(detokenizer: IncrementalDetokenizer, token_ids: list[int], rng: random.Random) -> str | None:
    """Feeds tokens in chunks of 1 to 3, like steps with and without speculative tokens."""
    index = 0
    while index < len(token_ids):
        size = rng.randint(1, 3)
        stop = detokenizer.update(token_ids[index : index + size])
        if stop is not None:
            return stop
        index += size
    return None


def test_incremental_text_equals_decode_for_random_text(tokenizer: PreTrainedTokenizerBase) -> None:
    rng = random.Random(0)
    for _ in range(200):
        prompt = tokenizer.encode(random_text(rng, 4))
        output = tokenizer.encode(random_text(rng))
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
        feed(detokenizer, output, rng)
        # Ordinary text needs no flush: every character is complete at the end.
        assert detokenizer.output_text == tokenizer.decode(output, skip_special_tokens=True)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_text_equals_decode_for_random_token_ids(
    tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool
) -> None:
    # Random ids cut characters anywhere and mix in <s> / </s>; after flush() the text still
    # equals a full decode, U+FFFD for U+FFFD.
    rng = random.Random(1)
    vocab = len(tokenizer)
    for _ in range(200):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(1, 50))]
        params = SamplingParams(skip_special_tokens=skip_special_tokens)
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, params)
        feed(detokenizer, output, rng)
        detokenizer.flush()
        assert detokenizer.output_text == tokenizer.decode(output, skip_special_tokens=skip_special_tokens)
        assert detokenizer.output_token_ids == output


def test_unfinished_multibyte_character_is_held_back(tokenizer: PreTrainedTokenizerBase) -> None:
    output = tokenizer.encode("a 龙𝄞 b")
    assert len(output) > 4, "the test needs characters split over byte tokens"
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    for token_id in output:
        detokenizer.update([token_id])
        assert "\ufffd" not in detokenizer.output_text
    assert detokenizer.output_text == "a 龙𝄞 b"


def test_special_tokens_are_skipped_or_kept(tokenizer: PreTrainedTokenizerBase) -> None:
    output = tokenizer.encode("hello") + [tokenizer.eos_token_id] + tokenizer.encode(" world")
    for skip, expected in [(True, "hello world"), (False, "hello</s> world")]:
        detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=skip))
        detokenizer.update(output)
        assert detokenizer.output_text == expected


def test_stop_string_spanning_token_boundaries_truncates_before_it(tokenizer: PreTrainedTokenizerBase) -> None:
    output = tokenizer.encode("hello world café 中文 more text")
    stop = "rld c"
    # The stop string starts inside one token and ends inside another.
    pieces = [tokenizer.decode([t]) for t in output]
    assert " w" in pieces and "or" in pieces and " ca" in pieces
    for include, expected in [(False, "hello wo"), (True, "hello world c")]:
        params = SamplingParams(stop=["zzz", stop], include_stop_str_in_output=include)
        detokenizer = IncrementalDetokenizer(tokenizer, [], params)
        matched = None
        for token_id in output:
            matched = detokenizer.update([token_id])
            if matched is not None:
                break
        assert matched == stop
        assert detokenizer.stop_string == stop
        assert detokenizer.output_text == expected


def test_stop_string_found_inside_one_multi_token_update(tokenizer: PreTrainedTokenizerBase) -> None:
    output = tokenizer.encode("one 中文 two 🙂 three 中文")
    params = SamplingParams(stop=["three", "🙂"], include_stop_str_in_output=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], params)
    # Both stop strings are in the update; the earlier one wins.
    assert detokenizer.update(output) == "🙂"
    assert detokenizer.output_text == "one 中文 two "


def test_stop_strings_wait_for_min_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    output = tokenizer.encode("stop here stop")
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["stop"], min_tokens=len(output) - 1))
    # The first "stop" arrives before min_tokens tokens exist, so only the second one counts.
    assert feed(detokenizer, output, random.Random(0)) == "stop"
    assert detokenizer.output_text == "stop here "


def test_stop_terminated_token_text_is_left_out(tokenizer: PreTrainedTokenizerBase) -> None:
    stop_token = tokenizer.encode("!")[0]
    output = tokenizer.encode("hello") + [stop_token]
    for include, expected in [(False, "hello"), (True, "hello!")]:
        params = SamplingParams(stop_token_ids=[stop_token], include_stop_str_in_output=include)
        detokenizer = IncrementalDetokenizer(tokenizer, [], params)
        detokenizer.update(output, stop_terminated=True)
        assert detokenizer.output_text == expected
        assert detokenizer.output_token_ids == output


def test_stop_string_completed_by_the_held_back_text_of_the_last_step_is_cut(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    # A byte-level token may hold a character and the first bytes of the next one (" " plus
    # half an emoji): its text waits for the next token, and when the request ends there (at
    # max_tokens) the flushed text is the only place the stop string appears.
    space_and_half_emoji = next(
        i for i in range(len(tokenizer))
        if tokenizer.decode([i]).endswith("\ufffd") and tokenizer.decode([i]).startswith(" ")
    )
    output = tokenizer.encode("hello") + [space_and_half_emoji]
    for include, expected in [(False, "hell"), (True, "hello ")]:
        params = SamplingParams(stop=["o "], include_stop_str_in_output=include)
        detokenizer = IncrementalDetokenizer(tokenizer, [], params)
        assert detokenizer.update(output) is None  # the " " is held back with the half emoji
        assert detokenizer.output_text == "hello"
        assert detokenizer.flush() == "o "
        assert detokenizer.stop_string == "o "
        assert detokenizer.output_text == expected
        assert detokenizer.get_next_output_text(finished=True, delta=False) == expected


def test_streaming_never_shows_part_of_a_stop_string(tokenizer: PreTrainedTokenizerBase) -> None:
    stop = "world!"
    output = tokenizer.encode("hello wor wo world! tail")
    params = SamplingParams(stop=[stop])
    assert params.output_text_buffer_length == len(stop) - 1
    detokenizer = IncrementalDetokenizer(tokenizer, [], params)
    streamed = ""
    for token_id in output:
        matched = detokenizer.update([token_id])
        finished = matched is not None
        streamed += detokenizer.get_next_output_text(finished=finished, delta=True)
        if not finished:
            # Everything shown is final text that no later stop match can take back.
            assert "hello wor wo ".startswith(streamed)
            assert detokenizer.get_next_output_text(finished=False, delta=False) == streamed
        else:
            break
    assert streamed == detokenizer.output_text == "hello wor wo "
    assert detokenizer.get_next_output_text(finished=True, delta=True) == ""


def test_decode_logprobs_builds_vllm_dicts(tokenizer: PreTrainedTokenizerBase) -> None:
    a, b = tokenizer.encode("a b")[:2]
    eos = tokenizer.eos_token_id
    token_logprobs = TokenLogprobs(
        token_ids=[[a, a, b], [b, eos, a]],
        logprobs=[[-0.1, -0.1, -2.5], [-3.0, -0.5, -1.0]],
        ranks=[1, 3],
    )
    positions = decode_logprobs(tokenizer, token_logprobs)
    assert positions[0] == {
        a: Logprob(logprob=-0.1, rank=1, decoded_token="a"),
        b: Logprob(logprob=-2.5, rank=2, decoded_token=" b"),
    }
    assert positions[1] == {
        b: Logprob(logprob=-3.0, rank=3, decoded_token=" b"),
        eos: Logprob(logprob=-0.5, rank=1, decoded_token="</s>"),
        a: Logprob(logprob=-1.0, rank=2, decoded_token="a"),
    }
    assert list(positions[1]) == [b, eos, a], "the chosen token comes first"
    without_tokenizer = decode_logprobs(None, token_logprobs)
    assert without_tokenizer[0][a] == Logprob(logprob=-0.1, rank=1, decoded_token=None)


def _sentencepiece_style_tokenizer() -> PreTrainedTokenizerBase:
    """A Llama-like tokenizer: "▁" for spaces, byte-fallback tokens <0x00>..<0xFF>, and a
    decoder that strips the leading space of the whole text."""
    rng = random.Random(2)
    corpus = [" ".join(rng.choice(_TEXT_PIECES[:7]) for _ in range(8)) for _ in range(200)]
    trainer_tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tokenizer.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trainer_tokenizer.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizer
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_text_continues_the_prompt() -> None:
    # Such decoders drop the first token's leading space, so the output is compared (as
    # vLLM's text) with the full decode minus the prompt's decode, not with decode(output).
    tokenizer = _sentencepiece_style_tokenizer()
    rng = random.Random(3)
    for _ in range(100):
        prompt = tokenizer.encode(random_text(rng, 4), add_special_tokens=False)
        output = tokenizer.encode(" " + random_text(rng), add_special_tokens=False)
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
        feed(detokenizer, output, rng)
        full = tokenizer.decode(prompt + output)
        assert detokenizer.output_text == full[len(tokenizer.decode(prompt)) :]
