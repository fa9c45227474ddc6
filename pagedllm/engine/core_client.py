"""The front process's end of the engine-core process: starts it, sends it requests and aborts,
and receives each step's outputs (see core_proc.py for the messages)."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import zmq
import zmq.asyncio

from pagedllm.config import EngineConfig
from pagedllm.engine.core_proc import ABORT, ADD, ERROR, READY, SHUTDOWN, run_engine_core
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.executor.base import describe_exit_code

logger = logging.getLogger(__name__)

# How long the engine core gets to leave on its own at shutdown before it is terminated.
_SHUTDOWN_TIMEOUT_S = 10.0


class EngineDeadError(RuntimeError):
    """The engine-core process is gone: every pending and future request fails with this."""


class EngineCoreClient:
    """Owns the engine-core process. `on_death(message)` is called (from a watcher thread) if
    the process dies while the client is still open."""

    def __init__(self, engine_config: EngineConfig, on_death: Callable[[str], None]) -> None:
        self._ipc_dir = tempfile.mkdtemp(prefix="pagedllm-ipc-")
        input_address = f"ipc://{os.path.join(self._ipc_dir, 'input')}"
        output_address = f"ipc://{os.path.join(self._ipc_dir, 'output')}"
        self._context = zmq.Context(io_threads=1)
        self._input_socket = self._context.socket(zmq.PUSH)
        self._input_socket.bind(input_address)
        self._output_socket = self._context.socket(zmq.PULL)
        self._output_socket.bind(output_address)
        self._async_output_socket: zmq.asyncio.Socket | None = None
        self._closed = False
        self._on_death = on_death
        context = multiprocessing.get_context("spawn")
        ready_reader, ready_writer = context.Pipe(duplex=False)
        # Not a daemon: daemonic processes may not start the executor's worker processes.
        self.process = context.Process(
            target=run_engine_core,
            args=(engine_config, input_address, output_address, ready_writer),
            name="pagedllm-engine-core",
        )
        self._finalizer = weakref.finalize(
            self, _stop, self.process, self._input_socket, self._output_socket, self._context, self._ipc_dir
        )
        start = time.perf_counter()
        try:
            self.process.start()
            ready_writer.close()
            self.num_kv_blocks, self.engine_config = self._wait_until_ready(ready_reader)
        except BaseException:
            self._closed = True
            self._finalizer()
            raise
        finally:
            ready_reader.close()
        logger.info("Engine core process (pid %d) ready in %.1f s.", self.process.pid, time.perf_counter() - start)
        threading.Thread(target=self._watch_process, name="pagedllm-engine-core-watch", daemon=True).start()

    def _wait_until_ready(self, ready_reader: multiprocessing.connection.Connection) -> tuple[int, EngineConfig]:
        """The number of KV blocks and the engine core's config (max_model_len settled)."""
        multiprocessing.connection.wait([ready_reader, self.process.sentinel])
        try:
            kind, value, *rest = ready_reader.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5.0)
            hint = ""
            if self.process.exitcode == 1:
                # The usual cause: the spawned process imports the user's script again, and a
                # script without a main guard then starts a second engine from inside it.
                hint = (" If your script creates the engine at the top level, put that code under "
                        "`if __name__ == \"__main__\":`: the engine core is a spawned process, which "
                        "imports the script again.")
            raise EngineDeadError(
                f"The engine core process died during start-up with "
                f"{describe_exit_code(self.process.exitcode)}; see its log above.{hint}"
            ) from None
        if kind == ERROR:
            if rest and rest[0]:  # bad input: the ValueError the engine raises in-process
                raise ValueError(value)
            raise RuntimeError(f"The engine core failed to start: {value}")
        assert kind == READY, kind
        return int(value), rest[0]

    def _watch_process(self) -> None:
        multiprocessing.connection.wait([self.process.sentinel])
        if not self._closed:
            self._on_death(
                f"The engine core process (pid {self.process.pid}) died with "
                f"{describe_exit_code(self.process.exitcode)}."
            )

    @property
    def pid(self) -> int:
        return int(self.process.pid or 0)

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def add_requests(self, requests: list[Request]) -> None:
        self._send((ADD, requests))

    def abort_requests(self, request_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        ids = list(request_ids)
        if ids:
            self._send((ABORT, ids, status))

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._closed:
            raise EngineDeadError("The engine was shut down.")
        self._input_socket.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    async def get_output(self) -> tuple[Any, ...]:
        """The next message from the engine core: ("outputs", outputs, stats) or ("error", text)."""
        if self._async_output_socket is None:
            self._async_output_socket = zmq.asyncio.Socket.from_socket(self._output_socket)
        return pickle.loads(await self._async_output_socket.recv())

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer()


def _stop(
    process: multiprocessing.process.BaseProcess,
    input_socket: zmq.Socket,
    output_socket: zmq.Socket,
    context: zmq.Context,
    ipc_dir: str,
) -> None:
    """Ask the engine core to leave, then terminate and finally kill it; it is always joined.
    Safe to call more than once."""
    if process.is_alive():
        try:
            input_socket.send(pickle.dumps((SHUTDOWN,)), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        process.join(timeout=_SHUTDOWN_TIMEOUT_S)
    for stop in ("terminate", "kill"):
        if process.pid is not None and process.is_alive():
            getattr(process, stop)()
            process.join(timeout=5.0)
    input_socket.close(linger=0)
    output_socket.close(linger=0)
    context.term()
    shutil.rmtree(ipc_dir, ignore_errors=True)
