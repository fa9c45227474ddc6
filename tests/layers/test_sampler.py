"""The sampler against plain-torch references: greedy, temperature, top-k/top-p/min-p,
seeded reproducibility, the sampled distribution, penalties, min_tokens and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.layers import sampler as sampler_module
from pagedllm.layers.sampler import (
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    apply_top_k_top_p,
    compute_prompt_logprobs,
    to_token_logprobs,
)

CPU = torch.device("cpu")


def build(
    params: list[SamplingParams],
    vocab_size: int,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    default_generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
) -> SamplingMetadata:
    rows = len(params)
    return SamplingMetadata.build(
        params=params,
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(rows)],
        output_token_ids=outputs if outputs is not None else [[] for _ in range(rows)],
        generators=generators if generators is not None else [None] * rows,
        default_generator=default_generator,
        eos_token_id=eos_token_id,
        vocab_size=vocab_size,
        device=CPU,
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=seeded(seed)) * scale


def test_greedy_rows_return_argmax() -> None:
    logits = random_logits(5, 100)
    out = Sampler()(logits, build([SamplingParams(temperature=0.0)] * 5, 100))
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-6),  # below the greedy threshold
        SamplingParams(temperature=1e-3),  # logits 1e-3 apart become e^1 ratios: still argmax
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6),
        SamplingParams(temperature=1.0, top_k=5, top_p=1e-6),
        SamplingParams(temperature=1.0, min_p=1.0),
    ],
    ids=["temperature_1e-6", "temperature_1e-3", "top_k_1", "tiny_top_p", "top_k_and_tiny_top_p", "min_p_1"],
)
def test_degenerate_random_sampling_equals_greedy(params: SamplingParams) -> None:
    # Well separated maxima (>= 1 apart) so that the low temperature case is deterministic.
    logits = random_logits(64, 200)
    logits[torch.arange(64), torch.arange(64) * 3] += 60.0
    out = Sampler()(logits, build([params] * 64, 200, default_generator=seeded(1)))
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_mixed_batch_keeps_greedy_rows_greedy_and_does_not_consume_their_generator() -> None:
    logits = random_logits(4, 50, scale=0.1)  # flat: random rows almost never hit the argmax
    generator = seeded(7)
    state_before = generator.get_state()
    params = [SamplingParams(temperature=0.0, seed=3), SamplingParams(temperature=1.0)] * 2
    out = Sampler()(logits, build(params, 50, generators=[generator, None] * 2, default_generator=seeded(0)))
    assert out.sampled_token_ids[0] == logits[0].argmax() and out.sampled_token_ids[2] == logits[2].argmax()
    assert torch.equal(generator.get_state(), state_before)


def _reference_top_k_top_p_mask(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """True where a token survives: within the row's top_k (0 = all) and inside the smallest
    prefix of the descending order whose probability mass reaches top_p (after top-k)."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for row in range(logits.shape[0]):
        order = logits[row].argsort(descending=True).tolist()
        k = top_k[row] or len(order)
        candidates = order[:k]
        probs = torch.softmax(logits[row, candidates].double(), dim=0).tolist()
        mass = 0.0
        for token, prob in zip(candidates, probs):
            if mass >= top_p[row]:
                break
            keep[row, token] = True
            mass += prob
    return keep


@pytest.mark.parametrize("top_k", [[0, 3, 10, 1], [4, 3, 10, 1]], ids=["some_rows_without_top_k", "top_k_on_every_row"])
def test_top_k_top_p_mask_matches_reference(top_k: list[int]) -> None:
    logits = random_logits(4, 64)
    top_p = [0.5, 0.9, 0.3, 1.0]
    masked = apply_top_k_top_p(
        logits, torch.tensor(top_k), max(top_k), torch.tensor(top_p), top_k_on_every_row=min(top_k) > 0
    )
    expected = _reference_top_k_top_p_mask(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(masked), expected)
    assert torch.equal(masked[expected], logits[expected])


def test_top_k_only_mask_matches_reference() -> None:
    logits = random_logits(3, 64)
    top_k = [0, 5, 1]
    masked = apply_top_k_top_p(logits, torch.tensor(top_k), 5, None)
    assert torch.equal(torch.isfinite(masked), _reference_top_k_top_p_mask(logits, top_k, [1.0] * 3))


def _sample_counts(logits_row: torch.Tensor, params: SamplingParams, draws: int, seed: int) -> torch.Tensor:
    vocab = logits_row.shape[0]
    logits = logits_row.expand(draws, vocab).clone()
    out = Sampler()(logits, build([params] * draws, vocab, default_generator=seeded(seed)))
    return torch.bincount(out.sampled_token_ids, minlength=vocab).double()


