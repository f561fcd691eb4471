"""Direct preference optimisation: preference pairs as rows, their log-probs and losses, reference log-probs.

A pair is `{"prompt": str | "messages": [...], "chosen": ..., "rejected": ...}`: a completion prompt
(bos + text) or a chat (`ChatFormat.encode_dialog`, ending in the open assistant header), and two
replies. A reply is a string or an assistant message dict; in a chat it is encoded as the assistant
body + `<|eot_id|>` exactly as `data.chat_examples` trains it, after a text prompt as text + eos.

`PairExamples` holds every array [N, 2, T]: row 0 the prompt + chosen reply, row 1 the prompt +
rejected reply, aligned as in `llama_jax.jobs.data` (targets = next token, `loss_mask` on the reply's
tokens only). Each sequence's log-probability is Σ over trained targets of log softmax(logits)[target].

The losses (sigmoid DPO, conservative DPO, robust DPO, IPO) are `llama_jax.jobs.losses.dpo_loss`, TRL's
`DPOTrainer` definitions; here they meet the model (`loss_sums`, the trainer's `objective="dpo"` step).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.jobs.data import numbered_records
from llama_jax.jobs.losses import dpo_loss, sequence_logps
from llama_jax.jobs.packing import ROW_DTYPES, assemble, document, padding_id
from llama_jax.text.chat import ChatFormat
from llama_jax.text.tokenizer import Tokenizer

__all__ = [
    "PairExamples",
    "job_pairs",
    "load_pairs",
    "loss_sums",
    "pair_examples",
    "pair_logps",
    "pairs_from_ids",
    "reference_logps",
]


@dataclasses.dataclass(frozen=True, eq=False)
class PairExamples:
    """Preference pairs in host memory: every array [N, 2, T] (row 0 chosen, row 1 rejected).

    `ref_logps` [N, 2] float32: the reference model's sequence log-probabilities, once computed
    (`with_reference`). A `data.Loader` batches it like `data.Examples`.
    """

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    ref_logps: np.ndarray | None = None
    n_pairs: int = 0
    n_truncated: int = 0
    n_dropped: int = 0

    def __post_init__(self) -> None:
        shape = self.tokens.shape
        if len(shape) != 3 or shape[1] != 2:
            raise ValueError(f"tokens: expected [N, 2, T], got shape {shape}")
        for name, dtype in ROW_DTYPES.items():
            value = getattr(self, name)
            if value.shape != shape or value.dtype != dtype:
                raise ValueError(f"{name}: expected {np.dtype(dtype)} {shape}, got {value.dtype} {value.shape}")
        if self.ref_logps is not None and self.ref_logps.shape != shape[:2]:
            raise ValueError(f"ref_logps: expected shape {shape[:2]}, got {self.ref_logps.shape}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {name: getattr(self, name) for name in ROW_DTYPES}
        if self.ref_logps is not None:
            arrays["ref_logps"] = self.ref_logps
        return arrays

    def with_reference(self, ref_logps: np.ndarray) -> PairExamples:
        return dataclasses.replace(self, ref_logps=np.asarray(ref_logps, np.float32))


def pairs_from_ids(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    seq_len: int,
    *,
    pad_id: int = 0,
) -> PairExamples:
    """Pairs from token ids: prompt i followed by chosen[i] (row 0) and by rejected[i] (row 1).

    A sequence longer than `seq_len` is cut at it (`n_truncated`); a pair where either reply has no
    token left is dropped (`n_dropped`).
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected replies")
    rows, truncated, dropped = [], 0, 0
    for prompt, *replies in zip(prompts, chosen, rejected, strict=True):
        if len(prompt) < 1:
            raise ValueError("a prompt needs at least one token (bos)")
        pair = []
        for reply in replies:
            ids = [*prompt, *reply]
            trained = [False] * len(prompt) + [True] * len(reply)
            truncated += len(ids) > seq_len
            # Cut, then align: a cut sequence's last position predicts nothing (unlike `Document.cut`).
            pair.append(document(ids[:seq_len], trained[:seq_len]))
        if not all(doc.loss_mask.any() for doc in pair):
            dropped += 1
            continue
        rows += [[doc] for doc in pair]
    flat = assemble(rows, seq_len, pad_id, None)  # [2N, T]: chosen, rejected, chosen, ...
    arrays = {name: array.reshape(len(rows) // 2, 2, seq_len) for name, array in flat.arrays.items()}
    return PairExamples(**arrays, n_pairs=len(prompts), n_truncated=truncated, n_dropped=dropped)


def _reply_ids(reply: Any, chat: ChatFormat | None, tokenizer: Tokenizer, header: list[int], where: str) -> list[int]:
    if isinstance(reply, Mapping):
        if reply.get("role", "assistant") != "assistant":
            raise ValueError(f"{where}: expected an assistant message, got role {reply.get('role')!r}")
        if chat is None:
            raise ValueError(f"{where}: a message reply needs a chat prompt ('messages'), not a text 'prompt'")
    elif not isinstance(reply, str):
        raise ValueError(f"{where}: expected a string or an assistant message, got {type(reply).__name__}")
    if chat is None:
        return tokenizer.encode(reply, bos=False, eos=True)
    message = dict(reply) if isinstance(reply, Mapping) else {"content": reply}
    message["role"] = "assistant"
    try:
        ids = chat.encode_message(message)  # header, body, <|eot_id|> (or <|eom_id|> for a tool call)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return ids[len(header) :]


def pair_examples(records: Iterable[tuple[str, Mapping[str, Any]]], tokenizer: Tokenizer, seq_len: int) -> PairExamples:
    """`(where, record)` preference records -> `PairExamples` (see the module doc for the format)."""
    chat = None
    prompts, chosen, rejected = [], [], []
    for where, record in records:
        if not isinstance(record, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in ("chosen", "rejected") if k not in record]
        if missing and "score" in record and ("text" in record or "messages" in record):
            raise ValueError(
                f"{where}: a best-of-n record (rejection's output_kind=best, SFT data for train), not a preference "
                f"pair; write pairs with `python -m llama_jax rejection ... --output-kind pairs`"
            )
        if missing or ("prompt" in record) == ("messages" in record):
            raise ValueError(
                f"{where}: a preference pair needs 'chosen', 'rejected' and exactly one of 'prompt' (text) "
                f"and 'messages' (a chat); found keys {sorted(record)}"
            )
        if "messages" in record:
            chat = chat or ChatFormat(tokenizer)
            try:
                prompt = chat.encode_dialog(record["messages"])
            except (TypeError, ValueError, KeyError) as err:
                raise ValueError(f"{where}: messages: {err}") from err
            header = chat.encode_message({"role": "assistant", "content": ""})[:-1]
            replies = [_reply_ids(record[k], chat, tokenizer, header, f"{where}: {k}") for k in ("chosen", "rejected")]
        else:
            if not isinstance(record["prompt"], str):
                raise ValueError(f"{where}: prompt: expected a string, got {type(record['prompt']).__name__}")
            prompt = tokenizer.encode(record["prompt"], bos=True, eos=False)
            replies = [_reply_ids(record[k], None, tokenizer, [], f"{where}: {k}") for k in ("chosen", "rejected")]
        prompts.append(prompt)
        chosen.append(replies[0])
        rejected.append(replies[1])
    return pairs_from_ids(prompts, chosen, rejected, seq_len, pad_id=padding_id(tokenizer))


def load_pairs(path: str | os.PathLike, tokenizer: Tokenizer, seq_len: int) -> PairExamples:
    """A JSONL file of preference pairs (what `rejection.run` writes with `output_kind="pairs"`)."""
    records = numbered_records(pathlib.Path(path))
    if not records:
        raise ValueError(f"{path}: no records (the file is empty)")
    return pair_examples(records, tokenizer, seq_len)


# ---- log-probabilities and the DPO step (jit-friendly, float32) --------------------------------------------


def pair_logps(model, batch: Mapping[str, jax.Array], *, remat: bool = False) -> jax.Array:
    """The model's sequence log-probabilities of a batch of pairs: [B, 2]."""
    b, two, t = batch["tokens"].shape
    flat = {k: batch[k].reshape(b * two, t) for k in ROW_DTYPES}
    logits, _ = model.forward(flat["tokens"], flat["positions"], segment_ids=flat["segment_ids"], remat=remat)
    return sequence_logps(logits, flat["targets"], flat["loss_mask"]).reshape(b, two)


def loss_sums(model, reference, micro, *, beta, loss, label_smoothing, remat=False) -> tuple[jax.Array, dict]:
    """(Σ per-pair loss, metric Σs) of a micro-batch of pairs: the trainer's `objective="dpo"` step.

    The reference log-probs are the batch's `ref_logps` (precomputed) or `reference`'s (online, no
    gradient). Rows with no trained token (padding of a partial batch) count for nothing.
    """
    logps = pair_logps(model, micro, remat=remat)
    if "ref_logps" in micro:
        ref_logps = micro["ref_logps"]
    elif reference is not None:
        ref_logps = pair_logps(reference, micro)
    else:
        raise ValueError("DPO needs reference log-probs: batches with ref_logps, or Trainer(..., teacher=reference)")
    lengths = jnp.sum(micro["loss_mask"], axis=-1)
    per_pair, metrics = dpo_loss(
        logps, jax.lax.stop_gradient(ref_logps), lengths, beta=beta, loss=loss, label_smoothing=label_smoothing
    )
    real = (lengths[:, 0] > 0).astype(jnp.float32)
    sums = {name: jnp.sum(value * real) for name, value in metrics.items()}
    sums.update(
        pairs=jnp.sum(real),
        trained_tokens=jnp.sum(micro["loss_mask"]),
        tokens=jnp.sum(micro["segment_ids"] > 0).astype(jnp.float32),
    )
    sums["dpo"] = jnp.sum(per_pair * real)
    return sums["dpo"], sums


def reference_logps(model, pairs: PairExamples, *, batch_size: int = 8) -> np.ndarray:
    """The reference pass: `model`'s sequence log-probs of every pair, [N, 2] float32, computed once.

    Batches are padded to `batch_size` rows (one compiled program); on a mesh the batch is placed by
    the model's rules like the trainer's.
    """
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, batch):
        return pair_logps(nnx.merge(graphdef, state), batch)

    out = np.zeros((len(pairs), 2), np.float32)
    arrays = {k: v for k, v in pairs.arrays.items() if k in ROW_DTYPES}
    for start in range(0, len(pairs), batch_size):
        stop = min(start + batch_size, len(pairs))
        batch = {k: np.zeros((batch_size, *v.shape[1:]), v.dtype) for k, v in arrays.items()}
        for k, v in arrays.items():
            batch[k][: stop - start] = v[start:stop]
        out[start:stop] = np.asarray(run(state, batch))[: stop - start]
    return out


def job_pairs(job, model, tokenizer, reference=None) -> tuple[PairExamples, Any]:
    """The `train` job's preference data: (pairs, online reference model or None).

    `dpo_reference="online"`: the reference is `reference` (the job's `teacher`), else the checkpoint
    loaded again (the initial policy; fresh LoRA adapters change nothing). `"precompute"`: one pass of
    that model over the pairs, cached as `workdir/reference_logps.npy` (written atomically) for resumes.
    """
    from llama_jax.jobs import jobs

    if job.data_kind not in ("auto", "pairs"):
        raise ValueError(
            f"objective=dpo reads preference pairs: data_kind must be auto or pairs, got {job.data_kind!r}"
        )
    if job.dpo_reference not in ("precompute", "online"):
        raise ValueError(f"dpo_reference: expected precompute or online, got {job.dpo_reference!r}")
    pairs = load_pairs(job.data, tokenizer, job.seq_len)
    if job.dpo_reference == "online":
        if reference is None:
            reference, _ = jobs.load_model(
                job.checkpoint, tokenizer=job.tokenizer, dtype=job.dtype, mesh=job.mesh, rules=job.rules
            )
        return pairs, reference
    cache = pathlib.Path(job.workdir) / "reference_logps.npy"
    ref_logps = np.load(cache) if job.resume and cache.is_file() else None
    if ref_logps is None or ref_logps.shape != (len(pairs), 2):
        ref_logps = reference_logps(reference if reference is not None else model, pairs)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache.with_suffix(".tmp"), "wb") as f:
            np.save(f, ref_logps)
        cache.with_suffix(".tmp").replace(cache)
    return pairs.with_reference(ref_logps), None
