"""`python -m llama_jax convert SRC DST`: between HF safetensors, Meta consolidated and our Orbax format.

One pipeline, tensor by tensor: reader (`open_checkpoint` / `OrbaxCheckpoint`) → our layout
(`layout.RULES[...].to_ours`) → writer (`to_source` for HF/Meta, stacked for Orbax). The HF writer
hands `write_safetensors` lazy tensors (shape and dtype known up front, bytes computed when that
tensor is written), so the host holds one tensor at a time, never the model.

Output goes to a hidden sibling `.DST.tmp-<pid>` and is renamed to DST only when complete, so a
killed conversion leaves nothing `load` would accept; the next run removes temporaries whose
process is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable, Iterator

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.weights import layout
from llama_jax.weights.meta_writer import meta_params, write_meta
from llama_jax.weights.safetensors_io import write_safetensors

__all__ = ["FORMATS", "convert", "fp8_quantization_config", "meta_params", "parse_size", "save"]

FORMATS = ("hf", "orbax", "meta")
# Files beside an HF checkpoint's weights that a converted HF directory should keep.
_HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


# ---- sources: every parameter of every layer, in our layout ------------------------------------------


class _Source:
    """A checkpoint of any supported format, read in our layout one (parameter, layer) at a time."""

    def __init__(self, path: pathlib.Path):
        from llama_jax.loading import open_checkpoint
        from llama_jax.weights import orbax
        from llama_jax.weights.checkpoint import check

        if path.is_dir() and orbax.is_orbax_checkpoint(path):
            self.ckpt = orbax.OrbaxCheckpoint(path)
            self.ckpt.check()
        else:
            self.ckpt = open_checkpoint(path)
            check(self.ckpt)
            if getattr(self.ckpt, "score_labels", None):
                raise ValueError(f"{path}: a LlamaForSequenceClassification checkpoint (score head); convert "
                                 f"handles causal LM checkpoints only (load it directly: llama_jax.load)")  # fmt: skip
        self.config: LlamaConfig = self.ckpt.config

    def dtype(self, rule: layout.Rule) -> np.dtype:
        if self.ckpt.fmt == "orbax":
            return np.dtype(_np_dtype(self.ckpt.dtypes[".".join(rule.path)]))
        dtype = self.ckpt.dtype(layout.source_names(rule, self.config, self.ckpt.fmt)[0])
        return _np_dtype("bfloat16") if dtype == _np_dtype("float8_e4m3fn") else dtype

    def read(self, rule: layout.Rule, i: int | None) -> np.ndarray:
        """Parameter `rule.path` (layer i of it, for per-layer parameters) in our layout."""
        if self.ckpt.fmt == "orbax":
            return self.ckpt.read(rule.path, i)
        from llama_jax.loading import source_to_ours

        self._release()
        name = layout.source_names(rule, self.config, self.ckpt.fmt)[0 if i is None else i]
        if i in self.fp8_layers and rule.path in _FFN:
            # FP8 weights are written dequantized (w · scale, rounded to bf16) unless the output is FP8
            # too (`fp8`); `--quantize fp8` quantizes other sources.
            dequantized = getattr(self.ckpt, "dequantized_ours", None)  # Meta: each rank with its own scales
            if dequantized is not None:
                w = dequantized(rule, name, i)
            else:
                q, scale = self.fp8(rule, i)
                w = q.astype(np.float32) * scale
            return w.astype(_np_dtype("bfloat16"))
        return np.asarray(source_to_ours(self.ckpt, rule, name))

    @property
    def fp8_layers(self) -> tuple[int, ...]:
        if self.ckpt.fmt == "orbax" or not getattr(self.ckpt, "quantization", None):
            return ()
        return self.ckpt.fp8_layers()

    def fp8(self, rule: layout.Rule, i: int) -> tuple[np.ndarray, np.ndarray]:
        """An FP8 source's FFN weight `rule` of layer i as stored: (fp8 [in, out] ours, float32 scale [out])."""
        from llama_jax.loading import source_to_ours

        self._release()
        name = layout.source_names(rule, self.config, self.ckpt.fmt)[i]
        return np.asarray(source_to_ours(self.ckpt, rule, name)), self.ckpt.fp8_scale(rule, i)

    def _release(self) -> None:
        """Unmap the pages of tensors already written: read-only file pages touched through a memory
        map count in this process's resident set until unmapped, and would add up to the model."""
        release = getattr(self.ckpt, "release", None)  # memory-mapped readers (HF safetensors) have it
        if release is not None:
            release()