def _expected_probs(logits_row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Plain reference: softmax(logits / T), restricted by top-k, top-p, min-p, renormalised."""
    probs = torch.softmax(logits_row.double() / params.temperature, dim=0)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    k = params.top_k or len(order)
    candidate_probs = probs[order[:k]] / probs[order[:k]].sum()
    mass = 0.0
    for token, prob in zip(order[:k].tolist(), candidate_probs.tolist()):
        if mass >= params.top_p:
            break
        keep[token] = True
        mass += prob
    keep &= probs >= params.min_p * probs.max()
    restricted = torch.where(keep, probs, 0.0)
    return restricted / restricted.sum()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.5, top_k=4),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05),
    ],
    ids=["t1", "t0.7", "top_k", "top_p", "min_p", "all"],
)
def test_sampled_distribution_matches_reference_softmax(params: SamplingParams) -> None:
    logits_row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    draws = 20_000
    counts = _sample_counts(logits_row, params, draws, seed=1234)
    expected = _expected_probs(logits_row, params) * draws
    # Tokens the reference excludes must never be sampled.
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    chi_square = (((counts - expected) ** 2)[support] / expected[support]).sum().item()
    # Chi-square with <= 7 degrees of freedom: p = 0.001 is at 24.3; 40 is generous and the
    # fixed seed makes the outcome deterministic anyway.
    assert chi_square < 40.0, (chi_square, counts.tolist(), expected.tolist())


def _sample_steps(
    params: SamplingParams, position: int, batch_size: int, seed: int | None, steps: int = 8
) -> list[int]:
    """Samples `steps` tokens for one request at `position` in a batch of unseeded rows."""
    vocab = 1000
    generator = seeded(seed) if seed is not None else None
    default = seeded(99 + batch_size)
    tokens = []
    for step in range(steps):
        logits = random_logits(batch_size, vocab, seed=1000 + step, scale=0.5)
        logits[position] = random_logits(1, vocab, seed=step, scale=0.5)[0]
        generators: list[torch.Generator | None] = [None] * batch_size
        generators[position] = generator
        others = SamplingParams(temperature=1.0, top_k=20)
        rows = [others] * batch_size
        rows[position] = params
        out = Sampler()(logits, build(rows, vocab, generators=generators, default_generator=default))
        tokens.append(int(out.sampled_token_ids[position]))
    return tokens


def test_seeded_rows_are_reproducible_across_batch_compositions() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    alone = _sample_steps(params, position=0, batch_size=1, seed=11)
    in_batch = _sample_steps(params, position=3, batch_size=6, seed=11)
    assert alone == in_batch
    other_seed = _sample_steps(params, position=3, batch_size=6, seed=12)
    assert other_seed != alone


def _reference_penalties(
    logits: list[float], prompt: list[int], output: list[int], rep: float, freq: float, pres: float
) -> list[float]:
    result = []
    for token, logit in enumerate(logits):
        if token in prompt or token in output:
            logit = logit / rep if logit > 0 else logit * rep
        count = output.count(token)
        logit -= freq * count + (pres if count > 0 else 0.0)
        result.append(logit)
    return result


def test_penalties_match_hand_written_reference() -> None:
    vocab = 12
    logits = random_logits(3, vocab)
    prompts = [[1, 2, 2, 3], [4], [0, 11]]
    outputs = [[3, 5, 5, 5, 7], [], [11, 11, 2]]
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.5),
        SamplingParams(temperature=0.0, repetition_penalty=0.8),
        SamplingParams(temperature=0.0, frequency_penalty=-0.7, presence_penalty=1.5),
    ]
    metadata = build(params, vocab, prompts=prompts, outputs=outputs)
    got = sampler_module.apply_penalties(logits, metadata)
    for row, p in enumerate(params):
        expected = _reference_penalties(
            logits[row].tolist(), prompts[row], outputs[row],
            p.repetition_penalty, p.frequency_penalty, p.presence_penalty,
        )
        torch.testing.assert_close(got[row], torch.tensor(expected), rtol=1e-6, atol=1e-6)
    # The sampler's greedy choice follows the penalised logits.
    out = Sampler()(logits, metadata)
    assert torch.equal(out.sampled_token_ids, got.argmax(-1))


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached() -> None:
    vocab, eos = 10, 9
    logits = torch.zeros(4, vocab)
    logits[:, eos] = 10.0
    logits[:, 5] = 9.0  # a stop token id, second best
    params = [
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5]),  # 1 output: banned
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5]),  # 3 outputs: free
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5], ignore_eos=True),
        SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[5]),
    ]
    outputs = [[0], [0, 1, 2], [0], []]
    out = Sampler()(logits, build(params, vocab, outputs=outputs, eos_token_id=eos, default_generator=seeded(0)))
    sampled = out.sampled_token_ids.tolist()
    assert sampled[0] not in (eos, 5)
    assert sampled[1] == eos
    # ignore_eos: EOS does not stop the request, so min_tokens leaves it alone.
    assert sampled[2] == eos
    assert sampled[3] not in (eos, 5)


@pytest.mark.parametrize("num_logprobs", [0, 3, -1])
def test_logprobs_and_ranks_match_log_softmax_of_raw_logits(num_logprobs: int) -> None:
    vocab = 40
    logits = random_logits(6, vocab)
    params = [
        SamplingParams(temperature=0.8, top_k=10, repetition_penalty=1.5, logprobs=num_logprobs),
        SamplingParams(temperature=0.0, logprobs=num_logprobs),
        SamplingParams(temperature=1.0),
    ] * 2
    out = Sampler()(
        logits, build(params, vocab, prompts=[[1, 2, 3]] * 6, default_generator=seeded(5))
    )
    reference = torch.log_softmax(logits.double(), dim=-1)
    sampled = out.sampled_token_ids
    assert out.logprobs is not None
    k = vocab if num_logprobs == -1 else num_logprobs
    assert out.logprobs.token_ids.shape == (6, 1 + k)
    assert torch.equal(out.logprobs.token_ids[:, 0], sampled)
    chosen = reference.gather(1, sampled[:, None])
    torch.testing.assert_close(out.logprobs.logprobs[:, :1].double(), chosen, rtol=0, atol=1e-5)
    expected_ranks = (reference > chosen).sum(-1) + 1
    assert torch.equal(out.logprobs.ranks, expected_ranks)
    if k:
        top_values, top_ids = reference.topk(k, dim=-1)
        assert torch.equal(out.logprobs.token_ids[:, 1:], top_ids)
        torch.testing.assert_close(out.logprobs.logprobs[:, 1:].double(), top_values, rtol=0, atol=1e-5)

    plain = to_token_logprobs(out.logprobs, [p.logprobs if p.logprobs != -1 else vocab for p in params])
    assert [len(row) for row in plain.token_ids] == [1 + k, 1 + k, 1] * 2
    assert plain.ranks == expected_ranks.tolist()
    assert plain.token_ids[1][0] == int(sampled[1])


def test_prompt_logprobs_match_log_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    # A chunk of 3 rows makes the 7 positions span three chunks.
    monkeypatch.setattr(sampler_module, "_PROMPT_LOGPROBS_CHUNK_ROWS", 3)
    vocab = 30
    logits = random_logits(7, vocab).to(torch.bfloat16)
    targets = torch.tensor([4, 0, 29, 7, 7, 3, 1])
    result = compute_prompt_logprobs(logits, targets, 2)
    reference = torch.log_softmax(logits.float(), dim=-1)
    assert [row[0] for row in result.token_ids] == targets.tolist()
    for position, target in enumerate(targets.tolist()):
        values, ids = reference[position].topk(2)
        assert result.token_ids[position][1:] == ids.tolist()
        expected = [reference[position, target].item()] + values.tolist()
        assert result.logprobs[position] == pytest.approx(expected, abs=1e-5)
        assert result.ranks[position] == int((reference[position] > reference[position, target]).sum()) + 1
    whole = compute_prompt_logprobs(logits, targets, -1)
    assert all(len(row) == 1 + vocab for row in whole.token_ids)
    assert all(math.isclose(math.fsum(math.exp(x) for x in row[1:]), 1.0, abs_tol=1e-4) for row in whole.logprobs)


def test_metadata_skips_unused_work() -> None:
    metadata = build([SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, top_k=5)], 10)
    assert metadata.all_greedy and metadata.no_top_k and metadata.no_top_p and metadata.no_min_p
    assert metadata.no_penalties and metadata.banned_token_index is None and metadata.max_num_logprobs is None
    metadata = build([SamplingParams(temperature=0.5, top_k=5, seed=1)], 10, generators=[seeded(1)])
    assert metadata.all_random and not metadata.no_top_k and metadata.no_top_p and list(metadata.generators) == [0]


@pytest.mark.gpu
def test_cuda_sampler_matches_cpu_and_keeps_seeded_rows_reproducible() -> None:
    cuda = torch.device("cuda")
    vocab, eos = 3000, 2
    logits = random_logits(6, vocab)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.2, frequency_penalty=0.3, logprobs=5),
        SamplingParams(temperature=0.0, presence_penalty=1.0, min_tokens=4, logprobs=-1),
        SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[7], logprobs=0),
        SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1),
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1),
        SamplingParams(temperature=1.0, top_k=3, seed=2),
    ]
    prompts = [[1, 5, 9], [3, 3], [4], [10, 11], [], [12]]
    outputs = [[5, 5, 6], [8], [], [1], [2], []]

    def run(device: torch.device, rows: list[int]) -> SamplerOutput:
        metadata = SamplingMetadata.build(
            params=[params[r] for r in rows],
            prompt_token_ids=[prompts[r] for r in rows],
            output_token_ids=[outputs[r] for r in rows],
            generators=[torch.Generator(device).manual_seed(p.seed) if p.seed is not None else None
                        for p in (params[r] for r in rows)],
            default_generator=torch.Generator(device).manual_seed(0),
            eos_token_id=eos,
            vocab_size=vocab,
            device=device,
        )
        return Sampler()(logits[rows].to(device), metadata)

    cpu_out, cuda_out = run(CPU, list(range(6))), run(cuda, list(range(6)))
    # Greedy rows are deterministic: same tokens, logprobs within float32 tolerance.
    assert torch.equal(cpu_out.sampled_token_ids[:3], cuda_out.sampled_token_ids[:3].cpu())
    assert cpu_out.logprobs is not None and cuda_out.logprobs is not None
    torch.testing.assert_close(cpu_out.logprobs.logprobs[:3], cuda_out.logprobs.logprobs[:3].cpu(), rtol=0, atol=1e-4)
    assert int(cuda_out.sampled_token_ids[1]) != eos and int(cuda_out.sampled_token_ids[2]) not in (eos, 7)
    # Seeded rows give the same token on CUDA whatever else is in the batch.
    alone = run(cuda, [3, 5]).sampled_token_ids.cpu()
    assert alone.tolist() == [int(cuda_out.sampled_token_ids[3]), int(cuda_out.sampled_token_ids[5])]


def _reference_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Sort everything: top-k first, then the nucleus of the renormalised distribution."""
    out = torch.full_like(logits, float("-inf"))
    for row in range(logits.shape[0]):
        values, indices = logits[row].sort(descending=True)
        if top_k[row] > 0:
            values, indices = values[: top_k[row]], indices[: top_k[row]]
        probs = torch.softmax(values, dim=-1)
        keep = ((probs.cumsum(0) - probs) < top_p[row]) | (top_p[row] >= 1.0)
        out[row, indices[keep]] = values[keep]
    return out


_MASS_TOLERANCE = 1e-5


def _mass_before_in_sorted_order(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Each token's running probability mass before it in descending order, in float64, over
    the row's top-k (renormalised) or the whole row; +inf for tokens beyond the top-k."""
    out = torch.full(logits.shape, float("inf"), dtype=torch.float64)
    for row in range(logits.shape[0]):
        values, indices = logits[row].double().sort(descending=True)
        if top_k[row] > 0:
            values, indices = values[: top_k[row]], indices[: top_k[row]]
        probs = torch.softmax(values, dim=-1)
        out[row, indices] = probs.cumsum(0) - probs
    return out


@pytest.mark.parametrize("temperature", [0.3, 1.0, 20.0], ids=["peaked", "normal", "flat"])
def test_top_p_without_a_full_sort_equals_the_sorted_reference(temperature):
    from pagedllm.layers.sampler import apply_top_k_top_p

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50_000, generator=generator) * 4 / temperature
    top_k = [0, 0, 50, 0, 3000, 0]
    top_p = [0.9, 0.5, 0.95, 0.99, 0.8, 1.0]
    result = apply_top_k_top_p(
        logits, torch.tensor(top_k), max(top_k), torch.tensor(top_p), top_k_on_every_row=False
    )
    expected = _reference_top_k_top_p(logits, top_k, top_p)
    kept, expected_kept = ~torch.isinf(result), ~torch.isinf(expected)
    # Judged by probability mass, not token sets: a token whose running mass (in float64)
    # lies within _MASS_TOLERANCE of top_p may fall either side of the edge, since float
    # summation order differs between CPUs; every other token must be kept or dropped
    # exactly as the sorted reference does.
    mass_before = _mass_before_in_sorted_order(logits, top_k)
    at_edge = (mass_before - torch.tensor(top_p, dtype=torch.float64).unsqueeze(1)).abs() <= _MASS_TOLERANCE
    assert torch.equal(kept & ~at_edge, expected_kept & ~at_edge)
    assert torch.equal(result[kept], logits[kept])
    assert kept[5].all()  # top_p = 1 keeps the whole vocabulary
