"""fp8 and int8 on the GPU: the torch._scaled_mm / torch._int_mm / GEMV paths (fed bf16 rows or
rows a norm quantized) equal the reference path (dequantized weight, fake-quantized
activations, float32 matmul) to bf16 output precision, the
one-launch Triton per-token quantization equals the torch expression bit for bit, and dynamic
fp8 loading streams (peak memory about the fp8 model plus one layer, never bf16)."""

from __future__ import annotations

import pytest
import torch

from pagedllm.layers.linear import MergedColumnParallelLinear
from pagedllm.layers.quantization.compressed_tensors import CompressedTensorsConfig
from pagedllm.layers.quantization.fp8 import Fp8Config
from pagedllm.layers.quantization.kernels.w8a8 import fake_quantize_activation

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
# bf16 output: 8 mantissa bits, relative to the output's largest value.
TOLERANCE = 1e-2


def int8_config(symmetric_activations: bool) -> CompressedTensorsConfig:
    return CompressedTensorsConfig.from_config({
        "quant_method": "compressed-tensors", "format": "int-quantized",
        "config_groups": {"g": {"targets": ["Linear"],
                                "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                                "input_activations": {"num_bits": 8, "type": "int", "strategy": "token",
                                                      "dynamic": True, "symmetric": symmetric_activations}}},
    })


def build(config, kernel: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            layer = MergedColumnParallelLinear(1024, [2048, 2048], quant_config=config)
        finally:
            torch.set_default_dtype(torch.float32)
    for shard in (0, 1):
        weight = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
        if layer.weight.dtype == torch.int8:
            scale = weight.float().abs().amax(1, keepdim=True) / 127
            layer.weight.weight_loader(layer.weight, torch.round(weight / scale).to(torch.int8), shard)
            layer.weight_scale.weight_loader(layer.weight_scale, scale, shard)
        else:
            layer.weight.weight_loader(layer.weight, weight, shard)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.w8a8_kernel == kernel
    return layer


def reference(layer, x: torch.Tensor) -> torch.Tensor:
    scheme = layer.quant_method.scheme
    xq = fake_quantize_activation(x.float(), scheme.weight_dtype, None, None, scheme.activation_symmetric, None)
    return xq @ layer.quant_method.dequantized_weight(layer, torch.float32).T


@pytest.mark.parametrize("num_tokens", [1, 7, 16, 17, 300])
@pytest.mark.parametrize("config, kernel", [
    (Fp8Config.from_config({}), "scaled_mm"),
    (int8_config(True), "int_mm"),
    (int8_config(False), "int_mm"),
], ids=["fp8", "int8", "int8-asymmetric-activations"])
def test_gpu_kernel_equals_reference_path(config, kernel, num_tokens) -> None:
    layer = build(config, kernel)
    x = torch.randn(num_tokens, 1024, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    ref = reference(layer, x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < TOLERANCE


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_int8_layer_fed_a_norm_quantized_activation_equals_the_reference(num_tokens) -> None:
    """The norm quantizes its output to int8 for a symmetric dynamic int8 layer; decode rows go
    through the GEMV's int8 dots, prefill through torch._int_mm, both equal to the reference."""
    from pagedllm.layers.ops.fused_rms_norm import rms_norm

    layer = build(int8_config(True), "int_mm")
    assert layer.quant_method.fused_input_quantization(layer) == torch.int8
    asymmetric = build(int8_config(False), "int_mm")
    assert asymmetric.quant_method.fused_input_quantization(asymmetric) is None
    x = torch.randn(num_tokens, 1024, device="cuda", dtype=torch.bfloat16)
    weight = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    out = layer(rms_norm(x, weight, 1e-6, quantize_to=torch.int8))
    ref = reference(layer, rms_norm(x, weight, 1e-6))
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < TOLERANCE


@pytest.mark.parametrize("qdtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("shape", [(1, 4096), (7, 14336), (300, 1000)])
def test_triton_per_token_quant_is_bit_identical_to_torch(qdtype, shape) -> None:
    from pagedllm.layers.quantization.kernels.per_token_quant import per_token_quant
    from pagedllm.layers.quantization.kernels.w8a8 import quantize_activation

    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 3
    q, scale = per_token_quant(x, qdtype)
    expected_q, expected_scale, _ = quantize_activation(x, qdtype, None, None, True, None)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))


def test_dynamic_fp8_loading_streams(tmp_path) -> None:
    """A 1 GiB bf16 checkpoint loads with quantization="fp8" with a peak of about its fp8 size
    plus one layer in bf16; the loaded weights take about half the bf16 bytes."""
    import transformers

    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.model_loader.loaders import get_model, model_weight_bytes

    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    hf_model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    bf16_bytes = sum(p.numel() * 2 for p in hf_model.parameters())
    hf_model.save_pretrained(tmp_path)
    del hf_model
    engine_config = EngineArgs.from_kwargs(str(tmp_path), quantization="fp8", dtype="bfloat16").create_engine_config()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = get_model(engine_config.model_config, engine_config.load_config, "cuda")
    peak = torch.cuda.max_memory_allocated() - base
    weights = model_weight_bytes(model)
    largest_layer_bf16 = 2 * 8192 * 2048 * 2  # gate_up_proj
    # Staging (bf16) plus one float32 chunk of rows while quantizing.
    assert peak < weights + 2 * largest_layer_bf16 + (64 << 20)
    assert peak < 0.75 * bf16_bytes
    assert weights < 0.6 * bf16_bytes


def test_dynamic_fp8_norms_quantize_for_their_layers(tiny_checkpoints, monkeypatch) -> None:
    """On the GPU the RMSNorms of a dynamic fp8 model hand qkv_proj and gate_up_proj fp8 rows:
    the same tokens and logprobs (bf16 output precision) as quantizing in the layers."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.model_loader import loaders

    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, prompt_logprobs=2, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 17, 99, 23, 8]}, {"prompt_token_ids": list(range(30, 70))}]

    def run() -> tuple[list, list, torch.nn.Module]:
        llm = LLM(str(tiny_checkpoints["llama"]), skip_tokenizer_init=True, dtype="bfloat16", quantization="fp8",
                  gpu_memory_utilization=0.2)
        try:
            outputs = llm.generate(prompts, params, use_tqdm=False)
            layer = llm.llm_engine.engine_core.executor.worker.model_runner.model.model.layers[0]
            tokens = [list(o.outputs[0].token_ids) for o in outputs]
            logprobs = [[{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                        + [{t: lp.logprob for t, lp in step.items()} for step in o.prompt_logprobs[1:]]
                        for o in outputs]
            return tokens, logprobs, layer
        finally:
            llm.shutdown()

    tokens, logprobs, layer = run()
    assert layer.input_layernorm._quantize_to == torch.float8_e4m3fn
    assert layer.post_attention_layernorm._quantize_to == torch.float8_e4m3fn
    monkeypatch.setattr(loaders, "link_activation_quantization", lambda model: 0)
    plain_tokens, plain_logprobs, plain_layer = run()
    assert plain_layer.input_layernorm._quantize_to is None
    assert tokens == plain_tokens
    for linked_rows, plain_rows in zip(logprobs, plain_logprobs):
        for linked, plain in zip(linked_rows, plain_rows):
            assert all(abs(linked[t] - plain[t]) < 2e-2 for t in linked.keys() & plain.keys())
