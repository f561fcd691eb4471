"""Logical axis names and the rules table that maps them onto mesh axes.

The model names every parameter and activation axis logically ("embed", "q_heads", ...) and never
names a mesh axis. A strategy is one rules table; `use_rules(mesh, rules)` activates it for the
duration of a trace, and `constrain` then pins activations. Outside that context `constrain` is
the identity, so single-device code pays nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical axes. Parameters: vocab, embed, q_heads, kv_heads, head_dim, mlp, norm, layers.
# Activations: batch, seq (query positions), cache_seq (key positions in the KV cache).
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# FSDP x tensor parallelism: heads, the FFN width and the vocabulary split over "tensor"; the model
# dimension of every weight split over "fsdp"; the batch over "data" and "fsdp". Axes absent from a
# mesh, or that do not divide a dimension, are dropped (replicated) per array.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("cache_seq", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class ShardingSpec:
    """A mesh and the rules that map the model's logical axes onto it (hashable: static in jit)."""

    mesh: Mesh
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "llama_jax_sharding_rules", default=None
)


def logical_to_spec(
    names: Sequence[str | None],
    rules: Rules,
    *,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array. Given `mesh`, axes it lacks are dropped; given
    `shape` too, an axis whose size does not divide the dimension is dropped, so that, say,
    8 KV heads on a 16-way tensor axis are replicated rather than unevenly split.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape)
            if shape is not None:
                kept = []
                for a in axes:
                    if shape[dim] % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                        kept.append(a)
                axes = tuple(kept)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names (identity when no rules are active)."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
