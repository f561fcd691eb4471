"""Greedy decode speed: llama_jax.generate against transformers' model.generate, same weights, same job.

CPU (default): a Llama-3.1-shaped fp32 model the size of `llama_jax.default_model` (vocab 128,256,
dim 256, 4 layers, GQA 8/2, tied embeddings; ~35.8M parameters) is built once by transformers
(random init), saved with `save_pretrained`, and loaded by `llama_jax.load(dir, dtype="float32")`.
Both sides then run the same job: 32-token prompts, 128 new tokens, no early stop, at batch 1 and 8.
Compilation is excluded (one warm-up run each), the best of `--repeats` runs is kept, and the two
libraries alternate run by run so a noisy machine slows both alike.

    decode tokens/s  = batch * new_tokens / (wall time of the whole generate call)
    prefill tokens/s = batch * prompt_len / (wall time of a generate call for 1 new token)

GPU (`--device-model 8b`): Llama 3.1 8B's shape with random bf16 weights, batch 1, reported against
the memory-bandwidth bound: HBM bandwidth / bytes one decode step must read (every weight but the
untied embedding table), the bandwidth measured by a large on-device copy (bytes read + written over
the time). "steady" excludes the prefill: (time for 128 tokens - time for 1) / 127.

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

PROMPT_LEN = 32
NEW_TOKENS = 128
BATCHES = (1, 8)


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _hf_config(transformers):
    from llama_jax.default_model import DEFAULT_CONFIG as c

    scaling = c.rope_scaling
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_seq_len,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": c.rope_theta,
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        },
        tie_word_embeddings=c.tie_embeddings,
        bos_token_id=128_000,
        eos_token_id=None,
        pad_token_id=None,
    )


def cpu_benchmark(repeats: int) -> dict:
    import torch
    import transformers

    import llama_jax
    from llama_jax import sampler

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(_hf_config(transformers)).eval()
    n_params = sum(p.numel() for p in hf_model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model = llama_jax.load(tmp, dtype="float32")

    rng = np.random.default_rng(0)
    results = {}
    for batch in BATCHES:
        prompts = rng.integers(0, 128_000, size=(batch, PROMPT_LEN))
        ids = torch.tensor(prompts)
        mask = torch.ones_like(ids)

        def ours(n, prompts=prompts):
            out = sampler.generate(model, prompts.tolist(), max_new_tokens=n, stop_tokens=[])
            assert all(len(r.tokens) == n for r in out)
            return out

        def theirs(n, ids=ids, mask=mask, batch=batch):
            with torch.no_grad():
                out = hf_model.generate(
                    ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    eos_token_id=None, pad_token_id=0,
                )  # fmt: skip
            assert out.shape == (batch, PROMPT_LEN + n)
            return out

        # Warm-up (compiles ours), and a check that both ran the same greedy job.
        agree = _agreement(ours(NEW_TOKENS), theirs(NEW_TOKENS), PROMPT_LEN)
        ours(1), theirs(1)
        timings = {"ours": float("inf"), "hf": float("inf"), "ours_prefill": float("inf"), "hf_prefill": float("inf")}
        for _ in range(repeats):
            timings["ours"] = min(timings["ours"], _best_of(lambda: ours(NEW_TOKENS), 1))
            timings["hf"] = min(timings["hf"], _best_of(lambda: theirs(NEW_TOKENS), 1))
            timings["ours_prefill"] = min(timings["ours_prefill"], _best_of(lambda: ours(1), 3))
            timings["hf_prefill"] = min(timings["hf_prefill"], _best_of(lambda: theirs(1), 3))
        decode_ours = batch * NEW_TOKENS / timings["ours"]
        decode_hf = batch * NEW_TOKENS / timings["hf"]
        prefill_ours = batch * PROMPT_LEN / timings["ours_prefill"]
        prefill_hf = batch * PROMPT_LEN / timings["hf_prefill"]
        results[f"batch_{batch}"] = {
            "decode_tokens_per_s": {"llama_jax": round(decode_ours, 1), "transformers": round(decode_hf, 1)},
            "decode_speedup": round(decode_ours / decode_hf, 2),
            "prefill_tokens_per_s": {"llama_jax": round(prefill_ours, 1), "transformers": round(prefill_hf, 1)},
            "prefill_speedup": round(prefill_ours / prefill_hf, 2),
            "greedy_token_agreement_with_transformers": agree,
        }
    return {
        "benchmark": "decode",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": threads,
        "torch_threads": torch.get_num_threads(),
        "model": {"params": n_params, "dtype": "float32", **_shape(model.config)},
        "job": {"prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "greedy": True, "early_stop": False},
        "repeats": repeats,
        "compiles": sampler.trace_counts(),
        **results,
    }


def _agreement(ours, theirs, prompt_len: int) -> float:
    """Fraction of greedy tokens equal in both (fp32 on both sides: ~1.0; ties may flip late ones)."""
    theirs = theirs[:, prompt_len:].numpy()
    ours = np.asarray([r.tokens for r in ours])
    return round(float((ours == theirs).mean()), 4)


def _shape(config) -> dict:
    return {k: getattr(config, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")}


def device_benchmark(name: str, repeats: int) -> dict:
    """Llama 3.1 8B shape, random bf16 weights, batch 1, against the HBM bandwidth bound."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax import sampler
    from llama_jax.config import model_config_from_file
    from llama_jax.model import Llama

    if name != "8b":
        raise SystemExit(f"--device-model: only '8b' is defined, got {name!r}")
    config = model_config_from_file(REPO / "configs" / "llama3_1_8b.py")
    device = jax.devices()[0]

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))

    @jax.jit
    def init():
        return nnx.split(Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))[1]

    model = nnx.merge(graphdef, init())
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    # A decode step reads every weight once, except an untied embedding table: only B rows of it.
    read_bytes = weight_bytes - (0 if config.tie_embeddings else model.tok_embeddings[...].nbytes)

    bandwidth = _hbm_bandwidth(jax, jnp)
    prompts = np.random.default_rng(0).integers(0, min(128_000, config.vocab_size), size=(1, PROMPT_LEN)).tolist()

    def ours(n):
        return sampler.generate(model, prompts, max_new_tokens=n, stop_tokens=[])

    ours(NEW_TOKENS), ours(1)
    total = _best_of(lambda: ours(NEW_TOKENS), repeats)
    first = _best_of(lambda: ours(1), repeats)
    per_token = (total - first) / (NEW_TOKENS - 1)  # steady-state decode step, prefill excluded
    bound = bandwidth / read_bytes
    return {
        "benchmark": "decode",
        "device": str(device.device_kind),
        "model": {
            "name": "llama3.1-8b-shape",
            "dtype": "bfloat16",
            "weight_bytes": weight_bytes,
            "bytes_read_per_decode_step": read_bytes,
            "params": config.num_params(),
            **_shape(config),
        },
        "job": {"batch": 1, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "greedy": True},
        "repeats": repeats,
        "hbm_bandwidth_GBps": round(bandwidth / 1e9, 1),
        "decode_tokens_per_s": round(NEW_TOKENS / total, 1),
        "steady_decode_tokens_per_s": round(1.0 / per_token, 1),
        "bandwidth_bound_tokens_per_s": round(bound, 1),
        "fraction_of_bound": round((1.0 / per_token) / bound, 3),
        "prefill_tokens_per_s": round(PROMPT_LEN / first, 1),
    }


def _hbm_bandwidth(jax, jnp, n_bytes: int = 4 << 30, repeats: int = 10) -> float:
    """Bytes moved per second by an on-device copy of a large buffer (read + write)."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()

    def run():
        copy(x).block_until_ready()

    return 2 * n_bytes / _best_of(run, repeats)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-model", choices=["8b"], help="GPU variant: the 8B shape, random bf16, batch 1")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (best is kept)")
    parser.add_argument("--out", type=pathlib.Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = device_benchmark(args.device_model, args.repeats) if args.device_model else cpu_benchmark(args.repeats)
    return report(result, args.out)


if __name__ == "__main__":
    main()
