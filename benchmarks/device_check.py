"""One prepared run on one GPU (H100/H200), under 8 minutes: what the lowering tests cannot show.

    python benchmarks/device_check.py                  # -> benchmarks/results/device_<gpu>.json
    python benchmarks/device_check.py --smoke --out /tmp/x   # tiny shapes on CPU: the script end to end

Random weights are generated on the device (no checkpoint). Checks, in order, each in its own
try/except and time budget (a failure or a skip is a message in the JSON, never a crash; the JSON is
rewritten after every check, so a killed run keeps what it measured):
- hbm_bandwidth: a large on-device elementwise copy, read + write bytes / time. The roofline unit.
- matmul_peak: a large bf16 matmul's TFLOP/s (for reference next to the spec peak).
- attention_parity: cuDNN vs the dense XLA attention in bf16 (causal, GQA), max|diff| / max|ref|.
- decode_attention: the split-K Triton decode kernel `generate` decodes with vs the dense read of the
  same cache layer; its time with 1/8 of the layer filled against all of it, and the dense read's.
- prefill_mfu: the 8B shape, one prompt of 4K, 2K and 8K tokens: model FLOPs / time / spec peak.
- prefill_128k: the 8B shape, one 128K-token prompt through `generate`'s prefill (time, memory).
- decode_bf16: the 8B shape at batch 1, 8, 64: s/step from `generate` (128 new tokens minus 65: the
  same compiled programs, `limit` is a runtime argument, so prefill and compilation cancel), against
  bytes per step (weights + the KV cache read) / the measured bandwidth.
- decode_fp8: the same with the FP8 release layout (FFNs of layers 1..30 rowwise FP8, "fp8" matmul),
  its ratio to bf16, and the compiled decode program searched for cuBLASLt FP8 GEMM custom calls;
  then at batch 1 and 8 the "auto" matmul (the weight-only FP8 read at decode), against "fp8".
- train_mfu_1b: one full fine-tuning step (Trainer: forward, backward, AdamW) on the 1B shape.

Goals (docs/GPU.md): 8B bf16 decode at batch 1 >= 85% of the HBM roofline; prefill >= 60% MFU at 4K;
FP8 decode >= 1.7x bf16 at batch 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import re
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama_jax.model import platform  # noqa: E402  (imports jax, starts no backend)

BUDGET_S = 420.0  # the whole run; each check also has its own estimate below
# Dense bf16 / FP8 tensor-core peaks and HBM bandwidth from NVIDIA's data sheets (SXM parts).
SPECS = {
    "H200": {"bf16_flops": 989e12, "fp8_flops": 1979e12, "hbm_bytes_s": 4.8e12},
    "H100 PCIe": {"bf16_flops": 756e12, "fp8_flops": 1513e12, "hbm_bytes_s": 2.0e12},
    "H100": {"bf16_flops": 989e12, "fp8_flops": 1979e12, "hbm_bytes_s": 3.35e12},
}


def _spec(kind: str) -> dict | None:
    return next((v for k, v in SPECS.items() if k in kind), None)


class Run:
    """The JSON being built, its deadline, and the model shapes (real or --smoke)."""

    def __init__(self, smoke: bool, out: pathlib.Path):
        import jax

        self.smoke, self.start = smoke, time.perf_counter()
        self.device = jax.devices()[0]
        kind = getattr(self.device, "device_kind", self.device.platform)
        name = re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") + ("_smoke" if smoke else "")
        self.path = out / f"device_{name}.json"
        self.spec = _spec(kind)
        self.bandwidth = None  # bytes/s, from hbm_bandwidth
        self.result = {
            "device": kind,
            "platform": self.device.platform,
            "jax": jax.__version__,
            "smoke": smoke,
            "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION")},
            "spec": self.spec,
            "checks": {},
        }

    def left(self) -> float:
        return BUDGET_S - (time.perf_counter() - self.start)

    def check(self, name: str, estimate_s: float, fn) -> None:
        if self.left() < estimate_s:
            entry = {"status": "skipped", "message": f"{self.left():.0f} s left of the budget, needs ~{estimate_s} s"}
        else:
            t0 = time.perf_counter()
            try:
                entry = {"status": "ok", **fn(self)}
            except Exception as e:  # one piece failing must not take the others with it
                entry = {
                    "status": "error",
                    "message": f"{type(e).__name__}: {e}"[:2000],
                    "traceback": traceback.format_exc()[-3000:],
                }
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            gc.collect()
        self.result["checks"][name] = entry
        print(
            f"{name}: {entry['status']} {json.dumps({k: v for k, v in entry.items() if k != 'traceback'})[:400]}",
            flush=True,
        )
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=2) + "\n")
        tmp.rename(self.path)

    def memory(self) -> dict:
        stats = self.device.memory_stats() or {}
        return {k: stats.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


# ---- shapes ---------------------------------------------------------------------------------------------


def _config(name: str, smoke: bool):
    from llama_jax.model.config import LlamaConfig, model_config_from_file

    if smoke:  # head_dim 128 as the real ones; a few MB
        return LlamaConfig(vocab_size=512, dim=256, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=256, max_seq_len=1024)
    return model_config_from_file(name)


def _random_model(config, *, fp8_layers=(), matmul="fp8"):
    """bf16 weights drawn on the device; FP8 FFNs (rowwise, scale 1/448 of a N(0, 0.02) weight) on `fp8_layers`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax.model import quant
    from llama_jax.model.model import Llama
    from llama_jax.model.options import Options

    fp8 = quant.Fp8Spec(tuple(fp8_layers), matmul=matmul) if fp8_layers else None
    model = Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), options=Options(fp8=fp8))
    if fp8 is not None:
        ffn = model.layers.feed_forward
        for i, name in enumerate(("w1", "w2", "w3")):
            w = getattr(ffn, name)
            q = jax.jit(lambda k, s=w.shape: jnp.clip(jax.random.normal(k, s) * 64, -448, 448).astype(quant.FP8))
            w.set_value(q(jax.random.key(i)))
            scale = getattr(ffn, f"{name}_scale")
            scale.set_value(jnp.full(scale.shape, 0.02 / 64, jnp.float32))
    return model


