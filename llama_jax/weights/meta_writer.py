"""Writing Meta checkpoints: `params.json` + `consolidated.NN.pth` for any model-parallel count, bf16 or FP8.

Streaming: each tensor is read once, split into its ranks' pieces along fairscale's axis
(`layout.META_SPLIT_AXIS`), and each piece is written to its own staging file; `torch.save` then
writes every rank from file-backed tensors (`torch.from_file`), so the host holds one tensor at a
time, never a shard's state dict. Staging costs one extra shard's worth of disk per rank, freed as
each rank is written.

More ranks than KV heads: every KV head is repeated consecutively so each rank holds whole heads,
and `n_kv_heads` in params.json counts the copies, as llama-models' `checkpoint.reshard_mp` does
(`repeat_qk_qv`) and as the 405B MP16 release ships. Our reader merges them back.

A Llama 1/2 model (`config.is_llama2_config`) is written as Meta released Llama 2: its params.json
keys only (`vocab_size: -1`, no `rope_theta`), the embedding split along the model dimension, and
`rope.freqs` (`meta.rope_freqs`, bf16) in every shard, so Meta's Llama 2 code and transformers'
conversion script read it as they read the release.

FP8 (`quantize="fp8"`): FFN weights of the release's layers 1..L-2 (`fp8.release_layers`) in
float8_e4m3fn with `fp8_scales_{rank}.pt` (`"{layer}_feed_forward.{w}_{rank}"`, one float32 per output
row of that rank's piece), the layout llama-models' `llama3/quantization/loader.py` reads. A bf16
source is quantized per rank piece, as its `quantize_fp8` quantizes each rank's weight; an FP8
source's values and scales are kept as they are.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np

from llama_jax.model import quant
from llama_jax.model.config import LlamaConfig, ffn_hidden_dim, is_llama2_config
from llama_jax.weights import atomic, fp8, layout
from llama_jax.weights.checkpoint import Checkpoint
from llama_jax.weights.meta import ROPE_FREQS, fp8_scale_key, rope_freqs


def write_meta(ckpt: Checkpoint, out: pathlib.Path, dtype, quantize: str | None, mp: int, bar) -> None:
    """Every tensor of `ckpt` into `out` as `mp` Meta shards (`dtype` None: as stored; FP8 dequantized)."""
    import torch

    config = ckpt.config
    if config.n_heads % mp:
        raise ValueError(f"--mp {mp}: n_heads={config.n_heads} is not a multiple of it")
    repeat = mp // config.n_kv_heads if config.n_kv_heads < mp else 1
    if (config.n_kv_heads * repeat) % mp:
        raise ValueError(f"--mp {mp}: n_kv_heads={config.n_kv_heads} cannot be split or repeated over {mp} ranks")
    quantized = set(fp8.release_layers(config.n_layers)) if quantize == "fp8" else set()
    llama2 = is_llama2_config(config)
    staging = out / ".staging"
    names: list[list[tuple[str, pathlib.Path, tuple, str]]] = [[] for _ in range(mp)]
    scales: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for rule in layout.rules_for(config):
        tensor_dtype = np.dtype(dtype) if dtype is not None else fp8.unquantized_dtype(ckpt, rule.path)
        for i in range(config.n_layers) if rule.per_layer else [None]:
            name = rule.meta if i is None else rule.meta.format(i=i)
            ckpt.release()
            if i in quantized and rule.path in fp8.PATHS:
                pieces, piece_scales = _fp8_pieces(ckpt, rule, i, mp)
                for r, s in enumerate(piece_scales):
                    scales[r][fp8_scale_key(i, rule.path[-1], r)] = torch.from_numpy(s)
            else:
                pieces = _pieces(fp8.unquantized(ckpt, rule.path, i), rule, config, mp, repeat, llama2)
                pieces = [p.astype(tensor_dtype) for p in pieces]
            for r, piece in enumerate(pieces):
                file = staging / f"{r:02d}" / f"{len(names[r]):05d}.bin"
                file.parent.mkdir(parents=True, exist_ok=True)
                np.ascontiguousarray(piece).tofile(file)
                names[r].append((name, file, piece.shape, piece.dtype.name))
            bar()
    for r in range(mp):
        state = {name: _from_file(file, shape, dtype_name) for name, file, shape, dtype_name in names[r]}
        if llama2:
            state[ROPE_FREQS] = torch.from_numpy(rope_freqs(config).view(np.int16)).view(torch.bfloat16)
        torch.save(state, out / f"consolidated.{r:02d}.pth")
        del state
        shutil.rmtree(staging / f"{r:02d}")
        if quantized:
            torch.save(scales[r], out / f"fp8_scales_{r}.pt")
    shutil.rmtree(staging, ignore_errors=True)
    params = meta_params(config)
    if "n_kv_heads" in params:  # absent only from a Llama 2 MHA params.json, whose heads never need repeating
        params["n_kv_heads"] = config.n_kv_heads * repeat
    atomic.write_atomically(out / "params.json", json.dumps(params, indent=2))


def _meta_layout(w_ours: np.ndarray, rule: layout.Rule, config: LlamaConfig) -> np.ndarray:
    w = rule.to_source(w_ours, config)
    if rule.rotary_heads is not None:
        w = layout.hf_to_meta_rows(w, rule.rotary_heads(config))
    return w


def _pieces(
    w_ours: np.ndarray, rule: layout.Rule, config: LlamaConfig, mp: int, repeat: int, llama2: bool
) -> list[np.ndarray]:
    """One tensor in Meta's layout, split over `mp` ranks (KV heads repeated `repeat` times first)."""
    w = _meta_layout(w_ours, rule, config)
    if repeat > 1 and rule.path[-1] in ("wk", "wv"):
        w = np.repeat(w.reshape(config.n_kv_heads, config.head_dim, -1), repeat, axis=0).reshape(-1, w.shape[1])
    axis = layout.meta_split_axis(rule.meta.replace("{i}", "0"), llama2)
    return [w] * mp if axis is None else np.split(w, mp, axis=axis)


