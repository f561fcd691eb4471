"""Two processes on 127.0.0.1, 4 CPU devices each, one global mesh: the same logits as one process.

Each process joins through `llama_jax.sharding.distributed.initialize` (jax.distributed + gloo collectives),
builds the global fsdp=2 x tensor=4 mesh (fsdp across the two processes), loads the checkpoint
holding only its own half of every weight, and runs one sharded forward.
"""

import json
import pathlib
import sys
import textwrap

import numpy as np

import llama_jax
from tests import checkpoints, processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENS = np.random.RandomState(3).randint(0, 384, size=(4, 16))
TIMEOUT_S = 240

_WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from llama_jax.sharding import distributed, mesh as mesh_lib

    port, process_id, checkpoint, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    topology = distributed.initialize(f"127.0.0.1:{port}", 2, process_id, cpu_devices=4, timeout_s=120)

    import jax
    from flax import nnx
    from jax.experimental import multihost_utils
    import llama_jax

    mesh = mesh_lib.make_mesh("fsdp=2,tensor=4")  # the same call on both processes: one global mesh
    model = llama_jax.load(checkpoint, dtype="float32", mesh=mesh)
    tokens_np = np.asarray(json.loads(sys.argv[5]), np.int32)
    tokens = jax.make_array_from_callback(tokens_np.shape, model.sharding.sharding(("batch", "seq"), tokens_np.shape),
                                          lambda index: tokens_np[index])
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    everything = multihost_utils.process_allgather(logits, tiled=True)
    results = llama_jax.generate(model, tokens_np.tolist(), max_new_tokens=6, stop_tokens=[])
    generated = [list(r.tokens) for r in results]
    wq = model.layers.attention.wq[...]
    report = dict(
        topology=topology.__dict__,
        mesh_processes=sorted({d.process_index for d in mesh.devices.flat}),
        wq_local_fraction=sum(s.data.size for s in wq.addressable_shards) / wq.size,
        generated=generated,
    )
    np.save(out + ".npy", np.asarray(everything))
    open(out + ".json", "w").write(json.dumps(report))
    distributed.shutdown()
    """
)


def test_two_processes_compute_the_single_process_logits_and_tokens(tmp_path):
    checkpoints.hf_checkpoint(
        tmp_path / "ckpt", vocab_size=384, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=160
    )
    single = llama_jax.load(tmp_path / "ckpt", dtype="float32")
    reference = np.asarray(single(TOKENS))
    reference_tokens = [
        list(r.tokens) for r in llama_jax.generate(single, TOKENS.tolist(), max_new_tokens=6, stop_tokens=[])
    ]

    env = processes.clean_env(ROOT)
    port = processes.free_port()
    commands = [
        [
            sys.executable,
            "-c",
            _WORKER,
            str(port),
            str(i),
            str(tmp_path / "ckpt"),
            str(tmp_path / f"out{i}"),
            json.dumps(TOKENS.tolist()),
        ]
        for i in range(2)
    ]
    processes.run_all(commands, [env] * 2, cwd=ROOT, timeout=TIMEOUT_S)

    for i in range(2):
        report = json.loads((tmp_path / f"out{i}.json").read_text())
        assert report["topology"] == {
            "process_id": i,
            "process_count": 2,
            "local_devices": 4,
            "global_devices": 8,
            "source": "arguments",
        }
        assert report["mesh_processes"] == [0, 1]
        assert report["wq_local_fraction"] == 0.5  # each process holds (and read) half of each weight
        logits = np.load(tmp_path / f"out{i}.npy")
        assert report["generated"] == reference_tokens  # greedy generate across both processes
        assert logits.shape == reference.shape
        assert np.abs(logits - reference).max() / np.abs(reference).max() <= 1e-5


def test_cluster_detection_reads_the_launchers_environment():
    from llama_jax.sharding.distributed import detect_cluster

    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "gpu[01-02]",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
    }
    assert detect_cluster(slurm) == "slurm"
    assert detect_cluster(slurm | {"SLURM_NTASKS": "1"}) is None  # a one-task job is one process
    ompi = {"OMPI_MCA_orte_hnp_uri": "1.2.3.4:5", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}
    assert detect_cluster(ompi) == "openmpi"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t1,t2"}) == "tpu"
    assert detect_cluster({"HOME": "/root"}) is None
