"""`load(path)`: recognise a checkpoint, check it, and stream it onto devices through the one placement loop.

Every source is a `weights.checkpoint.Checkpoint` (HF, Meta, our Orbax format, the embedded default),
and `load_from` fills any of them the same way. Tensor by tensor: each parameter is built on its
devices by the checkpoint's `place` (for files: `jax.make_array_from_callback`, whose callback hands
every device only its own slice of a memory-mapped source tensor). Per-layer tensors are written one
layer at a time into a preallocated, donated stacked buffer, so the host never holds more than one
layer's tensor (a transformed view of the memory map) and no device holds a second copy of a parameter.
On a GPU too small for the decode step's per-layer copy (`unstacked.wanted`: 405B on 8 H100s) the layers
stay the buffers they were built as, held `Unstacked`, and are never stacked.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding

from llama_jax.model import platform, unstacked
from llama_jax.model.model import Llama, abstract
from llama_jax.model.options import Options
from llama_jax.sharding import rules as sharding_rules
from llama_jax.weights import fp8, layout, orbax
from llama_jax.weights.checkpoint import Checkpoint, Place
from llama_jax.weights.hf import HFCheckpoint, is_hf_checkpoint
from llama_jax.weights.meta import MetaCheckpoint, is_meta_checkpoint


def open_checkpoint(path: str | pathlib.Path) -> Checkpoint:
    """The reader for whatever checkpoint `path` holds: HF safetensors, Meta consolidated, or our Orbax format."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is a file; pass the directory that holds it")
    if orbax.is_orbax_checkpoint(path):
        return orbax.OrbaxCheckpoint(path)
    if is_hf_checkpoint(path):
        return HFCheckpoint(path)
    if is_meta_checkpoint(path):
        return MetaCheckpoint(path)
    if (path / "original").is_dir() and is_meta_checkpoint(path / "original"):
        return MetaCheckpoint(path / "original")
    listing = sorted(p.name for p in path.iterdir())[:20]
    raise ValueError(
        f"{path}: unknown checkpoint layout. Expected a Hugging Face directory (config.json + "
        f"model.safetensors or model.safetensors.index.json), a Meta directory (params.json + "
        f"consolidated.NN.pth) or a llama-jax Orbax directory ({orbax.MANIFEST} + {orbax.PARAMS}/); found {listing}"
    )


def check_backends(dtype, attention: str = "auto", fp8_matmul: str = "auto") -> None:
    """The dtype, FP8 matmul mode and attention backend a model would run with, checked on this platform
    (`attention.select`'s own check: cudnn needs an NVIDIA GPU and bf16/fp16, splash a TPU) without it."""
    from llama_jax.model.attention import select

    if fp8_matmul not in platform.FP8_MATMUL_MODES:
        raise ValueError(f"fp8_matmul: expected one of {platform.FP8_MATMUL_MODES}, got {fp8_matmul!r}")
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype: expected bfloat16 or float32, got {dtype!r}") from None
    select(attention, platform=platform.target(), dtype=dtype, q_len=1, kv_len=1, q_offset=False)


def load(
    path: str | pathlib.Path | Checkpoint,
    *,
    dtype: str | jnp.dtype = "bfloat16",
    mesh: Mesh | None = None,
    rules: sharding_rules.Rules | None = None,
    attention: str = "auto",
    fp8_matmul: str = "auto",
    before_weights: Callable[[Checkpoint], object] | None = None,
) -> Llama:
    """Load a Llama checkpoint directory into a `Llama` module.

    Every step that can fail fast runs before a weight is read, in this order: the settings
    (`check_backends`), the checkpoint's layout, config and tensor list (`Checkpoint.check`), then
    `before_weights`; a typo or a wrong directory is reported in seconds.

    Args:
      path: a Hugging Face checkpoint directory, a Meta `consolidated.*.pth` directory, or a
        llama-jax Orbax directory (`python -m llama_jax convert SRC DST --to orbax`); or a `Checkpoint`
        already open (the embedded `default_model.DefaultCheckpoint`).
      dtype: parameter and compute dtype ("bfloat16", "float32", ...).
      mesh: place every parameter straight into its sharded home on this mesh (None: one device).
      rules: logical-axis rules for `mesh` (default: `llama_jax.sharding.rules.DEFAULT_RULES`).
      attention: the attention backend (`llama_jax.model.attention.BACKENDS`; "auto" picks by platform and size).
      fp8_matmul: for FP8 checkpoints (HF fbgemm_fp8, Meta fp8_scales), whose FFN weights stay FP8 on the
        device: "dequant" upcasts inside jit (CPU), "fp8" quantizes activations per token and runs
        fp8×fp8 dots (Hopper), "auto" picks by device (`platform.fp8_matmul`). See docs/CONVERT.md.
      before_weights: called with the checked checkpoint before a weight is read (a job reads its
        tokenizer there: a missing tokenizer is reported before the loading, and never hides a
        checkpoint that could not load anyway).
    """
    check_backends(dtype, attention, fp8_matmul)
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    ckpt.check()
    if before_weights is not None:
        before_weights(ckpt)
    return load_from(ckpt, dtype=dtype, mesh=mesh, rules=rules, attention=attention, fp8_matmul=fp8_matmul)


