"""AWQ GEMM checkpoints (interleaved nibble order, zero points), written by the tests' own
packer, run by `LLM` against transformers holding the dequantized weights in float32:
prompt logprobs within 1e-4, greedy tokens equal."""

from __future__ import annotations

import pytest
import torch
from int_group_checkpoints import (
    assert_engine_matches_reference,
    awq_pack,
    awq_unpack,
    write_quantized_checkpoint,
)
from tiny_models import make_tiny_checkpoint

from pagedllm.layers.quantization.awq import AWQConfig
from pagedllm.layers.quantization.kernels.int_group import unpack_awq, unpack_int32


def test_awq_checkpoint_matches_dequantized_transformers(tmp_path):
    source = make_tiny_checkpoint(tmp_path / "src", "llama", seed=2)
    reference = write_quantized_checkpoint(source, tmp_path / "awq", "awq", group_size=32, sym=False)
    assert_engine_matches_reference(tmp_path / "awq", reference)


def test_awq_unpacker_round_trips_the_interleaved_order():
    values = torch.randint(0, 16, (6, 24))
    packed = awq_pack(values)
    assert torch.equal(unpack_awq(packed).long(), values)
    assert torch.equal(awq_unpack(packed), values)
    # The interleave matters: a plain sequential unpack reads other columns.
    assert not torch.equal(unpack_int32(packed, 4, dim=1).long(), values)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"bits": 3, "group_size": 128}, "bits=3"),
        ({"bits": 4, "group_size": 128, "zero_point": False}, "zero_point"),
        ({"bits": 4, "group_size": 128, "version": "gemv"}, "gemv"),
    ],
)
def test_unsupported_awq_configs_are_value_errors(config, message):
    with pytest.raises(ValueError, match=message):
        AWQConfig.from_config({"quant_method": "awq", **config})
