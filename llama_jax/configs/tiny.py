"""A tiny Llama-3.1-shaped model for tests and examples (GQA, llama3 rope scaling, small vocabulary).

`model` holds Meta's params.json keys (source: llama_models/sku_list.py); the FFN width is derived
from `ffn_dim_multiplier` and `multiple_of` exactly as Meta derives it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model=dict(
                dim=64,
                n_layers=2,
                n_heads=4,
                n_kv_heads=2,
                vocab_size=512,
                multiple_of=32,
                norm_eps=1e-05,
                rope_theta=500000.0,
                use_scaled_rope=True,
                max_seq_len=131072,
            ),
        )
    )
