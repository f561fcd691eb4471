"""What a `Llama` is built with besides its architecture and dtype: one frozen `Options`.

Fixed at construction and part of the model's graphdef, so another setting is another model
(`Llama.with_options`, sharing the weights). `llama_jax.model.model` builds the transformer with it.
"""

from __future__ import annotations

import dataclasses

from llama_jax.model import attention as attention_lib
from llama_jax.model import quant
from llama_jax.model.linear import LoraSpec
from llama_jax.sharding.rules import ShardingSpec

__all__ = ["DEFAULT_PREFILL_CHUNK", "Options"]

# Prompt tokens per prefill step: bounds prefill activations ([B, chunk, F] in the FFN) at any length.
DEFAULT_PREFILL_CHUNK = 2048


@dataclasses.dataclass(frozen=True)
class Options:
    """What a `Llama` is built with besides its architecture and dtype; fixed for the model's life.

    attention_backend: one of `attention.BACKENDS` ("auto": `attention.select`'s rule, logged);
      attention_block its key (and query) block: the blockwise tile, a paged cache's page.
    prefill_chunk: prompt tokens per prefill step.
    fp8: FFN weights of `fp8.quantized_layers` in rowwise FP8 (the FP8 405B release); the other
      layers' FFNs live unquantized in `dense_ffn`, stacked over those layers only.
    lora: adapters `<name>_lora.a/.b` beside each of `lora.targets` (`llama_jax/weights/lora.py` adds, merges).
    score_labels: a classifier's `score` [D, labels] instead of the LM head (HF
      `LlamaForSequenceClassification`): "logits" are per-position scores `[B, T, labels]`.
    sharding: the mesh and rules activations are pinned by (`load(..., mesh=...)`, `shard_model`).
    """

    attention_backend: str = "auto"
    attention_block: int = attention_lib.DEFAULT_BLOCK
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    fp8: quant.Fp8Spec | None = None
    lora: LoraSpec | None = None
    score_labels: int | None = None
    sharding: ShardingSpec | None = None

    def __post_init__(self):
        if self.attention_backend not in attention_lib.BACKENDS:
            raise ValueError(f"attention must be one of {attention_lib.BACKENDS}, got {self.attention_backend!r}")
        if self.fp8 is not None and self.lora is not None and {"w1", "w2", "w3"} & set(self.lora.targets):
            raise ValueError("LoRA on FP8 feed-forward weights is not supported: load the bf16 model to fine-tune it")
