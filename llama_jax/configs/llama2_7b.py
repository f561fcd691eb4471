"""Llama 2 7B: multi-head attention, 32,000-token sentencepiece vocabulary, no rope scaling.

`model` holds Meta's params.json keys (source: llama_models/sku_list.py); the FFN width is derived
from `ffn_dim_multiplier` and `multiple_of` exactly as Meta derives it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model=dict(
                dim=4096,
                n_layers=32,
                n_heads=32,
                n_kv_heads=32,
                vocab_size=32000,
                multiple_of=256,
                norm_eps=1e-05,
                rope_theta=10000.0,
                use_scaled_rope=False,
                max_seq_len=4096,
            ),
        )
    )
