"""`load(path)`: recognise a checkpoint, check it against its config, and stream it onto devices.

Tensor by tensor: each parameter is built with `jax.make_array_from_callback`, whose callback
hands every device only its own slice of a memory-mapped source tensor. Per-layer tensors are
written one layer at a time into a preallocated, donated stacked buffer, so the host never holds
more than one layer's tensor (a transformed view of the memory map) and no device holds a
second copy of a parameter.
"""

from __future__ import annotations

import functools
import mmap
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding

from llama_jax import platform, quant
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
    attention: str = "auto",
    fp8_matmul: str = "auto",
) -> Llama:
    """Load a Llama checkpoint directory into a `Llama` module.

    Args:
      path: a Hugging Face checkpoint directory, a Meta `consolidated.*.pth` directory, or a
        llama-jax Orbax directory (`python -m llama_jax convert SRC DST --to orbax`).
      dtype: parameter and compute dtype ("bfloat16", "float32", ...).
      mesh: place every parameter straight into its sharded home on this mesh (None: one device).
      rules: logical-axis rules for `mesh` (default: `sharding.rules.DEFAULT_RULES`).
      attention: the attention backend (`llama_jax.attention.BACKENDS`; "auto" picks by platform and size).
      fp8_matmul: for FP8 checkpoints (HF fbgemm_fp8), whose FFN weights stay FP8 on the device:
        "dequant" upcasts inside jit (CPU), "fp8" quantizes activations per token and runs
        fp8×fp8 dots (Hopper), "auto" picks by device (`platform.fp8_matmul`). See docs/CONVERT.md.
    """
    from llama_jax.weights import orbax

    if fp8_matmul not in platform.FP8_MATMUL_MODES:
        raise ValueError(f"fp8_matmul={fp8_matmul!r}: expected one of {platform.FP8_MATMUL_MODES}")
    if pathlib.Path(path).is_dir() and orbax.is_orbax_checkpoint(pathlib.Path(path)):
        return orbax.load_orbax(path, dtype=dtype, mesh=mesh, rules=rules, attention=attention)
    ckpt = open_checkpoint(path)
    check(ckpt)
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
    dtype = jnp.dtype(dtype)
    config = ckpt.config
    fp8_layers = ckpt.fp8_layers() if getattr(ckpt, "quantization", None) else ()
    fp8 = None
    if fp8_layers:
        ub = float(ckpt.quantization.get("activation_scale_ub", quant.ACTIVATION_SCALE_UB))
        matmul = platform.fp8_matmul(fp8_matmul, mesh.devices.flat[0] if mesh is not None else None)
        fp8 = quant.Fp8Spec(fp8_layers, matmul=matmul, activation_scale_ub=ub)
    score_labels = getattr(ckpt, "score_labels", None)
    abstract = nnx.eval_shape(
        lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0), attention=attention, fp8=fp8, score_labels=score_labels)
    )
    graphdef, state = nnx.split(abstract)
    if mesh is not None and rules is None:
        rules = sharding_rules.DEFAULT_RULES
    flat = dict(nnx.to_flat_state(state))
    for rule in layout.rules_for(config, score_labels):
        if fp8 is not None and rule.path in _FFN:
            _place_fp8_ffn(ckpt, rule, fp8, flat, dtype, mesh, rules)
            continue
        variable = flat[rule.path]
        names = variable.get_metadata()["out_sharding"]
        sources = [lambda n=n, r=rule: source_to_ours(ckpt, r, n) for n in layout.source_names(rule, config, ckpt.fmt)]
        variable.set_value(place(variable.get_value().shape, dtype, names, sources, mesh, rules))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if mesh is not None:
        model.sharding = sharding_rules.ShardingSpec(mesh, tuple(rules))
    return model


_FFN = {("layers", "feed_forward", w) for w in ("w1", "w3", "w2")}


def _place_fp8_ffn(ckpt, rule, fp8, flat, dtype, mesh, rules) -> None:
    """One FFN weight of an FP8 checkpoint: FP8 + scales for quantized layers, `dense_ffn` for the rest.

    The stacked FP8 tensor has a slot for every layer (unquantized layers' slots hold zeros and are
    never read), so the scan over layers stays uniform; the unquantized layers' weights go to
    `dense_ffn`, stacked over those layers only, in `dtype`.
    """
    config = ckpt.config
    names = layout.source_names(rule, config, ckpt.fmt)
    w = rule.path[-1]

    def put(path, sources, value_dtype):
        variable = flat[path]
        shape = variable.get_value().shape
        out_names = variable.get_metadata()["out_sharding"]
        variable.set_value(place(shape, jnp.dtype(value_dtype), out_names, sources, mesh, rules))

    layer_shape = flat[rule.path].get_value().shape[1:]
    out_dim = layer_shape[-1]
    quantized = set(fp8.quantized_layers)
    put(rule.path, [
        (lambda n=n: source_to_ours(ckpt, rule, n)) if i in quantized else (lambda: np.zeros(layer_shape, quant.FP8))
        for i, n in enumerate(names)
    ], quant.FP8)  # fmt: skip
    put(rule.path[:-1] + (w + "_scale",), [
        (lambda i=i: ckpt.fp8_scale(rule, i).reshape(out_dim)) if i in quantized
        else (lambda: np.ones((out_dim,), np.float32))
        for i in range(config.n_layers)
    ], jnp.float32)  # fmt: skip
    dense = fp8.dense_layers(config.n_layers)
    if dense:
        put(("dense_ffn", w), [lambda n=names[i]: source_to_ours(ckpt, rule, n) for i in dense], dtype)


def source_to_ours(ckpt: Checkpoint, rule: layout.Rule, name: str) -> np.ndarray:
    """One source tensor in our layout, as a view (or a lazy merge of Meta's per-rank pieces) that a
    device slices without the whole tensor being read."""
    read_ours = getattr(ckpt, "read_ours", None)  # Meta: per-rank pieces moved into our layout, joined lazily
    if read_ours is not None:
        return read_ours(rule, name)
    return rule.to_ours(ckpt.read(name), ckpt.config)


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
    placed = jax.make_array_from_callback(tuple(shape), sharding, lambda index: np.asarray(array[index], dtype=dtype))
    _release_mapped_pages(array)
    return placed


def _release_mapped_pages(array: np.ndarray) -> None:
    """Drop the memory-mapped checkpoint pages behind `array` from this process's resident set.

    Every device has its slice by now. Left mapped, each page read stays resident until the file
    is closed, so RSS climbs by the whole checkpoint while loading (reclaimable page cache, but
    counted against the process: 0.9 GB peak for a 0.53 GB checkpoint in tests/test_sharding.py).
    The mapping is read-only and shared: a page touched again faults back in from the file.
    """
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    mapped = base.obj if isinstance(base, memoryview) else base
    if not isinstance(mapped, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or array.size == 0:
        return
    start = np.frombuffer(mapped, np.uint8, count=1).ctypes.data
    low, high = np.lib.array_utils.byte_bounds(array)
    begin = (low - start) // mmap.PAGESIZE * mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, begin, min(high - start, len(mapped)) - begin)


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
        lambda v: sharding_rules.logical_to_spec(
            v.get_metadata()["out_sharding"], rules, mesh=mesh, shape=v.get_value().shape
        ),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
