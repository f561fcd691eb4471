"""Rejection sampling (best-of-n): n samples per prompt, scored, the best kept as SFT data or best-vs-worst as pairs.

    python -m llama_jax rejection --input prompts.jsonl --output best.jsonl --config.n=8 \\
        --config.scorer=my_rewards:score                      # a Python callable, "module:function"
    python -m llama_jax rejection ... --config.reward_model=DIR --config.reward_token=" yes"
    python -m llama_jax rejection ... --config.reward_model=RM_DIR --config.reward_head=scalar
    summary = run(model, tokenizer, "prompts.jsonl", "pairs.jsonl", n=8, scorer=fn, output_kind="pairs")

The input is the batch job's: one request per line, `{"id", "prompt" | "messages", ...}` with optional
per-request sampling fields; any other field (a reference answer, a test case) is passed to the scorer
and not to the sampler. How it runs:

- Sampling is the batch job: each prompt becomes n requests `<id>#<k>`, k = 0..n-1, written to
  `<output>.requests.jsonl`, whose results go to `<output>.samples.jsonl`. Each draws from its own
  seed (`batch.request_seed(seed, "<id>#<k>")`), so a sample depends on nothing but its prompt, k and
  the job seed, and the samples file has the batch job's guarantees: killed at any moment (kill -9)
  and restarted, it ends with the same bytes. The n samples of one prompt are consecutive requests of
  one group, so an engine that shares a prompt's KV cache between requests will share it here.
- Scoring is deterministic and runs after sampling; the output is then written whole (temporary file +
  rename). A restart re-scores from the samples file, so it ends with the same output bytes too.
- A scorer is `score(request: dict, sample: dict) -> float`: the input record and the batch job's
  result record (`text`, `tokens`, `message` for chats). A reward model scores `prompt + sample`
  (+ `reward_suffix`): `reward_head="token"`, a causal LM's logit of `reward_token` at the last position;
  `"scalar"`, a Hugging Face `LlamaForSequenceClassification` checkpoint's one-label `score` head.

Output, in input order: `output_kind="best"`: `{"id", "messages": [..., assistant]}` for chats or
`{"id", "text": prompt + sample}` for text prompts (what `train` reads as SFT data), with `score`;
`"pairs"`: `{"id", "prompt" | "messages", "chosen", "rejected", "chosen_score", "rejected_score"}` (what
`train --config.objective=dpo` reads), prompts whose samples all score the same left out. Ties go to
the lowest k.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from llama_jax.jobs import batch, jobs
from llama_jax.model import settings
from llama_jax.model.settings import setting

__all__ = ["RejectionConfig", "RewardModelScorer", "load_scorer", "register", "reward_scorer", "run"]

Scorer = Callable[[Mapping[str, Any], Mapping[str, Any]], float]


@settings.declare(
    batch.JobConfig,
    *("input", "output", "batch_size", "progress", "force_resume", "seed", "max_new_tokens", "top_k", "min_p"),
    *("json_schema", "regex", "choice"),
    n=4,
    temperature=0.8,
    top_p=0.95,
)
class RejectionConfig(jobs.ModelSettings):
    """The job's settings: `llama_jax/configs/rejection.py`'s fields, `--config.<field>` and the flag named
    on the CLI. Its own are declared here; the model's are `jobs.ModelSettings`'; those it shares with the
    batch job (files, sampling) are the batch job's (`batch.JobConfig`), with this job's defaults."""

    output_kind: str = setting("best", "best (SFT data) or pairs (best vs worst: DPO data)", flag=True)
    scorer: str | None = setting(None, "module:function, score(request, sample) -> float", flag=True)
    reward_model: str | None = setting(None, "or a checkpoint that scores the samples: see reward_head")
    reward_head: str = setting(
        "token", "token: the logit of reward_token; scalar: the checkpoint's score head (one label)"
    )
    reward_token: str | None = setting(None, 'the text of one token (e.g. " yes"), or its id as digits')
    reward_suffix: str = setting("", "text appended after the sample before the reward model reads it")


# ---- scorers ------------------------------------------------------------------------------------------


def load_scorer(spec: str) -> Scorer:
    """The callable named "package.module:function"."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"scorer: expected 'module:function', got {spec!r}")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"scorer {spec!r}: {err}") from err
    if not callable(function):
        raise ValueError(f"scorer {spec!r} is not callable")
    return function


