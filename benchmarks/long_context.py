"""Long-context prefill and decode: llama-jax (chunked prefill, blockwise attention) vs transformers SDPA.

One tiny Llama (dim 64, 2 layers, 4 query / 2 KV heads, vocab 384, 131,072 positions, llama3 RoPE) is
saved by transformers; each measurement runs in a child process of its own so its peak RSS is its
own, and the two libraries alternate, `--repeats` runs each per length: each side's fastest prefill run
is reported (`prefill_s_runs` lists them all; peak RSS is the largest of its runs).

- prefill tokens/s = L / (wall time of the prefill of an L-token prompt). llama-jax: the jitted
  `Llama.prefill` (compiled ahead, compile excluded) over the prompt padded to its power-of-two
  bucket, as `generate` runs it (chunks past the prompt are skipped). transformers: one
  `model(ids, use_cache=True)` forward with `attn_implementation="sdpa"`.
- decode tokens/s at context L = steps / wall time of `--steps` single-token steps at positions L, L+1, ..
  llama-jax: the jitted `Llama.decode` over a cache (its contents do not change the time), once bucketed
  to L (`bucket`) and once the full 131,072-entry cache (`full_cache`), with blockwise attention (reads
  the filled blocks) and with dense attention (reads the whole cache), to show which one grows with what:
  the summary's `decode_ms_per_step` table. transformers: steps after its prefill, over its own cache.
- prefill attention GFLOP/s = causal attention FLOPs (`attention_flops`) / prefill time, for both sides,
  against a measured fp32 matmul and the nominal AVX-512 peak (`machine_peak`). With head_dim 16 the
  work per score is small and the exp() of every score bounds both libraries well below a matmul's rate.

    flock -x /tmp/cpu.lock python benchmarks/long_context.py --out benchmarks/results/long_context_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LENGTHS = (8192, 32768, 120_000)
MAX_POSITIONS = 131_072


def _peak_rss() -> int:
    """This process image's own peak resident memory (VmHWM). Not ru_maxrss: Linux carries the forking
    process's peak across exec, so a child would report its parent's peak if that were larger."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def attention_flops(length: int, *, layers: int = 2, n_heads: int = 4, head_dim: int = 16) -> float:
    """FLOPs of causal attention over an L-token prompt: q·k and p·v, 2·H each per visible (query, key)
    pair, L(L+1)/2 pairs per head and layer. The rest of this model (dim 64) is < 1% of it at 8K."""
    return 4.0 * head_dim * n_heads * layers * length * (length + 1) / 2


