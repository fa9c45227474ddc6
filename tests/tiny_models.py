"""Tiny random-weight checkpoints of each supported family, written with transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

FAMILIES = ("llama", "qwen2", "qwen3")
# A chat template for the tiny BPE tokenizer (which ships none): role, content, then the turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def make_tiny_checkpoint(
    path: Path,
    family: str = "llama",
    *,
    tie_word_embeddings: bool = False,
    num_key_value_heads: int = 2,
    safe_serialization: bool = True,
    max_shard_size: str | None = None,
    seed: int = 0,
    vocab_size: int = 384,
    tokenizer_dir: Path | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
) -> Path:
    """A 2-layer model of the family with weights large enough (initializer_range 0.2) that
    greedy choices are not near-ties, so our tokens can be compared with transformers'."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        config = transformers.LlamaConfig(**common, rope_theta=10000.0)
        model_class = transformers.LlamaForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=10000.0)
        model_class = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=32, rope_theta=10000.0)
        model_class = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(family)
    config.architectures = [model_class.__name__]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    kwargs = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    if safe_serialization:
        model.save_pretrained(path, **kwargs)
    else:
        # transformers 5 writes only safetensors; a .bin checkpoint is a torch.save'd state dict.
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    if tokenizer_dir is not None:
        for item in Path(tokenizer_dir).iterdir():
            shutil.copy(item, path / item.name)
    return path


def make_tiny_chat_checkpoint(path: Path, tokenizer_dir: Path) -> Path:
    """The tiny Qwen3 checkpoint (seed 5, vocabulary 512) with the tiny BPE tokenizer and
    CHAT_TEMPLATE saved beside it, for the chat, CLI and server tests."""
    make_tiny_checkpoint(path, "qwen3", vocab_size=512, tokenizer_dir=tokenizer_dir, seed=5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    results = []
    with torch.no_grad():
        for prompt in prompts:
            # No EOS: like ignore_eos=True (min_new_tokens would instead ban EOS).
            config = transformers.GenerationConfig(
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            out = model.generate(torch.tensor([prompt]), generation_config=config)
            results.append(out[0, len(prompt):].tolist())
    return results


def hf_logits(hf_model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits [len(tokens), vocab] for one unbatched sequence of token ids."""
    with torch.no_grad():
        return hf_model(tokens.unsqueeze(0)).logits[0]


def load_ours(architecture: str, config: object, hf_model: torch.nn.Module, device: str = "cpu") -> torch.nn.Module:
    """Our model of `architecture` built under `device` (as the worker builds it, so it picks
    that device's attention backend) with transformers' weights loaded; every parameter of
    ours must have been loaded."""
    from pagedllm.models.registry import get_model_class

    with torch.device(device):
        model = get_model_class(architecture)(config).eval()
    loaded = model.load_weights(hf_model.state_dict().items())
    assert loaded == set(dict(model.named_parameters()))
    return model
