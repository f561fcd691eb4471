"""Host memory while loading a Meta MP8 checkpoint onto 8 devices: per-device slice reads vs whole tensors.

`python benchmarks/meta_load_memory.py [--out benchmarks/results/meta_load_memory_cpu.json]`

Writes a random Meta checkpoint split over 8 ranks (`consolidated.00.pth` ... `07`), then loads it in
a fresh child process per mode onto a `tensor=8` mesh of 8 fake CPU devices, with tracemalloc on
(numpy reports its buffers to it; the devices' own buffers are XLA's and are not counted):
- "slices": `llama_jax.load` as it is: each device's callback reads only its slice, from the
  rank(s) holding it (`weights.lazy.Concat`).
- "whole": the same load with every Meta tensor merged on the host first (`np.asarray` of the
  merge), which is what concatenating the shards did before.
Printed JSON: peak traced host bytes per mode, the largest whole tensor and the largest per-device
slice, in the loaded dtype.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # first: an installed package named `benchmarks` must not shadow ours

from benchmarks import main_in_tempdir  # noqa: E402

PARAMS = dict(
    dim=512,
    n_layers=2,
    n_heads=8,
    n_kv_heads=8,
    vocab_size=16384,
    multiple_of=256,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
)
MP = 8

CHILD = r"""
import json, sys, tracemalloc
import numpy as np
import llama_jax
from llama_jax.weights.meta import MetaCheckpoint
from llama_jax.sharding.mesh import make_mesh

path, mode = sys.argv[1], sys.argv[2]
if mode == "whole":
    lazy = MetaCheckpoint.tensor
    MetaCheckpoint.tensor = lambda self, param, layer: np.asarray(lazy(self, param, layer))
mesh = make_mesh({"tensor": 8})
llama_jax.load(path, mesh=mesh)  # compile the placement programs once, outside the measurement
tracemalloc.start()
model = llama_jax.load(path, mesh=mesh)
_, peak = tracemalloc.get_traced_memory()
embedding = model.tok_embeddings[...]
print(json.dumps({"peak_host_bytes": peak, "embedding_slice_shape": list(embedding.addressable_shards[0].data.shape)}))
"""


def measure(path: pathlib.Path, mode: str) -> dict:
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)
    )
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), mode], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(directory: pathlib.Path) -> dict:
    from llama_jax.model.config import LlamaConfig
    from tests.checkpoints import meta_state_dict, write_meta_checkpoint

    write_meta_checkpoint(directory, PARAMS, meta_state_dict(PARAMS), mp=MP)
    c = LlamaConfig.from_meta_params(PARAMS)
    largest = c.vocab_size * c.dim * 2  # tok_embeddings / output, bfloat16
    result = {
        "checkpoint": f"Meta MP{MP}, dim {c.dim}, vocab {c.vocab_size}, {c.n_layers} layers, bf16",
        "mesh": "tensor=8 on 8 fake CPU devices",
        "largest_tensor_bytes": largest,
        "largest_device_slice_bytes": largest // MP,
    }
    for mode in ("slices", "whole"):
        result[mode] = measure(directory, mode)
    result["slices_peak_over_slice"] = result["slices"]["peak_host_bytes"] / result["largest_device_slice_bytes"]
    result["whole_peak_over_tensor"] = result["whole"]["peak_host_bytes"] / largest
    return result


if __name__ == "__main__":
    main_in_tempdir(run, __doc__)
