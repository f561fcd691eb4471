"""DPO of Llama 3.1 8B Instruct on preference pairs (`python -m llama_jax train --config dpo`).

Pairs are `{"prompt" | "messages", "chosen", "rejected"}` per line, e.g. what `python -m llama_jax
rejection ... --output-kind pairs` writes. Every field is
`llama_jax.jobs.train.TrainJob`'s; override any with `--config.<field>=VALUE`. docs/TRAINING.md has the details.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            checkpoint="Meta-Llama-3.1-8B-Instruct",
            data="pairs.jsonl",
            objective="dpo",
            dpo_beta=0.1,  # Llama 3's DPO used beta 0.1 and lr 1e-5 (Llama 3 paper, section 4.1.4)
            dpo_loss="sigmoid",  # or robust / ipo
            dpo_label_smoothing=0.0,  # > 0: conservative DPO
            dpo_reference="precompute",  # one reference pass, cached in the workdir; or "online"
            seq_len=2048,
            lora_rank=0,  # full fine-tuning; > 0 trains adapters (the reference is then the frozen base)
            steps=1000,
            batch_size=64,  # pairs per optimizer step
            grad_accum=8,
            learning_rate=1e-5,
            warmup_steps=50,
            end_lr_ratio=0.1,
            clip_norm=1.0,
            remat=True,
            mesh="fsdp=-1",  # FSDP over every device present (one on a laptop, 8 on an H100 node)
            rules="fsdp_tp",
            workdir="runs/dpo-8b",
            checkpoint_every=100,
            keep_checkpoints=3,
            export="hf",
        )
    )