class RewardModelScorer:
    """Scores `prompt ids + sample ids + suffix ids` by a reward model, from one token's final hidden state h.

    `token_id` given: the logit of that token at the last position (a causal LM judging, e.g. " yes").
    None: the model's one-label score head (a `LlamaForSequenceClassification` checkpoint), `score · h` at the
    last token that is not `pad_id` — transformers' rule, so a reply ending in the pad token is scored where
    transformers scores it. Either way only h of that position meets one head column: no `[B, T, V]` logits.
    Sequences are right-padded to a power of two so a job compiles a bounded number of programs.
    """

    def __init__(
        self, model, tokenizer, token_id: int | None = None, suffix: str = "", *, pad_id: int | None = None
    ) -> None:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        if token_id is None:
            if model.score is None:
                raise ValueError(
                    "the reward model has no score head (not a LlamaForSequenceClassification "
                    "checkpoint): use reward_head='token' with a reward_token"
                )
            if model.score.shape[1] != 1:
                raise ValueError(f"the reward model's score head has {model.score.shape[1]} labels; a reward is one")
        elif model.score is not None:
            raise ValueError("the reward model has a score head, no token logits: use reward_head='scalar'")
        elif not 0 <= token_id < model.config.vocab_size:
            raise ValueError(f"reward_token id {token_id} is outside the reward model's vocabulary")
        self.pad_id = pad_id
        self.suffix = tokenizer.encode(suffix, bos=False, eos=False) if suffix else []
        graphdef, state = nnx.split(model)
        column = 0 if token_id is None else token_id

        def reward(state, tokens_bt, last_b):
            model = nnx.merge(graphdef, state)
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
            h_btd, _ = model.forward(tokens_bt, positions_bt, logits=False)
            h_bd = h_btd[jnp.arange(tokens_bt.shape[0]), last_b]
            return jnp.einsum("bd,d->b", h_bd, model.output_weight()[:, column], preferred_element_type=jnp.float32)

        self._state = state
        self._reward = jax.jit(reward)

    def __call__(self, prompt_ids: Sequence[int], samples: Sequence[Sequence[int]]) -> list[float]:
        rows = [[*prompt_ids, *s, *self.suffix] for s in samples]
        width = 1 << max(len(r) for r in rows).bit_length()
        tokens = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
        last = np.array([self._last(r) for r in rows], np.int32)
        return [float(x) for x in np.asarray(self._reward(self._state, tokens, last))]

    def _last(self, row: Sequence[int]) -> int:
        """The row's last token, or with `pad_id` its last token that is not `pad_id` (0 if none is)."""
        if self.pad_id is None:
            return len(row) - 1
        return next((i for i in range(len(row) - 1, -1, -1) if row[i] != self.pad_id), 0)


def reward_scorer(
    model, tokenizer, head: str, token: str | None = None, suffix: str = "", pad_id: int | None = None
) -> RewardModelScorer:
    """The job's reward model scorer: `head="token"` reads `token`'s logit, `"scalar"` the score head."""
    if head == "token":
        if token is None:
            raise ValueError("reward_head='token' needs reward_token (the token whose logit is the score)")
        return RewardModelScorer(model, tokenizer, _token_id(tokenizer, token), suffix)
    if head == "scalar":
        if token is not None:
            raise ValueError("reward_token is for reward_head='token'; a scalar head scores without one")
        return RewardModelScorer(model, tokenizer, None, suffix, pad_id=pad_id)
    raise ValueError(f"reward_head: expected token or scalar, got {head!r}")


