"""The one place that maps checkpoint tensors to our parameters, and back.

Each `Rule` says which source tensor feeds a parameter, the shape that tensor must have, and the
transform between layouts. Transforms are numpy views (transpose/reshape) wherever possible, so a
memory-mapped tensor is never copied whole: a device reads only its slice.

Source layouts (torch Linear, `[out, in]`):
  HF   `model.layers.{i}.self_attn.q_proj.weight` [N·H, D], heads in rotate-half order.
  Meta `layers.{i}.attention.wq.weight`           [N·H, D], heads in interleaved (complex) order.
Ours (input dimension first): wq [D, N, H], wk/wv [D, K, H], wo [N, H, D], w1/w3 [D, F], w2 [F, D],
tok_embeddings [V, D], output [D, V]; per-layer parameters stacked as [L, ...].
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from llama_jax.model.config import LlamaConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    path: Path  # our parameter, e.g. ("layers", "attention", "wq")
    hf: str  # HF tensor name; "{i}" is the layer index for stacked parameters
    meta: str  # Meta tensor name
    source_shape: Callable[[LlamaConfig], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, LlamaConfig], np.ndarray]  # source layout -> ours (one layer)
    to_source: Callable[[np.ndarray, LlamaConfig], np.ndarray]  # ours (one layer) -> source layout
    rotary_heads: Callable[[LlamaConfig], int] | None = None  # set for wq/wk: Meta rows need permuting

    @property
    def per_layer(self) -> bool:
        return self.path[0] == "layers"


def _identity(x, c):
    return x


def _transpose(x, c):
    return x.T


def _heads_in(n: Callable[[LlamaConfig], int]):
    """[n·H, D] -> [D, n, H] and back."""
    return (
        lambda x, c: x.reshape(n(c), c.head_dim, c.dim).transpose(2, 0, 1),
        lambda x, c: x.transpose(1, 2, 0).reshape(n(c) * c.head_dim, c.dim),
    )


def _heads_out(x, c):
    """wo: [D, N·H] -> [N, H, D]."""
    return x.reshape(c.dim, c.n_heads, c.head_dim).transpose(1, 2, 0)


def _heads_out_back(x, c):
    return x.transpose(2, 0, 1).reshape(c.dim, c.n_heads * c.head_dim)


def _n_heads(c):
    return c.n_heads


def _n_kv(c):
    return c.n_kv_heads


_q_in, _q_back = _heads_in(_n_heads)
_kv_in, _kv_back = _heads_in(_n_kv)

RULES: tuple[Rule, ...] = (
    Rule(
        ("tok_embeddings",),
        "model.embed_tokens.weight",
        "tok_embeddings.weight",
        lambda c: (c.vocab_size, c.dim),
        _identity,
        _identity,
    ),
    Rule(
        ("layers", "attention_norm", "weight"),
        "model.layers.{i}.input_layernorm.weight",
        "layers.{i}.attention_norm.weight",
        lambda c: (c.dim,),
        _identity,
        _identity,
    ),
    Rule(
        ("layers", "attention", "wq"),
        "model.layers.{i}.self_attn.q_proj.weight",
        "layers.{i}.attention.wq.weight",
        lambda c: (c.n_heads * c.head_dim, c.dim),
        _q_in,
        _q_back,
        rotary_heads=_n_heads,
    ),
    Rule(
        ("layers", "attention", "wk"),
        "model.layers.{i}.self_attn.k_proj.weight",
        "layers.{i}.attention.wk.weight",
        lambda c: (c.n_kv_heads * c.head_dim, c.dim),
        _kv_in,
        _kv_back,
        rotary_heads=_n_kv,
    ),
    Rule(
        ("layers", "attention", "wv"),
        "model.layers.{i}.self_attn.v_proj.weight",
        "layers.{i}.attention.wv.weight",
        lambda c: (c.n_kv_heads * c.head_dim, c.dim),
        _kv_in,
        _kv_back,
    ),
    Rule(
        ("layers", "attention", "wo"),
        "model.layers.{i}.self_attn.o_proj.weight",
        "layers.{i}.attention.wo.weight",
        lambda c: (c.dim, c.n_heads * c.head_dim),
        _heads_out,
        _heads_out_back,
    ),
    Rule(
        ("layers", "ffn_norm", "weight"),
        "model.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.ffn_norm.weight",
        lambda c: (c.dim,),
        _identity,
        _identity,
    ),
    Rule(
        ("layers", "feed_forward", "w1"),
        "model.layers.{i}.mlp.gate_proj.weight",
        "layers.{i}.feed_forward.w1.weight",
        lambda c: (c.ffn_dim, c.dim),
        _transpose,
        _transpose,
    ),
    Rule(
        ("layers", "feed_forward", "w3"),
        "model.layers.{i}.mlp.up_proj.weight",
        "layers.{i}.feed_forward.w3.weight",
        lambda c: (c.ffn_dim, c.dim),
        _transpose,
        _transpose,
    ),
    Rule(
        ("layers", "feed_forward", "w2"),
        "model.layers.{i}.mlp.down_proj.weight",
        "layers.{i}.feed_forward.w2.weight",
        lambda c: (c.dim, c.ffn_dim),
        _transpose,
        _transpose,
    ),
    Rule(("norm", "weight"), "model.norm.weight", "norm.weight", lambda c: (c.dim,), _identity, _identity),
    Rule(("output",), "lm_head.weight", "output.weight", lambda c: (c.vocab_size, c.dim), _transpose, _transpose),
)

RULES_BY_PATH: dict[Path, Rule] = {r.path: r for r in RULES}

# Meta model-parallel shards: the axis each tensor is split along (fairscale Column/RowParallel,
# VocabParallelEmbedding for Llama 3); None means replicated. Keyed by the Meta name's last parts.
META_SPLIT_AXIS: dict[str, int | None] = {
    "tok_embeddings.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,
}


def meta_split_axis(meta_name: str, llama2: bool = False) -> int | None:
    """Llama 1/2 shards split the embedding with fairscale's `ParallelEmbedding`: along the model dimension."""
    if llama2 and meta_name == "tok_embeddings.weight":
        return 1
    for suffix, axis in META_SPLIT_AXIS.items():
        if meta_name == suffix or meta_name.endswith("." + suffix):
            return axis
    raise KeyError(meta_name)


