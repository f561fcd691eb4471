"""Meta checkpoints: `params.json` + `consolidated.00.pth` ... `consolidated.NN.pth` (+ `fp8_scales_N.pt`).

Each shard is one model-parallel rank, split along the axis fairscale's layer split it
(`layout.META_SPLIT_AXIS`; Llama 1/2's `ParallelEmbedding` splits the embedding along the model
dimension, Llama 3's `VocabParallelEmbedding` along the vocabulary). Every rank's piece is moved
into our layout on its own (fairscale splits whole heads, so the q/k row permutation works per
piece) and the pieces are joined lazily (`lazy.Concat`): a device reads only the slice it keeps,
from the shard(s) that hold it. Files are opened with `torch.load(weights_only=True, mmap=True)`:
no code in an untrusted file runs, and bytes are read only when sliced.

Released variants handled here (llama-models `sku_list.py`, `checkpoint.py`, `quantization/loader.py`):
- Llama 1/2: `vocab_size: -1`, no `rope_theta` (see `LlamaConfig.from_meta_params`); the vocabulary
  is the embedding's row count. Every shard also holds `rope.freqs`, the bf16 inverse frequencies a
  buffer of Meta's training code saved (Meta's own loader passes `strict=False`; no model reads it).
  It is checked, not skipped: it must be the frequencies of the config's θ (`rope_freqs`), else the
  params.json and the weights disagree about the rotary base.
- 405B bf16 MP16: `n_kv_heads: 16`, each real KV head stored twice consecutively so every rank
  holds one (llama-models `checkpoint.reshard_mp`, `repeat_qk_qv`). Detected from layer 0 and
  merged back to the real heads; every read checks the copies are identical.
- FP8 405B: FFN weights of layers 1..L-2 in float8_e4m3fn, with `fp8_scales_{rank}.pt` holding
  `"{layer}_feed_forward.{w1|w3|w2}_{rank}"` rowwise scales (llama-models
  `llama3/quantization/loader.py`). Loaded into the HF release's representation: one float32
  scale per output channel. w2 is split along its input, so each rank scaled a channel on its own
  slice; those channels are re-expressed under the largest rank scale (`lazy.Rescaled`).
"""

from __future__ import annotations

import pathlib
import re

import ml_dtypes
import numpy as np

from llama_jax.model import rope
from llama_jax.model.config import LlamaConfig, is_llama2_params, read_json
from llama_jax.weights import fp8, layout
from llama_jax.weights.checkpoint import ArrayLike
from llama_jax.weights.lazy import Concat, Identical, Rescaled
from llama_jax.weights.source import SourceCheckpoint

_SHARD = re.compile(r"consolidated\.(\d+)\.pth$")
ROPE_FREQS = "rope.freqs"
# One bf16 step: the release rounded float32 frequencies to bf16, and a float32 computation that
# differs in its last bit may round the other way. A different θ moves them much further.
_ROPE_FREQS_RTOL = 2.0**-7


def is_meta_checkpoint(path: pathlib.Path) -> bool:
    return (path / "params.json").is_file() and any(_SHARD.search(p.name) for p in path.glob("consolidated.*.pth"))


def shard_files(path: pathlib.Path) -> list[pathlib.Path]:
    """consolidated.00.pth ... in rank order; a gap in the numbering is a missing shard."""
    found = sorted((int(m.group(1)), p) for p in path.glob("consolidated.*.pth") if (m := _SHARD.search(p.name)))
    ranks = [r for r, _ in found]
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise FileNotFoundError(f"{path}: missing shard(s) " + ", ".join(f"consolidated.{r:02d}.pth" for r in missing))
    return [p for _, p in found]


