"""LoRA fine-tuning of Llama 3.1 8B Instruct on chat data.

    python -m llama_jax train --config finetune_lora

Every field is `llama_jax.jobs.train.TrainJob`'s; unknown fields are an error. Override any of them on the
command line, e.g. `--config.steps=200 --config.lora_rank=8`, or the common ones' flags (`--data`,
`--checkpoint`, `--steps`, `--resume`, ...). docs/TRAINING.md has the table.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            checkpoint="Meta-Llama-3.1-8B-Instruct",  # HF / Meta / Orbax directory
            data="sft.jsonl",  # {"messages": [...]} per line; loss on assistant tokens only
            data_kind="auto",
            seq_len=2048,
            lora_rank=16,
            lora_alpha=32.0,
            lora_targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"),
            steps=1000,
            batch_size=32,  # sequences per optimizer step
            grad_accum=4,  # 8 sequences per micro-batch
            learning_rate=2e-4,
            warmup_steps=50,
            end_lr_ratio=0.1,
            weight_decay=0.0,
            clip_norm=1.0,
            remat=True,
            mesh="fsdp=-1",  # every device present: 1 on a laptop; on an 8-GPU node the base and adapters split 8 ways
            rules="fsdp_tp",
            fp8_matmul="auto",  # FP8 checkpoints: llama_jax.model.platform.fp8_matmul
            workdir="runs/lora-8b",
            checkpoint_every=100,
            keep_checkpoints=3,
            export="hf",  # merged model to runs/lora-8b/model
        )
    )
