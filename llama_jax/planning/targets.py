"""Named accelerator targets a program can be compiled for on this machine, without the hardware.

    target = targets.get("v5p-16")          # 8 v5p chips (2x2x2)
    mesh = target.mesh({"fsdp": 1, "tensor": 8})
    jax.jit(f).lower(<ShapeDtypeStructs sharded over mesh>).compile()   # the TPU compiler's program

XLA compiles for a TPU or an NVIDIA GPU from a description of its devices alone: libtpu (the version
`jax[tpu]` pins) describes any TPU slice by its topology, and the CUDA plugin (`jax-cuda12-plugin`,
`jax-cuda12-pjrt`, no CUDA libraries needed) a GPU by a `GpuTargetConfigProto`; XLA keeps those of real
GPUs, vendored here under `gpu_specs/` with their source named. `jax` itself keeps running on the CPU
(`JAX_PLATFORMS=cpu`; `TPU_SKIP_MDS_QUERY=1` keeps libtpu from asking a cloud metadata server).

Names follow the planner's presets (`sharding.mesh.preset`): `v5p-N` counts TensorCores (2 per chip),
`v5e-N` and `v6e-N` chips, `h100xN` / `h200xN` GPUs. HBM per device is what the vendor's spec sheet
(TPU: Google Cloud's system architecture pages) or XLA's target config (GPU) says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import pathlib
import re

import numpy as np

GiB = 1 << 30
SPECS = pathlib.Path(__file__).parent / "gpu_specs"

# (HBM bytes per chip, HBM bytes/s per chip, TensorCores per chip): Google Cloud TPU system architecture.
_TPU_CHIPS = {
    "v5e": (16 * GiB, 819e9, 1),
    "v5p": (95 * GiB, 2765e9, 2),
    "v6e": (32 * GiB, 1640e9, 1),
}
# GPU name -> the vendored XLA target config.
_GPU_SPECS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}


class PluginMissing(RuntimeError):
    """The compiler plugin a target needs is not installed."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One accelerator slice: its devices are made by the target's compiler plugin (`devices()`)."""

    name: str  # "v5p-16", "h100x8"
    platform: str  # "tpu" or "cuda"
    topology: str  # "v5p:2x2x2" (libtpu) or "1x1x8" (the CUDA plugin: slices x hosts x GPUs)
    n_devices: int
    hbm_bytes: int  # per device
    hbm_bandwidth: float  # bytes/s per device

    @property
    def memory_bytes(self) -> int:
        """HBM per device, under the name the planner's `sharding.mesh.Hardware` gives it."""
        return self.hbm_bytes

    @property
    def lowering_platform(self) -> str:
        return "cuda" if self.platform == "cuda" else "tpu"

    def cudnn_version(self) -> int:
        """The cuDNN version of a GPU target's config, as cuDNN numbers it (9.10.0 -> 91000)."""
        text = (SPECS / _GPU_SPECS[self.name.split("x")[0]]).read_text()
        major, minor, patch = re.search(r'dnn_version: "(\d+)\.(\d+)\.(\d+)"', text).groups()
        return int(major) * 10000 + int(minor) * 100 + int(patch)

    def devices(self) -> list:
        """The target's devices, as its compiler plugin describes them (no hardware needed)."""
        return list(_topology(self.name).devices)

    def mesh(self, sizes: dict[str, int]):
        """A `jax.sharding.Mesh` of this target's devices with these axis sizes (their product = n_devices)."""
        from jax.sharding import Mesh

        if math.prod(sizes.values()) != self.n_devices:
            raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices; {self.name} has {self.n_devices}")
        return Mesh(np.array(self.devices()).reshape(tuple(sizes.values())), tuple(sizes))

    def default_mesh(self, n_heads: int | None = None, training: bool = False) -> dict[str, int]:
        """Tensor parallel over up to 8 devices (Llama 3's 8 KV heads); the rest split the weights further.

        Training: over "fsdp" (each layer's weights gathered per step, which its large batches amortize).
        Inference (a model's `n_heads` given): over "kv_rep" as far as the query heads divide (the query
        heads, FFN width and vocabulary split further, each kv head copied), so a decode step reads each
        weight where it lies and only all-reduces activations; an FSDP mesh gathers every layer's weights
        every step (405B bf16 on v5p-32, fsdp 2 x tensor 8: 0.39 of the HBM roofline, docs/TARGETS.md).
        "fsdp" takes what the heads leave."""
        tensor = math.gcd(self.n_devices, 8)
        rest = self.n_devices // tensor
        kv_rep = 1
        if not training and n_heads:
            kv_rep = max(r for r in range(1, rest + 1) if rest % r == 0 and n_heads % (tensor * r) == 0)
        return {"fsdp": rest // kv_rep, **({"kv_rep": kv_rep} if kv_rep > 1 else {}), "tensor": tensor}


def _tpu(generation: str, chips_shape: tuple[int, ...]) -> Target:
    hbm, bandwidth, cores = _TPU_CHIPS[generation]
    chips = math.prod(chips_shape)
    return Target(
        f"{generation}-{chips * cores}",
        "tpu",
        f"{generation}:{'x'.join(map(str, chips_shape))}",
        chips,
        hbm,
        bandwidth,
    )


@contextlib.contextmanager
def tracing(target: Target):
    """Trace programs for `target`: attention "auto" picks its backend (`platform.lowering_for`).

    On a GPU target, `jax.nn.dot_product_attention(implementation="cudnn")` first asks the installed
    cuDNN library its version (`jax._src.cudnn.fused_attention_stablehlo.check_cudnn_version`, through
    the CUDA plugin's `cudnn_get_version`), and raises "cuDNN not found" without it. jax 0.10.2 has no
    config flag or environment variable around that call (`JAX_SKIP_CUDA_CONSTRAINTS_CHECK` only skips
    the plugin's start-up checks); the one public way is to install the cuDNN wheel (`nvidia-cudnn-cu12`,
    hundreds of MB), and then the version is the installed library's, not the target's. So while
    tracing, and only then, that check answers with the target config's `dnn_version`: the check is all
    it asks, the fused-attention custom call is built by jax itself."""
    from llama_jax.model import platform

    with contextlib.ExitStack() as stack:
        stack.enter_context(platform.lowering_for(target.lowering_platform))
        if target.platform == "cuda":
            from jax._src.cudnn import fused_attention_stablehlo as cudnn

            version = target.cudnn_version()
            saved = cudnn.check_cudnn_version
            cudnn.check_cudnn_version = lambda: version
            stack.callback(setattr, cudnn, "check_cudnn_version", saved)
        yield


def _gpu(kind: str, n: int) -> Target:
    info = gpu_device_info(kind)
    return Target(f"{kind}x{n}", "cuda", f"1x1x{n}", n, info["device_memory_size"], float(info["memory_bandwidth"]))


@functools.cache
def gpu_device_info(kind: str) -> dict[str, int]:
    """The integer fields of the vendored target config's `gpu_device_info` (memory size, bandwidth...)."""
    text = (SPECS / _GPU_SPECS[kind]).read_text()
    return {k: int(v) for k, v in re.findall(r"^  (\w+): (\d+)$", text, flags=re.M)}


@functools.cache
def all_targets() -> dict[str, Target]:
    out = [
        *(_tpu("v5e", s) for s in ((1, 1), (2, 2), (2, 4))),
        *(_tpu("v5p", s) for s in ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 4))),
        *(_tpu("v6e", s) for s in ((1, 1), (2, 2), (2, 4))),
        _gpu("h100", 1),
        _gpu("h100", 8),
        _gpu("h200", 8),
    ]
    return {t.name: t for t in out}


