"""Start N engine replicas as Ray actors (on a local Ray started for the purpose, or an existing cluster)."""
from __future__ import annotations

from dataclasses import dataclass

from sloserve.config import EngineConfig
from sloserve.engine.cost import StepCostModel
from sloserve.router.replica import EngineReplica, ModelInfo
from sloserve.router.replica_set import ReplicaSet
from sloserve.router.router import Router
from sloserve.router.policies import make_routing_policy

# A local Ray's object store holds only stream items and load reports: keep its shared memory small.
_OBJECT_STORE_BYTES = 128 * 1024**2


@dataclass(slots=True)
class ReplicaSettings:
    num_replicas: int
    router: str = "slo"
    num_threads: int = 1  # torch threads (and Ray CPUs) of each replica
    ray_address: str | None = None  # None: start a local Ray sized for the replicas
    admission: bool = False  # --admission slo: the router refuses what no replica can serve in time
    max_restarts: int = -1  # Ray restarts a dead replica (-1: always)
    startup_timeout_s: float = 600.0  # loading the model (and, on a machine's first use, compiling kernels)


def start_replicas(config: EngineConfig, settings: ReplicaSettings, step_model: StepCostModel | None = None,
                   actor_class: type = EngineReplica) -> ReplicaSet:
    """Blocks until every replica has loaded its model; returns the front the server serves through.

    `actor_class`: EngineReplica or a subclass (benchmarks/ray_path.py's stamps its stages).
    """
    import ray

    if settings.num_replicas < 1 or settings.num_threads < 1:
        raise ValueError("--data-parallel-size and --num-threads must be positive")
    policy = make_routing_policy(settings.router)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        if settings.ray_address:
            ray.init(address=settings.ray_address, log_to_driver=True)
        else:
            ray.init(num_cpus=settings.num_replicas * settings.num_threads, include_dashboard=False,
                     object_store_memory=_OBJECT_STORE_BYTES, log_to_driver=True)
    model = {"knots": list(step_model.knots), "coefficients": step_model.coefficients} if step_model else None
    actor = ray.remote(actor_class).options(num_cpus=settings.num_threads, max_restarts=settings.max_restarts)
    actors = [actor.remote(i, config, model, settings.num_threads) for i in range(settings.num_replicas)]
    try:
        info: ModelInfo = ray.get(actors[0].info.remote(), timeout=settings.startup_timeout_s)
        loads = ray.get([a.load.remote() for a in actors], timeout=settings.startup_timeout_s)
    except Exception:
        for a in actors:
            ray.kill(a, no_restart=True)
        raise
    router = Router(policy, settings.num_replicas, admission=settings.admission)
    for load in loads:
        router.update(load)
    replicas = ReplicaSet(actors, info, router)
    replicas.owns_ray = owns_ray
    return replicas


def stop_replicas(replicas: ReplicaSet) -> None:
    """Kill the actors, and the local Ray if it was started for them."""
    import ray

    for a in replicas.actors:
        ray.kill(a, no_restart=True)
    if replicas.owns_ray:
        ray.shutdown()
