"""The batch-inference job (`python -m llama_jax batch --config batch`): a template.

Every field is `llama_jax.batch.JobConfig`'s; unknown fields are an error. Override any of them on
the command line, e.g. `--config.max_new_tokens=64 --config.mesh=data=8` (or the plain aliases
`--input`, `--output`, `--checkpoint`, `--mesh`, `--max-new-tokens`, ...). Formats: docs/BATCH.md.
"""

import ml_collections

from llama_jax.sampling import META_TEMPERATURE, META_TOP_P


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            input=None,  # JSONL requests: {"id", "prompt" | "messages", optional sampling fields}
            output=None,  # JSONL results; an existing file is resumed
            errors=None,  # default <output>.errors.jsonl
            checkpoint=None,  # HF / Meta / Orbax directory; None = the embedded model (RANDOM weights)
            tokenizer=None,  # default: tokenizer.model in the checkpoint (or original/)
            dtype=None,  # default bfloat16 for a checkpoint, float32 for the embedded model
            mesh=None,  # e.g. "data=8" (data parallel) or "data=2,tensor=4"; None = one device
            rules="fsdp_tp",  # sharding strategy on the mesh: dp, fsdp, tp, fsdp_tp
            fp8_matmul="auto",  # FP8 checkpoints: fp8 GEMMs on FP8-tensor-core GPUs, else dequant
            attention="auto",  # auto | dense | blockwise | cudnn | splash (llama_jax/attention.py)
            batch_size=32,  # decode slots: requests run together (power of two, >= the data-parallel size)
            kv_pages=None,  # KV cache pages per engine; None = batch_size x 2,048 tokens' worth
            page_size=64,  # positions per KV page (prefix sharing works in whole pages)
            burst=16,  # decode steps per jitted call between scheduling steps
            progress=True,
            force_resume=False,  # resume an output made with other settings (<output>.job.json)
            peer_timeout_s=60.0,  # several processes: a peer silent this long stops the others (exit 75)
            # Per-request defaults (a request's own fields win):
            max_new_tokens=256,
            temperature=META_TEMPERATURE,  # Meta's defaults (0.6, 0.9); 0 = greedy
            top_p=META_TOP_P,
            top_k=0,
            min_p=0.0,
            seed=0,  # a request without "seed" samples with request_seed(seed, id)
            top_logprobs=0,  # K > 0: K most likely tokens per step, for distillation
            n=1,  # samples per request; n > 1 writes results "<id>#<k>"
        )
    )
