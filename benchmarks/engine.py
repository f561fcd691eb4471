"""The continuous-batching engine against the static batcher and transformers' `generate_batch`.

CPU, the ~35.8M-parameter fp32 Llama-3.1-shaped model of `benchmarks/decode.py` (128K vocabulary,
dim 256, 4 layers, tied embeddings), random init by transformers, saved and loaded by
`llama_jax.load`. Its <|eot_id|> row is set to beta x the mean direction of the model's final hidden
states, beta bisected on sampled completions until their mean length is 60 (cap 256): lengths decided
by sampled stop tokens, ~1.5% of steps stopping.

Workloads (same requests for every side, temperature 1, per-request seeds; each drawn from a seed of its own):
  stop:    `--requests` prompts of 20-600 random tokens, up to 256 new tokens, ending at sampled eot.
  prefix:  the same with a 1,000-token system prompt in front of every prompt (prompts 20-100 tokens).

Sides, each timed end to end on the token ids (best of `--repeats` after a warm-up that compiles):
  engine          `Engine.run` (slots = batch size, prefix cache on)
  engine_noshare  the same, prefix cache off (prefix workload: the gain from sharing, reported beside
                  `prefix_sharing_flop_bound`: the FLOPs the run must do without sharing over those with
                  it, no padding, `prefix_sharing_bound`; decoding is the same on both sides)
  static          the previous batch job's schedule: `sampler.generate` on groups of `batch` requests
                  of one prompt bucket (`min_batch` padding), every row held until its batch ends
  transformers    `generate_batch` (continuous batching, paged cache), eager

Prints one JSON object; `--out benchmarks/results/engine_cpu.json` also writes it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import layer_matmul_weights, report  # noqa: E402
from benchmarks.decode import SHAPES, hf_config, model_shape  # noqa: E402

EOT = 128_009
TARGET_MEAN = 60  # sampled completion tokens (geometric, ~1.5% of steps stop), capped at MAX_NEW
MAX_NEW = 256
PAGE = 64  # the engine's page: prefix sharing works in whole pages
CALIBRATION_PROMPTS = 32
WORKLOADS = ("stop", "prefix")


def tune_eot(torch, hf_model, model, rng, prompts) -> dict:
    """Set the eot row (tied: input and output, in both models) to beta x the mean final hidden direction,
    beta bisected until sampled completions of `prompts` (calibration prompts shaped like the workload's,
    apart from them; temperature 1, cap 256, seeds apart) have a mean length of TARGET_MEAN. (Matching the
    eot probability on prompt positions gave sampled completions a mean of 246 tokens, and one beta for
    every workload ended the 1,000-token-prefix prompts at once: the calibration samples, per workload.)
    The samples come from the engine, all prompts in flight at once: its tokens are `generate`'s for the
    same seeds (`engine_equals_static`), and it prefills a shared prefix once, where `generate` prefilled
    the 1,000-token prefix for every prompt of every bisection step (over an hour on this machine)."""
    import jax.numpy as jnp

    from llama_jax.inference.engine import Engine, Request
    from llama_jax.inference.sampling import SamplingParams

    ids = torch.tensor(rng.integers(0, 128_000, size=(4, 512)))
    with torch.no_grad():
        h = hf_model.model(ids).last_hidden_state.reshape(-1, hf_model.config.hidden_size)
        direction = (h.mean(0) / h.mean(0).norm()).numpy()
    table = model.tok_embeddings[...]

    params = [
        SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=1_000_000 + i, stop_tokens=[EOT])
        for i in range(len(prompts))
    ]
    requests = [Request(i, p, params[i]) for i, p in enumerate(prompts)]
    pages = len(prompts) * (max(map(len, prompts)) + MAX_NEW) // PAGE + 64

    def mean_length(beta: float) -> float:
        model.tok_embeddings.value = table.at[EOT].set(jnp.asarray(beta * direction, table.dtype))
        engine = Engine(model, slots=len(prompts), pages=pages, page_size=PAGE, burst=16)
        return float(np.mean([len(r.tokens) for r in engine.generate(requests)]))

    lo, hi = 0.0, 1.0
    while mean_length(hi) > TARGET_MEAN:  # mean length falls as beta grows
        lo, hi = hi, 2 * hi
    for _ in range(6):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_length(mid) > TARGET_MEAN else (lo, mid)
    beta = (lo + hi) / 2
    calibrated = mean_length(beta)
    with torch.no_grad():
        hf_model.model.embed_tokens.weight[EOT] = torch.from_numpy(beta * direction)
    return {"beta": round(beta, 4), "calibration_mean_length": round(calibrated, 1), "prompts": len(prompts)}


def make_prompts(rng, n, lo, hi, system=None) -> list[list[int]]:
    prompts = [[128_000, *rng.integers(0, 128_000, size=int(rng.integers(lo, hi))).tolist()] for _ in range(n)]
    return [system + p[1:] for p in prompts] if system else prompts


def static(model, prompts, seeds, batch):
    """The previous batch job: groups of `batch` requests of one prompt bucket, one `generate` each."""
    from llama_jax.inference import sampler

    groups: dict[int, list[int]] = {}
    outs = {}

    def run(idx):
        res = sampler.generate(
            model,
            [prompts[i] for i in idx],
            max_new_tokens=MAX_NEW,
            temperature=1.0,
            seed=[seeds[i] for i in idx],
            stop_tokens=[EOT],
            min_batch=batch,
        )
        outs.update(zip(idx, res, strict=True))

    for i, p in enumerate(prompts):
        group = groups.setdefault(sampler.prompt_bucket(len(p), model.config.max_seq_len), [])
        group.append(i)
        if len(group) == batch:
            run(group)
            group.clear()
    for group in groups.values():
        if group:
            run(group)
    return [outs[i] for i in range(len(prompts))]


def cpu_benchmark(n_requests: int, batch: int, repeats: int, workloads) -> dict:
    import torch
    import transformers

    import llama_jax
    from llama_jax.inference.engine import Engine, Request
    from llama_jax.inference.sampling import SamplingParams

    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config(transformers, *SHAPES["default"])).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model = llama_jax.load(tmp, dtype="float32")
    out = {
        "benchmark": "engine",
        "device": "cpu",
        "model": {"dtype": "float32", **model_shape(model.config)},
        "batch": batch,
        "max_new_tokens": MAX_NEW,
        "repeats": repeats,
    }
    for workload in workloads:
        # Each workload draws from its own seed, so it is the same workload whichever others run with it.
        rng = np.random.default_rng(WORKLOADS.index(workload))
        if workload == "stop":
            prompts = make_prompts(rng, n_requests, 20, 600)
            calibration = make_prompts(rng, CALIBRATION_PROMPTS, 20, 600)
        else:
            system = [128_000, *rng.integers(0, 128_000, size=999).tolist()]
            prompts = make_prompts(rng, n_requests, 20, 100, system)
            calibration = make_prompts(rng, CALIBRATION_PROMPTS, 20, 100, system)
        eot = tune_eot(torch, hf_model, model, rng, calibration)
        seeds = list(range(len(prompts)))
        requests = [
            Request(i, p, SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=s, stop_tokens=[EOT]))
            for i, (p, s) in enumerate(zip(prompts, seeds, strict=True))
        ]
        pages = batch * (max(map(len, prompts)) + MAX_NEW) // PAGE + 64

        engine_stats = {}

        def engine_side(name, share, pages=pages, requests=requests, engine_stats=engine_stats):
            def side():  # a fresh engine each time: its prefix cache starts empty
                eng = Engine(model, slots=batch, pages=pages, page_size=PAGE, burst=16, prefix_cache=share)
                tokens = [r.tokens for r in eng.generate(requests)]
                engine_stats[name] = eng.stats
                return tokens

            return side

        def hf_side(prompts=prompts):
            config = transformers.GenerationConfig(
                max_new_tokens=MAX_NEW,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                eos_token_id=EOT,
                pad_token_id=0,
            )
            with torch.no_grad():
                # Its slots and per-step token budget bounded like ours (unbounded, its prefill logits took 10 GB).
                cb = transformers.ContinuousBatchingConfig(max_requests_per_batch=batch, max_batch_tokens=512)
                res = hf_model.generate_batch(
                    inputs=prompts, generation_config=config, progress_bar=False, continuous_batching_config=cb
                )
            return [list(r.generated_tokens) for r in res.values()]

        sides = {
            "engine": engine_side("engine", True),
            "static": lambda prompts=prompts, seeds=seeds: [r.tokens for r in static(model, prompts, seeds, batch)],
            "transformers_generate_batch": hf_side,
        }
        if workload == "prefix":
            sides["engine_noshare"] = engine_side("engine_noshare", False)
        times, tokens, results = {}, {}, {}
        for name, run in sides.items():
            if name != "transformers_generate_batch":
                run()  # compiles
            times[name] = float("inf")
        for _ in range(repeats):  # alternate the sides so a noisy machine slows all alike
            for name, run in sides.items():
                start = time.perf_counter()
                results[name] = run()
                times[name] = min(times[name], time.perf_counter() - start)
        for name in sides:
            tokens[name] = sum(len([t for t in r if t != EOT]) for r in results[name])
        lengths = [len(r) for r in results["engine"]]
        out[workload] = {
            "eot": eot,
            "requests": len(prompts),
            "prompt_tokens": {
                "min": min(map(len, prompts)),
                "max": max(map(len, prompts)),
                "total": sum(map(len, prompts)),
            },
            "completion_tokens_mean": round(float(np.mean(lengths)), 1),
            "stopped_early": sum(n < MAX_NEW for n in lengths),
            "engine_equals_static": results["engine"] == results["static"],
            **{
                name: {
                    "seconds": round(times[name], 3),
                    "completion_tokens": tokens[name],
                    "tokens_per_s": round(tokens[name] / times[name], 1),
                    **_phases(engine_stats.get(name)),
                }
                for name in sides
            },
            "engine_vs_transformers_generate_batch": round(times["transformers_generate_batch"] / times["engine"], 2),
            "engine_vs_static": round(times["static"] / times["engine"], 2),
        }
        if workload == "prefix":
            out[workload]["prefix_sharing_speedup"] = round(times["engine_noshare"] / times["engine"], 2)
            prefill = {name: engine_stats[name]["prefill_seconds"] for name in ("engine", "engine_noshare")}
            out[workload]["prefix_sharing_speedup_of_prefill"] = round(prefill["engine_noshare"] / prefill["engine"], 2)
            bound = prefix_sharing_bound(model.config, prompts, results["engine"], page=PAGE)
            out[workload]["prefix_sharing_flop_bound"] = bound
            out[workload]["prefix_sharing_fraction_of_bound"] = round(
                out[workload]["prefix_sharing_speedup"] / bound["speedup_bound"], 2
            )
        print(json.dumps({workload: out[workload]}), file=sys.stderr, flush=True)  # survives a timeout later
    return out


def forward_flops(config, positions: np.ndarray) -> float:
    """FLOPs of running tokens at `positions` through the layers (no head): 2 per layer weight, plus q·k
    and p·v over the positions each token sees (4 · N · H per key and layer)."""
    attention = 4 * config.n_heads * config.head_dim * np.sum(positions + 1.0)
    return float(config.n_layers * (2 * layer_matmul_weights(config) * positions.size + attention))


def prefix_sharing_bound(config, prompts, completions, page: int) -> dict:
    """The most prefix sharing can save on this workload: FLOPs without sharing over FLOPs with it, every
    token computed once and nothing padded. Sharing removes the prefill of each prompt's leading whole
    pages that an earlier prompt holds (what `Engine`'s prefix cache takes: the last prompt token is
    always computed); decode (each completion token but the first through the layers, every sampled token
    through the [D, V] head) is the same on both sides, and bounds the gain."""
    head = 2.0 * config.dim * config.vocab_size
    decode = sum(
        forward_flops(config, len(p) + np.arange(len(c) - 1)) + head * len(c)
        for p, c in zip(prompts, completions, strict=True)
    )
    shared = []
    for i, prompt in enumerate(prompts):
        common = 0
        for earlier in prompts[:i]:
            n = min(len(prompt), len(earlier))
            diff = np.flatnonzero(np.asarray(prompt[:n]) != np.asarray(earlier[:n]))
            common = max(common, int(diff[0]) if diff.size else n)
        shared.append(min(common, len(prompt) - 1) // page * page)
    unshared = decode + sum(forward_flops(config, np.arange(len(p))) for p in prompts)
    with_sharing = decode + sum(
        forward_flops(config, np.arange(s, len(p))) for p, s in zip(prompts, shared, strict=True)
    )
    return {
        "gflop_unshared": round(unshared / 1e9, 1),
        "gflop_shared": round(with_sharing / 1e9, 1),
        "gflop_decode": round(decode / 1e9, 1),
        "shared_tokens": sum(shared),
        "speedup_bound": round(unshared / with_sharing, 2),
    }


def _phases(stats) -> dict:
    """An engine run's split (its last timed run): seconds in prefill calls and in decode bursts."""
    if stats is None:
        return {}
    keys = ("prefill_seconds", "decode_seconds", "prefill_calls", "decode_calls", "shared_tokens")
    return {k: round(stats[k], 3) if isinstance(stats[k], float) else stats[k] for k in keys}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    return report(cpu_benchmark(args.requests, args.batch, args.repeats, args.workloads.split(",")), args.out)


if __name__ == "__main__":
    main()
