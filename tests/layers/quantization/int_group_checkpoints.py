"""Test-side quantizers and packers for GPTQ, AWQ and compressed-tensors pack-quantized,
written from the formats' public descriptions (independently of pagedllm's unpackers), and a
writer of whole quantized checkpoints of a tiny transformers model plus the transformers
model holding the dequantized weights (the reference)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Quantized:
    """q [K, N] unsigned ints, zeros [G, N] unsigned ints, scales fp16 [G, N], g_idx [K],
    dequantized [N, K] float32 (the reference weight, in the nn.Linear orientation)."""

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    dequantized: torch.Tensor


def quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
             g_idx: torch.Tensor | None = None) -> Quantized:
    """Min/max round-to-nearest quantization of a [N, K] weight along K in groups."""
    w = weight.detach().float().t()  # [K, N]
    num_rows = w.shape[0]
    if g_idx is None:
        g_idx = torch.arange(num_rows) // group_size if group_size != -1 else torch.zeros(num_rows, dtype=torch.long)
    g_idx = g_idx.long()
    num_groups = int(g_idx.max()) + 1
    maxq = 2**bits - 1
    scales = torch.empty(num_groups, w.shape[1])
    zeros = torch.empty(num_groups, w.shape[1], dtype=torch.long)
    for group in range(num_groups):
        rows = w[g_idx == group]
        low, high = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
        if sym:
            scales[group] = torch.maximum(low.abs(), high) * 2 / maxq
            zeros[group] = (maxq + 1) // 2
        else:
            scales[group] = (high - low) / maxq
            zeros[group] = torch.round(-low / scales[group]).long().clamp(0, maxq)
    scales = scales.clamp(min=1e-6).half()
    s, z = scales.float()[g_idx], zeros[g_idx]
    q = (torch.round(w / s) + z).clamp(0, maxq).long()
    dequantized = ((q - z).float() * s).t().contiguous()
    return Quantized(q, zeros, scales, g_idx.to(torch.int32), dequantized)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] -> int32 [R / (32/bits), C]: word r holds rows r*pack + i at bits i*bits."""
    pack = 32 // bits
    words = torch.zeros(values.shape[0] // pack, values.shape[1], dtype=torch.int64)
    for i in range(pack):
        words |= (values[i::pack].long() & (2**bits - 1)) << (bits * i)
    return _to_int32(words)


def pack_along_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_along_rows(values.t(), bits).t().contiguous()


def gptq_tensors(qt: Quantized, bits: int, v1: bool = True) -> dict[str, torch.Tensor]:
    stored_zeros = (qt.zeros - 1) if v1 else qt.zeros
    return {
        "qweight": pack_along_rows(qt.q, bits),
        "qzeros": pack_along_cols(stored_zeros & (2**bits - 1), bits),
        "scales": qt.scales,
        "g_idx": qt.g_idx,
    }


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit -> int32 [R, C/8]: nibble i of word j holds column 8j + AWQ_ORDER[i]."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for i, column in enumerate(AWQ_ORDER):
        words |= values[:, column::8].long() << (4 * i)
    return _to_int32(words)


def awq_tensors(qt: Quantized) -> dict[str, torch.Tensor]:
    return {"qweight": awq_pack(qt.q), "qzeros": awq_pack(qt.zeros), "scales": qt.scales}


def unpack_along_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    pack = 32 // bits
    out = torch.empty(words.shape[0] * pack, words.shape[1], dtype=torch.long)
    for i in range(pack):
        out[i::pack] = (words.long() >> (bits * i)) & (2**bits - 1)
    return out


def awq_unpack(words: torch.Tensor) -> torch.Tensor:
    out = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.long)
    for i, column in enumerate(AWQ_ORDER):
        out[:, column::8] = (words.long() >> (4 * i)) & 0xF
    return out


