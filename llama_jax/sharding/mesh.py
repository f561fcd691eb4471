"""Device meshes by named axis sizes, on one CPU, one H100 node, several nodes, or a TPU slice.

Every mesh has the same four axes, outermost first, so one rules table fits all of them:

  data    whole-model replicas; the batch is split. Crosses nodes / TPU slices (least traffic).
  fsdp    the batch is split *and* every weight's model dimension is split (ZeRO-3): memory
          falls, but every step all-gathers every layer's weights.
  kv_rep  more tensor parallelism for query heads, FFN and vocabulary, with the KV heads and the
          KV cache replicated along it: how 16 devices serve a model with 8 KV heads
          (tensor=8,kv_rep=2) without 16 copies of the cache.
  tensor  heads, FFN width and vocabulary split (Megatron); two all-reduces per block, so keep it
          inside one NVLink node (<= 8 H100s) or one ICI domain, and at most n_kv_heads.

An axis not asked for has size 1. Axis order matters for topology: `jax.make_mesh` (via
`mesh_utils.create_device_mesh`) lays the last axis over the closest devices (one GPU node,
neighbouring TPU chips); across TPU slices the outer axes go over the data-centre network
(`create_hybrid_device_mesh`).

Axis types are `AxisType.Auto`, deliberately. jax 0.10's `make_mesh` defaults to `Explicit`
(sharding in types): every op's output sharding must then be inferable without collectives or be
given by hand. The model is written the GSPMD/Shardy way, parameters and a few activations pinned
and the compiler propagating the rest and inserting collectives; under Explicit axes its very first
op, the embedding gather from a vocab-sharded table, raises `ShardingTypeError` and asks for an
`out_sharding` (as do einsums contracting a sharded axis: wo, w2, the vocab projection).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "kv_rep", "tensor")
GiB = 1 << 30


def parse_axes(text: str | Mapping[str, int]) -> dict[str, int]:
    """Axis sizes from 'data=2,tensor=4' (the others 1); one size may be -1, meaning the rest."""
    if isinstance(text, Mapping):
        items = dict(text)
    else:
        items = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not re.fullmatch(r"-?\d+", value.strip()):
                raise ValueError(f"mesh {text!r}: expected name=size pairs like 'data=2,tensor=4', got {part!r}")
            if name.strip() in items:
                raise ValueError(f"mesh {text!r}: axis {name.strip()!r} given twice")
            items[name.strip()] = int(value)
    unknown = sorted(set(items) - set(AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} unknown; the axes are {AXES}")
    sizes = {a: int(items.get(a, 1)) for a in AXES}
    if sum(s == -1 for s in sizes.values()) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh {text!r}: sizes must be positive (at most one -1 meaning 'the rest')")
    return sizes


def resolve_axes(axes: str | Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Sizes with a -1 filled in; the product must equal the device count."""
    sizes = parse_axes(axes)
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if n_devices % known:
            raise ValueError(f"mesh {format_axes(sizes)}: {n_devices} devices are not divisible by {known}")
        sizes = {a: (n_devices // known if s == -1 else s) for a, s in sizes.items()}
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(
            f"mesh {format_axes(sizes)} needs {math.prod(sizes.values())} devices, but {n_devices} are given "
            f"(use -1 for one axis to take the rest)"
        )
    return sizes


def format_axes(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={sizes[a]}" for a in AXES if a in sizes)


def make_mesh(
    axes: str | Mapping[str, int],
    devices: Sequence[jax.Device] | None = None,
    *,
    axis_types: AxisType = AxisType.Auto,
) -> Mesh:
    """A mesh with axes ("data", "fsdp", "kv_rep", "tensor") of the given sizes over `devices` (default: all,
    every process's included, so the same call on every host of a multi-host job builds one global mesh).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axes(axes, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    types = (axis_types,) * len(AXES)
    slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
    if len(slices) > 1:
        # Multi-slice TPU: put the slices on the outermost axes (data first), chips within a slice inside.
        dcn = _split_outer(shape, len(slices))
        if dcn is not None:
            ici = tuple(s // d for s, d in zip(shape, dcn, strict=True))
            grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
            return Mesh(grid, AXES, axis_types=types)
    return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)


def _split_outer(shape: tuple[int, ...], granules: int) -> tuple[int, ...] | None:
    """Factor `granules` over the axes, outermost first; None if it does not factor."""
    dcn = []
    left = granules
    for size in shape:
        f = math.gcd(size, left)
        dcn.append(f)
        left //= f
    return tuple(dcn) if left == 1 else None


# ---- hardware presets -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hardware:
    """A device set the planner sizes for.

    memory_bytes: HBM per device. Vendors' "80 GB" / "95 GB" / "32 GB" are binary units (HBM stacks
      are 16 GiB), so they are taken as GiB. What a program may really use is less: CUDA context,
      cuDNN/cuBLAS workspaces, and on GPU jax preallocates only 75% unless
      XLA_PYTHON_CLIENT_MEM_FRACTION is raised (docs/SHARDING.md); the planner keeps `headroom`.
    mesh: the default axis sizes for this device set.
    """

    name: str
    platform: str
    n_devices: int
    hosts: int
    memory_bytes: int
    mesh: Mapping[str, int]
    note: str = ""


def _h100(n: int) -> Hardware:
    hosts = max(1, n // 8)
    # Tensor within the NVLink node; further nodes split the query heads, FFN and vocabulary more
    # (kv_rep): decoding then all-reduces activations across nodes but never gathers weights.
    mesh = {"tensor": min(n, 8), "kv_rep": max(1, n // 8)}
    return Hardware(f"h100x{n}", "gpu", n, hosts, 80 * GiB, mesh, "H100 SXM 80GB, 8 per node over NVLink")


def _tpu(generation: str, n: int) -> Hardware:
    if generation == "v5p":
        # v5p-N counts TensorCores: 2 per chip; 4 chips per host; 95 GiB HBM2e per chip.
        if n % 2:
            raise ValueError(f"v5p-{n}: v5p slice names count TensorCores (2 per chip); expected an even number")
        chips, per_host, memory = n // 2, 4, 95 * GiB
    elif generation == "v6e":
        # v6e-N counts chips (1 TensorCore each); 8 chips per host; 32 GiB HBM per chip.
        chips, per_host, memory = n, 8, 32 * GiB
    else:
        raise ValueError(f"unknown TPU generation {generation!r} (known: v5p, v6e)")
    tensor = math.gcd(chips, 8)  # Llama 3 has 8 KV heads
    mesh = {"tensor": tensor, "fsdp": chips // tensor}
    return Hardware(
        f"{generation}-{n}",
        "tpu",
        chips,
        max(1, chips // per_host),
        memory,
        mesh,
        f"TPU {generation}, {chips} chips, {per_host} per host",
    )


PRESETS: dict[str, Hardware] = {
    "cpu": Hardware("cpu", "cpu", 8, 1, 8 * GiB, {"tensor": 8}, "8 fake CPU devices (tests)"),
    "h100x1": _h100(1),
    "h100x8": _h100(8),
    "h100x16": _h100(16),
    "v5p-128": _tpu("v5p", 128),
    "v6e-256": _tpu("v6e", 256),
}


def preset(name: str) -> Hardware:
    """A preset by name: "h100xN" (N H100s, 8 per node), "v5p-N" (N TensorCores), "v6e-N" (N chips)."""
    if name in PRESETS:
        return PRESETS[name]
    if m := re.fullmatch(r"h100x(\d+)", name):
        return _h100(int(m.group(1)))
    if m := re.fullmatch(r"(v5p|v6e)-(\d+)", name):
        return _tpu(m.group(1), int(m.group(2)))
    raise ValueError(f"unknown hardware preset {name!r}; known: {sorted(PRESETS)} (or h100xN, v5p-N, v6e-N)")


def describe(mesh: Mesh) -> str:
    return format_axes(dict(mesh.shape)) + f" ({mesh.devices.size} {mesh.devices.flat[0].platform} devices)"


def device_grid(mesh: Mesh) -> np.ndarray:
    """Device ids laid out as the mesh (for logs and tests)."""
    return np.vectorize(lambda d: d.id)(mesh.devices)