def _np_dtype(name) -> np.dtype:
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, str(name))) if str(name) in ("bfloat16", "float8_e4m3fn") else np.dtype(name)


class _Lazy:
    """A tensor whose shape and dtype are known now and whose bytes are computed when asked for."""

    def __init__(self, shape, dtype, compute: Callable[[], np.ndarray], on_read: Callable[[], None] = lambda: None):
        self.shape, self.dtype, self._compute, self._on_read = tuple(shape), np.dtype(dtype), compute, on_read

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        array = np.asarray(self._compute(), dtype=self.dtype)
        if array.shape != self.shape:
            raise ValueError(f"internal layout error: built {array.shape}, expected {self.shape}")
        self._on_read()
        return array


# ---- writers ---------------------------------------------------------------------------------------


def _fp8_layers(config: LlamaConfig) -> range:
    """FFN layers the FP8 release quantizes: all but the first and the last (REFERENCE.md 3.1)."""
    return range(1, config.n_layers - 1)


_FFN = {("layers", "feed_forward", "w1"), ("layers", "feed_forward", "w3"), ("layers", "feed_forward", "w2")}


def _hf_tensors(src: _Source, dtype, quantize: str | None, bar) -> list[tuple[str, _Lazy]]:
    """Every HF tensor as a lazy entry, in HF's order (embeddings, layer by layer, norm, head)."""
    from llama_jax import quant

    config = src.config
    rules = layout.rules_for(config)
    fp8_layers = set(_fp8_layers(config)) if quantize == "fp8" else set()
    out: list[tuple[str, _Lazy]] = []

    def entry(rule: layout.Rule, i: int | None):
        name = rule.hf if i is None else rule.hf.format(i=i)
        shape = rule.source_shape(config)
        tensor_dtype = np.dtype(dtype) if dtype is not None else src.dtype(rule)

        def hf_layout():
            return rule.to_source(src.read(rule, i), config)

        if i in fp8_layers and rule.path in _FFN:
            memo: dict[str, np.ndarray] = {}

            def weight():
                # weight and weight_scale come from one quantization; the scale, written next, reuses it.
                # An FP8 source's weight and scale are kept as stored.
                if i in src.fp8_layers:
                    q, scale = src.fp8(rule, i)
                    memo["scale"] = scale.reshape(-1, 1).astype(np.float32)
                    return rule.to_source(q, config)
                q, memo["scale"] = quant.quantize_rowwise_np(hf_layout())
                return q

            def scale():
                return memo.pop("scale") if "scale" in memo else quant.quantize_rowwise_np(hf_layout())[1]

            out.append((name, _Lazy(shape, _np_dtype("float8_e4m3fn"), weight, bar)))
            out.append(
                (name[: -len(".weight")] + ".weight_scale", _Lazy((shape[0], 1), np.float32, scale, lambda: None))
            )
        else:
            out.append((name, _Lazy(shape, tensor_dtype, hf_layout, bar)))

    by_path = {r.path: r for r in rules}
    for rule in rules:
        if not rule.per_layer and rule.path == ("tok_embeddings",):
            entry(rule, None)
    for i in range(config.n_layers):
        for rule in rules:
            if rule.per_layer:
                entry(rule, i)
    for path in (("norm", "weight"), ("output",)):
        if path in by_path:
            entry(by_path[path], None)
    return out


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '64KiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {size!r}; use e.g. 5GB, 500MB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


