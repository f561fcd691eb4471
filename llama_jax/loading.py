"""`load(path)`: recognise a checkpoint, check it against its config, and stream it onto devices.

Tensor by tensor: each parameter is built with `jax.make_array_from_callback`, whose callback
hands every device only its own slice of a memory-mapped source tensor. Per-layer tensors are
written one layer at a time into a preallocated, donated stacked buffer, so the host never holds
more than one layer's tensor (a transformed view of the memory map) and no device holds a
second copy of a parameter.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.weights import layout
from llama_jax.weights.checkpoint import Checkpoint, check
from llama_jax.weights.hf import HFCheckpoint, is_hf_checkpoint
from llama_jax.weights.meta import MetaCheckpoint, is_meta_checkpoint
from sharding import rules as sharding_rules


def open_checkpoint(path: str | pathlib.Path) -> Checkpoint:
    """The reader for whatever checkpoint layout `path` holds (HF safetensors or Meta consolidated)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is a file; pass the directory that holds it")
    if is_hf_checkpoint(path):
        return HFCheckpoint(path)
    if is_meta_checkpoint(path):
        return MetaCheckpoint(path)
    if (path / "original").is_dir() and is_meta_checkpoint(path / "original"):
        return MetaCheckpoint(path / "original")
    listing = sorted(p.name for p in path.iterdir())[:20]
    raise ValueError(
        f"{path}: unknown checkpoint layout. Expected a Hugging Face directory (config.json + "
        f"model.safetensors or model.safetensors.index.json) or a Meta directory (params.json + "
        f"consolidated.NN.pth); found {listing}"
    )


def load(
    path: str | pathlib.Path,
    *,
    dtype: str | jnp.dtype = "bfloat16",
    mesh: Mesh | None = None,
    rules: sharding_rules.Rules | None = None,
    attention_impl: str | None = None,
) -> Llama:
    """Load a Llama checkpoint directory into a `Llama` module.

    Args:
      path: a Hugging Face checkpoint directory or a Meta `consolidated.*.pth` directory.
      dtype: parameter and compute dtype ("bfloat16", "float32", ...).
      mesh: place every parameter straight into its sharded home on this mesh (None: one device).
      rules: logical-axis rules for `mesh` (default: `sharding.rules.DEFAULT_RULES`).
      attention_impl: forwarded to `jax.nn.dot_product_attention` ("cudnn" on H100).
    """
    ckpt = open_checkpoint(path)
    check(ckpt)
    return load_from(ckpt, dtype=dtype, mesh=mesh, rules=rules, attention_impl=attention_impl)


def load_from(
    ckpt: Checkpoint,
    *,
    dtype: str | jnp.dtype = "bfloat16",
    mesh: Mesh | None = None,
    rules: sharding_rules.Rules | None = None,
    attention_impl: str | None = None,
) -> Llama:
    dtype = jnp.dtype(dtype)
    config = ckpt.config
    abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0), attention_impl=attention_impl))
    graphdef, state = nnx.split(abstract)
    if mesh is not None and rules is None:
        rules = sharding_rules.DEFAULT_RULES
    flat = dict(nnx.to_flat_state(state))
    for rule in layout.rules_for(config):
        variable = flat[rule.path]
        names = variable.get_metadata()["out_sharding"]
        sources = [lambda n=n: source_to_ours(ckpt, rule, n) for n in layout.source_names(rule, config, ckpt.fmt)]
        variable.set_value(place(variable.get_value().shape, dtype, names, sources, mesh, rules))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if mesh is not None:
        model.sharding = sharding_rules.ShardingSpec(mesh, tuple(rules))
    return model


def source_to_ours(ckpt: Checkpoint, rule: layout.Rule, name: str) -> np.ndarray:
    """One source tensor in our layout, as a view where the transform allows."""
    array = ckpt.read(name)
    if ckpt.fmt == "meta" and rule.rotary_heads is not None:
        array = layout.meta_to_hf_rows(array, rule.rotary_heads(ckpt.config))
    return rule.to_ours(array, ckpt.config)


def target_sharding(
    names: Sequence[str | None], mesh: Mesh | None, rules: sharding_rules.Rules | None, shape: Sequence[int]
) -> Sharding:
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, sharding_rules.logical_to_spec(names, rules, mesh=mesh, shape=shape))


def place(
    shape: tuple[int, ...],
    dtype: jnp.dtype,
    names: Sequence[str | None],
    sources: Sequence,
    mesh: Mesh | None,
    rules: sharding_rules.Rules | None,
) -> jax.Array:
    """Build one parameter on its devices from `sources` (callables giving numpy arrays).

    One source: the whole parameter. Several: its layers, stacked along axis 0 ("layers").
    """
    sharding = target_sharding(names, mesh, rules, shape)
    if len(sources) == 1 and names[0] != "layers":
        return _from_host(sources[0](), shape, dtype, sharding)
    layer_shape = shape[1:]
    layer_sharding = target_sharding(names[1:], mesh, rules, layer_shape)
    stacked = _zeros(shape, dtype, sharding)
    for i, source in enumerate(sources):
        layer = _from_host(source(), layer_shape, dtype, layer_sharding)
        stacked = _set_layer(stacked, layer, i)
    return stacked


def _from_host(array: np.ndarray, shape, dtype, sharding: Sharding) -> jax.Array:
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"internal layout error: built {array.shape}, parameter needs {shape}")
    return jax.make_array_from_callback(tuple(shape), sharding, lambda index: np.asarray(array[index], dtype=dtype))


def _zeros(shape, dtype, sharding: Sharding) -> jax.Array:
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, i: int) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), i, axis=0)


def abstract_model(config: LlamaConfig, dtype="bfloat16") -> Llama:
    """A `Llama` whose parameters are shape/dtype structs only (for planning and checks)."""
    return nnx.eval_shape(lambda: Llama(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))


def partition_specs(model: Llama, mesh: Mesh, rules: sharding_rules.Rules) -> nnx.State:
    """The PartitionSpec of every parameter of `model` under `rules` on `mesh`."""
    state = nnx.state(model)
    return jax.tree.map(
        lambda v: sharding_rules.logical_to_spec(v.get_metadata()["out_sharding"], rules, mesh=mesh, shape=v.get_value().shape),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


