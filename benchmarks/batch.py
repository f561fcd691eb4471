"""The batch job against transformers generating the same requests one by one, same model, same run.

CPU: the Llama-3.1-shaped fp32 model of `benchmarks/decode.py` (vocab 128,256, dim 256, 4 layers, GQA
8/2, tied embeddings; ~35.8M parameters), built once by transformers (random init), saved with
`save_pretrained` and loaded by `llama_jax.load(dir, dtype="float32")`. The job: `--requests` requests
(a third of them chats), prompts of 5 to ~55 tokens from the real Llama 3 tokenizer, greedy,
`--new-tokens` new tokens each (both sides stop at Llama 3's stop tokens; random weights rarely emit one).

    ours:          `run_batch` end to end: read and tokenize the JSONL, bucket, generate, write and fsync
                   the results, reorder; "warm" is the best of `--repeats` runs after a first one
                   ("cold", compilation included), each into a fresh output file.
    transformers:  `model.generate` on each request's ids alone (batch 1), the loop timed as a whole,
                   best of `--repeats`, alternating with ours so a noisy machine slows both alike;
                   torch gets whichever thread count (1 or all cores) is faster on a few requests.

    requests/s = requests / wall time;  tokens/s = generated tokens / wall time.

Prints one JSON object; `--out benchmarks/results/batch_cpu.json` also writes it.
"""

from __future__ import annotations

import argparse
import json
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
from benchmarks.decode import SHAPES, hf_config, model_shape  # noqa: E402  (the same model as the decode benchmark)

WORDS = "the of and to in is was for on that with as by at from his her an were are which this be".split()


def make_requests(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 40))))
        if i % 3 == 0:
            requests.append({"id": i, "messages": [{"role": "user", "content": text}]})
        else:
            requests.append({"id": i, "prompt": text})
    return requests


def cpu_benchmark(n_requests: int, new_tokens: int, batch_size: int, repeats: int) -> dict:
    import torch
    import transformers

    import llama_jax
    from llama_jax.jobs import batch
    from llama_jax.text.chat import ChatFormat
    from llama_jax.weights import default_model

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config(transformers, *SHAPES["default"])).eval()
    tokenizer = default_model.default_tokenizer()
    chat = ChatFormat(tokenizer)
    requests = make_requests(n_requests)
    prompts = [
        chat.encode_dialog(r["messages"]) if "messages" in r else tokenizer.encode(r["prompt"], bos=True, eos=False)
        for r in requests
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        hf_model.save_pretrained(tmp / "model")
        model = llama_jax.load(tmp / "model", dtype="float32")
        (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))

        def ours(run: int) -> tuple[float, dict, list[dict]]:
            output = tmp / f"out{run}.jsonl"
            start = time.perf_counter()
            summary = batch.run_batch(
                model,
                tokenizer,
                tmp / "in.jsonl",
                output,
                batch_size=batch_size,
                progress=False,
                max_new_tokens=new_tokens,
                temperature=0.0,
            )
            elapsed = time.perf_counter() - start
            return elapsed, summary, [json.loads(line) for line in output.read_text().splitlines()]

        def theirs(some: int | None = None) -> list[list[int]]:
            out = []
            with torch.no_grad():
                for ids in prompts[:some]:
                    x = torch.tensor([ids])
                    y = hf_model.generate(
                        x,
                        attention_mask=torch.ones_like(x),
                        max_new_tokens=new_tokens,
                        do_sample=False,
                        eos_token_id=list(tokenizer.stop_tokens),
                        pad_token_id=0,
                    )
                    out.append([t for t in y[0, len(ids) :].tolist() if t not in tokenizer.stop_tokens])
            return out

        cold, cold_summary, results = ours(0)  # compiles
        torch_threads = _fastest_threads(torch, lambda: theirs(4), threads)
        # Alternate the two, best of `repeats` each, so a noisy machine slows both alike.
        warm = hf_time = float("inf")
        for run in range(repeats):
            warm = min(warm, ours(run + 1)[0])
            start = time.perf_counter()
            hf_tokens = theirs()
            hf_time = min(hf_time, time.perf_counter() - start)

    ours_tokens = sum(r["completion_tokens"] for r in results)
    hf_total = sum(len(t) for t in hf_tokens)
    same = sum(a == b for r, t in zip(results, hf_tokens, strict=True) for a, b in zip(r["tokens"], t, strict=False))
    return {
        "benchmark": "batch",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": threads,
        "torch_threads": torch_threads,
        "model": {
            "params": sum(p.numel() for p in hf_model.parameters()),
            "dtype": "float32",
            **model_shape(model.config),
        },
        "job": {
            "requests": n_requests,
            "chat_fraction": round(sum("messages" in r for r in requests) / n_requests, 2),
            "prompt_tokens": {
                "min": min(map(len, prompts)),
                "max": max(map(len, prompts)),
                "total": sum(map(len, prompts)),
            },
            "max_new_tokens": new_tokens,
            "greedy": True,
            "batch_size": batch_size,
        },
        "repeats": repeats,
        "llama_jax_batch": {
            "warm_seconds": round(warm, 3),
            "requests_per_s": round(n_requests / warm, 2),
            "tokens_per_s": round(ours_tokens / warm, 1),
            "cold_seconds_including_compilation": round(cold, 3),
            "cold_requests_per_s": round(n_requests / cold, 2),
            "compiles": cold_summary["compiles"],
            "generated_tokens": ours_tokens,
        },
        "transformers_one_by_one": {
            "seconds": round(hf_time, 3),
            "requests_per_s": round(n_requests / hf_time, 2),
            "tokens_per_s": round(hf_total / hf_time, 1),
            "generated_tokens": hf_total,
        },
        "speedup_warm": round(hf_time / warm, 2),
        "speedup_cold": round(hf_time / cold, 2),
        "greedy_token_agreement_with_transformers": round(same / max(1, max(ours_tokens, hf_total)), 4),
    }


def _fastest_threads(torch, run, cpus: int) -> int:
    """Give transformers its best thread count: on a shared machine 2 threads on 2 cores can be 2-3x
    slower than 1 (a descheduled thread stalls the other at every op), so time a few requests each way."""
    timings = {}
    for n in sorted({1, cpus}):
        torch.set_num_threads(n)
        run()  # warm-up
        start = time.perf_counter()
        run()
        timings[n] = time.perf_counter() - start
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best is kept)")
    parser.add_argument("--out", type=pathlib.Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    return report(cpu_benchmark(args.requests, args.new_tokens, args.batch_size, args.repeats), args.out)


if __name__ == "__main__":
    main()
