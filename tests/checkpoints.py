"""Tiny checkpoints written by the reference libraries themselves: no downloads, ever.

`hf_checkpoint` saves a random `LlamaForCausalLM` with transformers' `save_pretrained`;
`meta_checkpoint` writes Meta's `consolidated.NN.pth` layout with `torch.save`, split across
model-parallel ranks the way fairscale splits it.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket

import torch

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}


def hf_checkpoint(
    directory: pathlib.Path,
    *,
    vocab_size: int = 384,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 8,
    n_kv_heads: int = 2,
    ffn_dim: int = 160,
    tie: bool = False,
    max_shard_size: str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """Save a random HF Llama (norm weights moved away from 1.0) and return the torch model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=ffn_dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=dict(LLAMA3_ROPE),
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


META_PARAMS = dict(
    dim=64,
    n_layers=2,
    n_heads=8,
    n_kv_heads=2,
    vocab_size=384,
    multiple_of=32,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
)

# fairscale split axis per Meta tensor (None: replicated on every rank).
_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "tok_embeddings": 0, "output": 0}


# A Llama 2 params.json exactly as Meta ships them (Llama-2-7b: dim, multiple_of, n_heads, n_layers,
# norm_eps, vocab_size -1; no n_kv_heads, no rope_theta), at a tiny size.
LLAMA2_PARAMS = dict(dim=64, multiple_of=32, n_heads=8, n_layers=2, norm_eps=1e-05, vocab_size=-1)
LLAMA2_VOCAB = 320


def meta_state_dict(params: dict, seed: int = 0, *, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Random weights in Meta's layout, rounded to bf16 (as Meta ships them) and held in fp32.

    `vocab_size`: for Llama 2 params (`vocab_size: -1`), the tokenizer's vocabulary."""
    from llama_jax.model.config import LlamaConfig

    c = LlamaConfig.from_meta_params(params, **({"vocab_size": vocab_size} if vocab_size else {}))
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05):
        return (scale * torch.randn(*shape, generator=g)).bfloat16().float()

    sd = {"tok_embeddings.weight": rand(c.vocab_size, c.dim, scale=1.0)}
    for i in range(c.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = rand(c.n_heads * c.head_dim, c.dim)
        sd[p + "attention.wk.weight"] = rand(c.n_kv_heads * c.head_dim, c.dim)
        sd[p + "attention.wv.weight"] = rand(c.n_kv_heads * c.head_dim, c.dim)
        sd[p + "attention.wo.weight"] = rand(c.dim, c.n_heads * c.head_dim)
        sd[p + "feed_forward.w1.weight"] = rand(c.ffn_dim, c.dim)
        sd[p + "feed_forward.w3.weight"] = rand(c.ffn_dim, c.dim)
        sd[p + "feed_forward.w2.weight"] = rand(c.dim, c.ffn_dim)
        sd[p + "attention_norm.weight"] = (1.0 + rand(c.dim, scale=0.3)).bfloat16().float()
        sd[p + "ffn_norm.weight"] = (1.0 + rand(c.dim, scale=0.3)).bfloat16().float()
    sd["norm.weight"] = (1.0 + rand(c.dim, scale=0.3)).bfloat16().float()
    sd["output.weight"] = rand(c.vocab_size, c.dim)
    return sd


def llama2_rope_freqs(head_dim: int, theta: float = 10_000.0) -> torch.Tensor:
    """The `rope.freqs` tensor in every Llama 1/2 release shard: the inverse frequencies of Meta's
    llama/model.py `precompute_freqs_cis` (float32, θ 10,000), stored in bf16."""
    return (1.0 / (theta ** (torch.arange(0, head_dim, 2)[: (head_dim // 2)].float() / head_dim))).bfloat16()


def write_meta_checkpoint(directory: pathlib.Path, params: dict, state_dict: dict, *, mp: int = 1) -> None:
    """`params.json` + `consolidated.00.pth` ... split over `mp` ranks, stored as bf16.

    Llama 2 (`vocab_size: -1`) shards are written as Meta released them: the embedding split with
    fairscale's `ParallelEmbedding`, along the model dimension (transformers' convert_llama_weights_to_hf.py:
    `concat_dim = 0 if is_llama_3 else 1`), and `rope.freqs` in every shard.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    llama2 = params.get("vocab_size") == -1
    split = dict(_SPLIT, tok_embeddings=1) if llama2 else _SPLIT
    for rank in range(mp):
        shard = {}
        for name, t in state_dict.items():
            axis = split.get(name.split(".")[-2])
            shard[name] = t if axis is None else torch.chunk(t, mp, dim=axis)[rank].clone()
            shard[name] = shard[name].bfloat16()
        if llama2:
            shard["rope.freqs"] = llama2_rope_freqs(params["dim"] // params["n_heads"])
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")


def meta_reference_model(params: dict, state_dict: dict, *, max_seq_len: int = 64):
    """Meta's own `llama_models.llama3.model.Transformer` (fp32) holding `state_dict`."""
    _init_fairscale()
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    model = Transformer(ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=4))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _init_fairscale() -> None:
    """Meta's model needs a model-parallel group; a gloo group of size 1 on this process."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as mp_init

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not mp_init.model_parallel_is_initialized():
        mp_init.initialize_model_parallel(1)
