"""Training-step speed: llama_jax's Trainer against transformers + torch.optim.AdamW, same model, same run.

The model is the shape of `llama_jax.weights.default_model` (vocab 128,256, dim 256, 4 layers, GQA 8/2, tied
embeddings; ~35.8M parameters, fp32). transformers builds it with random weights, saves it with
`save_pretrained`, and `llama_jax.load(dir, dtype="float32")` reads the same weights. Both sides
then run the same full fine-tuning step on the same batches (`--batch` sequences of `--seq-len`
tokens, every target trained): forward, mean cross-entropy, backward, global-norm clipping at 1.0,
and AdamW (lr 1e-4, b1 0.9, b2 0.95, eps 1e-8, weight decay 0).

    tokens/s = batch * seq_len / (wall time of one optimizer step, its result on the host)

Compilation is excluded (warm-up steps first). The two libraries alternate step by step so that a
noisy machine slows both alike, and the median of `--steps` steps is kept. Our side runs with and
without layer rematerialisation. The loss of the first step is compared across the two libraries
as a sanity check.

Prints one JSON object; `--out benchmarks/results/<name>.json` also writes it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # first: an installed package named `benchmarks` must not shadow ours

from benchmarks import report  # noqa: E402
from benchmarks.decode import SHAPES, hf_config  # noqa: E402  (the decode benchmark's default model shape)


def _batch(rng, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    rows = rng.integers(0, 128_000, size=(batch, seq_len + 1)).astype(np.int32)
    return {
        "tokens": rows[:, :-1],
        "targets": rows[:, 1:],
        "loss_mask": np.ones((batch, seq_len), np.float32),
        "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
        "segment_ids": np.ones((batch, seq_len), np.int32),
    }


def run(batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    import torch
    import transformers

    import llama_jax
    from llama_jax.jobs.train import TrainConfig, Trainer

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config(transformers, *SHAPES["default"]))
    n_params = sum(p.numel() for p in hf_model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        ours = {
            remat: Trainer(
                llama_jax.load(tmp, dtype="float32"),
                TrainConfig(
                    steps=warmup + steps + 1,
                    batch_size=batch,
                    learning_rate=1e-4,
                    warmup_steps=0,
                    end_lr_ratio=1.0,
                    remat=remat,
                ),
            )
            for remat in (False, True)
        }
    hf_model.train()
    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    def theirs(b):
        optimizer.zero_grad(set_to_none=True)
        ids = torch.from_numpy(np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1).astype(np.int64))
        loss = hf_model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    rng = np.random.default_rng(0)
    batches = [_batch(rng, batch, seq_len) for _ in range(warmup + steps)]
    first = {"transformers": theirs(batches[0])}
    for remat, trainer in ours.items():
        first[f"llama_jax_remat_{remat}"] = trainer.train_step(batches[0])["loss"]
    for b in batches[1:warmup]:
        theirs(b)
        for trainer in ours.values():
            trainer.train_step(b)

    times: dict[str, list[float]] = {"transformers": [], "llama_jax": [], "llama_jax_remat": []}
    for b in batches[warmup:]:
        for name, step in (
            ("transformers", theirs),
            ("llama_jax", ours[False].train_step),
            ("llama_jax_remat", ours[True].train_step),
        ):
            start = time.perf_counter()
            step(b)
            times[name].append(time.perf_counter() - start)
    tokens = batch * seq_len
    tok_s = {name: tokens / float(np.median(t)) for name, t in times.items()}
    return {
        "batch": batch,
        "seq_len": seq_len,
        "tokens_per_s": {k: round(v, 1) for k, v in tok_s.items()},
        "speedup_vs_transformers": round(tok_s["llama_jax"] / tok_s["transformers"], 2),
        "speedup_vs_transformers_with_remat": round(tok_s["llama_jax_remat"] / tok_s["transformers"], 2),
        "first_step_loss": {k: round(v, 5) for k, v in first.items()},
        "n_params": n_params,
    }


def main(argv=None) -> dict:
    import jax

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per library (median kept)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = {
        "benchmark": "train_step",
        "device": jax.devices()[0].device_kind,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "jax": jax.__version__,
        **run(args.batch, args.seq_len, args.steps, args.warmup),
    }
    return report(result, args.out)


if __name__ == "__main__":
    main()
