"""Sharded checkpoints (vLLM's save_sharded_state layout): `pagedllm save-sharded` writes each
rank's shards as model-rank-{rank}-part-{part}.safetensors plus the source's config and
tokenizer; loading them with load_format="sharded_state" reads only the rank's own files and
gives transformers' greedy tokens; another tensor_parallel_size fails naming both."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open
from tiny_models import hf_greedy, make_tiny_checkpoint

from pagedllm import LLM, SamplingParams
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.entrypoints.cli import main

PROMPTS = [[5, 17, 99, 23, 8], list(range(30, 100))]
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
ENGINE = dict(dtype="float32", kv_cache_memory_bytes=1 << 24)
MAX_FILE_SIZE = 60_000  # bytes: forces each rank's ~125 KB into several parts


def _rank_files(folder, rank: int) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith(f"model-rank-{rank}-part-"))


def _saved_tensor_names(folder, rank: int) -> list[str]:
    names = []
    for name in _rank_files(folder, rank):
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            names += list(f.keys())
    return names


def _tensor_bytes(folder, rank: int) -> int:
    total = 0
    for name in _rank_files(folder, rank):
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            total += sum(f.get_tensor(key).numel() * f.get_tensor(key).element_size() for key in f.keys())
    return total


def test_two_rank_sharded_state_round_trip_gives_transformers_tokens(tmp_path, tiny_bpe_tokenizer_dir):
    source = make_tiny_checkpoint(tmp_path / "model", "llama", tie_word_embeddings=True, tokenizer_dir=tiny_bpe_tokenizer_dir)
    output = tmp_path / "sharded"
    assert main([
        "save-sharded", "--model", str(source), "--tensor-parallel-size", "2", "--output", str(output),
        "--max-file-size", str(MAX_FILE_SIZE), "--dtype", "float32",
    ]) == 0

    for rank in (0, 1):
        files = _rank_files(output, rank)
        assert len(files) > 1 and files[0] == f"model-rank-{rank}-part-0.safetensors"
        assert all(os.path.getsize(output / name) <= MAX_FILE_SIZE + 4096 for name in files)  # + header
        names = _saved_tensor_names(output, rank)
        assert len(names) == len(set(names)) and "lm_head.weight" not in names  # tied: saved once
    assert json.loads((output / "sharded_state.json").read_text())["tensor_parallel_size"] == 2
    for copied in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (output / copied).is_file(), copied
    assert not (output / "model.safetensors").exists()

    llm = LLM(str(output), load_format="sharded_state", tensor_parallel_size=2, **ENGINE)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(source, PROMPTS, MAX_TOKENS)
        assert outputs[0].outputs[0].text  # the copied tokenizer decodes
        # Each rank read exactly the tensors of its own files.
        read = llm.llm_engine.executor.collective_rpc("loaded_weight_bytes")
        assert read == [_tensor_bytes(output, 0), _tensor_bytes(output, 1)]
    finally:
        llm.shutdown()


def test_loading_with_another_tensor_parallel_size_fails_naming_both(tmp_path):
    source = make_tiny_checkpoint(tmp_path / "model", "qwen2")
    output = tmp_path / "sharded"
    # One rank in this process (no worker processes): the saving path itself.
    assert main(["save-sharded", "--model", str(source), "--tensor-parallel-size", "1",
                 "--output", str(output), "--distributed-executor-backend", "uni"]) == 0
    assert _rank_files(output, 0) == ["model-rank-0-part-0.safetensors"]
    with pytest.raises(ValueError, match="saved with tensor_parallel_size=1 but loading with tensor_parallel_size=2"):
        EngineArgs.from_kwargs(str(output), load_format="sharded_state", tensor_parallel_size=2).create_engine_config()
    # The matching size loads, in-process, and gives transformers' tokens.
    llm = LLM(str(output), load_format="sharded_state", skip_tokenizer_init=True, **ENGINE)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(source, PROMPTS, MAX_TOKENS)


def test_sharded_state_errors_name_the_fix(tmp_path, capsys):
    source = make_tiny_checkpoint(tmp_path / "model", "llama")
    with pytest.raises(ValueError, match="holds no model-rank-\\*-part-\\*.safetensors"):
        EngineArgs.from_kwargs(str(source), load_format="sharded_state").create_engine_config()
    with pytest.raises(SystemExit):  # the CLI prints one line and exits with status 2
        main(["save-sharded", "--model", str(source), "--tensor-parallel-size", "1", "--output", str(source),
              "--distributed-executor-backend", "uni"])
    assert "is the model folder itself" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["save-sharded", "--output", str(tmp_path / "other")])
    assert "save-sharded needs --model" in capsys.readouterr().err


def test_vllm_save_paths_file_pattern_and_module_entry_point(tmp_path, capsys):
    """vLLM's example saves through llm.llm_engine.engine_core.save_sharded_state(path=,
    pattern=, max_size=) and copies the config files itself; the command takes its -o and
    --file-pattern; `python -m pagedllm.entrypoints.save_sharded` is the command."""
    from pagedllm.model_loader.sharded_state import copy_metadata_files

    source = make_tiny_checkpoint(tmp_path / "model", "llama")
    expected = hf_greedy(source, PROMPTS, MAX_TOKENS)
    llm = LLM(str(source), skip_tokenizer_init=True, **ENGINE)
    assert llm.llm_engine.model_executor is llm.llm_engine.executor
    by_python = tmp_path / "python"
    llm.llm_engine.engine_core.save_sharded_state(path=str(by_python), pattern="w-{rank}-{part}.safetensors",
                                                  max_size=MAX_FILE_SIZE)
    llm.shutdown()
    copy_metadata_files(str(source), str(by_python))
    by_cli = tmp_path / "cli"
    assert main(["save-sharded", "--model", str(source), "-o", str(by_cli), "--file-pattern",
                 "x-{rank}-{part}.safetensors", "--distributed-executor-backend", "uni"]) == 0
    assert "x-0-0.safetensors" in os.listdir(by_cli)
    assert len([n for n in os.listdir(by_python) if n.startswith("w-0-")]) > 1
    for folder in (by_python, by_cli):
        loaded = LLM(str(folder), load_format="sharded_state", skip_tokenizer_init=True, **ENGINE)
        outputs = loaded.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
    with pytest.raises(SystemExit):
        main(["save-sharded", "--model", str(source), "-o", str(tmp_path / "bad"), "--file-pattern", "x.safetensors"])
    assert "must contain {rank} and {part}" in capsys.readouterr().err
    help_text = subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.save_sharded", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--file-pattern" in help_text and "--tensor-parallel-size" in help_text


def test_saving_again_replaces_the_earlier_state_and_auto_loading_names_the_format(tmp_path):
    """A second save into the same folder replaces the first (as vLLM's does), leaving no part of
    it behind; loading the folder without load_format='sharded_state' says to pass it."""
    source = make_tiny_checkpoint(tmp_path / "model", "llama")
    output = tmp_path / "sharded"
    common = ["save-sharded", "--model", str(source), "-o", str(output), "--distributed-executor-backend", "uni"]
    assert main([*common, "--max-file-size", str(MAX_FILE_SIZE)]) == 0
    assert len(_rank_files(output, 0)) > 1
    assert main(common) == 0
    assert _rank_files(output, 0) == ["model-rank-0-part-0.safetensors"]
    with pytest.raises(ValueError, match="holds a sharded state.*load_format='sharded_state'"):
        LLM(str(output), skip_tokenizer_init=True, **ENGINE)
    llm = LLM(str(output), load_format="sharded_state", skip_tokenizer_init=True, **ENGINE)
    assert llm.llm_engine.vllm_config.parallel_config.world_size == 1
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(source, PROMPTS, MAX_TOKENS)



def test_vllm_made_states_load_and_a_folder_mixing_two_states_is_refused(tmp_path):
    """A state as vLLM writes it: no sharded_state.json, a custom file pattern named by
    model_loader_extra_config, a tied embedding saved under lm_head.weight; a running engine's
    second save into the same folder replaces its first; a folder that still mixes two states
    is refused rather than loaded wrong."""
    from safetensors.torch import load_file, save_file

    source = make_tiny_checkpoint(tmp_path / "model", "qwen2", tie_word_embeddings=True)
    expected = hf_greedy(source, PROMPTS, MAX_TOKENS)
    llm = LLM(str(source), skip_tokenizer_init=True, **ENGINE)
    state = tmp_path / "state"
    save = llm.llm_engine.engine_core.save_sharded_state
    save(path=str(state), pattern="w-{rank}-{part}.safetensors", max_size=MAX_FILE_SIZE)
    save(path=str(state), pattern="w-{rank}-{part}.safetensors")  # replaces the first: one part now
    assert sorted(n for n in os.listdir(state) if n.startswith("w-")) == ["w-0-0.safetensors"]
    llm.shutdown()
    os.remove(state / "sharded_state.json")
    tensors = load_file(str(state / "w-0-0.safetensors"))
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")  # vLLM keeps the tied copy's name
    save_file(tensors, str(state / "w-0-0.safetensors"))
    from pagedllm.model_loader.sharded_state import copy_metadata_files

    copy_metadata_files(str(source), str(state))
    with pytest.raises(ValueError, match="holds no .*name their pattern with model_loader_extra_config"):
        LLM(str(state), load_format="sharded_state", skip_tokenizer_init=True, **ENGINE)
    extra = {"pattern": "w-{rank}-{part}.safetensors"}
    loaded = LLM(str(state), load_format="sharded_state", model_loader_extra_config=extra, skip_tokenizer_init=True,
                 **ENGINE)
    outputs = loaded.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    loaded.shutdown()
    with pytest.raises(ValueError, match="unexpected key"):
        LLM(str(state), load_format="sharded_state", model_loader_extra_config={"pattern": "x", "other": 1})

    # Another state's part written beside it by hand: two files fill the same tensor.
    save_file({"lm_head.weight": tensors["lm_head.weight"]}, str(state / "w-0-1.safetensors"))
    with pytest.raises(ValueError, match="mixes two saved states"):
        LLM(str(state), load_format="sharded_state", model_loader_extra_config=extra, skip_tokenizer_init=True,
            **ENGINE)
    # vLLM's rank files without sharded_state.json are named as a sharded state when loaded plainly.
    plain = tmp_path / "plain"
    plain.mkdir()
    copy_metadata_files(str(source), str(plain))
    save_file(tensors, str(plain / "model-rank-0-part-0.safetensors"))
    with pytest.raises(ValueError, match="load_format='sharded_state'"):
        LLM(str(plain), skip_tokenizer_init=True, **ENGINE)