def _pad_token_id(checkpoint: str) -> int | None:
    """`pad_token_id` of an HF checkpoint's config.json (where a sequence classifier's pooling stops)."""
    from llama_jax.model.config import read_json

    config = pathlib.Path(checkpoint) / "config.json"
    return read_json(config).get("pad_token_id") if config.is_file() else None


def _token_id(tokenizer, text: str) -> int:
    if text.isdigit():
        return int(text)
    ids = tokenizer.encode(text, bos=False, eos=False)
    if len(ids) != 1:
        raise ValueError(f"reward_token {text!r} is {len(ids)} tokens {ids}; give one token's text or its id")
    return ids[0]


# ---- the job --------------------------------------------------------------------------------------------


def _sample_id(request_id, k: int) -> str:
    return f"{request_id}#{k}"


def _read_requests(path: pathlib.Path) -> list[tuple[str, dict]]:
    from llama_jax.jobs.data import numbered_records

    records = numbered_records(path)
    seen: dict[str, str] = {}
    for where, record in records:
        if "id" not in record:
            raise ValueError(f"{where}: missing id")
        key = json.dumps(record["id"])
        if key in seen:
            raise ValueError(f"{where}: duplicate id {key} (first at {seen[key]})")
        seen[key] = where
    return records


def run(
    model,
    tokenizer,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    n: int = 4,
    scorer: Scorer | None = None,
    reward: RewardModelScorer | None = None,
    output_kind: str = "best",
    batch_size: int = 32,
    progress: bool = True,
    model_identity: dict | None = None,
    force_resume: bool = False,
    **sampling,
) -> dict[str, Any]:
    """Draw `n` samples per request of `input_path`, score them, write the best (or pairs) to `output_path`.

    Args:
      model, tokenizer: the policy and its tokenizer.
      scorer: `score(request, sample) -> float`; or `reward`: a `RewardModelScorer`. Exactly one.
      output_kind: "best" or "pairs" (see the module doc).
      model_identity, force_resume: as `batch.run_batch`'s, for the samples file.
      **sampling: the batch job's per-request defaults (max_new_tokens, temperature, top_p, top_k, min_p, seed,
        json_schema, regex, choice).
    Returns the summary: prompts, samples, written lines, skipped ties, the batch job's summary.
    """
    if (scorer is None) == (reward is None):
        raise ValueError("give exactly one of scorer (a callable) and reward (a RewardModelScorer)")
    if output_kind not in ("best", "pairs"):
        raise ValueError(f"output_kind: expected best or pairs, got {output_kind!r}")
    if not (isinstance(n, int) and n >= 1 and (n >= 2 or output_kind == "best")):
        raise ValueError(f"n: expected an integer >= 1 (>= 2 for pairs), got {n!r}")
    input_path, output_path = pathlib.Path(input_path), pathlib.Path(output_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input {input_path} does not exist")
    records = _read_requests(input_path)
    requests_path = output_path.with_name(output_path.name + ".requests.jsonl")
    samples_path = output_path.with_name(output_path.name + ".samples.jsonl")
    lines = []
    for _, record in records:
        request = {k: v for k, v in record.items() if k in batch.REQUEST_FIELDS and k not in ("id", "seed")}
        for k in range(n):
            lines.append(jobs.json_line({"id": _sample_id(record["id"], k), **request}))
    if not requests_path.is_file() or requests_path.read_bytes() != b"".join(lines):
        jobs.write_atomically(requests_path, lines)
    summary = batch.run_batch(
        model,
        tokenizer,
        requests_path,
        samples_path,
        model_identity=model_identity,
        force_resume=force_resume,
        batch_size=batch_size,
        progress=progress,
        **sampling,
    )
    samples = {json.loads(line)["id"]: json.loads(line) for line in samples_path.read_bytes().splitlines()}
    out, ties, missing = [], 0, 0
    for where, record in records:
        drawn = [samples.get(_sample_id(record["id"], k)) for k in range(n)]
        if any(s is None for s in drawn):  # a bad request line: the errors file says why
            missing += 1
            continue
        scores = _scores(record, drawn, scorer, reward, tokenizer, where)
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        if output_kind == "best":
            out.append(jobs.json_line(_best_record(record, drawn[best], scores[best])))
        elif scores[best] == scores[worst]:
            ties += 1
        else:
            out.append(jobs.json_line(_pair_record(record, drawn[best], drawn[worst], scores[best], scores[worst])))
    jobs.write_atomically(output_path, out)
    return {
        "prompts": len(records),
        "samples": len(samples),
        "written": len(out),
        "ties_skipped": ties,
        "failed_prompts": missing,
        "output": str(output_path),
        "batch": summary,
    }


def _scores(record, drawn, scorer, reward, tokenizer, where) -> list[float]:
    if scorer is not None:
        scores = [scorer(record, sample) for sample in drawn]
    else:
        prompt_ids = _prompt_ids(record, tokenizer)
        scores = reward(prompt_ids, [s["tokens"] for s in drawn])
    for score in scores:
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not np.isfinite(score):
            raise ValueError(f"{where}: the scorer returned {score!r}; expected a finite number")
    return [float(s) for s in scores]


def _prompt_ids(record, tokenizer) -> list[int]:
    from llama_jax.text.chat import ChatFormat

    if "messages" in record:
        return ChatFormat(tokenizer).encode_dialog(record["messages"])
    return tokenizer.encode(record["prompt"], bos=True, eos=False)


def _best_record(record, sample, score) -> dict:
    if "messages" in record:
        reply = {"role": "assistant", "content": sample["message"]["content"]}
        return {"id": record["id"], "messages": [*record["messages"], reply], "score": score}
    return {"id": record["id"], "text": record["prompt"] + sample["text"], "score": score}


def _pair_record(record, best, worst, best_score, worst_score) -> dict:
    prompt = {"messages": record["messages"]} if "messages" in record else {"prompt": record["prompt"]}
    reply = "content" if "messages" in record else None
    chosen = best["message"][reply] if reply else best["text"]
    rejected = worst["message"][reply] if reply else worst["text"]
    return {
        "id": record["id"],
        **prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_score": best_score,
        "rejected_score": worst_score,
    }


# ---- the command line -----------------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rejection",
        help="best-of-n sampling scored by a callable or a reward model (resumable)",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "Settings: RejectionConfig's defaults < --config FILE (llama_jax/configs/rejection.py) < options. "
            "docs/TRAINING.md."
        ),
    )
    settings.add_config_arguments(parser, RejectionConfig)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from llama_jax.model.platform import enable_compile_cache

    enable_compile_cache()
    try:
        job = jobs.config_from_args(RejectionConfig, args)
        for name in ("input", "output"):
            if getattr(job, name) is None:
                raise ValueError(f"no {name} file: pass --{name} PATH (or set `{name}` in the --config file)")
        model, tokenizer = jobs.load_job_model(job, engine=True)
        scorer = load_scorer(job.scorer) if job.scorer else None
        reward = None
        if job.reward_model is not None:
            # The reward model reads the policy's tokens: it is loaded with the policy's tokenizer.
            policy_tokenizer = jobs.tokenizer_file(job.checkpoint, job.tokenizer)
            reward_model, _ = jobs.load_job_model(job, checkpoint=job.reward_model, tokenizer=policy_tokenizer)
            reward = reward_scorer(
                reward_model,
                tokenizer,
                job.reward_head,
                job.reward_token,
                job.reward_suffix,
                pad_id=_pad_token_id(job.reward_model),
            )
        sampling = {name: getattr(job, name) for name in settings.request_fields(RejectionConfig)}  # with n, seed
        summary = run(
            model,
            tokenizer,
            job.input,
            job.output,
            scorer=scorer,
            reward=reward,
            output_kind=job.output_kind,
            batch_size=job.batch_size,
            progress=job.progress,
            model_identity=jobs.job_model_identity(job, model),
            force_resume=job.force_resume,
            **sampling,
        )
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"rejection: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
