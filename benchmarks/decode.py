"""Greedy decode speed: llama_jax.generate against transformers' model.generate, same weights, same job.

CPU (default): three fp32 model shapes, each built once by transformers (random init), saved with
`save_pretrained` and loaded by `llama_jax.load(dir, dtype="float32")`:

    default      the embedded default's shape: vocab 128,256, dim 256, 4 layers, tied (head-heavy)
    layer_heavy  vocab 8,192, dim 512, 8 layers, FFN 1,536, untied
    deep_narrow  vocab 8,192, dim 256, 32 layers, FFN 768, untied
    (all GQA 8 query / 2 KV heads, llama3 RoPE)

Every shape runs the same job at batch 1, 8 and 32: 32-token prompts, 128 new tokens, no early stop,
on three engines: llama-jax, transformers `generate` (eager, dynamic cache), and transformers with a
static cache and `torch.compile` (its strongest CPU setting; inductor). Compilation is excluded (one
warm-up run each), the engines alternate run by run so a noisy machine slows all alike, and the best
of `--repeats` runs is kept.

    decode tokens/s  = batch * new_tokens / (wall time of the whole generate call)
    prefill tokens/s = batch * prompt_len / (wall time of a generate call for 1 new token)
    steady step      = (time for 128 new tokens - time for 1) / 127: one decode step, prefill excluded
    roofline         = bytes one step must read / memory bandwidth, where the bytes are every weight
                       but the embedding table (tied: the table is the head, so it counts) plus the
                       filled KV cache (its mean over the 128 steps), and the bandwidth is measured in
                       the same run by a ~1 GB copy (bytes read + written over the time; the faster of
                       numpy's and a jitted XLA copy)
    roofline fraction = (batch / steady step) / (batch / roofline step time)

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
BATCHES = (1, 8, 32)
# name -> (vocab, dim, layers, ffn, tied); 8 query / 2 KV heads everywhere.
SHAPES = {
    "default": (128_256, 256, 4, 768, True),
    "layer_heavy": (8_192, 512, 8, 1_536, False),
    "deep_narrow": (8_192, 256, 32, 768, False),
}
ENGINES = ("llama_jax", "transformers", "transformers_compiled")


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def hf_config(transformers, vocab: int, dim: int, n_layers: int, ffn: int, tied: bool):
    from llama_jax.weights.default_model import DEFAULT_CONFIG as c

    scaling = c.rope_scaling
    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=ffn,
        num_hidden_layers=n_layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=dim // 8,
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
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=None,
    )


def memory_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Bytes read + written per second by a copy of an `n_bytes` buffer: numpy's and a jitted XLA one."""
    import jax
    import jax.numpy as jnp

    buffers = [np.ones(n_bytes // 4, np.float32), np.empty(n_bytes // 4, np.float32)]
    numpy_s = _best_of(lambda: np.copyto(buffers[1], buffers[0]), repeats)
    x = jnp.asarray(buffers.pop(0))
    buffers.clear()
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    xla_s = _best_of(lambda: copy(x).block_until_ready(), repeats)
    measured = {"numpy_copy": 2 * n_bytes / numpy_s, "xla_copy": 2 * n_bytes / xla_s}
    return {k: round(v / 1e9, 2) for k, v in measured.items()} | {"used": round(max(measured.values()) / 1e9, 2)}


def step_bytes(model, batch: int) -> int:
    """Bytes one decode step must read: every weight but the embedding table (a tied table is the head,
    read whole), and the filled KV cache, averaged over the job's steps."""
    import jax
    from flax import nnx

    c = model.config
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    if not c.tie_embeddings:
        weights -= model.tok_embeddings[...].nbytes
    mean_filled = PROMPT_LEN + (NEW_TOKENS + 1) / 2
    kv = 2 * c.n_layers * batch * mean_filled * c.n_kv_heads * c.head_dim * model.dtype.itemsize
    return int(weights + kv)


def _compiled_generation_kwargs(transformers) -> dict:
    """transformers' static cache + torch.compile of the forward (auto-compile is GPU-only unless asked)."""
    config = transformers.CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def cpu_benchmark(repeats: int, shapes, batches) -> dict:
    import torch
    import transformers

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    # Every (shape, batch, cache length) is a new graph; past dynamo's limit it would silently run eager.
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 1024
    bandwidth = memory_bandwidth()
    results = {}
    for name in shapes:
        results[name] = _shape_benchmark(name, batches, repeats, bandwidth["used"] * 1e9, torch, transformers)
    from llama_jax.inference import sampler

    return {
        "benchmark": "decode",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": threads,
        "torch_threads": torch.get_num_threads(),
        "memory_bandwidth_GBps": bandwidth,
        "job": {"prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "greedy": True, "early_stop": False},
        "repeats": repeats,
        "compiles": sampler.trace_counts(),
        "shapes": results,
    }


def _shape_benchmark(name, batches, repeats, bandwidth, torch, transformers) -> dict:
    import llama_jax
    from llama_jax.inference import sampler

    vocab, dim, n_layers, ffn, tied = SHAPES[name]
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config(transformers, vocab, dim, n_layers, ffn, tied)).eval()
    n_params = sum(p.numel() for p in hf_model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model = llama_jax.load(tmp, dtype="float32")
    compiled_kwargs = _compiled_generation_kwargs(transformers)
    rng = np.random.default_rng(0)
    out = {"model": {"params": n_params, "dtype": "float32", **model_shape(model.config)}}
    for batch in batches:
        prompts = rng.integers(0, min(vocab, 128_000), size=(batch, PROMPT_LEN))
        ids = torch.tensor(prompts)

        def ours(n, prompts=prompts):
            result = sampler.generate(model, prompts.tolist(), max_new_tokens=n, stop_tokens=[])
            assert all(len(r.tokens) == n for r in result)
            return np.asarray([r.tokens for r in result])

        def theirs(n, ids=ids, batch=batch, **kwargs):
            with torch.no_grad():
                tokens = hf_model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                    **kwargs,
                )
            assert tokens.shape == (batch, PROMPT_LEN + n)
            return tokens[:, PROMPT_LEN:].numpy()

        run = {
            "llama_jax": ours,
            "transformers": theirs,
            "transformers_compiled": lambda n, theirs=theirs: theirs(n, **compiled_kwargs),
        }
        # Warm-up (compiles), and the check that every engine ran the same greedy job.
        tokens = {engine: fn(NEW_TOKENS) for engine, fn in run.items()}
        for fn in run.values():
            fn(1)
        full = dict.fromkeys(ENGINES, float("inf"))
        first = dict.fromkeys(ENGINES, float("inf"))
        for _ in range(repeats):
            for engine, fn in run.items():  # alternating
                full[engine] = min(full[engine], _best_of(lambda fn=fn: fn(NEW_TOKENS), 1))
                first[engine] = min(first[engine], _best_of(lambda fn=fn: fn(1), 2))
        step = {e: (full[e] - first[e]) / (NEW_TOKENS - 1) for e in ENGINES}
        bound_step = step_bytes(model, batch) / bandwidth
        decode = {e: batch * NEW_TOKENS / full[e] for e in ENGINES}
        out[f"batch_{batch}"] = {
            "decode_tokens_per_s": {e: round(v, 1) for e, v in decode.items()},
            "speedup_vs_transformers": round(decode["llama_jax"] / decode["transformers"], 2),
            "speedup_vs_transformers_compiled": round(decode["llama_jax"] / decode["transformers_compiled"], 2),
            "steady_step_ms": {e: round(1e3 * v, 3) for e, v in step.items()},
            "bytes_read_per_step": step_bytes(model, batch),
            "roofline_tokens_per_s": round(batch / bound_step, 1),
            "llama_jax_roofline_fraction": round(bound_step / step["llama_jax"], 3),
            "prefill_tokens_per_s": {e: round(batch * PROMPT_LEN / first[e], 1) for e in ENGINES},
            "greedy_token_agreement_with_transformers": {
                e: round(float((tokens[e] == tokens["transformers"]).mean()), 4) for e in ENGINES if e != "transformers"
            },
        }
        print(name, batch, out[f"batch_{batch}"], file=sys.stderr, flush=True)
    return out


def model_shape(config) -> dict:
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")
    return {k: getattr(config, k) for k in keys}


def device_benchmark(name: str, repeats: int) -> dict:
    """Llama 3.1 8B shape, random bf16 weights, batch 1, against the HBM bandwidth bound."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax.inference import sampler
    from llama_jax.model.config import model_config_from_file
    from llama_jax.model.model import Llama, abstract

    if name != "8b":
        raise SystemExit(f"--device-model: only '8b' is defined, got {name!r}")
    config = model_config_from_file("llama3_1_8b")
    device = jax.devices()[0]

    graphdef = nnx.graphdef(abstract(config, jnp.bfloat16))

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
            **model_shape(config),
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
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best is kept)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="CPU model shapes")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="CPU batch sizes")
    parser.add_argument("--out", type=pathlib.Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = (
        device_benchmark(args.device_model, args.repeats)
        if args.device_model
        else cpu_benchmark(args.repeats, args.shapes, args.batches)
    )
    return report(result, args.out)


if __name__ == "__main__":
    main()
