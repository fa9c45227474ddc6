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

from pagedllm.engine.arg_utils import EngineArgs
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
    config = EngineArgs.from_kwargs(str(path), dtype="float32", device="cpu", load_format=load_format).create_engine_config()
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


def test_a_loader_written_for_plain_tensors_reads_a_slice_whole(tmp_path):
    """Slice-aware loaders index the slice; any other use (copy_, torch functions, tensor
    methods) reads the whole tensor once and still loads the right values."""
    from safetensors.torch import save_file

    from pagedllm.model_loader.weight_utils import ReadStats, sharded_safetensors_iterator

    weight = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    save_file({"w": weight, "norm": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    stats = ReadStats()
    items = dict()
    for name, loaded in sharded_safetensors_iterator([str(tmp_path / "model.safetensors")], stats, use_tqdm=False):
        if name == "w":
            assert loaded.shape == (6, 4) and loaded.dtype == torch.float32
            assert torch.equal(loaded.narrow(0, 3, 3), weight[3:])  # 48 bytes
            target = torch.zeros(6, 4, dtype=torch.bfloat16)
            target.copy_(loaded)  # reads it whole: 96 bytes
            assert torch.equal(target, weight.to(torch.bfloat16))
            assert torch.equal(torch.cat([loaded, loaded]), torch.cat([weight, weight]))  # cached, no re-read
            assert torch.equal(loaded.float().t(), weight.t())
        items[name] = loaded
    assert isinstance(items["norm"], torch.Tensor)  # vectors come whole: 16 bytes
    assert stats.bytes_read == 48 + 96 + 16 and stats.num_tensors == 2
