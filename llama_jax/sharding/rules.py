"""Logical axis names and the rules tables that map them onto mesh axes, one table per strategy.

The model names every parameter and activation axis logically ("embed", "q_heads", ...) and never
names a mesh axis. A strategy is one rules table; `use_rules(mesh, rules)` activates it for the
duration of a trace, and `constrain` then pins activations. Outside that context `constrain` is
the identity, so single-device code pays nothing.

Mesh axes (see `llama_jax/sharding/mesh.py`): "data" (replicas: whole model copies, batch split),
"fsdp" (batch split *and* the model dimension of every weight split, ZeRO-3 style), "tensor"
(heads, FFN width and vocabulary split, Megatron style; keep it inside a node / ICI domain) and
"kv_rep", a second tensor-parallel axis for grouped-query attention with fewer KV heads than
devices: query heads, FFN and vocabulary are split over tensor x kv_rep, KV heads (and the KV
cache) over "tensor" only and replicated along kv_rep, as Meta's MP16 405B checkpoint duplicates
its 8 KV heads. Query heads are split tensor-major, so a device's query heads all read KV heads
it holds: attention needs no communication.

| strategy  | batch                      | embed | q_heads, mlp, vocab | kv_heads | KV cache            |
|-----------|----------------------------|-------|---------------------|----------|---------------------|
| `dp`      | data, fsdp, kv_rep, tensor | -     | -                   | -        | batch over all axes |
| `fsdp`    | data, fsdp                 | fsdp  | -                   | -        | batch               |
| `tp`      | data                       | -     | tensor, kv_rep      | tensor   | batch, kv heads     |
| `fsdp_tp` | data, fsdp                 | fsdp  | tensor, kv_rep      | tensor   | batch, kv heads     |

Per array, an axis absent from the mesh or not dividing the dimension is dropped, i.e. that
dimension is replicated: 8 KV heads on a 16-way "tensor" axis are replicated across all 16
devices, and so is the KV cache (16 copies). Use tensor=8,kv_rep=2 instead (2 copies); the
planner shows the difference (docs/SHARDING.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# A rules table: (logical axis, mesh axis | tuple of mesh axes | None), one row per logical axis.
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Parameters: vocab, embed, q_heads, kv_heads, head_dim, mlp, norm, layers.
# Activations: batch, seq (query positions), cache_seq (key positions in the KV cache).
LOGICAL_AXES = (
    "batch",
    "seq",
    "cache_seq",
    "vocab",
    "embed",
    "q_heads",
    "kv_heads",
    "head_dim",
    "mlp",
    "norm",
    "layers",
)

# Within one array two logical axes may never share a mesh axis: that is what `validate` calls a
# collision. Which arrays a model holds, and their logical axes, is the model's own business: it
# passes them as `arrays` (`llama_jax.weights.placement.array_axes()` reads a Llama's from its parameters).
# Activations are exempt by design: ("batch", "seq", "embed") under FSDP maps both batch and embed to
# "fsdp"; the first axis that divides takes it, so activations split by batch and weights by embed.

_REPLICATED = (("seq", None), ("cache_seq", None), ("head_dim", None), ("norm", None), ("layers", None))

# Pure data parallelism: every device holds the whole model; every mesh axis splits the batch.
DP_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "kv_rep", "tensor")),
    ("embed", None),
    ("vocab", None),
    ("q_heads", None),
    ("kv_heads", None),
    ("mlp", None),
    *_REPLICATED,
)

# FSDP (ZeRO-3): weights split along the model dimension over "fsdp" and gathered layer by layer
# by the compiler; the batch split over data and fsdp. Memory per device falls with fsdp; every
# step all-gathers each layer's weights, so it suits large batches (prefill, training), not latency.
FSDP_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", None),
    ("q_heads", None),
    ("kv_heads", None),
    ("mlp", None),
    *_REPLICATED,
)

# Tensor parallelism (Megatron): heads, FFN width and vocabulary split over "tensor" (x "kv_rep");
# each block costs two all-reduces of the [B, T, D] activations (after wo and after w2), nothing else.
TP_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", "data"),
    ("embed", None),
    ("vocab", ("tensor", "kv_rep")),
    ("q_heads", ("tensor", "kv_rep")),
    ("kv_heads", "tensor"),
    ("mlp", ("tensor", "kv_rep")),
    *_REPLICATED,
)

# FSDP x tensor parallelism: heads, the FFN width and the vocabulary split over "tensor" (x "kv_rep");
# the model dimension of every weight split over "fsdp"; the batch over "data" and "fsdp". Axes
# absent from a mesh, or that do not divide a dimension, are dropped (replicated) per array.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("cache_seq", None),
    ("embed", "fsdp"),
    ("vocab", ("tensor", "kv_rep")),
    ("q_heads", ("tensor", "kv_rep")),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", ("tensor", "kv_rep")),
    ("norm", None),
    ("layers", None),
)
FSDP_TP_RULES = DEFAULT_RULES

STRATEGIES: dict[str, tuple[tuple[str, str | tuple[str, ...] | None], ...]] = {
    "dp": DP_RULES,
    "fsdp": FSDP_RULES,
    "tp": TP_RULES,
    "fsdp_tp": FSDP_TP_RULES,
}


def _targets(target: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return (target,) if isinstance(target, str) else tuple(target or ())


def validate(rules: Rules, *, arrays: Mapping[str, Sequence[str]] | None = None) -> tuple:
    """Check a rules table and return it as a tuple (hashable, usable in `ShardingSpec`).

    Rejected: a row that is not (name, target); a logical name outside `LOGICAL_AXES`, or listed
    twice; a mesh axis listed twice in one target; and collisions: two logical axes of one of
    `arrays` (name -> its logical axes, e.g. every parameter and the KV cache of a model) mapped to
    the same mesh axis, which would silently replicate one of them.
    """
    table: dict[str, tuple[str, ...]] = {}
    for row in rules:
        if not (isinstance(row, tuple) and len(row) == 2 and isinstance(row[0], str)):
            raise ValueError(f"rules row {row!r}: expected (logical axis, mesh axis | tuple | None)")
        name, target = row
        if name not in LOGICAL_AXES:
            raise ValueError(f"rules: unknown logical axis {name!r}; the rules tables name {LOGICAL_AXES}")
        if name in table:
            raise ValueError(f"rules: logical axis {name!r} is listed twice")
        axes = _targets(target)
        if not all(isinstance(a, str) for a in axes):
            raise ValueError(f"rules: {name!r} -> {target!r}: mesh axes must be names (str)")
        if len(set(axes)) != len(axes):
            raise ValueError(f"rules: {name!r} -> {target!r} lists a mesh axis twice")
        table[name] = axes
    for array, names in (arrays or {}).items():
        owner: dict[str, str] = {}
        for name in names:
            for axis in table.get(name, ()):
                if axis in owner and owner[axis] != name:
                    raise ValueError(
                        f"rules collision in {array} {tuple(names)}: logical axes {owner[axis]!r} and "
                        f"{name!r} both map to mesh axis {axis!r}; one of them would be silently "
                        f"replicated. Map them to different mesh axes."
                    )
                owner[axis] = name
    return tuple(rules)


def get_rules(strategy: str | Rules, *, arrays: Mapping[str, Sequence[str]] | None = None) -> tuple:
    """A strategy's rules by name ("dp", "fsdp", "tp", "fsdp_tp"), or a custom table validated against `arrays`."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown sharding strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
        return STRATEGIES[strategy]
    return validate(strategy, arrays=arrays)


