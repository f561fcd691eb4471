"""A Llama on a mesh: its parameters' logical axes, placed, sharded caches, and abstract shapes for planning.

`llama_jax/sharding/` knows meshes and rules tables, nothing of Llama; this module is where the two meet.
Which parameter carries which logical axes is read from the model itself (the `out_sharding`
metadata every `nnx.Param` of `llama_jax.model.model` is created with), never restated in a table.

`llama_jax.load(path, mesh=..., rules=...)` streams a checkpoint straight into place; these helpers
cover the rest: an in-memory model moved onto a mesh (`shard_model`), a KV cache created directly
in its sharded home (`zeros_cache`), and abstract, sharded shapes of both (`abstract_state`, over
`model.abstract`, and `abstract_cache`) that `jax.jit(...).lower` accepts without allocating a byte.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llama_jax.model import quant, unstacked
from llama_jax.model.config import LlamaConfig
from llama_jax.model.kv_cache import CACHE_AXES, KVCache
from llama_jax.model.model import Llama, abstract
from llama_jax.model.options import Options
from llama_jax.model.unstacked import Unstacked
from llama_jax.sharding import rules as sharding_rules
from llama_jax.sharding.rules import ShardingSpec


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes(variable: nnx.Variable) -> tuple[str, ...]:
    """The logical axis names a parameter was created with (`model._param(..., names)`)."""
    return tuple(variable.get_metadata()["out_sharding"])


def parameter_axes(model: Llama | nnx.State) -> dict[str, tuple[str, ...]]:
    """{"layers.attention.wq": ("layers", "embed", "q_heads", "head_dim"), ...} for every parameter of `model`."""
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    flat = nnx.to_flat_state(state)
    return {".".join(map(str, path)).removesuffix(".weight"): logical_axes(v) for path, v in flat}


@functools.cache
def array_axes() -> dict[str, tuple[str, ...]]:
    """The logical axes of every array a Llama can hold: each parameter of a bf16 and of an FP8 model
    (its per-channel scales and the unquantized layers' `dense_ffn`), and the KV cache. Rules are
    validated against these (`llama_rules`). Read from a tiny abstract model: shapes do not matter."""
    config = LlamaConfig(dim=8, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=16, ffn_dim=16, max_seq_len=16)
    axes = parameter_axes(abstract(config))
    axes.update(parameter_axes(abstract(config, options=Options(fp8=quant.Fp8Spec((1,))))))
    return {**axes, "kv_cache": CACHE_AXES}


def llama_rules(strategy: str | sharding_rules.Rules) -> tuple:
    """A strategy's rules by name, or a custom table checked for collisions in every array of a Llama."""
    return sharding_rules.get_rules(strategy, arrays=array_axes())


def sharding_spec(mesh: Mesh, rules: str | sharding_rules.Rules = "fsdp_tp") -> ShardingSpec:
    """A `ShardingSpec` from a mesh and a strategy name or rules table (validated)."""
    return ShardingSpec(mesh, tuple(llama_rules(rules)))


def param_shardings(model: Llama, spec: ShardingSpec) -> nnx.State:
    """The NamedSharding of every parameter of `model` (real or abstract) under `spec`."""
    return state_shardings(nnx.state(model), spec)


def state_shardings(state: nnx.State, spec: ShardingSpec) -> nnx.State:
    """The NamedSharding of every variable of `state` (a filtered part of a model, real or abstract)."""
    return jax.tree.map(lambda v: spec.sharding(logical_axes(v), v.shape), state, is_leaf=_is_variable)


def shard_model(model: Llama, mesh: Mesh, rules: str | sharding_rules.Rules = "fsdp_tp") -> Llama:
    """An in-memory model's parameters moved onto `mesh`: a new model (`Options.sharding` set, so its
    forward pins activations by the same rules) over the placed arrays."""
    spec = sharding_spec(mesh, rules)
    placed = jax.tree.map(
        lambda v: v.replace(jax.device_put(v.get_value(), spec.sharding(logical_axes(v), v.shape))),
        nnx.state(model),
        is_leaf=_is_variable,
    )
    graphdef = nnx.graphdef(abstract(model.config, model.dtype, dataclasses.replace(model.options, sharding=spec)))
    return nnx.merge(graphdef, placed)


def cache_shape(config: LlamaConfig, batch: int, length: int) -> tuple[int, ...]:
    return KVCache.shape(config, batch, length)


def cache_sharding(config: LlamaConfig, batch: int, length: int, spec: ShardingSpec) -> NamedSharding:
    """Where the KV cache lives: batch over the batch axes, KV heads over "tensor" where they divide it.

    With fewer KV heads than the tensor axis (8 heads, tensor=16) the heads are replicated across
    "tensor"; each device then holds every head of its batch rows. Prefer meshes whose tensor axis
    divides n_kv_heads, with the rest of the devices on "data"/"fsdp" (docs/SHARDING.md).
    """
    return spec.sharding(CACHE_AXES, cache_shape(config, batch, length))


def zeros_cache(config: LlamaConfig, batch: int, length: int, spec: ShardingSpec | None, dtype=jnp.bfloat16) -> KVCache:
    """An empty KV cache created directly in its sharded home: no device ever holds the whole cache."""
    if spec is None:
        return KVCache.zeros(config, batch, length, dtype)
    sharding = cache_sharding(config, batch, length, spec)
    make = jax.jit(lambda: KVCache.zeros(config, batch, length, dtype), out_shardings=KVCache(sharding, sharding))
    return make()


def abstract_state(
    config: LlamaConfig, options: Options, dtype=jnp.bfloat16, by_layer: bool | None = False, device_bytes=None
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of `model.abstract(config, dtype, options)` with each parameter a
    `jax.ShapeDtypeStruct` sharded by `options.sharding`: no memory. `by_layer`: the layers held
    `Unstacked`, one struct per layer, as `load` holds them on a GPU too small for the decode copy; None:
    where `load` would hold them so on devices of `device_bytes` each (`unstacked.decide`)."""
    spec = options.sharding
    if spec is None:
        raise ValueError("abstract_state: options.sharding must say the mesh and rules the parameters are placed by")
    graphdef, state = nnx.split(abstract(config, dtype, options))
    state = jax.tree.map(
        lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=spec.sharding(logical_axes(v), v.shape))),
        state,
        is_leaf=_is_variable,
    )
    if by_layer is None:
        by_layer = unstacked.decide(layer_leaves(state), device_bytes)
    if not by_layer:
        return graphdef, state

    def rows(v):
        if logical_axes(v)[0] != "layers":
            return v
        x = v.get_value()
        row = jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=spec.sharding(logical_axes(v)[1:], x.shape[1:]))
        return v.replace(Unstacked((row,) * x.shape[0]))

    return graphdef, jax.tree.map(rows, state, is_leaf=_is_variable)


def layer_leaves(state: nnx.State) -> list:
    """The stacked layer weights of an abstract state (their logical axes start with "layers")."""
    return jax.tree.leaves(
        [v.get_value() for v in jax.tree.leaves(state, is_leaf=_is_variable) if logical_axes(v)[:1] == ("layers",)]
    )


def abstract_cache(
    config: LlamaConfig, batch: int, length: int, spec: ShardingSpec, dtype=jnp.bfloat16, by_layer: bool = False
) -> KVCache:
    """The KV cache as sharded `ShapeDtypeStruct`s; `by_layer`: one per layer (`Unstacked`, `KVCache.zeros`)."""
    shape, dtype = cache_shape(config, batch, length), jnp.dtype(dtype)
    if by_layer:
        row = jax.ShapeDtypeStruct(shape[1:], dtype, sharding=spec.sharding(CACHE_AXES[1:], shape[1:]))
        return KVCache(Unstacked((row,) * shape[0]), Unstacked((row,) * shape[0]))
    struct = jax.ShapeDtypeStruct(shape, dtype, sharding=cache_sharding(config, batch, length, spec))
    return KVCache(struct, struct)
