"""Gemma 3 with an image split over 2 CPU processes (gloo) gives the logits of the unsplit
transformers model: the SigLIP tower's heads and MLP, the decoder's heads (2 key/value heads,
one per rank) and the bidirectional image span all sharded. Tolerance 1e-4 (fp32)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

IMAGE_TOKEN, BOI, EOI = 380, 381, 382


def _namespace(config: dict) -> SimpleNamespace:
    return SimpleNamespace(**{k: _namespace(v) if k.endswith("_config") else v for k, v in config.items()})


def _rank_main(rank: int, world_size: int, port: int, workdir: str) -> None:
    # Children import no transformers (slow to import): the config travels as a plain dict.
    from pagedllm.distributed.parallel_state import destroy_distributed, init_distributed
    from pagedllm.forward_context import AttentionMetadata, set_forward_context
    from pagedllm.models.registry import get_model_class

    init_distributed(world_size, rank, "gloo", f"tcp://127.0.0.1:{port}")
    try:
        config = _namespace(torch.load(f"{workdir}/config.pt"))
        model = get_model_class("Gemma3ForConditionalGeneration")(config)
        model.load_weights(torch.load(f"{workdir}/weights.pt").items())
        input_ids, pixel_values = torch.load(f"{workdir}/input_ids.pt"), torch.load(f"{workdir}/pixel_values.pt")
        n = len(input_ids)
        metadata = AttentionMetadata(
            num_actual_tokens=n, num_reqs=1, max_query_len=n, max_seq_len=n,
            query_start_loc=torch.tensor([0, n], dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
            block_table=torch.zeros(1, 1, dtype=torch.int32), slot_mapping=torch.full((n,), -1),
            query_start_loc_cpu=[0, n], seq_lens_cpu=[n],
        )
        with torch.no_grad(), set_forward_context(metadata):
            embeds = model.get_input_embeddings(input_ids)
            embeds[input_ids == IMAGE_TOKEN] = model.embed_multimodal("image", {"pixel_values": pixel_values})
            logits = model.compute_logits(model(input_ids, torch.arange(n), embeds))
        torch.save(logits, f"{workdir}/logits_rank{rank}.pt")
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_two_rank_gemma3_with_an_image_matches_unsplit_transformers(tmp_path: Path) -> None:
    import transformers
    from tiny_vlm_checkpoints import randomize_

    text = dict(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=4, vision_use_head=False)
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=16, image_token_index=IMAGE_TOKEN,
        boi_token_index=BOI, eoi_token_index=EOI,
    )
    hf_model = transformers.Gemma3ForConditionalGeneration(config).eval()
    randomize_(hf_model, norm_mean=0.0)
    input_ids = torch.tensor([5, 6, BOI] + [IMAGE_TOKEN] * 16 + [EOI, 7, 8, 9])
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(
            input_ids=input_ids[None], pixel_values=pixel_values,
            token_type_ids=(input_ids == IMAGE_TOKEN).long()[None],
        ).logits[0]
    config_dict = config.to_dict()
    config_dict.update(image_token_id=IMAGE_TOKEN, architectures=["Gemma3ForConditionalGeneration"])
    torch.save(config_dict, tmp_path / "config.pt")
    torch.save(hf_model.state_dict(), tmp_path / "weights.pt")
    torch.save(input_ids, tmp_path / "input_ids.pt")
    torch.save(pixel_values, tmp_path / "pixel_values.pt")
    from pagedllm.executor.base import get_open_port

    mp.spawn(_rank_main, args=(2, get_open_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        logits = torch.load(tmp_path / f"logits_rank{rank}.pt")
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0, msg=f"rank {rank}")
