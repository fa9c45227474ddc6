"""`pagedllm generate|chat|plan`: the same text as LLM.generate / LLM.chat, one-line errors with
status 2 before anything loads, and `--debug` tracebacks."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_tiny_chat_checkpoint

from pagedllm import LLM, SamplingParams
from pagedllm.entrypoints.cli import main

ENGINE_FLAGS = ["--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 22)]
SAMPLING_FLAGS = ["--max-tokens", "6", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]
PARAMS = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=3)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_bpe_tokenizer_dir) -> Path:
    return make_tiny_chat_checkpoint(tmp_path_factory.mktemp("cli_model") / "model", tiny_bpe_tokenizer_dir)


@pytest.fixture(scope="module")
def llm(chat_model) -> LLM:
    return LLM(str(chat_model), dtype="float32", kv_cache_memory_bytes=1 << 22)


def test_generate_prints_what_llm_generate_returns_without_a_chat_template(chat_model, llm, capsys):
    prompts = ["hello world", "the paged attention"]
    argv = ["generate", "--model", str(chat_model), *ENGINE_FLAGS, *SAMPLING_FLAGS]
    assert main([*argv, "--prompt", prompts[0]]) == 0
    expected = llm.generate(prompts[0], PARAMS, use_tqdm=False)[0].outputs[0].text
    assert expected and capsys.readouterr().out == expected + "\n"
    assert main([*argv, "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
    printed = capsys.readouterr().out
    for output in llm.generate(prompts, PARAMS, use_tqdm=False):
        assert output.outputs[0].text + "\n" in printed


def test_chat_applies_the_template_and_keeps_the_conversation_from_stdin(chat_model, llm, capsys, monkeypatch):
    argv = ["chat", "--model", str(chat_model), *ENGINE_FLAGS, *SAMPLING_FLAGS]
    assert main([*argv, "--prompt", "hello"]) == 0
    first = llm.chat([{"role": "user", "content": "hello"}], PARAMS, use_tqdm=False)[0].outputs[0].text
    assert capsys.readouterr().out == first + "\n"
    assert first != llm.generate("hello", PARAMS, use_tqdm=False)[0].outputs[0].text

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nworld\n"))
    assert main(argv) == 0
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "world"}]
    second = llm.chat(conversation, PARAMS, use_tqdm=False)[0].outputs[0].text
    assert capsys.readouterr().out == f"{first}\n{second}\n"


def _fails_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pagedllm: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_bad_options_print_one_line_and_exit_with_status_2(chat_model, tmp_path, capsys, monkeypatch):
    # Sampling options are checked before the model: a missing model is not even looked at.
    line = _fails_with_one_line(["generate", "--model", str(tmp_path / "absent"), "--prompt", "x",
                                 "--temperature", "-1"], capsys)
    assert "temperature" in line and "-1" in line
    line = _fails_with_one_line(["chat", "--model", str(tmp_path / "absent"), "--prompt", "x"], capsys)
    assert "absent" in line
    line = _fails_with_one_line(["generate", "--model", str(chat_model), "--prompt", "x",
                                 "--max-model-len", "100000"], capsys)
    assert "max_model_len=100000" in line and "512" in line
    line = _fails_with_one_line(["generate", "--model", str(chat_model), "--no-such-flag"], capsys)
    assert "--no-such-flag" in line
    line = _fails_with_one_line(["generate", "--temperature", "warm"], capsys)
    assert "warm" in line
    with pytest.raises(ValueError, match="temperature"):
        main(["generate", "--debug", "--model", str(chat_model), "--prompt", "x", "--temperature", "-1"])


def test_the_installed_command_exits_with_status_2_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "generate", "--model", str(tmp_path),
         "--prompt", "x", "--top-p", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pagedllm: error: SamplingParams.top_p must be in (0, 1], got 2.0."
    ]


def test_plan_prints_the_memory_plan_without_loading_the_model(chat_model, capsys):
    assert main(["plan", "--model", str(chat_model), "--gpu-memory", "1GiB", "--max-num-seqs", "4"]) == 0
    printed = capsys.readouterr().out
    for label in ("weights", "activation peak", "CUDA graphs", "KV cache per token", "max concurrency"):
        assert label in printed
    assert main(["plan", "--model", str(chat_model), "--device", "cpu", "--json", "--max-num-seqs", "2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # 2 requests of the model's 512 tokens (32 blocks each) plus 10% headroom.
    assert plan["num_kv_blocks"] == 64 + 7 and plan["kv_cache_tokens"] == 71 * 16
    assert plan["weights_bytes"] == sum(plan["weights_bytes_by_dtype"].values()) > 0
    assert plan["fits"] is True


def test_engine_flags_come_from_engine_args_including_max_model_len_auto():
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.entrypoints.cli import build_parser

    parser, runners = build_parser()
    assert {"generate", "chat", "plan", "save-sharded"} <= set(runners)
    for value, expected in (("auto", "auto"), ("-1", -1), ("4096", 4096)):
        args = parser.parse_args(["generate", "--max-model-len", value, "--kv-cache-headroom", "0.2"])
        engine_args = EngineArgs.from_cli_args(args)
        assert engine_args.max_model_len == expected and engine_args.kv_cache_headroom == 0.2
    import subprocess
    import sys

    help_text = subprocess.run([sys.executable, "-m", "pagedllm", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "save-sharded" in help_text  # `python -m pagedllm` is the command
    # vLLM's parser takes underscores in option names too.
    from pagedllm.entrypoints.cli_argv import dashed_options

    dashed = dashed_options(["generate", "--max_model_len", "64", "--kv_cache_dtype=fp8", "--prompt", "a_b"])
    assert dashed == ["generate", "--max-model-len", "64", "--kv-cache-dtype=fp8", "--prompt", "a_b"]
    # vLLM's short flags.
    engine_args = EngineArgs.from_cli_args(parser.parse_args(["generate", "-tp", "2", "-q", "fp8", "-O", "0"]))
    assert (engine_args.tensor_parallel_size, engine_args.quantization, engine_args.compilation_config) == (2, "fp8", 0)


def test_generate_and_chat_use_the_models_generation_config_as_llm_generate_does(chat_model, tmp_path, capsys):
    import shutil

    model = tmp_path / "with_defaults"
    shutil.copytree(chat_model, model)
    (model / "generation_config.json").write_text(json.dumps({"top_k": 1, "temperature": 0.7, "max_new_tokens": 3}))
    llm = LLM(str(model), dtype="float32", kv_cache_memory_bytes=1 << 22)
    expected = llm.generate("hello world", use_tqdm=False)[0].outputs[0]
    assert len(expected.token_ids) == 3
    assert main(["generate", "--model", str(model), *ENGINE_FLAGS, "--prompt", "hello world"]) == 0
    assert capsys.readouterr().out == expected.text + "\n"
    # A flag given still wins over the file.
    assert main(["generate", "--model", str(model), *ENGINE_FLAGS, "--prompt", "hello world", "--max-tokens", "5"]) == 0
    longer = llm.generate("hello world", SamplingParams(top_k=1, temperature=0.7, max_tokens=5), use_tqdm=False)
    assert capsys.readouterr().out == longer[0].outputs[0].text + "\n"
    llm.shutdown()


def test_an_error_after_the_model_is_found_is_still_one_line_in_a_real_process(chat_model):
    result = subprocess.run(
        [sys.executable, "-m", "pagedllm", "generate", "--model", str(chat_model), "--prompt", "x",
         "--max-model-len", "100000"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pagedllm: error: max_model_len=100000"), result.stderr


def test_vllm_command_lines_port(chat_model, llm, tmp_path, capsys):
    """--version, --config FILE.yaml (the command line wins over the file), vLLM's flags of
    features pagedllm lacks at their 'off' values, human-readable sizes, chat --chat-template."""
    from pagedllm import __version__
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.entrypoints.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == __version__

    config = tmp_path / "config.yaml"
    config.write_text("dtype: float32\nkv-cache-memory-bytes: 4M\nmax_tokens: 6\ntemperature: 0.8\ntop-p: 0.9\n"
                      "seed: 7\nenable-prefix-caching: false\nignore-eos: false\n")
    assert main(["generate", "--config", str(config), "--model", str(chat_model), "--seed", "3", "--prompt", "hello"]) == 0
    assert capsys.readouterr().out == llm.generate("hello", PARAMS, use_tqdm=False)[0].outputs[0].text + "\n"

    assert main(["generate", "--model", str(chat_model), *ENGINE_FLAGS, *SAMPLING_FLAGS, "--prompt", "hello",
                 "-pp", "1", "--data-parallel-size", "1", "--task", "generate", "--scheduling-policy", "fcfs"]) == 0
    capsys.readouterr()
    line = _fails_with_one_line(["generate", "--model", str(chat_model), "--prompt", "x", "-pp", "2"], capsys)
    assert "pipeline_parallel_size=2 is not supported" in line

    parser, _ = build_parser()
    args = parser.parse_args(["generate", "--kv-cache-memory-bytes", "4M", "--max-num-batched-tokens", "2k"])
    assert (args.kv_cache_memory_bytes, args.max_num_batched_tokens) == (4 << 20, 2000)
    import argparse

    assert isinstance(EngineArgs.add_cli_args(argparse.ArgumentParser()), argparse.ArgumentParser)

    line = _fails_with_one_line(["chat", "--model", str(chat_model), "--prompt", "x", "--n", "2"], capsys)
    assert "--n 1" in line
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    assert main(["chat", "--model", str(chat_model), *ENGINE_FLAGS, *SAMPLING_FLAGS, "--prompt", "hello",
                 "--chat-template", template]) == 0
    expected = llm.chat([{"role": "user", "content": "hello"}], PARAMS, use_tqdm=False, chat_template=template)
    assert capsys.readouterr().out == expected[0].outputs[0].text + "\n"
