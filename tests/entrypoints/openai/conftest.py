"""A real `pagedllm serve` subprocess on a tiny checkpoint with the tiny BPE tokenizer.

Exports fixtures `serve_model_dir` (module: the checkpoint folder), `chat_template_file`,
`server` (module: one `pagedllm serve` with the chat template and API_KEY) and `client` (an
openai client on it), and the helpers `serve` (the body of a module's server fixture, with
extra flags), `ServerProcess` (start, wait until healthy, stop) and `children_of(pid)`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from tiny_models import CHAT_TEMPLATE, make_tiny_checkpoint

from pagedllm.executor.base import get_open_port

API_KEY = "test-key"
MODEL_NAME = "tiny"
# The engine options of the server, and of the LLM it is compared with.
ENGINE_OPTIONS = dict(dtype="float32", device="cpu", max_model_len=256, kv_cache_memory_bytes=1 << 22, max_num_seqs=64)
REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def serve_model_dir(tmp_path_factory, tiny_bpe_tokenizer_dir) -> Path:
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("serve") / "model", "qwen3", vocab_size=512,
        tokenizer_dir=tiny_bpe_tokenizer_dir, seed=5,
    )


@pytest.fixture(scope="module")
def chat_template_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.jinja"
    path.write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(serve_model_dir, chat_template_file, tmp_path_factory):
    yield from serve(serve_model_dir, chat_template_file, tmp_path_factory.mktemp("server_log") / "server.log")


def serve(model_dir: Path, chat_template_file: Path, log: Path, extra_args: Sequence[str] = ()) -> Iterator[ServerProcess]:
    """A healthy server on the tiny model (MODEL_NAME, the chat template, API_KEY, and
    `extra_args`), stopped when the generator closes: `yield from` it in a fixture."""
    process = ServerProcess(
        model_dir,
        ["--served-model-name", MODEL_NAME, "--chat-template", str(chat_template_file), "--api-key", API_KEY,
         *extra_args],
        log,
    )
    try:
        process.wait_until_healthy()
        yield process
    finally:
        process.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


class ServerProcess:
    def __init__(self, model_dir: Path, extra_args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 engine_options: dict[str, object] | None = None) -> None:
        self.port = get_open_port()
        self.url = f"http://127.0.0.1:{self.port}"
        options = [f"--{k.replace('_', '-')}={v}" for k, v in (engine_options or ENGINE_OPTIONS).items()]
        command = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", str(model_dir), "--host", "127.0.0.1",
                   "--port", str(self.port), "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log",
                   *options, *extra_args]
        self.log_path = log_path
        self._log = open(log_path, "w")
        # The repository first, then what the caller's path holds (packages installed beside it).
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        environment = {**os.environ, "PYTHONPATH": python_path, **(env or {})}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=environment, cwd=REPO_ROOT)

    def wait_until_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"The server did not become healthy in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def children_of(pid: int) -> list[int]:
    """Live (non-zombie) child processes of pid, from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry))
    return children


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if is_alive(pid)]
        if not alive:
            return []
        time.sleep(0.1)
    return [pid for pid in pids if is_alive(pid)]


def engine_core_pid(server_pid: int) -> int:
    """The spawned engine-core child of the server (not multiprocessing's resource tracker)."""
    for pid in children_of(server_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            text = cmdline.read().replace(b"\0", b" ").decode()
        if "spawn_main" in text:
            return pid
    raise LookupError(f"no engine-core child of {server_pid}")
