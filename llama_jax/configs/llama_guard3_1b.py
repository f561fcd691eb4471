"""Llama Guard 3 1B: a Llama 3.2 1B fine-tune (the same shape: 16 layers, FFN 8192, tied embeddings).

`model` holds Meta's params.json keys as llama_models/sku_list.py lists them for Llama-Guard-3-1B. It is
not pruned: the pruned model is Llama-Guard-3-1B-INT4 (12 layers, FFN 6400, 4-bit, an ExecuTorch .pte
file with no loadable weights here). It was not trained for S14 (Code Interpreter Abuse): pass
`excluded=["S14"]` to `guard.classify`, as its own chat template lists S1-S13.
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
