"""A 100K-token prompt end to end: chunked prefill + blockwise attention, against transformers (SDPA).

The model is a tiny Llama saved by transformers (dim 64, 2 layers, 4 query / 2 KV heads, 131,072
positions, llama3 RoPE scaling). llama-jax loads it and generates greedily in a child process whose
peak resident memory is measured; transformers then runs the prompt plus those tokens in one SDPA
forward, and its argmax at each step must be the token llama-jax produced.

Memory bound: the dense `[1, 4, T, S]` score matrix alone would be 160 GB at this length, and one
`[T, T]` float32 head 40 GB. The child must stay under `PEAK_RSS_BOUND` (1.5 GiB): the process
(JAX runtime, compiled programs, weights) plus a 67 MB KV cache, chunk activations and one
`[block, block]` score tile per head.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch

from tests.checkpoints import hf_checkpoint

PROMPT_LEN = 100_008
NEW_TOKENS = 4
PEAK_RSS_BOUND = 1.5 * 2**30

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import llama_jax

    checkpoint, prompt_file = sys.argv[1], sys.argv[2]
    model = llama_jax.load(checkpoint, dtype="float32")
    prompt = np.load(prompt_file).tolist()
    [result] = llama_jax.generate(model, [prompt], max_new_tokens={NEW_TOKENS}, temperature=0.0, stop_tokens=[])
    # VmHWM is this process image's own peak. ru_maxrss is not: Linux carries the forking process's
    # peak across exec, so a child of a grown pytest process would report pytest's peak.
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    peak = int(status.split()[0]) * 1024  # kB
    print(json.dumps({"tokens": list(result.tokens), "peak_rss": peak}))
""".replace("{NEW_TOKENS}", str(NEW_TOKENS))
)


def test_100k_token_prompt_matches_transformers_sdpa_within_bounded_memory(tmp_path):
    reference = hf_checkpoint(tmp_path / "hf", n_heads=4, n_kv_heads=2, seed=3)
    prompt = np.random.default_rng(0).integers(0, reference.config.vocab_size, PROMPT_LEN).astype(np.int32)
    np.save(tmp_path / "prompt.npy", prompt)

    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "hf"), str(tmp_path / "prompt.npy")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["peak_rss"] < PEAK_RSS_BOUND, f"peak RSS {out['peak_rss'] / 2**30:.2f} GiB"
    assert len(out["tokens"]) == NEW_TOKENS

    reference.set_attn_implementation("sdpa")
    assert reference.config._attn_implementation == "sdpa"
    ids = torch.tensor(np.concatenate([prompt, out["tokens"][:-1]]))[None]
    with torch.no_grad():
        logits = reference(ids, logits_to_keep=NEW_TOKENS).logits[0]
    assert logits.argmax(-1).tolist() == out["tokens"]
