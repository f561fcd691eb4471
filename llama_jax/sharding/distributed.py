"""Multi-host start-up: one call on every process before anything touches a device.

    from llama_jax.sharding import distributed, mesh
    distributed.initialize()                       # no-op on one machine
    m = mesh.make_mesh("kv_rep=2,tensor=8")        # the same global mesh on every process
    model = llama_jax.load(path, mesh=m)           # each process reads only its devices' slices

Where the coordinates come from, first match wins:

1. arguments to `initialize`;
2. environment: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES,
   JAX_PROCESS_ID, and optionally JAX_LOCAL_DEVICE_IDS ("0,1,2,3"), which jax also reads;
3. jax's own cluster detection (`jax.distributed.initialize()` without arguments): SLURM
   (srun), Open MPI (mpirun), Cloud TPU VMs and GKE TPU pods, Kubernetes jobs;
4. none of these: a single process, nothing to do.

On CPU (tests, the planner's virtual devices) `cpu_devices=N` gives each process N devices and
cross-process collectives go through gloo. Launch recipes for H100 nodes and TPU pods are in
docs/SHARDING.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax

_CLUSTER_MARKERS = (
    ("slurm", ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")),
    ("openmpi", ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")),
    ("tpu", ("TPU_WORKER_HOSTNAMES",)),
    ("tpu", ("TPU_PROCESS_ADDRESSES",)),
)


@dataclasses.dataclass(frozen=True)
class Topology:
    """What this process sees after `initialize`."""

    process_id: int
    process_count: int
    local_devices: int
    global_devices: int
    source: str  # "arguments", "environment", "slurm", "openmpi", "tpu", "auto", "single"


def detect_cluster(environ: dict[str, str] | None = None) -> str | None:
    """The cluster manager whose environment this process runs in, if any jax can read."""
    environ = os.environ if environ is None else environ
    if environ.get("SLURM_NTASKS") == "1":
        return None  # a one-task SLURM job is a single process
    for name, keys in _CLUSTER_MARKERS:
        if all(k in environ for k in keys):
            return name
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    cpu_devices: int | None = None,
    timeout_s: int = 300,
) -> Topology:
    """Join the multi-process job this process belongs to (or do nothing when there is none).

    Must run before any jax computation or device query. `cpu_devices`: CPU-only runs give each
    process that many devices (and use gloo for cross-process collectives).
    """
    if cpu_devices is not None:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    env = os.environ
    if coordinator_address or num_processes is not None or process_id is not None:
        source = "arguments"
    elif "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
        source = "environment"
        coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
        num_processes = int(env["JAX_NUM_PROCESSES"])
        process_id = int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None
    else:
        source = detect_cluster() or "single"
    if source == "single":
        return _topology(source)
    if source in ("arguments", "environment") and (
        coordinator_address is None or num_processes is None or process_id is None
    ):
        raise ValueError(
            f"multi-process start-up from {source}: need the coordinator address (host:port of process 0), "
            f"the number of processes and this process's id; got {coordinator_address!r}, {num_processes!r}, "
            f"{process_id!r} (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=list(local_device_ids) if local_device_ids is not None else None,
        initialization_timeout=timeout_s,
    )
    return _topology(source)


def shutdown() -> None:
    """Leave the job cleanly (all processes should call it; harmless when not initialised)."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def _topology(source: str) -> Topology:
    return Topology(
        process_id=jax.process_index(),
        process_count=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
        source=source,
    )
