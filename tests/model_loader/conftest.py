"""Tiny checkpoints and hub-cache folders for the model loader tests (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

# A fixed commit hash, as the hub cache names snapshot folders.
REVISION = "0123456789abcdef0123456789abcdef01234567"


def save_pt_checkpoint(model: PreTrainedModel, folder: Path, num_shards: int = 1) -> None:
    """config.json plus pytorch_model*.bin written with torch.save (transformers 5 only writes
    safetensors), sharded with a pytorch_model.bin.index.json when num_shards > 1."""
    model.config.save_pretrained(folder)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    if num_shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = sorted(state)
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.bin"
        part = {name: state[name] for name in names[shard::num_shards]}
        torch.save(part, folder / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_hub_cache(cache_dir: Path, repo_id: str, files_from: Path, revision: str = REVISION, ref: str | None = "main") -> Path:
    """Lay out `files_from`'s files as huggingface_hub's cache does:
    models--org--name/snapshots/<commit>/... and refs/<ref> holding the commit."""
    repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in os.listdir(files_from):
        shutil.copy(files_from / name, snapshot / name)
    if ref is not None:
        (repo_folder / "refs").mkdir(exist_ok=True)
        (repo_folder / "refs" / ref).write_text(revision)
    return snapshot


@pytest.fixture
def make_cache() -> Callable[..., Path]:
    """`make_hub_cache` as a fixture, since test modules here are not a package."""
    return make_hub_cache


@pytest.fixture
def save_pt() -> Callable[..., None]:
    """`save_pt_checkpoint` as a fixture."""
    return save_pt_checkpoint


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    """A tiny random Llama (2 layers, hidden 64, GQA 4/2 heads, vocab 256), the same for a seed."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()