def load_from(
    ckpt: Checkpoint,
    *,
    dtype: str | jnp.dtype = "bfloat16",
    mesh: Mesh | None = None,
    rules: sharding_rules.Rules | None = None,
    attention: str = "auto",
    fp8_matmul: str = "auto",
) -> Llama:
    """Fill a `Llama` of `ckpt.config` from `ckpt` (any source), parameter by parameter, onto `mesh`."""
    dtype = jnp.dtype(dtype)
    fp8_spec = fp8.spec(ckpt, fp8_matmul, mesh.devices.flat[0] if mesh is not None else None)
    if mesh is not None and rules is None:
        rules = sharding_rules.DEFAULT_RULES
    spec = sharding_rules.ShardingSpec(mesh, tuple(rules)) if mesh is not None else None
    options = Options(attention_backend=attention, fp8=fp8_spec, score_labels=ckpt.score_labels, sharding=spec)
    graphdef, state = nnx.split(abstract(ckpt.config, dtype, options))
    flat = dict(nnx.to_flat_state(state))
    by_layer = holds_unstacked(flat.values(), mesh, rules)
    unfilled = set(flat)
    for path, value_dtype, places in fills(ckpt, fp8_spec):
        variable = flat[path]
        unfilled.remove(path)
        shape, names = variable.get_value().shape, variable.get_metadata()["out_sharding"]
        variable.set_value(place(shape, jnp.dtype(value_dtype or dtype), names, places, mesh, rules, by_layer))
    if unfilled:
        raise ValueError(f"internal: no source for parameter(s) {sorted('.'.join(p) for p in unfilled)}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def fills(ckpt: Checkpoint, fp8_spec=None) -> Iterator[tuple[layout.Path, np.dtype | None, list[Place | None]]]:
    """Every model parameter with its dtype (None: the model's) and what builds it: one `Place` for a whole
    parameter, one per layer for a stacked one. The FP8 FFN weights are `fp8.fills`'."""
    n_layers = ckpt.config.n_layers
    for rule in layout.rules_for(ckpt.config, ckpt.score_labels):
        if fp8_spec is not None and rule.path in fp8.PATHS:
            yield from fp8.fills(ckpt, rule.path, fp8_spec)
            continue
        layers = range(n_layers) if rule.per_layer else [None]
        yield rule.path, None, [functools.partial(ckpt.place, rule.path, i) for i in layers]


def target_sharding(
    names: Sequence[str | None], mesh: Mesh | None, rules: sharding_rules.Rules | None, shape: Sequence[int]
) -> Sharding:
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, sharding_rules.logical_to_spec(names, rules, mesh=mesh, shape=shape))


def holds_unstacked(variables, mesh: Mesh | None, rules: sharding_rules.Rules | None) -> bool:
    """Whether a model of these (abstract) parameters holds its layers `Unstacked` on `mesh` (`unstacked.decide`)."""
    layers = []
    for v in variables:
        shape, names = v.get_value().shape, v.get_metadata()["out_sharding"]
        if names and names[0] == "layers":
            sharding = target_sharding(names, mesh, rules, shape)
            layers.append(jax.ShapeDtypeStruct(shape, v.get_value().dtype, sharding=sharding))
    return unstacked.decide(layers)


def place(
    shape: tuple[int, ...],
    dtype: jnp.dtype,
    names: Sequence[str | None],
    places: Sequence[Place | None],
    mesh: Mesh | None,
    rules: sharding_rules.Rules | None,
    by_layer: bool = False,
) -> jax.Array | unstacked.Unstacked:
    """Build one parameter on its devices. A parameter with a leading "layers" axis is stacked from one
    `Place` per layer (None leaves that layer's zeros), written into a preallocated donated buffer, or
    with `by_layer` kept as those layers' own buffers (`Unstacked`)."""
    sharding = target_sharding(names, mesh, rules, shape)
    if names[0] != "layers":
        (whole,) = places
        return whole(jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding))
    layer = jax.ShapeDtypeStruct(tuple(shape[1:]), dtype, sharding=target_sharding(names[1:], mesh, rules, shape[1:]))
    if by_layer:
        rows = (_zeros(layer.shape, dtype, layer.sharding) if build is None else build(layer) for build in places)
        return unstacked.Unstacked(tuple(r if r.dtype == dtype else r.astype(dtype) for r in rows))
    stacked = _zeros(tuple(shape), dtype, sharding)
    for i, build in enumerate(places):
        if build is not None:
            stacked = _set_layer(stacked, build(layer), i)
    return stacked


def _zeros(shape, dtype, sharding: Sharding) -> jax.Array:
    return _zeros_program(tuple(shape), jnp.dtype(dtype), sharding)()


@functools.cache
def _zeros_program(shape, dtype, sharding: Sharding):
    """One compiled program per (shape, dtype, sharding): loading the same model again compiles nothing."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, i: int) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), i, axis=0)


def partition_specs(model: Llama, mesh: Mesh, rules: sharding_rules.Rules) -> nnx.State:
    """The PartitionSpec of every parameter of `model` under `rules` on `mesh`."""
    state = nnx.state(model)
    return jax.tree.map(
        lambda v: sharding_rules.logical_to_spec(
            v.get_metadata()["out_sharding"], rules, mesh=mesh, shape=v.get_value().shape
        ),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