def machine_peak() -> dict:
    """What the CPU can do: a measured fp32 matmul (jax, 2,048³, best of 5) and the nominal AVX-512 peak
    (2 FMA pipes × 8 fp32 lanes × 2 FLOPs per cycle and core, AMD Zen 4's double-pumped AVX-512)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((2048, 2048), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    best = min(_timed(lambda: matmul(a).block_until_ready()) for _ in range(5))
    with open("/proc/cpuinfo") as f:
        mhz = max(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
    cores = os.cpu_count() or 1
    return {
        "matmul_gflop_per_s": 2 * 2048**3 / best / 1e9,
        "cpu_mhz": mhz,
        "cores": cores,
        "nominal_peak_gflop_per_s": cores * mhz * 1e6 * 32 / 1e9,
    }


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bucket(n: int) -> int:
    return min(MAX_POSITIONS, 1 << (n - 1).bit_length())


def run_ours(checkpoint: str, length: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import llama_jax
    from llama_jax.inference import decoding
    from llama_jax.model.kv_cache import KVCache

    result = {"side": "llama_jax", "length": length}
    model = llama_jax.load(checkpoint, dtype="float32")
    graphdef, params = nnx.split(model)
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, length).astype(np.int32)
    bucket = _bucket(length + steps)
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, :length] = prompt
    lengths = jnp.asarray([length], jnp.int32)

    def prefill(params, tokens, lengths, cache):
        return nnx.merge(graphdef, params).prefill(tokens, cache, lengths)

    cache = KVCache.zeros(model.config, 1, bucket, jnp.float32)
    start = time.perf_counter()
    compiled = jax.jit(prefill, donate_argnums=3).lower(params, tokens, lengths, cache).compile()
    result["prefill_compile_s"] = time.perf_counter() - start
    start = time.perf_counter()
    logits, cache = compiled(params, tokens, lengths, cache)
    logits.block_until_ready()
    result["prefill_s"] = time.perf_counter() - start
    result["prefill_tokens_per_s"] = length / result["prefill_s"]
    del cache

    for attention in ("blockwise", "dense"):
        for name, size in (("bucket", bucket), ("full_cache", MAX_POSITIONS)):
            if attention == "dense" and length > 32768:
                continue  # the dense [1, 4, 1, S] decode step is fine, but keep the run short
            model_a = model.with_options(attention_backend=attention)
            graphdef_a, params_a = nnx.split(model_a)
            layers = decoding.layer_weights(model_a)

            def step(params, layers, token, position, cache, graphdef=graphdef_a):
                return nnx.merge(graphdef, params).decode(token, position, cache, layers=layers)

            cache = KVCache.zeros(model.config, 1, size, jnp.float32)
            token = jnp.asarray([[1]], jnp.int32)
            fn = jax.jit(step, donate_argnums=4)
            for _ in range(2):  # the second call compiles again: its cache comes back committed to a device
                logits, cache = fn(params_a, layers, token, jnp.asarray([[length]], jnp.int32), cache)
            logits.block_until_ready()
            start = time.perf_counter()
            for i in range(steps):
                logits, cache = fn(params_a, layers, token, jnp.asarray([[length + i]], jnp.int32), cache)
            logits.block_until_ready()
            elapsed = time.perf_counter() - start
            result[f"decode_{attention}_{name}"] = {
                "cache_len": size,
                "ms_per_step": 1e3 * elapsed / steps,
                "tokens_per_s": steps / elapsed,
            }
            del cache
    result["decode_tokens_per_s"] = result["decode_blockwise_bucket"]["tokens_per_s"]
    result["peak_rss_gib"] = _peak_rss() / 2**30
    return result


def run_transformers(checkpoint: str, length: int, steps: int) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.LlamaForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, length)
    ids = torch.tensor(prompt)[None]
    result = {"side": "transformers_sdpa", "length": length}
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        result["prefill_s"] = time.perf_counter() - start
        cache = out.past_key_values
        token = torch.tensor([[1]])
        start = time.perf_counter()
        for _ in range(steps):
            cache = model(token, past_key_values=cache, use_cache=True).past_key_values
        elapsed = time.perf_counter() - start
    result["prefill_tokens_per_s"] = length / result["prefill_s"]
    result["decode_tokens_per_s"] = steps / elapsed
    result["decode_ms_per_step"] = 1e3 * elapsed / steps
    result["peak_rss_gib"] = _peak_rss() / 2**30
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="runs per side and length; the fastest prefill is kept")
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--child", nargs=2, metavar=("SIDE", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        side, checkpoint = args.child
        run = run_ours if side == "ours" else run_transformers
        print(json.dumps(run(checkpoint, args.lengths[0], args.steps)))
        return 0

    from tests.checkpoints import hf_checkpoint

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_checkpoint(pathlib.Path(tmp), n_heads=4, n_kv_heads=2, seed=3)
        for length in args.lengths:
            runs = {"ours": [], "transformers": []}
            for _ in range(args.repeats):  # the sides alternate, so a noisy stretch slows both alike
                for side, side_runs in runs.items():
                    cmd = [sys.executable, __file__, "--child", side, tmp]
                    cmd += ["--lengths", str(length), "--steps", str(args.steps)]
                    child = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if child.returncode:
                        raise SystemExit(f"{side} at {length}: {child.stderr[-3000:]}")
                    side_runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
                    print(json.dumps(side_runs[-1]), file=sys.stderr, flush=True)
            for side_runs in runs.values():  # each side's fastest prefill run, with every run's time
                best = min(side_runs, key=lambda r: r["prefill_s"])
                best["prefill_s_runs"] = [r["prefill_s"] for r in side_runs]
                best["peak_rss_gib"] = max(r["peak_rss_gib"] for r in side_runs)
                results.append(best)
    peak = machine_peak()
    for r in results:  # attention FLOP/s of the prefill, against what the machine can do
        flops = attention_flops(r["length"]) / r["prefill_s"]
        r["prefill_attention_gflop_per_s"] = flops / 1e9
        r["prefill_attention_fraction_of_matmul"] = flops / 1e9 / peak["matmul_gflop_per_s"]
        r["prefill_attention_fraction_of_nominal_peak"] = flops / 1e9 / peak["nominal_peak_gflop_per_s"]
    by = {(r["side"], r["length"]): r for r in results}
    summary = {
        str(n): {
            "prefill_speedup_vs_sdpa": by["llama_jax", n]["prefill_tokens_per_s"]
            / by["transformers_sdpa", n]["prefill_tokens_per_s"],
            "decode_speedup_vs_sdpa": by["llama_jax", n]["decode_tokens_per_s"]
            / by["transformers_sdpa", n]["decode_tokens_per_s"],
        }
        for n in args.lengths
    }
    ours = {n: by["llama_jax", n] for n in args.lengths}
    summary["decode_ms_per_step"] = {  # growth with the filled length (rows), not with the cache (columns)
        str(n): {key: r[key]["ms_per_step"] for key in r if key.startswith("decode_") and isinstance(r[key], dict)}
        | {"transformers_sdpa": by["transformers_sdpa", n]["decode_ms_per_step"]}
        for n, r in ours.items()
    }
    report = {
        "benchmark": "long_context",
        "model": "tiny Llama (dim 64, 2 layers, 4 q / 2 kv heads, vocab 384, 131,072 positions), fp32",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "machine_peak": peak,
        "steps": args.steps,
        "results": results,
        "summary": summary,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
