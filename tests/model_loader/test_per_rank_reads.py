"""Each tensor-parallel rank reads only its shards from safetensors files (sliced reads, not
whole tensors then narrowed); .bin files, which cannot be read in part, are read whole.

The bound, exact for these checkpoints at N = 2: every matrix is split evenly over the ranks
(KV heads 2 over 2 ranks, vocabulary 384 = 2 x 192 rows, no padding), and vectors (the norms)
are read whole by every rank, so
    bytes read by one rank = matrix bytes / N + vector bytes.
Ranks are simulated in one process (the layers shard by the rank they are told);
tests/entrypoints/test_tensor_parallel.py checks the same numbers in real worker processes
through the `loaded_weight_bytes` RPC."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from tiny_models import make_tiny_checkpoint

from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import override_tp_state_for_testing
from pagedllm.model_loader.loaders import get_model
from pagedllm.model_loader.weight_utils import find_weight_files


def _checkpoint_bytes(path) -> tuple[int, int]:
    """(bytes of matrices, bytes of vectors) in the checkpoint's safetensors files."""
    files, _ = find_weight_files(str(path), "safetensors")
    matrices = vectors = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                size = tensor.numel() * tensor.element_size()
                if tensor.dim() >= 2:
                    matrices += size
                else:
                    vectors += size
    return matrices, vectors


def _bytes_read_per_rank(path, tp_size: int, load_format: str = "auto") -> list[int]:
    config = EngineConfig.from_kwargs(str(path), dtype="float32", device="cpu", load_format=load_format)
    read = []
    for rank in range(tp_size):
        with override_tp_state_for_testing(rank, tp_size):
            model = get_model(config.model_config, config.load_config, "cpu")
        read.append(model.load_stats.bytes_read)
    return read


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_each_rank_reads_its_share_of_the_matrices_from_safetensors(tmp_path, family):
    path = make_tiny_checkpoint(tmp_path / family, family, max_shard_size="40KB")
    matrices, vectors = _checkpoint_bytes(path)
    assert _bytes_read_per_rank(path, 1) == [matrices + vectors]
    two = _bytes_read_per_rank(path, 2)
    assert two == [matrices // 2 + vectors] * 2
    # At 4 ranks the 2 KV heads are replicated and the vocabulary is padded to 4 x 128 rows
    # (the last rank holds only padding), so the split is uneven; still every rank reads less
    # than at 2 ranks, and together they read every byte at least once.
    four = _bytes_read_per_rank(path, 4)
    assert max(four) < two[0] and sum(four) >= matrices + vectors


def test_bin_checkpoints_are_read_whole_by_every_rank(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "bin", "llama", safe_serialization=False)
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert _bytes_read_per_rank(path, 2) == [total, total]