def get(name: str) -> Target:
    """A target by name (`all_targets()`); a clear error for any other."""
    known = all_targets()
    if name not in known:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(known)}")
    return known[name]


def check_plugin(target: Target) -> None:
    """Raise `PluginMissing`, saying what to install, if `target`'s compiler plugin is absent."""
    module, install = (
        ("libtpu", '"libtpu==<the version jax[tpu] pins>" (requirements-test.txt)')
        if target.platform == "tpu"
        else ("jax_cuda12_plugin", "jax-cuda12-plugin and jax-cuda12-pjrt of the installed jax's version")
    )
    if importlib.util.find_spec(module) is None and not (
        target.platform == "cuda" and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    ):
        raise PluginMissing(f"compiling for {target.name} needs the {module} package: pip install {install}")


@functools.cache
def _topology(name: str):
    from jax.experimental import topologies

    target = get(name)
    check_plugin(target)
    # Compiling touches no TPU: no cloud metadata server to ask, and libtpu's one-process lock guards
    # nothing here (a test run or a second report may compile beside this one).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if target.platform == "tpu":
        single = target.n_devices == 1  # libtpu needs the host bounds of a one-chip slice spelled out
        bounds = {"chips_per_host_bounds": (1, 1, 1)} if single else {}
        return topologies.get_topology_desc(target.topology, "tpu", **bounds)
    kind = target.name.split("x")[0]
    config = (SPECS / _GPU_SPECS[kind]).read_text()
    return topologies.get_topology_desc(kind, "cuda", target_config=config, topology=target.topology)
