"""Rejection sampling with Llama 3.1 8B Instruct.

    python -m llama_jax rejection --config rejection

Every field is `llama_jax.jobs.rejection.RejectionConfig`'s (those not set here keep its defaults); override any
with `--config.<field>=VALUE` or its flag (`--input`, `--n`, `--scorer`, ...). docs/TRAINING.md has the details.
"""

from llama_jax.jobs.rejection import RejectionConfig
from llama_jax.model import settings


def get_config():
    return settings.config_dict(
        RejectionConfig,
        checkpoint="Meta-Llama-3.1-8B-Instruct",
        input="prompts.jsonl",  # the batch job's requests; extra fields go to the scorer
        output="pairs.jsonl",
        n=8,  # samples per prompt
        output_kind="pairs",  # best (SFT data) | pairs (best vs worst: DPO data)
        # score(request, sample) -> float; or a reward model instead: reward_model=DIR with reward_head="token"
        # and reward_token (a causal LM's logit), or reward_head="scalar" (a LlamaForSequenceClassification)
        scorer="my_rewards:score",
        max_new_tokens=512,
        temperature=0.8,
        top_p=0.95,
        seed=0,
        batch_size=64,
        mesh="data=-1",  # a policy copy per device present, the samples split between them
    )
