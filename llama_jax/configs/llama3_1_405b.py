"""Llama 3.1 405B (and Instruct; the bf16-mp8 and FP8 releases).

`model` holds Meta's params.json keys (source: llama_models/sku_list.py); the FFN width is derived
from `ffn_dim_multiplier` and `multiple_of` exactly as Meta derives it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model=dict(
                dim=16384,
                n_layers=126,
                n_heads=128,
                n_kv_heads=8,
                vocab_size=128256,
                ffn_dim_multiplier=1.2,
                multiple_of=4096,
                norm_eps=1e-05,
                rope_theta=500000.0,
                use_scaled_rope=True,
                max_seq_len=131072,
            ),
        )
    )