def write_quantized_checkpoint(
    source: Path, target: Path, method: str, bits: int = 4, group_size: int = 32,
    sym: bool = True, desc_act: bool = False, seed: int = 0,
) -> torch.nn.Module:
    """Quantize every decoder linear of the checkpoint at `source` into `target` as a `method`
    ("gptq" or "awq") checkpoint; returns the transformers model holding the dequantized
    weights (float32), the reference the engine must match."""
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    for layer_index in range(model.config.num_hidden_layers):
        for name in LINEAR_NAMES:
            group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"model.layers.{layer_index}.{group}.{name}"
            module = model.get_submodule(prefix)
            g_idx = None
            if desc_act:  # a random act order, as GPTQ's sorting by the Hessian gives one
                num_rows = module.in_features
                order = torch.randperm(num_rows, generator=generator)
                g_idx = torch.empty(num_rows, dtype=torch.long)
                g_idx[order] = torch.arange(num_rows) // group_size
            qt = quantize(module.weight, bits, group_size, sym, g_idx)
            del state[f"{prefix}.weight"]
            tensors = gptq_tensors(qt, bits) if method == "gptq" else awq_tensors(qt)
            state.update({f"{prefix}.{key}": value for key, value in tensors.items()})
            with torch.no_grad():
                module.weight.copy_(qt.dequantized)
    target.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / "model.safetensors"))
    config = json.loads((Path(source) / "config.json").read_text())
    if method == "gptq":
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
            "sym": sym, "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True,
        }
    else:
        config["quantization_config"] = {
            "quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None,
        }
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return model


PROMPT = [5, 17, 99, 23, 8, 41, 77, 150, 3, 260, 31, 64, 90, 12]
GREEDY_TOKENS = 8
# fp32 on both sides: only summation order differs, so logprobs agree to ~1e-5; a wrong
# layout (another nibble order, a zero point off by one) moves them by 1e-2 or more.
LOGPROB_ATOL = 1e-4


def assert_engine_matches_reference(path: Path, reference: torch.nn.Module, atol: float = LOGPROB_ATOL,
                                    **llm_kwargs) -> None:
    """`LLM(path, dtype="float32")`'s prompt logprobs are the reference's within `atol` and
    its greedy tokens are the reference's."""
    from pagedllm import LLM, SamplingParams

    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 24, **llm_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, prompt_logprobs=5, ignore_eos=True)
    output = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([PROMPT])).logits[0].float(), dim=-1)
        hf_tokens = reference.generate(
            torch.tensor([PROMPT]),
            generation_config=transformers.GenerationConfig(
                max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0),
        )[0, len(PROMPT):].tolist()
    worst = 0.0
    for position in range(1, len(PROMPT)):
        for token_id, logprob in output.prompt_logprobs[position].items():
            worst = max(worst, abs(logprob.logprob - expected[position - 1, token_id].item()))
    assert worst <= atol, f"prompt logprobs differ by {worst:.2e} (> {atol})"
    assert list(output.outputs[0].token_ids) == hf_tokens
    llm.shutdown()


def ct_tensors(qt: Quantized, bits: int, sym: bool, with_g_idx: bool = False) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized tensors of a quantization (offset-by-2**(bits-1)
    unsigned values equal this quantizer's unsigned ones: its symmetric zero is 2**(bits-1))."""
    tensors = {
        "weight_packed": pack_along_rows(qt.q, bits).t().contiguous(),
        "weight_scale": qt.scales.t().contiguous(),
        "weight_shape": torch.tensor([qt.q.shape[1], qt.q.shape[0]]),
    }
    if not sym:
        tensors["weight_zero_point"] = pack_along_rows(qt.zeros.t(), bits)
    if with_g_idx:
        tensors["weight_g_idx"] = qt.g_idx
    return tensors


class OneMethodConfig:
    """A quantization config giving every layer the method `make()` builds (stands in for
    the compressed-tensors dispatcher, which lives in another module)."""

    def __init__(self, make) -> None:
        self.make = make

    def get_name(self) -> str:
        return "compressed-tensors"

    def get_linear_method(self, layer, prefix):
        return self.make()


def checkpoint_tensors(method: str, qt: Quantized, bits: int, sym: bool, g_idx: bool) -> dict[str, torch.Tensor]:
    if method == "gptq":
        return gptq_tensors(qt, bits)
    if method == "awq":
        return awq_tensors(qt)
    return ct_tensors(qt, bits, sym, g_idx)
