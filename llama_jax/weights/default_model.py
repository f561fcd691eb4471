"""The embedded default: a small Llama-3.1-shaped model with RANDOM weights, and the real tokenizer.

It exists so the CLI, examples and tests run with no checkpoint at all. Its text is noise: the
weights are drawn from a fixed seed, not trained. The shape is Llama 3.1's in miniature: the full
128,256-token vocabulary, llama3 RoPE scaling, grouped-query attention (8 query heads, 2 kv heads),
tied embeddings, Meta's FFN width rule; about 35.8M parameters, 32.8M of them the embedding.

The tokenizer is Meta's own `tokenizer.model` shipped inside the `llama_models` package, when that
package is installed.
"""

from __future__ import annotations

import functools
import pathlib
import warnings

import jax.numpy as jnp
import numpy as np

from llama_jax.model.config import LLAMA3_VOCAB_SIZE, LlamaConfig, RopeScaling, ffn_hidden_dim
from llama_jax.model.model import Llama
from llama_jax.weights import layout
from llama_jax.weights.checkpoint import Checkpoint
from llama_jax.weights.loading import load_from

__all__ = [
    "DEFAULT_CONFIG",
    "RANDOM_WEIGHTS_NOTICE",
    "DefaultCheckpoint",
    "default_model",
    "default_tokenizer",
    "tokenizer_path",
]

DEFAULT_CONFIG = LlamaConfig(
    vocab_size=LLAMA3_VOCAB_SIZE,
    dim=256,
    n_layers=4,
    n_heads=8,
    n_kv_heads=2,
    ffn_dim=ffn_hidden_dim(256, None, 256),  # 768, as Meta derives it (multiple_of=256)
    norm_eps=1e-5,
    rope_theta=500_000.0,
    rope_scaling=RopeScaling(factor=8.0),
    max_seq_len=131_072,
    tie_embeddings=True,
)

RANDOM_WEIGHTS_NOTICE = (
    "NOTICE: no --checkpoint given, running the embedded default model. Its weights are RANDOM "
    "(seeded, untrained): the output is meaningless text. Pass --checkpoint DIR for a real Llama."
)

WEIGHT_STD = 0.02


class DefaultCheckpoint(Checkpoint):
    """The default model's random weights as a checkpoint: N(0, 0.02²) matrices and unit norms from `seed`.

    Drawn from numpy's generator rather than module initialisation, which draws the embedding's values
    several times slower on CPU. Parameters are drawn whole (stacked over layers) in
    sorted path order: the same seed gives the same weights.
    """

    def __init__(self, seed: int = 0, config: LlamaConfig = DEFAULT_CONFIG):
        self.config = config
        self.seed = seed

    @functools.cached_property
    def _values(self) -> dict[layout.Path, np.ndarray]:
        """Drawn when first read, so that opening this checkpoint costs nothing before the checks."""
        config, rng = self.config, np.random.default_rng(self.seed)
        values = {}
        for rule in sorted(layout.rules_for(config), key=lambda r: r.path):
            ours = rule.to_ours(np.broadcast_to(np.float32(0), rule.source_shape(config)), config).shape
            shape = (config.n_layers, *ours) if rule.per_layer else ours
            if rule.path[-1] == "weight":  # the RMSNorm scales
                values[rule.path] = np.ones(shape, np.float32)
            else:
                values[rule.path] = rng.standard_normal(shape, dtype=np.float32)
                values[rule.path] *= np.float32(WEIGHT_STD)
        return values

    def check(self) -> None:
        """Generated for its own config: nothing can be missing."""

    def stored_dtype(self, param: layout.Path) -> np.dtype:
        return np.dtype(np.float32)

    def tensor(self, param: layout.Path, layer: int | None) -> np.ndarray:
        value = self._values[param]
        return value if layer is None else value[layer]


def default_model(
    *, seed: int = 0, dtype: str | jnp.dtype = "float32", warn: bool = True, attention: str = "auto"
) -> Llama:
    """The default `Llama` with random weights (`DefaultCheckpoint(seed)`) on the default device.

    attention: the attention backend (`llama_jax.model.attention.BACKENDS`).
    """
    if warn:
        warnings.warn(RANDOM_WEIGHTS_NOTICE, stacklevel=2)
    return load_from(DefaultCheckpoint(seed), dtype=dtype, attention=attention)


def tokenizer_path() -> pathlib.Path | None:
    """Meta's Llama 3 `tokenizer.model` from the installed `llama_models` package, if any."""
    try:
        import llama_models
    except ImportError:
        return None
    path = pathlib.Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    return path if path.is_file() else None


def default_tokenizer():
    """The real Llama 3 tokenizer (from `llama_models`), or None when that package is missing."""
    path = tokenizer_path()
    if path is None:
        return None
    from llama_jax.text.tokenizer import Tokenizer

    return Tokenizer.from_file(path)