def ours_split_axis(rule: Rule, source_axis: int) -> int:
    """Where a Meta rank's split lands in our layout. Identity rules (the embedding) keep the axis;
    every other rule puts the source's input dimension first: a split of the output rows (wq/wk/wv,
    w1/w3, output) becomes axis 1 ([D, n, H], [D, F], [D, V]), a split of the input columns (wo, w2)
    axis 0 ([N, H, D], [F, D])."""
    if rule.to_ours is _identity:
        return source_axis
    return 1 if source_axis == 0 else 0


def rule_for_source(name: str, fmt: str) -> Rule:
    """The rule whose source tensor (per-layer template or not) is `name` in format `fmt`."""
    for rule in RULES:
        template = rule.hf if fmt == "hf" else rule.meta
        pattern = template.replace(".", r"\.").replace("{i}", r"\d+")
        if re.fullmatch(pattern, name):
            return rule
    raise KeyError(f"{name!r} is no {fmt} tensor of a Llama model")


def rules_for(config: LlamaConfig, score_labels: int | None = None) -> tuple[Rule, ...]:
    """The rules a model of this config needs (no `output` when embeddings are tied).

    `score_labels`: a sequence classifier (HF `LlamaForSequenceClassification`), whose `score.weight`
    [labels, D] takes the place of the LM head.
    """
    rules = tuple(r for r in RULES if not (r.path == ("output",) and (config.tie_embeddings or score_labels)))
    if score_labels:
        rules += (
            Rule(("score",), "score.weight", "score.weight", lambda c: (score_labels, c.dim), _transpose, _transpose),
        )
    return rules


def source_names(rule: Rule, config: LlamaConfig, fmt: str) -> list[str]:
    """The source tensor names feeding `rule`'s parameter: one, or one per layer."""
    template = rule.hf if fmt == "hf" else rule.meta
    if rule.per_layer:
        return [template.format(i=i) for i in range(config.n_layers)]
    return [template]


def meta_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved rotary rows -> HF's rotate-half rows (inverse of HF's `permute`).

    Within each head, Meta pairs rows (2j, 2j+1); HF puts the evens first, then the odds.
    """
    rows, d_in = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(rows, d_in)


def hf_to_meta_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> Meta interleaved rows (`convert_llama_weights_to_hf.permute`, inverted)."""
    rows, d_in = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(rows, d_in)