@dataclasses.dataclass(frozen=True)
class ShardingSpec:
    """A mesh and the rules that map the model's logical axes onto it (hashable: static in jit)."""

    mesh: Mesh
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]

    def spec(self, names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        return logical_to_spec(names, self.rules, mesh=self.mesh, shape=shape)

    def sharding(self, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("sharding_rules", default=None)


def logical_to_spec(
    names: Sequence[str | None],
    rules: Rules,
    *,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array. Given `mesh`, axes it lacks (or of size 1) are dropped; given
    `shape` too, an axis whose size does not divide the dimension is dropped, so that, say,
    8 KV heads on a 16-way tensor axis are replicated rather than unevenly split.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = _targets(target)
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            # Size-1 axes split nothing; dropping them keeps specs readable (P(None, "tensor")).
            axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
            if shape is not None:
                kept = []
                for a in axes:
                    if shape[dim] % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                        kept.append(a)
                axes = tuple(kept)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def shards(spec: PartitionSpec, mesh: Mesh) -> int:
    """Into how many distinct pieces `spec` cuts an array on `mesh` (the rest is replication)."""
    return math.prod(mesh.shape[a] for entry in spec for a in _targets(entry))


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
    return _ACTIVE.get()


def active_split() -> tuple[Mesh, Rules] | None:
    """The active (mesh, rules) where the mesh has more than one device; None where nothing is split (no
    rules active, or one device): what a kernel run per device under `shard_map` asks first."""
    ctx = _ACTIVE.get()
    return None if ctx is None or ctx[0].size == 1 else ctx


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names (identity when no rules are active).

    Uses the array's shape, like the parameters do: an axis that does not divide (8 KV heads on
    16 devices, a batch of 1 on data=2) is replicated instead of failing or splitting unevenly.
    """
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_spec(names, rules, mesh=mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
