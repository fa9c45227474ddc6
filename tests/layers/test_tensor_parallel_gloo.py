"""A tiny Llama split over 2 CPU processes (gloo) gives the logits of the unsplit transformers
model: exercises the process group, all-reduce, all-gather and every layer's sharding, with
key/value heads split (2 kv heads) and replicated (1 kv head, fewer than ranks).
Tolerance 1e-4 (fp32)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    vocab_size=100, max_position_embeddings=64, tie_word_embeddings=False, attention_bias=True,
    architectures=["LlamaForCausalLM"],
)
KV_HEAD_COUNTS = (2, 1)
LENS = [5, 3]


def _rank_main(rank: int, world_size: int, port: int, workdir: str) -> None:
    # Children import no transformers (slow to import): the config travels as a plain dict.
    from pagedllm.distributed.parallel_state import destroy_distributed, init_distributed
    from pagedllm.forward_context import AttentionMetadata, set_forward_context
    from pagedllm.models.registry import get_model_class

    init_distributed(world_size, rank, "gloo", f"tcp://127.0.0.1:{port}")
    try:
        starts = [0, LENS[0], sum(LENS)]
        metadata = AttentionMetadata(
            num_actual_tokens=sum(LENS), num_reqs=2, max_query_len=max(LENS), max_seq_len=max(LENS),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(LENS, dtype=torch.int32), block_table=torch.zeros(2, 1, dtype=torch.int32),
            slot_mapping=torch.full((sum(LENS),), -1), query_start_loc_cpu=starts, seq_lens_cpu=LENS,
        )
        positions = torch.cat([torch.arange(n) for n in LENS])
        for kv in KV_HEAD_COUNTS:
            config = SimpleNamespace(**torch.load(f"{workdir}/config_kv{kv}.pt"))
            model = get_model_class("LlamaForCausalLM")(config)
            model.load_weights(torch.load(f"{workdir}/weights_kv{kv}.pt").items())
            with torch.no_grad(), set_forward_context(metadata):
                logits = model.compute_logits(model(torch.load(f"{workdir}/input_ids.pt"), positions))
            torch.save(logits, f"{workdir}/logits_kv{kv}_rank{rank}.pt")
    finally:
        destroy_distributed()


def test_two_rank_llama_matches_unsplit_transformers(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    input_ids = torch.randint(0, 100, (sum(LENS),))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    expected = {}
    for kv in KV_HEAD_COUNTS:
        config = LlamaConfig(**CONFIG, num_key_value_heads=kv)
        hf_model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for name, param in hf_model.named_parameters():
                param.normal_(1.0 if "norm" in name else 0.0, 0.1)
            expected[kv] = torch.cat([hf_model(p.unsqueeze(0)).logits[0] for p in input_ids.split(LENS)])
        torch.save(config.to_dict(), tmp_path / f"config_kv{kv}.pt")
        torch.save(hf_model.state_dict(), tmp_path / f"weights_kv{kv}.pt")
    from pagedllm.executor.base import get_open_port

    mp.spawn(_rank_main, args=(2, get_open_port(), str(tmp_path)), nprocs=2, join=True)
    for kv in KV_HEAD_COUNTS:
        for rank in range(2):
            logits = torch.load(tmp_path / f"logits_kv{kv}_rank{rank}.pt")
            torch.testing.assert_close(logits, expected[kv], atol=1e-4, rtol=0, msg=f"kv heads {kv}, rank {rank}")
