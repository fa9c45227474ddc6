"""GPTQ end to end under tensor parallelism (two gloo ranks: q/k/v and gate/up split by
output, o/down by whole groups, act order slicing g_idx per rank) and through
`save-sharded` / load_format="sharded_state", which must keep the quantized tensors:
prompt logprobs within 1e-4 of transformers holding the dequantized weights."""

from __future__ import annotations

import json

import pytest
from int_group_checkpoints import assert_engine_matches_reference, write_quantized_checkpoint
from safetensors import safe_open
from tiny_models import make_tiny_checkpoint

from pagedllm.entrypoints.save_sharded import save_sharded_checkpoint


@pytest.fixture(scope="module")
def gptq_act_order(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gptq-tp")
    source = make_tiny_checkpoint(folder / "src", "llama", seed=6)
    reference = write_quantized_checkpoint(source, folder / "gptq", "gptq", bits=4, sym=False, desc_act=True)
    return folder / "gptq", reference


@pytest.mark.slow
def test_two_ranks_match_dequantized_transformers(gptq_act_order):
    path, reference = gptq_act_order
    assert_engine_matches_reference(path, reference, tensor_parallel_size=2)


def test_sharded_state_keeps_the_quantized_tensors(gptq_act_order, tmp_path):
    path, reference = gptq_act_order
    save_sharded_checkpoint(str(path), str(tmp_path / "sharded"), 1, dtype="float32")
    with safe_open(str(tmp_path / "sharded" / "model-rank-0-part-0.safetensors"), framework="pt") as f:
        names = set(f.keys())
        qweight = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
    assert str(qweight.dtype) == "torch.int32" and tuple(qweight.shape) == (128 // 8, 64)
    assert "model.layers.0.mlp.down_proj.scales" in names and "model.layers.0.mlp.down_proj.perm" in names
    assert_engine_matches_reference(tmp_path / "sharded", reference, load_format="sharded_state")


def test_a_sharded_state_from_before_the_interleaved_int4_layout_is_refused(gptq_act_order, tmp_path):
    """Its 4-bit words would load without error and compute garbage."""
    from pagedllm import LLM

    path, _ = gptq_act_order
    save_sharded_checkpoint(str(path), str(tmp_path / "sharded"), 1, dtype="float32")
    metadata_path = tmp_path / "sharded" / "sharded_state.json"
    metadata = json.loads(metadata_path.read_text())
    assert metadata["layout_version"] == 2
    del metadata["layout_version"]  # as written before it existed
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="layout version 1.*need version 2.*save it again"):
        LLM(str(tmp_path / "sharded"), load_format="sharded_state", skip_tokenizer_init=True, dtype="float32",
            kv_cache_memory_bytes=1 << 24)
