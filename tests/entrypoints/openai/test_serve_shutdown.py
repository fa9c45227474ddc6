"""Ctrl-C (SIGINT) with a stream in flight: the server ends the stream, exits with status 0,
and leaves no process behind (the engine core and everything it started are gone)."""

from __future__ import annotations

import signal
import threading

import httpx
import pytest
from conftest import ServerProcess, children_of, engine_core_pid, wait_gone

for _package in ("fastapi", "uvicorn", "zmq", "prometheus_client"):
    pytest.importorskip(_package)


@pytest.mark.slow
def test_sigint_with_an_open_stream_exits_cleanly(serve_model_dir, tmp_path):
    server = ServerProcess(serve_model_dir, ["--no-enable-prefix-caching"], tmp_path / "server.log")
    try:
        server.wait_until_healthy()
        core = engine_core_pid(server.process.pid)
        children = children_of(server.process.pid)
        started = threading.Event()
        lines: list[str] = []

        def stream() -> None:
            body = {"prompt": "hello world", "max_tokens": 230, "stream": True, "ignore_eos": True}
            try:
                with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
                    for line in response.iter_lines():
                        lines.append(line)
                        started.set()
            except httpx.HTTPError:
                pass
            started.set()

        client = threading.Thread(target=stream)
        client.start()
        assert started.wait(60)
        assert server.stop(signal.SIGINT) == 0, server.log()
        client.join(30)
        assert not client.is_alive()
        assert core in children and wait_gone(children) == [], server.log()
        log = server.log()
        assert "Traceback" not in log, log
    finally:
        server.stop(signal.SIGKILL)
