"""Host memory of `convert --to meta`: the Meta writer holds one tensor at a time, not a shard's state dict.

`python benchmarks/meta_write_memory.py [--out benchmarks/results/meta_write_memory_cpu.json]`

Saves a random 127 MB bf16 HF checkpoint (transformers' `save_pretrained`), then converts it to Meta
MP1 and MP2 in a fresh child process each, sampling anonymous resident memory (`RssAnon` in
/proc/self/status, every 5 ms) during `convert`. File-backed pages (the memory-mapped source and
the staged pieces `torch.save` reads) are reclaimable page cache and are not counted; what a state
dict built in memory would cost is. Printed JSON: growth over the pre-convert baseline per MP, and
the largest tensor's bytes.
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

SHAPE = dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=2048)

CHILD = r"""
import json, sys, threading, time
from llama_jax.jobs.convert import convert
import torch  # noqa: F401  (imported before the baseline)

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

src, dst, mp = sys.argv[1], sys.argv[2], int(sys.argv[3])
peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
base = anon()
sampler = threading.Thread(target=sample)
sampler.start()
convert(src, dst, to="meta", mp=mp, progress=False)
done.set()
sampler.join()
print(json.dumps({"anon_growth_bytes": peak[0] - base}))
"""


def run(directory: pathlib.Path) -> dict:
    import torch

    from tests.checkpoints import hf_checkpoint

    hf_checkpoint(directory / "hf", dtype=torch.bfloat16, **SHAPE)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    size = sum(f.stat().st_size for f in (directory / "hf").glob("*.safetensors"))
    result = {"model_bytes": size, "largest_tensor_bytes": SHAPE["vocab_size"] * SHAPE["dim"] * 2}
    for mp in (1, 2):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(directory / "hf"), str(directory / f"meta{mp}"), str(mp)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        result[f"mp{mp}"] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    main_in_tempdir(run, __doc__)
