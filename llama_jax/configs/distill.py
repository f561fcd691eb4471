"""Distil Llama 3.1 8B Instruct into Llama 3.2 1B (`python -m llama_jax train --config distill`).

Online: the teacher runs inside each training step (its own sharding rules on the same mesh) and the
loss is (1 - distill_weight) · cross-entropy + distill_weight · τ² · KL(teacher_τ ‖ student_τ).
Offline: set `teacher=None` and `data` to the batch job's output written with `--top-logprobs K`
(docs/BATCH.md); the KL is then over the teacher's top-K tokens and the rest (docs/TRAINING.md).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            checkpoint="Llama-3.2-1B-Instruct",  # the student
            teacher="Meta-Llama-3.1-8B-Instruct",
            teacher_rules="dp",  # the teacher only runs forward: a whole copy per device, each on its rows
            data="prompts_and_answers.jsonl",
            seq_len=2048,
            distill_temperature=2.0,
            distill_weight=0.9,
            steps=2000,
            batch_size=32,
            grad_accum=4,
            learning_rate=5e-5,
            warmup_steps=100,
            mesh="fsdp=-1",  # the student FSDP over every device present (one on a laptop, 8 on a node)
            rules="fsdp_tp",
            fp8_matmul="auto",  # FP8 checkpoints: llama_jax.model.platform.fp8_matmul
            workdir="runs/distill-8b-1b",
            checkpoint_every=200,
            export="hf",
        )
    )
