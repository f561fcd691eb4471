"""Llama 3.2 1B: tied embeddings, head_dim 64, rope factor 32 (HF's value).

`model` holds Meta's params.json keys (source: llama_models/sku_list.py); the FFN width is derived
from `ffn_dim_multiplier` and `multiple_of` exactly as Meta derives it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model=dict(
                dim=2048,
                n_layers=16,
                n_heads=32,
                n_kv_heads=8,
                vocab_size=128256,
                ffn_dim_multiplier=1.5,
                multiple_of=256,
                norm_eps=1e-05,
                rope_theta=500000.0,
                use_scaled_rope=True,
                rope_scaling_factor=32.0,
                tie_embeddings=True,
                max_seq_len=131072,
            ),
        )
    )
