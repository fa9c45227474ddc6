"""The engine-core process: `EngineCore`'s step loop in its own process, fed over ZeroMQ.

The front process (`AsyncLLM`) tokenizes, detokenizes and serves HTTP; this process only
schedules and runs steps, so neither holds the other's GIL. Messages are pickled tuples of
plain dataclasses over local IPC sockets that only the two processes know (never network
input):

    front -> core   ("add", [Request, ...]) | ("abort", [request_id, ...], RequestStatus)
                    | ("shutdown",)
    core -> front   ("outputs", [EngineCoreOutput, ...], SchedulerStats) | ("error", text)

Start-up ends with ("ready", num_kv_blocks, engine_config) or ("error", text) on a pipe; the
config sent back has max_model_len="auto" settled. The process leaves
when the front process dies (it watches its parent), so it is never orphaned.
"""

from __future__ import annotations

import logging
import pickle
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any

import zmq

from pagedllm.config import EngineConfig
from pagedllm.engine.request import RequestStatus
from pagedllm.executor.base import exit_with_parent

logger = logging.getLogger(__name__)

ADD, ABORT, SHUTDOWN, OUTPUTS, ERROR, READY = "add", "abort", "shutdown", "outputs", "error", "ready"


def run_engine_core(
    engine_config: EngineConfig, input_address: str, output_address: str, ready_conn: Connection
) -> None:
    """The body of the engine-core process."""
    # Ctrl-C reaches the whole process group; the front process decides and tells us to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_system_exit)
    exit_with_parent()
    from pagedllm.engine.core import EngineCore
    from pagedllm.engine.frontend import ModelFrontend

    try:
        # The grammar matchers live next to the scheduler: this process loads the tokenizer
        # too, exactly as LLMEngine does in-process.
        manager = ModelFrontend.load(engine_config.model_config).structured_output_manager()
        engine_core = EngineCore(engine_config, manager)
    except BaseException as error:  # noqa: BLE001 - every start-up failure goes to the front
        # Bad input (a ValueError naming the option) is raised again as itself in the front
        # process; the traceback goes to this process's log for anything else.
        bad_input = isinstance(error, (ValueError, TypeError))
        if not bad_input:
            logger.error("The engine core failed to start:\n%s", traceback.format_exc())
        ready_conn.send((ERROR, str(error) if bad_input else f"{type(error).__name__}: {error}", bad_input))
        ready_conn.close()
        raise SystemExit(1) from None
    context = zmq.Context(io_threads=1)
    input_socket = context.socket(zmq.PULL)
    input_socket.connect(input_address)
    output_socket = context.socket(zmq.PUSH)
    output_socket.setsockopt(zmq.LINGER, 2000)
    output_socket.connect(output_address)
    ready_conn.send((READY, engine_core.num_kv_blocks, engine_core.config))
    ready_conn.close()
    try:
        _EngineCoreLoop(engine_core, input_socket, output_socket).run()
    except Exception as error:  # noqa: BLE001 - the front must learn why every request failed
        logger.exception("The engine core failed.")
        output_socket.send(pickle.dumps((ERROR, f"{type(error).__name__}: {error}")))
        raise SystemExit(1) from None
    finally:
        engine_core.shutdown()
        input_socket.close(linger=0)
        output_socket.close()
        context.term()


class _EngineCoreLoop:
    def __init__(self, engine_core: Any, input_socket: zmq.Socket, output_socket: zmq.Socket) -> None:
        self.engine_core = engine_core
        self.input_socket = input_socket
        self.output_socket = output_socket
        self._last_stats: object = None

    def run(self) -> None:
        core = self.engine_core
        while True:
            # Idle: sleep until a message comes. Busy: take what came, then step.
            if not core.has_unfinished_requests():
                self.input_socket.poll(timeout=None)
            while self.input_socket.poll(timeout=0):
                if not self._handle(pickle.loads(self.input_socket.recv())):
                    return
            outputs = core.step() if core.has_unfinished_requests() else []
            stats = core.make_stats()
            if outputs or stats != self._last_stats:
                self.output_socket.send(pickle.dumps((OUTPUTS, outputs, stats), protocol=pickle.HIGHEST_PROTOCOL))
                self._last_stats = stats

    def _handle(self, message: tuple[Any, ...]) -> bool:
        kind = message[0]
        if kind == ADD:
            for request in message[1]:
                self.engine_core.add_request(request)
        elif kind == ABORT:
            status = message[2] if len(message) > 2 else RequestStatus.FINISHED_ABORTED
            self.engine_core.finish_requests(message[1], status)
        elif kind == SHUTDOWN:
            return False
        else:
            raise ValueError(f"Unknown engine-core message {kind!r}.")
        return True


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
