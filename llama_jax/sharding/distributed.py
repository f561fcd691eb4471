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

A process that dies leaves the others blocked in their next collective, which never returns.
`peer_timeout_s` bounds that: every process beats through the coordination service's key-value
store, and a process that sees a peer's beat stand still for that long prints which process it lost
and exits with `PEER_LOST_EXIT` (a restart of every process resumes a resumable job). jax's own
heartbeat timeout, twice as long, is the backstop (it aborts the process with jax's message). A
process that finishes calls `shutdown`, which tells the others it left rather than died.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import time
from collections.abc import Sequence

import jax

PEER_LOST_EXIT = 75  # EX_TEMPFAIL: the job failed for now; restarting every process resumes it
_BEATS = "sharding/peer_watch"  # key-value directory: beat/<process>, left/<process>

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
    peer_timeout_s: float | None = None,
) -> Topology:
    """Join the multi-process job this process belongs to (or do nothing when there is none).

    Must run before any jax computation or device query. `cpu_devices`: CPU-only runs give each
    process that many devices (and use gloo for cross-process collectives). `timeout_s`: how long to
    wait for every process to join. `peer_timeout_s`: exit with `PEER_LOST_EXIT`, naming the process,
    once a peer has been silent that long (None: jax's own heartbeat, 100 s, which aborts).
    """
    if peer_timeout_s is not None and not peer_timeout_s > 0:
        raise ValueError(f"peer_timeout_s: expected a number of seconds > 0, got {peer_timeout_s!r}")
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
        **({} if peer_timeout_s is None else {"heartbeat_timeout_seconds": math.ceil(2 * peer_timeout_s)}),
    )
    topology = _topology(source)
    if peer_timeout_s is not None and topology.process_count > 1:
        global _watch
        _watch = _PeerWatch(topology.process_id, topology.process_count, peer_timeout_s)
        _watch.start()
    return topology


def shutdown() -> None:
    """Leave the job cleanly (all processes should call it; harmless when not initialised)."""
    global _watch
    if _watch is not None:
        _watch.leave()
        _watch = None
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def abandon() -> None:
    """This process failed: stop its beats without leaving, so its peers exit within their peer timeout
    (naming it) rather than wait in a collective it will never join."""
    global _watch
    if _watch is not None:
        _watch.stop()
        _watch = None


class _PeerWatch(threading.Thread):
    """Beats for this process and watches the others' beats; a peer silent for `timeout_s` ends this process."""

    def __init__(self, process_id: int, process_count: int, timeout_s: float) -> None:
        super().__init__(name="peer-watch", daemon=True)
        from jax._src import distributed as jax_distributed  # the coordination service's client

        self.client = jax_distributed.global_state.client
        self.process_id, self.timeout_s = process_id, timeout_s
        self.peers = [p for p in range(process_count) if p != process_id]
        self.stopped = threading.Event()

    def run(self) -> None:
        last: dict[int, str | None] = dict.fromkeys(self.peers)
        heard = dict.fromkeys(self.peers, time.monotonic())
        beat = 0
        while not self.stopped.wait(min(1.0, self.timeout_s / 5)):
            beat += 1
            try:
                self.client.key_value_set(f"{_BEATS}/beat/{self.process_id}", str(beat), allow_overwrite=True)
                entries = dict(self.client.key_value_dir_get(f"{_BEATS}/"))
            except Exception as e:  # noqa: BLE001 - whatever the RPC raises, the coordinator is gone
                if not self.stopped.is_set():
                    self._lost([0], f"the coordinator stopped answering ({e})")
                return
            now = time.monotonic()
            for p in self.peers:
                if entries.get(f"{_BEATS}/beat/{p}") != last[p]:
                    last[p], heard[p] = entries.get(f"{_BEATS}/beat/{p}"), now
            lost = [p for p in self.peers if f"{_BEATS}/left/{p}" not in entries and now - heard[p] > self.timeout_s]
            if lost:
                self._lost(lost, f"no heartbeat for {self.timeout_s:g} s: killed, crashed or cut off")

    def _lost(self, processes: list[int], why: str) -> None:
        names = ", ".join(map(str, processes))
        print(
            f"error: process {self.process_id} lost process {names} of this {len(self.peers) + 1}-process job ({why}); "
            f"it stops too (exit {PEER_LOST_EXIT}). Restart every process to resume the job.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(PEER_LOST_EXIT)  # the main thread may be blocked in a collective that never returns

    def leave(self) -> None:
        """Stop beating and tell the peers this process finished (so its silence is not a death)."""
        self.client.key_value_set(f"{_BEATS}/left/{self.process_id}", "1", allow_overwrite=True)
        self.stop()

    def stop(self) -> None:
        self.stopped.set()
        self.join()


_watch: _PeerWatch | None = None


def _topology(source: str) -> Topology:
    return Topology(
        process_id=jax.process_index(),
        process_count=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
        source=source,
    )