def torch_to_numpy(t) -> np.ndarray:
    """Zero-copy view of a CPU torch tensor (bfloat16 and float8 included) as numpy."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


def rope_freqs(config: LlamaConfig) -> np.ndarray:
    """What Llama 1/2 shards store as `rope.freqs`: the config's inverse frequencies `[H/2]` in bf16
    (Meta's `precompute_freqs_cis`, float32, then the checkpoint's bf16)."""
    return rope.inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling).astype(ml_dtypes.bfloat16)


def fp8_scale_key(layer: int, w: str, rank: int) -> str:
    return f"{layer}_feed_forward.{w}_{rank}"


def _torch_load(file: pathlib.Path, *, mmap: bool = True):
    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"{file}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from e


class MetaCheckpoint(SourceCheckpoint):
    fmt = "meta"
    buffers = frozenset({ROPE_FREQS})

    def __init__(self, path: str | pathlib.Path):
        try:
            import torch  # noqa: F401
        except ImportError as e:  # pragma: no cover - torch is installed wherever tests run
            raise ImportError("reading Meta .pth checkpoints needs torch: pip install torch") from e
        self.path = pathlib.Path(path)
        params_file = self.path / "params.json"
        params = read_json(params_file)
        self.files = shard_files(self.path)
        self._shards = [_torch_load(f) for f in self.files]
        first = set(self._shards[0])
        for f, shard in zip(self.files[1:], self._shards[1:], strict=True):
            if set(shard) != first:
                diff = sorted(set(shard) ^ first)[:5]
                raise ValueError(f"{f}: holds different tensor names than {self.files[0].name} (e.g. {diff})")
        self.llama2 = is_llama2_params(params, str(params_file))
        overrides = {}
        if self.llama2:
            if "tok_embeddings.weight" not in first:
                raise ValueError(f"{self.files[0]}: no 'tok_embeddings.weight' to take the vocabulary size from")
            overrides["vocab_size"] = int(self._shards[0]["tok_embeddings.weight"].shape[0])
        raw = LlamaConfig.from_meta_params(params, source=str(params_file), **overrides)
        if raw.n_heads % self.mp or raw.n_kv_heads % self.mp:
            raise ValueError(
                f"{params_file}: n_heads={raw.n_heads} and n_kv_heads={raw.n_kv_heads} must be multiples of the "
                f"{self.mp} model-parallel shards"
            )
        self._shard_config = raw.replace(n_heads=raw.n_heads // self.mp, n_kv_heads=raw.n_kv_heads // self.mp)
        self.kv_repeat = self._kv_repeat(raw)
        self.config = raw.replace(n_kv_heads=raw.n_kv_heads // self.kv_repeat)
        self._scales = self._read_fp8_scales()
        self.quantization = {"activation_scale_ub": self.activation_scale_ub} if self._scales else None
        self.fp8_layers = fp8.release_layers(self.config.n_layers) if self._scales else ()

    @property
    def mp(self) -> int:
        return len(self._shards)

    def names(self) -> set[str]:
        return set(self._shards[0])

    def where(self, name: str) -> str:
        return str(self.files[0]) if self.mp == 1 else f"{self.path}/consolidated.*.pth"

    def _axis(self, name: str) -> int | None:
        """The source-layout axis the ranks split `name` along (None: replicated or unknown)."""
        try:
            return layout.meta_split_axis(name, self.llama2)
        except KeyError:
            return None

    def buffer_problems(self) -> list[str]:
        """`rope.freqs` in every shard must be the inverse frequencies of the config's θ."""
        if ROPE_FREQS not in self.names():
            return []
        want = rope_freqs(self.config).astype(np.float32)
        problems = []
        for f, shard in zip(self.files, self._shards, strict=True):
            got = torch_to_numpy(shard[ROPE_FREQS]).astype(np.float32)
            if got.shape != want.shape:
                problems.append(
                    f"tensor {ROPE_FREQS!r} in {f} has shape {list(got.shape)}, expected [{want.size}] (head_dim / 2)"
                )
            elif not np.allclose(got, want, rtol=_ROPE_FREQS_RTOL, atol=0):
                i = int(np.argmax(np.abs(got - want) / want))
                problems.append(
                    f"tensor {ROPE_FREQS!r} in {f} is not the rotary inverse frequencies of rope_theta="
                    f"{self.config.rope_theta:g} (index {i}: {got[i]:.6g} stored, {want[i]:.6g} expected"
                    f"{_theta_fit(got)}): this shard and params.json disagree about the rotary base"
                )
        return problems

    def _kv_repeat(self, raw: LlamaConfig) -> int:
        """How many consecutive copies of each KV head the shards hold (2 for the 405B MP16 release).

        Read off layer 0's wk and wv: the largest r whose every group of r consecutive heads is
        identical (and still divides the query heads). 1 for every checkpoint with real KV heads.
        """
        names = ("layers.0.attention.wk.weight", "layers.0.attention.wv.weight")
        if raw.n_kv_heads == 1 or not set(names) <= self.names():
            return 1
        heads = [
            np.concatenate([torch_to_numpy(s[n]) for s in self._shards], axis=0).reshape(raw.n_kv_heads, -1)
            for n in names
        ]
        if heads[0].shape[1] != raw.head_dim * raw.dim:
            return 1  # wrong shape: `check` reports it
        for r in range(raw.n_kv_heads, 1, -1):
            if raw.n_kv_heads % r or raw.n_heads % (raw.n_kv_heads // r):
                continue
            if all((h.reshape(-1, r, h.shape[1]) == h[::r][:, None]).all() for h in heads):
                return r
        if raw.n_kv_heads % 2 == 0 and any((h[0::2] == h[1::2]).all(axis=1).any() for h in heads):
            # Some heads are stored twice, so all should be: reading each pair raises at the first that differs.
            for name, h in zip(names, heads, strict=True):
                for head in self._merged_kv_heads(name, list(h), 2):
                    head[...]
        return 1

    def _merged_kv_heads(self, name: str, heads: list, r: int) -> list[Identical]:
        """Each group of `r` consecutive stored KV heads of `name` as one head whose every read
        compares the copies, naming the tensor, the head and the shard of each copy."""
        files = [str(self.files[i * self.mp // len(heads)]) for i in range(len(heads))]
        return [Identical(heads[g : g + r], f"{name!r} head {g}", files[g : g + r]) for g in range(0, len(heads), r)]

    # ---- shapes and reads ----------------------------------------------------------------------

    def shape(self, name: str) -> tuple[int, ...]:
        shape = list(self._shards[0][name].shape)
        axis = self._axis(name)
        if axis is not None and self.mp > 1:
            shape[axis] = sum(s[name].shape[axis] for s in self._shards)
        if self.kv_repeat > 1 and name.endswith(("attention.wk.weight", "attention.wv.weight")):
            shape[0] //= self.kv_repeat
        return tuple(shape)

    def dtype(self, name: str) -> np.dtype:
        return torch_to_numpy(self._shards[0][name][:0]).dtype

    def read(self, name: str) -> np.ndarray:
        """The whole tensor in Meta's source layout (merged, KV heads de-duplicated)."""
        rule = layout.rule_for_source(name, "meta")
        layer = _layer_of(name)
        w = rule.to_source(np.asarray(self.tensor(rule.path, layer)), self.config)
        if rule.rotary_heads is not None:
            w = layout.hf_to_meta_rows(w, rule.rotary_heads(self.config))
        return w

    def tensor(self, param: layout.Path, layer: int | None) -> ArrayLike:
        """In our layout, lazily: a view (one shard) or a `Concat` of per-rank pieces."""
        rule, name = self.rule(param), self.source_name(param, layer)
        pieces = [self._piece_ours(rule, name, torch_to_numpy(s[name])) for s in self._shards]
        axis = self._axis(name)
        if axis is None or self.mp == 1 and self.kv_repeat == 1:
            return pieces[0]
        ours_axis = layout.ours_split_axis(rule, axis)
        if rule.path[-1] in ("wk", "wv") and self.kv_repeat > 1:
            heads = [p[:, j : j + 1] for p in pieces for j in range(p.shape[1])]
            pieces = self._merged_kv_heads(name, heads, self.kv_repeat)
        if layer in self.fp8_layers and rule.path[-1] == "w2" and self.mp > 1:
            scales = np.stack([self._rank_scale(layer, "w2", r) for r in range(self.mp)])
            top = scales.max(axis=0)
            pieces = [
                p if (s == top).all() else Rescaled(p, s / top, axis=1) for p, s in zip(pieces, scales, strict=True)
            ]
        return pieces[0] if len(pieces) == 1 else Concat(pieces, ours_axis)

    def _piece_ours(self, rule: layout.Rule, name: str, piece: np.ndarray) -> np.ndarray:
        config = self.config if self._axis(name) is None else self._shard_config
        if self.llama2 and name == "tok_embeddings.weight":
            config = self.config  # split along the model dimension: the transform (identity) needs no heads
        if rule.rotary_heads is not None:
            piece = layout.meta_to_hf_rows(piece, rule.rotary_heads(config))
        return rule.to_ours(piece, config)

    # ---- FP8 (Meta's fp8_scales_{rank}.pt) -----------------------------------------------------

    def _read_fp8_scales(self) -> list[dict] | None:
        files = [self.path / f"fp8_scales_{r}.pt" for r in range(self.mp)]
        present = [f.is_file() for f in files]
        if not any(present):
            return None
        if not all(present):
            raise FileNotFoundError(
                f"{self.path}: FP8 scales missing for rank(s): "
                + ", ".join(f.name for f, p in zip(files, present, strict=True) if not p)
            )
        scales = [_torch_load(f, mmap=False) for f in files]
        layers = fp8.release_layers(self.config.n_layers)
        out_local = {"w1": self.config.ffn_dim // self.mp, "w3": self.config.ffn_dim // self.mp, "w2": self.config.dim}
        for rank, (f, table) in enumerate(zip(files, scales, strict=True)):
            want = {fp8_scale_key(i, w, rank) for i in layers for w in fp8.WEIGHTS}
            missing, extra = sorted(want - set(table)), sorted(set(table) - want)
            if missing or extra:
                raise ValueError(
                    f"{f}: scale keys do not match layers 1..{self.config.n_layers - 2} of rank {rank}: "
                    f"missing {missing[:4]}, unexpected {extra[:4]}"
                )
            for key, t in table.items():
                w = key.split(".")[1].rsplit("_", 1)[0]
                if t.numel() != out_local[w] or t.dim() > 2:
                    raise ValueError(f"{f}: scale {key!r} has shape {list(t.shape)}, expected [{out_local[w]}]")
        for i in (0, self.config.n_layers - 1):  # the loader leaves these bf16: FP8 there has no scale
            for w in fp8.WEIGHTS:
                name = f"layers.{i}.feed_forward.{w}.weight"
                if name in self.names() and self.dtype(name) == fp8.DTYPE:
                    raise ValueError(
                        f"{self.files[0]}: {name!r} is float8_e4m3fn, but llama-models' FP8 loader "
                        f"keeps layers 0 and {self.config.n_layers - 1} unquantized (no scale for it)"
                    )
        return [{k: t.float().reshape(-1).numpy() for k, t in table.items()} for table in scales]

    def _rank_scale(self, layer: int, w: str, rank: int) -> np.ndarray:
        return self._scales[rank][fp8_scale_key(layer, w, rank)]

    def dequantized(self, param: layout.Path, layer: int) -> np.ndarray:
        """FP8 FFN weight `param` dequantized exactly, float32 in our layout: each rank's piece times its
        own scales (the output channel is our last axis for w1, w3 and w2 alike)."""
        rule, name, w = self.rule(param), self.source_name(param, layer), param[-1]
        pieces = [
            self._piece_ours(rule, name, torch_to_numpy(s[name])).astype(np.float32) * self._rank_scale(layer, w, r)
            for r, s in enumerate(self._shards)
        ]
        return (
            pieces[0] if self.mp == 1 else np.concatenate(pieces, axis=layout.ours_split_axis(rule, self._axis(name)))
        )

    def fp8_scale(self, param: layout.Path, layer: int) -> np.ndarray:
        """float32 [out]: the dequant multiplier of each output channel of FFN weight `param` in `layer`."""
        w = param[-1]
        per_rank = [self._rank_scale(layer, w, r) for r in range(self.mp)]
        if w == "w2":  # every rank scaled all D output channels over its own F/mp inputs: the largest covers all
            return np.max(np.stack(per_rank), axis=0)
        return np.concatenate(per_rank)


def _theta_fit(freqs: np.ndarray) -> str:
    """The θ stored inverse frequencies fit (from the lowest, `θ^-(H-2)/H`), as a hint in an error."""
    head_dim = 2 * freqs.size
    if head_dim <= 2 or not freqs[-1] > 0:
        return ""
    return f"; they fit θ ≈ {float(freqs[-1]) ** (-head_dim / (head_dim - 2)):.3g}"


def _layer_of(name: str) -> int | None:
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None
