"""`python -m llama_jax convert SRC DST`: any checkpoint (HF, Meta, FP8, our Orbax) into HF, Meta or Orbax.

One pipeline for every pair: `open_checkpoint(SRC)` gives a `weights.checkpoint.Checkpoint`, checked
whole before anything is written; a writer then reads it in our layout one (parameter, layer) at a
time (`fp8.unquantized`: FP8 weights dequantized unless the output keeps FP8) and streams it out:
`weights/hf_writer.py`, `weights/orbax.py`, `weights/meta_writer.py`. The host holds one tensor at a
time, never the model. `save` writes an in-memory `Llama` through the same writers. The source's
tokenizer goes along (`tokenizer_files`), so every converted directory runs with `--checkpoint DST`.

Output goes to a hidden sibling `.DST.tmp-<pid>` and is renamed to DST only when complete
(`atomic.directory`), so a killed conversion leaves nothing `load` would accept; the next run removes
temporaries whose process is gone.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import sys
import warnings

import ml_dtypes
import numpy as np

from llama_jax.text.tokenizer import TOKENIZER_PLACES, find_tokenizer
from llama_jax.weights import atomic, fp8, layout
from llama_jax.weights.checkpoint import Checkpoint, ModelCheckpoint
from llama_jax.weights.hf_writer import write_hf
from llama_jax.weights.loading import open_checkpoint
from llama_jax.weights.meta_writer import meta_params, write_meta
from llama_jax.weights.orbax import write_orbax

__all__ = [
    "FORMATS",
    "HF_TOKENIZER_FILES",
    "convert",
    "fp8_quantization_config",
    "meta_params",
    "parse_size",
    "save",
    "tokenizer_files",
]

FORMATS = ("hf", "orbax", "meta")
# Hugging Face's tokenizer and generation files: `convert` carries them as they are (`tokenizer_files`).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
fp8_quantization_config = fp8.hf_quantization_config  # the name this module has always exported


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '64KiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {size!r}; use e.g. 5GB, 500MB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


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
    ckpt = open_checkpoint(src)
    ckpt.check()  # the whole source, before anything is written
    if ckpt.score_labels:
        raise ValueError(
            f"{src}: a LlamaForSequenceClassification checkpoint (score head); convert handles causal LM "
            f"checkpoints only (load it directly: llama_jax.load)"
        )
    return _write(ckpt, dst, **options, progress=progress, side_files=tokenizer_files(src, to, dst))


def tokenizer_files(src: pathlib.Path, to: str, dst) -> dict[str, pathlib.Path]:
    """The tokenizer files a conversion carries, name in the output → source file, copied as they are.

    The `tokenizer.model` that `find_tokenizer` finds for `src`, to the output's root (where every layout
    we write keeps it: HF's root, beside Meta's params.json, our Orbax root), so `--checkpoint DST` runs;
    into HF and Orbax outputs also HF's own tokenizer and generation files where `src` has them (Meta's
    layout has no place for them). Without a tokenizer.model, a warning says what DST will need.
    """
    found = find_tokenizer(src)
    if found is None:
        looked = " and ".join(str(src / place) for place in TOKENIZER_PLACES)
        warnings.warn(
            f"{src} has no tokenizer.model (looked for {looked}): {dst} will have none, so running it needs "
            f"--tokenizer PATH (or copy the model's tokenizer.model into it)",
            stacklevel=3,
        )
    files = {} if found is None else {"tokenizer.model": found}
    if to != "meta":
        files |= {name: src / name for name in HF_TOKENIZER_FILES if (src / name).is_file()}
    return files


def save(
    model, dst: str | os.PathLike, *, to: str = "orbax", tokenizer=None, progress: bool = True, **options
) -> pathlib.Path:
    """Write an in-memory `Llama` (a fine-tuned or merged-LoRA model) to `dst`, as `convert` would.

    `options` are `convert`'s (dtype, quantize, max_shard_size, overwrite). The same writers and the
    same atomic rename; tensors are fetched from the devices one (parameter, layer) at a time.
    `tokenizer`: a tokenizer.model to copy in, so the directory is a whole checkpoint (`--checkpoint`
    of the CLI finds it). Models with unmerged adapters are refused (`llama_jax.weights.lora.merge` first).
    """
    _check(dst, to=to, **options)
    if tokenizer is not None and not pathlib.Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer}")
    side_files = {"tokenizer.model": tokenizer}
    return _write(ModelCheckpoint(model), dst, to=to, progress=progress, side_files=side_files, **options)


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


def _write(
    ckpt: Checkpoint,
    dst,
    *,
    to,
    dtype=None,
    quantize=None,
    max_shard_size="5GB",
    overwrite=False,
    progress=True,
    side_files=None,
    mp=1,
) -> pathlib.Path:
    """Every tensor of `ckpt` (and `side_files`: name → path or None) into `dst`, atomically."""
    from tqdm import tqdm

    dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype) if dtype else None
    config = ckpt.config
    total = sum(config.n_layers if r.per_layer else 1 for r in layout.rules_for(config))
    with atomic.directory(dst) as tmp:
        with tqdm(total=total, desc=f"convert → {to}", unit="tensor", disable=not progress) as pbar:
            bar = lambda: pbar.update(1)  # noqa: E731
            if to == "hf":
                write_hf(ckpt, tmp, dtype, quantize, parse_size(max_shard_size), bar)
            elif to == "orbax":
                write_orbax(ckpt, tmp, dtype, bar)
            else:
                write_meta(ckpt, tmp, dtype, quantize, mp, bar)
        for name, path in (side_files or {}).items():
            if path is not None:
                shutil.copyfile(path, tmp / name)
    return pathlib.Path(dst).absolute()


# ---- CLI -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint directory: Hugging Face, Meta consolidated or llama-jax Orbax")
    parser.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--to", choices=FORMATS, default="hf", help="output format (default: hf)")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="cast every tensor (default: keep the stored dtype, bit-exact)",
    )
    parser.add_argument(
        "--quantize",
        choices=("fp8",),
        default=None,
        help="rowwise FP8 FFN weights of layers 1..L-2 (HF fbgemm_fp8 or Meta fp8_scales layout)",
    )
    parser.add_argument("--mp", type=int, default=1, help="model-parallel shards for --to meta (default 1)")
    parser.add_argument("--max-shard-size", default="5GB", help="HF shard size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert between HF, Meta and Orbax checkpoints", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            out = convert(
                args.src,
                args.dst,
                to=args.to,
                dtype=args.dtype,
                quantize=args.quantize,
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                mp=args.mp,
            )
        except (FileExistsError, FileNotFoundError, ValueError) as e:
            print(f"convert: error: {e}", file=sys.stderr)
            return 2
    for warning in caught:
        print(f"convert: warning: {warning.message}", file=sys.stderr)
    print(out)
    return 0


if (
    __name__ == "__main__"
):  # `python -m llama_jax.jobs.convert ...`: the same command as `python -m llama_jax convert ...`
    _parser = argparse.ArgumentParser(prog="python -m llama_jax.jobs.convert", description=__doc__.split("\n\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