def _fp8_pieces(ckpt: Checkpoint, rule: layout.Rule, i: int, mp: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Rank pieces of an FP8 FFN weight and each piece's per-row scale (Meta's source layout [out, in])."""
    config = ckpt.config
    axis = layout.meta_split_axis(rule.meta)
    if i in ckpt.fp8_layers:  # an FP8 source's values and scales are kept as stored
        q = rule.to_source(np.asarray(ckpt.tensor(rule.path, i)), config)
        scale = ckpt.fp8_scale(rule.path, i)
        if axis == 0:  # rows split: each rank keeps its rows' scales
            return np.split(q, mp, axis=0), [s.astype(np.float32) for s in np.split(scale, mp)]
        return np.split(q, mp, axis=1), [scale.astype(np.float32)] * mp  # one scale covers every rank's slice
    w = rule.to_source(fp8.unquantized(ckpt, rule.path, i), config)
    pieces = [quant.quantize_rowwise_np(p) for p in np.split(w, mp, axis=axis)]
    return [q for q, _ in pieces], [s.reshape(-1) for _, s in pieces]


def _from_file(file: pathlib.Path, shape: tuple, dtype_name: str):
    import torch

    torch_dtype = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}.get(dtype_name) or getattr(
        torch, dtype_name
    )
    count = int(np.prod(shape, dtype=np.int64))
    return torch.from_file(str(file), shared=False, size=count, dtype=torch_dtype).reshape(shape)


def meta_params(config: LlamaConfig) -> dict:
    """Meta's `params.json` for `config`; the FFN width is given the way Meta derives it. A Llama 1/2
    model gets the release's keys only (`vocab_size: -1`: the reader takes the embedding's rows)."""
    if config.head_dim != config.dim // config.n_heads:
        raise ValueError(f"Meta's params.json cannot express head_dim={config.head_dim} != dim // n_heads")
    rope = config.rope_scaling
    if rope is not None and (rope.low_freq_factor, rope.high_freq_factor, rope.original_max_position_embeddings) != (
        1.0,
        4.0,
        8192,
    ):
        raise ValueError("Meta's params.json can only express llama3 rope scaling with Meta's constants")
    hidden = int(2 * (4 * config.dim) / 3)
    candidates = [(m, mult) for m in (1024, 256, 4096) for mult in (None, 1.3, 1.5, 1.2, 1.0)]
    candidates.append((config.ffn_dim, config.ffn_dim / hidden))  # always exact: rounds up to ffn_dim
    multiple_of, multiplier = next((m, x) for m, x in candidates if ffn_hidden_dim(config.dim, x, m) == config.ffn_dim)
    if is_llama2_config(config):  # the release's keys, in its order; 7B/13B (MHA) state no n_kv_heads
        params = {
            "dim": config.dim,
            "multiple_of": multiple_of,
            "ffn_dim_multiplier": multiplier,
            "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads if config.n_kv_heads != config.n_heads else None,
            "n_layers": config.n_layers,
            "norm_eps": config.norm_eps,
            "vocab_size": -1,
        }
        return {k: v for k, v in params.items() if v is not None}
    params = {
        "dim": config.dim,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "vocab_size": config.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "use_scaled_rope": rope is not None,
        "max_seq_len": config.max_seq_len,
        "tie_embeddings": config.tie_embeddings,
    }
    if rope is not None:
        params["rope_scaling_factor"] = rope.factor
    return params
