"""A stacked `[L, ...]` layer parameter held as L buffers of its own: `Unstacked`, and when a model holds it so.

A decode step must read each weight where it lies. Read from a slice of a stacked buffer inside the step,
a weight is copied out first on a GPU: XLA's GEMMs (Triton and cuBLAS alike) take whole buffers, so a
`lax.scan` over the stack, or a static slice of it, copies every layer's weights on every step (TPU reads
the scan's slice in place). The decode step therefore runs each layer from weights of their own
(`decoding.layer_weights`), a second copy of the layers kept beside the stack where it takes at most
`COPY_BUDGET` of a device's memory.

Past that budget, on a GPU (405B on 8 H100s), the model holds its layers `Unstacked` instead of stacked:
the same parameters (their logical axes, "layers" first, and their values row for row), one buffer per
layer, loaded so (`loading.load_from`) and never stacked. Every program then runs the layers one by one
from those buffers (`Llama._layers`); the price is compile time linear in depth, prefill included.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from llama_jax.sharding import rules

__all__ = [
    "COPY_BUDGET",
    "Unstacked",
    "bytes_per_device",
    "constrain",
    "copy_fits",
    "decide",
    "device_memory_limit",
    "held",
    "scan_copies",
    "wanted",
]

# The decode step's per-layer copy may take at most this fraction of any device's memory. Past it the
# model scans its stack (TPU, CPU) or holds its layers unstacked (GPU): the weights are never held twice
# where they barely fit once.
COPY_BUDGET = 0.25


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Unstacked:
    """A stacked parameter's L layers, each an array of its own: `u[i]` is layer i, `u.shape` the stack's."""

    rows: tuple[jax.Array, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.rows[0].shape)

    @property
    def dtype(self):
        return self.rows[0].dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> jax.Array:
        if not isinstance(i, int):
            raise TypeError(f"an Unstacked parameter is indexed by a Python int layer, got {i!r}")
        return self.rows[i]


def constrain(x, names):
    """`sharding.rules.constrain` by logical `names`; an `Unstacked` value row by row (names past "layers")."""
    if isinstance(x, Unstacked):
        return Unstacked(tuple(rules.constrain(r, names[1:]) for r in x.rows))
    return rules.constrain(x, names)


def held(tree) -> bool:
    """Whether any parameter in `tree` (a module's state, a model) is held `Unstacked`."""
    return any(isinstance(x, Unstacked) for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Unstacked)))


def device_memory_limit(device) -> int | None:
    """Bytes the device can hold, or None where it does not say (CPU, another process's device)."""
    if device.process_index != jax.process_index():
        return None
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


def bytes_per_device(leaves) -> dict:
    """{device: bytes} of the arrays (or sharded `ShapeDtypeStruct`s) `leaves` on each device."""
    out: dict = {}
    for a in leaves:
        sharding = getattr(a, "sharding", None)
        if sharding is None:
            continue
        nbytes = math.prod(sharding.shard_shape(a.shape)) * a.dtype.itemsize
        for device in sharding.device_set:
            out[device] = out.get(device, 0) + nbytes
    return out


def scan_copies(platform: str) -> bool:
    """Whether `platform`'s compiler copies each slice of a stacked weight out before reading it (a GPU)."""
    return platform in ("gpu", "cuda")


def copy_fits(layer_bytes: int, device_bytes: int | None, budget: float = COPY_BUDGET) -> bool:
    """Whether a second, per-layer copy of `layer_bytes` of stacked layers takes at most `budget` of a device
    of `device_bytes` (None: a device that does not say, where it is taken to fit)."""
    return device_bytes is None or layer_bytes <= budget * device_bytes


def wanted(platform: str, layer_bytes: int, device_bytes: int | None, budget: float = COPY_BUDGET) -> bool:
    """Whether a model whose stacked layers take `layer_bytes` on a device of `device_bytes` (None: unknown)
    holds them unstacked: where a scan copies (`scan_copies`) and the per-layer copy would not fit `budget`."""
    return scan_copies(platform) and not copy_fits(layer_bytes, device_bytes, budget)


def decide(layer_leaves, device_bytes: int | None = None) -> bool:
    """Whether a model whose stacked layer weights are `layer_leaves` (arrays, or sharded `ShapeDtypeStruct`s
    of a plan) holds them unstacked: `wanted` on their most loaded device, of `device_bytes` (a target's
    HBM) or of the memory that device reports."""
    per_device = bytes_per_device(layer_leaves)
    if not per_device:
        return False
    device, nbytes = max(per_device.items(), key=lambda item: item[1])
    return wanted(device.platform, nbytes, device_memory_limit(device) if device_bytes is None else device_bytes)