def _write_hf(src: _Source, out: pathlib.Path, dtype, quantize, max_shard_size: int, bar) -> None:
    config = src.config
    tensors = _hf_tensors(src, dtype, quantize, bar)
    shards: list[list[tuple[str, _Lazy]]] = [[]]
    size = 0
    for name, t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += t.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], metadata=metadata)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / file, shard, metadata=metadata)
            weight_map.update({name: file for name, _ in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for _, t in tensors)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = config.to_hf_config()
    stored = {t.dtype.name for _, t in tensors if t.dtype.name != "float8_e4m3fn" and t.shape[-1] != 1}
    hf["torch_dtype"] = "bfloat16" if "bfloat16" in stored else sorted(stored)[0]
    if quantize == "fp8":
        hf["quantization_config"] = fp8_quantization_config(config)
    # config.json last: before it exists the directory is no HF checkpoint.
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    if src.ckpt.fmt == "hf":
        for side in _HF_SIDE_FILES:
            if (src.ckpt.path / side).is_file():
                shutil.copyfile(src.ckpt.path / side, out / side)


def fp8_quantization_config(config: LlamaConfig) -> dict:
    """HF's fbgemm_fp8 config: every linear module that stays bf16, by full module path."""
    keep = ["lm_head"]
    for i in range(config.n_layers):
        keep += [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkvo"]
        if i not in _fp8_layers(config):
            keep += [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": keep}


def _write_orbax(src: _Source, out: pathlib.Path, dtype, bar) -> None:
    from llama_jax.weights.orbax import OrbaxWriter

    config = src.config
    writer = OrbaxWriter(out, config)
    for rule in layout.rules_for(config):
        tensor_dtype = np.dtype(dtype) if dtype is not None else src.dtype(rule)
        for i in range(config.n_layers) if rule.per_layer else [None]:
            writer.write(rule.path, i, np.asarray(src.read(rule, i), dtype=tensor_dtype))
            bar()
    writer.finish()


# ---- atomic output ---------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temporaries(dst: pathlib.Path) -> Iterator[tuple[pathlib.Path, int]]:
    for p in dst.parent.glob(f".{dst.name}.tmp-*"):
        suffix = p.name.rsplit("-", 1)[-1]
        if suffix.isdigit():
            yield p, int(suffix)


def _clean_stale(dst: pathlib.Path) -> None:
    """Remove temporaries left by killed conversions into `dst` (their process no longer runs)."""
    for p, pid in _temporaries(dst):
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str = "hf",
    dtype: str | None = None,
    quantize: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    mp: int = 1,
) -> pathlib.Path:
    """Convert checkpoint `src` (HF, Meta or our Orbax dir) into `dst` in format `to`. Returns `dst`.

    dtype: None keeps every tensor's stored dtype (bit-exact); "bfloat16"/"float32" casts.
    quantize: "fp8" writes the FFN of layers 1..L-2 as rowwise FP8: HF's fbgemm_fp8 layout (to="hf") or Meta's
      `fp8_scales_{rank}.pt` layout (to="meta"). An FP8 source keeps its FP8 values and scales.
    mp: model-parallel ranks for to="meta" (`consolidated.00.pth` ... split as fairscale splits them).
    """
    src = pathlib.Path(src).absolute()
    if pathlib.Path(dst).absolute() == src:
        raise ValueError("source and destination are the same directory")
    options = dict(to=to, dtype=dtype, quantize=quantize, max_shard_size=max_shard_size, overwrite=overwrite, mp=mp)
    _check(dst, **options)
    source = _Source(src)  # checks the whole source before anything is written
    return _write(source, dst, **options, progress=progress)


def save(
    model, dst: str | os.PathLike, *, to: str = "orbax", tokenizer=None, progress: bool = True, **options
) -> pathlib.Path:
    """Write an in-memory `Llama` (a fine-tuned or merged-LoRA model) to `dst`, as `convert` would.

    `options` are `convert`'s (dtype, quantize, max_shard_size, overwrite). The same writers and the
    same atomic rename; tensors are fetched from the devices one (parameter, layer) at a time.
    `tokenizer`: a tokenizer.model to copy in, so the directory is a whole checkpoint (`--checkpoint`
    of the CLI finds it). Models with unmerged adapters are refused (`llama_jax.lora.merge` first).
    """
    _check(dst, to=to, **options)
    if tokenizer is not None and not pathlib.Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer}")
    return _write(_ModelSource(model), dst, to=to, progress=progress, side_files={"tokenizer.model": tokenizer},
                  **options)  # fmt: skip


class _ModelSource:
    """An in-memory `Llama` read like a checkpoint: one (parameter, layer) in our layout at a time."""

    class _NoFiles:
        fmt = "model"

    fp8_layers = ()  # models with FP8 weights are refused below

    def __init__(self, model):
        if getattr(model, "lora", None) is not None:
            raise ValueError("the model has LoRA adapters: merge them first (llama_jax.lora.merge(model))")
        if getattr(model, "fp8", None) is not None:
            raise ValueError("saving an FP8-loaded model is not supported: convert its source checkpoint instead")
        self.model, self.config, self.ckpt = model, model.config, self._NoFiles()

    def _param(self, rule: layout.Rule):
        node = self.model
        for part in rule.path:
            node = getattr(node, part)
        return node

    def dtype(self, rule: layout.Rule) -> np.dtype:
        return _np_dtype(self._param(rule).dtype)

    def read(self, rule: layout.Rule, i: int | None) -> np.ndarray:
        import jax

        value = self._param(rule)[...]
        return np.asarray(jax.device_get(value if i is None else value[i]))


def _check(dst, *, to: str, dtype=None, quantize=None, overwrite: bool = False, max_shard_size="5GB", mp=1) -> None:
    """Refuse bad options and a non-empty destination before anything is read or written."""
    if to not in FORMATS:
        raise ValueError(f"--to {to!r}: expected one of {FORMATS}")
    if quantize not in (None, "fp8"):
        raise ValueError(f"--quantize {quantize!r}: only 'fp8' is supported")
    if quantize and to == "orbax":
        raise ValueError("--quantize fp8 writes the HF fbgemm_fp8 or Meta fp8_scales layout; use --to hf or --to meta")
    if not isinstance(mp, int) or mp < 1 or (mp > 1 and to != "meta"):
        raise ValueError(f"--mp {mp!r}: a positive model-parallel count, for --to meta only")
    if dtype is not None and dtype not in ("bfloat16", "float32"):
        raise ValueError(f"--dtype {dtype!r}: expected bfloat16 or float32")
    parse_size(max_shard_size)
    dst = pathlib.Path(dst).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"destination {dst} exists and is not empty; pass --overwrite to replace it")


