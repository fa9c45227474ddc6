"""One Ray actor per tensor-parallel rank, placed by a placement group, so ranks may sit on
several machines (`ray start` on each, then `LLM(..., distributed_executor_backend="ray")`).

Ray is imported only when this executor is built: the package works without it. The actors
run `RayWorkerWrapper`, a thin host for a `Worker`; the ranks meet over TCP at rank 0's node.
Ranks are numbered node by node (the driver's node first), so a node's ranks are contiguous;
on GPUs each actor then sees every GPU Ray gave the actors of its node, in the same order, and
uses the one at its local rank, so NCCL can find peer-to-peer paths between them.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass
from collections.abc import Collection
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.base import Executor, RankEvent, get_open_port

logger = logging.getLogger(__name__)

# How long start-up waits for the cluster to offer one bundle per rank.
_PLACEMENT_TIMEOUT_S = 120.0


class RayWorkerWrapper:
    """The body of each Ray actor: hosts one Worker and runs its methods by name."""

    def __init__(self) -> None:
        self.worker: Any = None

    def node_info(self) -> tuple[str, str, list[str], int]:
        """(node id, node IP, GPU ids Ray assigned, pid)."""
        import ray

        gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), gpu_ids, os.getpid()

    def free_port(self) -> int:
        return get_open_port("0.0.0.0")

    def init_worker(
        self, engine_config: EngineConfig, rank: int, local_rank: int, init_method: str, env: dict[str, str]
    ) -> None:
        # Before torch touches CUDA, which reads CUDA_VISIBLE_DEVICES once.
        os.environ.update(env)
        from pagedllm.worker.worker import Worker

        self.worker = Worker(engine_config, rank, local_rank, distributed_init_method=init_method)

    def execute_method(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], reply: bool = True) -> Any:
        result = getattr(self.worker, method)(*args, **kwargs)
        return result if reply else None

    def execute_model(self, scheduler_output: SchedulerOutput, reply: bool) -> ModelRunnerOutput | None:
        # Its own method so the step's message can be an ObjectRef passed at the top level,
        # which Ray resolves (refs nested in a tuple are not).
        output = self.worker.execute_model(scheduler_output)
        return output if reply else None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None


@dataclass
class _Actor:
    rank: int
    handle: Any
    node_id: str
    pid: int


class RayExecutor(Executor):
    def __init__(self, engine_config: EngineConfig) -> None:
        super().__init__(engine_config)
        import ray
        from ray.util.placement_group import placement_group

        world_size = engine_config.parallel_config.tensor_parallel_size
        use_gpu = engine_config.device_config.device.type == "cuda"
        if not ray.is_initialized():
            # Joins the cluster RAY_ADDRESS or `ray start` names, else starts a local one.
            ray.init()
        start = time.perf_counter()
        bundle = {"GPU": 1.0} if use_gpu else {"CPU": 1.0}
        self._placement_group = placement_group([bundle] * world_size, strategy="PACK")
        self._actors: list[_Actor] = []
        self._finalizer = weakref.finalize(self, _stop_actors, self._actors, self._placement_group)
        try:
            ray.get(self._placement_group.ready(), timeout=_PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self._finalizer()
            raise ValueError(
                f"Ray could not place tensor_parallel_size={world_size} ranks ({bundle} each) "
                f"within {_PLACEMENT_TIMEOUT_S:.0f} s; the cluster offers {ray.available_resources()}. "
                "Add nodes, or lower tensor_parallel_size."
            ) from None
        try:
            init_method = self._start_actors(engine_config, world_size, use_gpu)
        except BaseException:
            self._finalizer()
            raise
        logger.info(
            "Started %d Ray actors (pids %s) in %.1f s; ranks meet at %s.",
            world_size, ", ".join(str(a.pid) for a in self._actors), time.perf_counter() - start, init_method,
        )

    def _start_actors(self, engine_config: EngineConfig, world_size: int, use_gpu: bool) -> str:
        """Create one actor per bundle, number them, and start their workers; returns the
        ranks' meeting point."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_class = ray.remote(RayWorkerWrapper)
        for index in range(world_size):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self._placement_group, placement_group_bundle_index=index
            )
            handle = actor_class.options(
                num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0, scheduling_strategy=strategy
            ).remote()
            # Listed at once, so a failure below still stops every actor made so far.
            self._actors.append(_Actor(index, handle, "", 0))
        infos = ray.get([actor.handle.node_info.remote() for actor in self._actors])
        driver_node = ray.get_runtime_context().get_node_id()
        order = sorted(
            range(world_size),
            key=lambda i: (infos[i][0] != driver_node, infos[i][0], [int(g) for g in infos[i][2] if g.isdigit()]),
        )
        handles = [actor.handle for actor in self._actors]
        self._actors[:] = [
            _Actor(rank, handles[index], infos[index][0], infos[index][3]) for rank, index in enumerate(order)
        ]
        envs, local_ranks = _placement_env([infos[i] for i in order], use_gpu)
        port = ray.get(self._actors[0].handle.free_port.remote())
        init_method = f"tcp://{infos[order[0]][1]}:{port}"
        config_ref = ray.put(engine_config)
        self._get(
            [
                actor.handle.init_worker.remote(config_ref, actor.rank, local_ranks[actor.rank], init_method, envs[actor.rank])
                for actor in self._actors
            ],
            "init_worker",
        )
        return init_method

    @property
    def worker_pids(self) -> list[int]:
        return [actor.pid for actor in self._actors]

    def collective_rpc(self, method: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        self._check_usable()
        refs = [actor.handle.execute_method.remote(method, args, kwargs or {}) for actor in self._actors]
        return self._get(refs, method)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self._check_usable()
        import ray

        # Put once, so Ray serialises the step's message once for all ranks.
        message = ray.put(scheduler_output)
        refs = [actor.handle.execute_model.remote(message, actor.rank == 0) for actor in self._actors]
        return self._get(refs, "execute_model")[0]

    def shutdown(self) -> None:
        self._finalizer()

    def _get(self, refs: list[Any], method: str) -> list[Any]:
        """Results in rank order, under the executors' shared failure policy."""
        import ray

        rank_of = {ref: rank for rank, ref in enumerate(refs)}

        def wait(pending: Collection[int], timeout: float | None) -> list[RankEvent]:
            ready, _ = ray.wait([refs[rank] for rank in pending], num_returns=1, timeout=timeout)
            events = []
            for ref in ready:
                rank = rank_of[ref]
                try:
                    events.append(RankEvent(rank, "ok", ray.get(ref)))
                except ray.exceptions.RayActorError as error:
                    pid = self._actors[rank].pid if rank < len(self._actors) else "?"
                    events.append(RankEvent(rank, "died", f"(Ray actor, pid {pid}) died", f" Ray says: {error}"))
                except ray.exceptions.RayTaskError as error:
                    cause = error.cause if isinstance(getattr(error, "cause", None), BaseException) else None
                    if cause is None:
                        cause = RuntimeError(f"Worker rank {rank} failed in {method}: {error}")
                    events.append(RankEvent(rank, "error", cause, str(error)))
            return events

        return self._wait_with_grace(len(refs), method, wait)

    def _is_shut_down(self) -> bool:
        return not self._finalizer.alive

    def _stop_workers_now(self) -> None:
        self._finalizer()


def _placement_env(infos: list[tuple[str, str, list[str], int]], use_gpu: bool) -> tuple[list[dict[str, str]], list[int]]:
    """Per rank (in rank order): environment to set before the worker starts, and local rank."""
    by_node: dict[str, list[str]] = defaultdict(list)
    for node_id, _, gpu_ids, _ in infos:
        by_node[node_id].extend(gpu_ids)
    envs, local_ranks = [], []
    seen: dict[str, int] = defaultdict(int)
    for node_id, _, gpu_ids, _ in infos:
        if use_gpu and gpu_ids:
            visible = sorted(set(by_node[node_id]), key=lambda g: (not g.isdigit(), int(g) if g.isdigit() else 0, g))
            envs.append({"CUDA_VISIBLE_DEVICES": ",".join(visible)})
            local_ranks.append(visible.index(gpu_ids[0]))
        else:
            envs.append({})
            local_ranks.append(seen[node_id])
        seen[node_id] += 1
    return envs, local_ranks


def _stop_actors(actors: list[_Actor], placement_group: Any) -> None:
    """Let each worker leave its process group, then kill the actors and free their bundles.
    Safe at interpreter exit, when Ray may already be down."""
    try:
        import ray
        from ray.util.placement_group import remove_placement_group

        if not ray.is_initialized():
            return
        if actors:
            try:
                ray.wait([actor.handle.shutdown.remote() for actor in actors], num_returns=len(actors), timeout=5.0)
            except Exception:
                pass
        for actor in actors:
            ray.kill(actor.handle)
        actors.clear()
        remove_placement_group(placement_group)
    except Exception as error:  # shutdown must never raise (it runs in finalizers)
        logger.debug("Stopping the Ray actors: %s", error)