def _param_bytes(model) -> int:
    import jax
    from flax import nnx

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))


REPEATS = {"value": None}  # --smoke: 1


def _timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` (which must block), after one warm-up call (compilation)."""
    repeats = REPEATS["value"] or repeats
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---- the checks -----------------------------------------------------------------------------------------


def hbm_bandwidth(run: Run) -> dict:
    import jax
    import jax.numpy as jnp

    n = (2**20 if run.smoke else 2**30) // 4 * 4  # 4 MiB / 4 GiB of float32
    x = jnp.ones((n // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    seconds = _timed(lambda: f(x).block_until_ready(), 10)
    run.bandwidth = 2 * n / seconds  # one read, one write
    spec = run.spec["hbm_bytes_s"] if run.spec else None
    return {
        "bytes": 2 * n,
        "seconds": seconds,
        "bytes_per_s": run.bandwidth,
        "pct_of_spec": 100 * run.bandwidth / spec if spec else None,
    }


def matmul_peak(run: Run) -> dict:
    import jax
    import jax.numpy as jnp

    n = 256 if run.smoke else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    seconds = _timed(lambda: f(a).block_until_ready(), 10)
    flops = 2 * n**3 / seconds
    spec = run.spec["bf16_flops"] if run.spec else None
    return {"n": n, "flops_per_s": flops, "pct_of_spec": 100 * flops / spec if spec else None}


def attention_parity(run: Run) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama_jax.model import attention

    if run.device.platform != "gpu":
        raise RuntimeError(f"cuDNN attention needs an NVIDIA GPU; this run is on {run.device.platform}")
    b, t, n, k, h = 2, 2048, 32, 8, 128
    q, kk, v = (jax.random.normal(jax.random.key(i), (b, t, m, h), jnp.bfloat16) for i, m in enumerate((n, k, k)))
    q_index = jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1))
    out = {}
    for backend in ("cudnn", "dense"):
        f = jax.jit(lambda q, k_, v, i, be=backend: attention.attend(q, k_, v, i, backend=be, q_offset=False))
        out[backend] = np.asarray(f(q, kk, v, q_index), np.float32)
        out[backend + "_seconds"] = _timed(lambda f=f: f(q, kk, v, q_index).block_until_ready(), 5)
    diff = float(np.max(np.abs(out["cudnn"] - out["dense"])) / np.max(np.abs(out["dense"])))
    return {
        "shape_btnkh": [b, t, n, k, h],
        "max_rel_diff": diff,
        "bound": 2e-2,
        "pass": diff <= 2e-2,
        "cudnn_seconds": out["cudnn_seconds"],
        "dense_seconds": out["dense_seconds"],
    }


def decode_attention(run: Run) -> dict:
    """`generate`'s decode attention on a GPU: jax's split-K Triton decode kernel over a `[B, K, S, H]` cache
    layer (`paged_attention.contiguous`) against the dense read of the same layer, bf16, ragged rows
    (max|diff|/max|ref| <= 2e-2); its time with an eighth of the layer filled against the whole layer filled
    (it reads each row's filled keys: about 1/8 of the time, launch overhead aside) and the dense read's
    (the whole layer, whatever is filled); the kernel's bandwidth over the whole filled layer. On a CPU
    (--smoke) the kernel runs in Pallas interpret mode."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama_jax.model import attention, paged_attention

    b, k, g, s, h = (2, 2, 4, 256, 16) if run.smoke else (8, 8, 4, 8192, 128)
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (b, k * g, h), jnp.bfloat16)
    layer_k, layer_v = (jax.random.normal(key, (b, k, s, h), jnp.bfloat16) for key in keys[1:])
    kernel = jax.jit(paged_attention.contiguous)
    dense = jax.jit(lambda q, k_, v, n: attention.dense_kv_major(q[:, None], k_, v, (n - 1)[:, None])[:, 0])
    ragged = jnp.asarray(np.linspace(1, s, b).astype(np.int32))
    got, want = (np.asarray(f(q, layer_k, layer_v, ragged), np.float32) for f in (kernel, dense))
    diff = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    full, eighth = jnp.full((b,), s, jnp.int32), jnp.full((b,), s // 8, jnp.int32)
    seconds = {
        name: _timed(lambda f=f, n=n: f(q, layer_k, layer_v, n).block_until_ready(), 20)
        for name, f, n in (("kernel_full", kernel, full), ("kernel_eighth", kernel, eighth), ("dense", dense, full))
    }
    layer_bytes = 2 * b * k * s * h * 2
    return {
        "shape_bkgsh": [b, k, g, s, h],
        "max_rel_diff": diff,
        "bound": 2e-2,
        "pass": diff <= 2e-2,
        "seconds": seconds,
        "eighth_over_full": seconds["kernel_eighth"] / seconds["kernel_full"],
        "kernel_full_bytes_per_s": layer_bytes / seconds["kernel_full"],
    }


def _prefill_flops(config, tokens: int) -> float:
    """Matmul FLOPs of a causal forward over `tokens` tokens: 2 per weight per token (head: 1 token) + attention."""
    from benchmarks import layer_matmul_weights

    c = config
    attention = 2 * c.n_layers * c.n_heads * c.head_dim * tokens * tokens  # QK^T and PV, causal half of 2·2·T²
    return 2.0 * c.n_layers * layer_matmul_weights(c) * tokens + attention + 2.0 * c.dim * c.vocab_size


def _prefill_seconds(model, tokens: int, repeats: int, **kw) -> float:
    from llama_jax.inference import sampler

    prompt = [[7] * (tokens - 1)]
    return _timed(lambda: sampler.generate(model, prompt, max_new_tokens=1, stop_tokens=[], **kw), repeats)


def prefill_128k(run: Run) -> dict:
    tokens = 64 if run.smoke else 131_072
    before = run.memory()
    # unroll=1: the decode program scans the stacked weights, so no per-layer copy shares the memory.
    seconds = _prefill_seconds(run.model_8b, tokens, 1, unroll=1)
    flops = _prefill_flops(run.config_8b, tokens)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "flops_per_s": flops / seconds,
        "mfu_pct": _mfu(run, flops / seconds),
        "memory_before": before,
        "memory_after": run.memory(),
    }


def _mfu(run: Run, flops_per_s: float) -> float | None:
    return 100 * flops_per_s / run.spec["bf16_flops"] if run.spec else None


def prefill_mfu(run: Run) -> dict:
    rows = []
    for tokens in (64,) if run.smoke else (4096, 2048, 8192):
        seconds = _prefill_seconds(run.model_8b, tokens, 3)
        flops = _prefill_flops(run.config_8b, tokens)
        rows.append(
            {
                "tokens": tokens,
                "seconds": seconds,
                "flops_per_s": flops / seconds,
                "mfu_pct": _mfu(run, flops / seconds),
            }
        )
    return {"note": "batch 1, generate(max_new_tokens=1): prefill + first token", "rows": rows}


def _decode_shape(run: Run) -> tuple[int, int, int]:
    """(prompt tokens, new tokens, the shorter run's new tokens): both in one output bucket, one program."""
    return (16, 32, 17) if run.smoke else (128, 128, 65)


def _decode_rows(run: Run, model, config, batches=(1, 8, 64)) -> list[dict]:
    from llama_jax.inference import sampler

    prompt_len, steps, short = _decode_shape(run)
    batches = batches[:1] if run.smoke else batches
    weight_bytes = _param_bytes(model) - config.vocab_size * config.dim * 2  # the embedding is gathered, not read
    rows = []
    for batch in batches:
        if run.left() < 30:
            rows.append({"batch": batch, "status": "skipped", "message": "out of time"})
            continue
        prompts = [[7] * prompt_len] * batch

        def gen(n, prompts=prompts):
            return lambda: sampler.generate(model, prompts, max_new_tokens=n, stop_tokens=[])

        per_step = (_timed(gen(steps), 3) - _timed(gen(short), 3)) / (steps - short)
        cache_len = sampler.prompt_bucket(prompt_len, config.max_seq_len) + steps
        kv_bytes = 2 * config.n_layers * batch * cache_len * config.n_kv_heads * config.head_dim * 2
        ideal = (weight_bytes + kv_bytes) / run.bandwidth if run.bandwidth else None
        rows.append(
            {
                "batch": batch,
                "seconds_per_step": per_step,
                "tokens_per_s": batch / per_step,
                "bytes_per_step": weight_bytes + kv_bytes,
                "pct_of_hbm_roofline": 100 * ideal / per_step if ideal else None,
            }
        )
    return rows


def decode_bf16(run: Run) -> dict:
    run.decode_bf16_rows = _decode_rows(run, run.model_8b, run.config_8b)
    return {
        "note": "s/step = (t(N=128) - t(N=65)) / 63, greedy, 128-token prompts; roofline = (weights + KV "
        "cache) / measured bandwidth",
        "rows": run.decode_bf16_rows,
    }


def fp8_gemm_calls(hlo: str) -> list[str]:
    """GEMMs of a compiled GPU program that multiply f8e4m3fn by f8e4m3fn: cuBLASLt FP8 custom calls
    (`__cublas$lt$matmul$f8`) or dots of GEMM fusions (Triton's `__triton_nested_gemm_fusion`) whose
    operands are FP8 after compilation. The compiled HLO prints operands without their types; the
    package's reader resolves them (`llama_jax.planning.compiled`)."""
    from llama_jax.planning import compiled

    report = compiled.read_text(hlo)
    calls = report.custom_calls.items()
    cublas = [f"custom-call {name} x{n}" for name, n in calls if "cublas" in name and "f8" in name]
    dots = [f"{d.computation}: dot {d.instr} ({d.lhs} x {d.rhs})" for d in report.fp8_dots()]
    return cublas + dots


def decode_fp8(run: Run) -> dict:
    from llama_jax.inference import sampler
    from llama_jax.weights import fp8

    config = run.config_8b
    model = _random_model(config, fp8_layers=fp8.release_layers(config.n_layers))
    rows = _decode_rows(run, model, config)
    prompt_len, steps, _ = _decode_shape(run)
    _, decode = sampler.lower(model, [[7] * prompt_len], max_new_tokens=steps)  # the batch-1 program timed above
    calls = fp8_gemm_calls(decode.compile().as_text())
    # Per FP8 layer, w1 and w3 (one GEMM where XLA concatenates them, as for an unsharded model) and w2.
    quantized = config.n_layers - 2
    bf16 = {r["batch"]: r for r in getattr(run, "decode_bf16_rows", []) if "seconds_per_step" in r}
    for r in rows:
        if r["batch"] in bf16 and "seconds_per_step" in r:
            r["speedup_vs_bf16"] = bf16[r["batch"]]["seconds_per_step"] / r["seconds_per_step"]
    # What `--fp8-matmul auto` decodes with instead (the weight-only FP8 read, docs/GPU.md), timed against
    # the FP8 GEMMs it was chosen over: the measurement that would move `quant.FP8_GEMM_MIN_ROWS`.
    auto = model.with_options(fp8=dataclasses.replace(model.fp8, matmul="auto"))
    auto_rows = _decode_rows(run, auto, config, batches=(1, 8))
    gemm = {r["batch"]: r for r in rows if "seconds_per_step" in r}
    for r in auto_rows:
        if r["batch"] in gemm and "seconds_per_step" in r:
            r["speedup_vs_fp8_gemms"] = gemm[r["batch"]]["seconds_per_step"] / r["seconds_per_step"]
    return {
        "fp8_gemm_custom_calls": len(calls),
        "expected_at_least": 2 * quantized,
        "uses_fp8_gemms": len(calls) >= 2 * quantized,
        "examples": calls[:3],
        "rows": rows,
        "auto_rows": auto_rows,
    }


def train_mfu_1b(run: Run) -> dict:
    import jax
    import numpy as np

    from llama_jax.jobs.train import TrainConfig, Trainer
    from llama_jax.model import attention

    config = _config("llama3_2_1b", run.smoke)
    batch, seq = (2, 64) if run.smoke else (4, 2048)
    model = _random_model(config)
    trainer = Trainer(model, TrainConfig(batch_size=batch, steps=10, warmup_steps=0, remat=False))
    del model
    ones = np.ones((batch, seq), np.int32)
    data = {
        "tokens": ones * 7,
        "targets": ones * 7,
        "loss_mask": ones.astype(np.float32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
        "segment_ids": ones,
    }
    seconds = _timed(lambda: jax.block_until_ready(trainer.train_step(data)), 3)
    flops = 3 * batch * _prefill_flops(config, seq)  # forward + backward (2x)
    backend = attention.select(
        "auto",
        platform=run.device.platform,
        dtype="bfloat16",
        q_len=seq,
        kv_len=seq,
        batch=batch,
        n_heads=config.n_heads,
        q_offset=False,
        segments=True,
    )
    return {
        "batch": batch,
        "seq_len": seq,
        "seconds": seconds,
        "tokens_per_s": batch * seq / seconds,
        "flops_per_s": flops / seconds,
        "mfu_pct": _mfu(run, flops / seconds),
        "attention": backend,
        "note": "bf16 weights, float32 master + AdamW, no remat; random tokens, one packed segment per row",
    }


def with_8b(run: Run) -> dict:
    run.config_8b = _config("llama3_1_8b", run.smoke)
    run.model_8b = _random_model(run.config_8b)
    return {"params": run.config_8b.num_params(), "weight_bytes": _param_bytes(run.model_8b), "memory": run.memory()}


def drop_8b(run: Run) -> dict:
    del run.model_8b
    gc.collect()
    return {"memory": run.memory()}


CHECKS = (  # name, seconds it needs at least, function
    ("hbm_bandwidth", 10, hbm_bandwidth),
    ("matmul_peak", 10, matmul_peak),
    ("attention_parity", 20, attention_parity),
    ("decode_attention", 20, decode_attention),
    ("build_8b", 30, with_8b),
    ("decode_bf16", 90, decode_bf16),
    ("prefill_mfu", 60, prefill_mfu),
    ("prefill_128k", 60, prefill_128k),
    ("drop_8b", 0, drop_8b),
    ("decode_fp8", 120, decode_fp8),
    ("train_mfu_1b", 45, train_mfu_1b),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, tests): the script end to end")
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not args.smoke:
        platform.configure_gpu_environment()  # the flags and memory fraction the CLI runs with
    run = Run(args.smoke, args.out)
    REPEATS["value"] = 1 if args.smoke else None
    for name, estimate, fn in CHECKS:
        needs_8b = fn in (prefill_128k, prefill_mfu, decode_bf16, drop_8b)
        if needs_8b and not hasattr(run, "model_8b"):
            run.result["checks"][name] = {"status": "skipped", "message": "no 8B-shaped model (build_8b failed)"}
            continue
        run.check(name, 0 if args.smoke else estimate, fn)
    run.result["seconds"] = round(time.perf_counter() - run.start, 1)
    run.write()
    print(f"wrote {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