def _write(source, dst, *, to, dtype=None, quantize=None, max_shard_size="5GB", overwrite=False, progress=True,
           side_files=None, mp=1):  # fmt: skip
    """Write every tensor of `source` (and copy `side_files`: name → path or None) into a temporary
    sibling of `dst`, then rename it into place."""
    from tqdm import tqdm

    dst = pathlib.Path(dst).absolute()
    dtype = _np_dtype(dtype) if dtype else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    config = source.config
    total = sum(config.n_layers if r.per_layer else 1 for r in layout.rules_for(config))
    try:
        with tqdm(total=total, desc=f"convert → {to}", unit="tensor", disable=not progress) as pbar:
            bar = lambda: pbar.update(1)  # noqa: E731
            if to == "hf":
                _write_hf(source, tmp, dtype, quantize, parse_size(max_shard_size), bar)
            elif to == "orbax":
                _write_orbax(source, tmp, dtype, bar)
            else:
                write_meta(source, tmp, dtype, quantize, mp, bar)
        for name, path in (side_files or {}).items():
            if path is not None:
                shutil.copyfile(path, tmp / name)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ---- CLI -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint directory: Hugging Face, Meta consolidated or llama-jax Orbax")
    parser.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--to", choices=FORMATS, default="hf", help="output format (default: hf)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="cast every tensor (default: keep the stored dtype, bit-exact)")  # fmt: skip
    parser.add_argument("--quantize", choices=("fp8",), default=None,
                        help="rowwise FP8 FFN weights of layers 1..L-2 (HF fbgemm_fp8 or Meta fp8_scales layout)")  # fmt: skip
    parser.add_argument("--mp", type=int, default=1, help="model-parallel shards for --to meta (default 1)")
    parser.add_argument("--max-shard-size", default="5GB", help="HF shard size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert between HF, Meta and Orbax checkpoints",
                                   description=__doc__.split("\n\n")[0])  # fmt: skip
    add_arguments(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        out = convert(
            args.src, args.dst, to=args.to, dtype=args.dtype, quantize=args.quantize,
            max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=not args.no_progress, mp=args.mp,
        )  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m llama_jax.convert", description=__doc__.split("\n\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
