"""The batch-inference job (`python -m llama_jax batch --config batch`): a template of every field.

The fields, their defaults and what each means are `llama_jax.jobs.batch.JobConfig`'s declarations (docs/BATCH.md
shows them as a table); unknown fields are an error. Override any on the command line, e.g.
`--config.max_new_tokens=64 --config.mesh=data=8` (or the flags `--input`, `--max-new-tokens`, `--mesh`, ...).
"""

from llama_jax.jobs.batch import JobConfig
from llama_jax.model import settings


def get_config():
    return settings.config_dict(JobConfig)
