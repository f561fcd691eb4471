"""Full supervised fine-tuning of Llama 3.2 1B (`python -m llama_jax train --config finetune_sft`).

Every field is `llama_jax.jobs.train.TrainJob`'s; override any of them with `--config.<field>=VALUE`.
Full fine-tuning keeps a float32 master copy of the weights and AdamW's two float32 moments: about
16 bytes per parameter (20 GB for 1.2B), sharded over the mesh (FSDP).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            checkpoint="Llama-3.2-1B-Instruct",
            data="sft.jsonl",  # chat {"messages"} or raw {"text"} lines (text is packed)
            seq_len=2048,
            steps=2000,
            batch_size=64,
            grad_accum=2,
            learning_rate=1e-5,
            warmup_steps=100,
            weight_decay=0.1,
            clip_norm=1.0,
            remat=True,
            mesh="fsdp=-1",  # FSDP over every device present (one on a laptop, 8 on an H100 node)
            workdir="runs/sft-1b",
            checkpoint_every=200,
            export="hf",
        )
    )
