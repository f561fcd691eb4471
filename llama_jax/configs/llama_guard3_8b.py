"""Llama Guard 3 8B: a Llama 3.1 8B fine-tune that classifies prompts and responses (`llama_jax.guard`).

`model` holds Meta's params.json keys as llama_models/sku_list.py lists them for Llama-Guard-3-8B (and the
INT8 variant): the 8B shape, with `use_scaled_rope=False` (unlike Llama 3.1 8B). Run it with
`python -m llama_jax guard --checkpoint Llama-Guard-3-8B --message "..."`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model=dict(
                dim=4096,
                n_layers=32,
                n_heads=32,
                n_kv_heads=8,
                vocab_size=128256,
                ffn_dim_multiplier=1.3,
                multiple_of=1024,
                norm_eps=1e-05,
                rope_theta=500000.0,
                use_scaled_rope=False,
                max_seq_len=131072,
            ),
        )
    )
