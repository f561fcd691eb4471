"""The compiled generation programs, read as HLO: the decode loop reads every weight in place (no
per-step slice, transpose or copy of a parameter-sized buffer inside the `while` body), prefill sends
only each row's last prompt token through the vocabulary projection, and the per-layer weights the
decode step reads compute what the stacked scan computes, for plain, FP8 and LoRA models."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.inference import decoding, sampler
from llama_jax.model import quant, unstacked
from llama_jax.model.config import LlamaConfig
from llama_jax.model.model import Llama, LoraSpec
from llama_jax.model.options import Options
from llama_jax.weights import lora

# Layer-heavy in miniature, untied: every weight matrix has a size no activation or cache buffer has.
CONFIG = LlamaConfig(vocab_size=1000, dim=96, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=160, max_seq_len=256)
PROMPTS = [[5, 17, 3, 99, 250], [7, 1]]


@pytest.fixture(scope="module")
def model():
    return Llama(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0))


def _computations(hlo: str) -> dict[str, list[str]]:
    """HLO text → {computation name: its instruction lines}."""
    found, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            name = header.group(1)
            found[name] = []
        elif name and line.startswith("  "):
            found[name].append(line.strip())
    return found


def _reachable(computations: dict[str, list[str]], roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for line in computations[name]:
            todo += re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", line)
            todo += [
                c
                for group in re.findall(r"branch_computations=\{([^}]*)\}", line)
                for c in re.findall(r"%([\w.\-]+)", group)
            ]
    return seen


def _elements(shape: str) -> int:
    return math.prod(int(d) for d in shape.split(",") if d) if shape else 1


def weight_copies_in_decode_loop(hlo: str, weight_sizes: set[int]) -> list[str]:
    """Instructions inside the decode `while` body (and what it calls) that slice, transpose or copy
    a buffer the size of one layer's weight matrix, in a computation that does no dot: a weight
    materialised anew every step instead of read where it lives."""
    computations = _computations(hlo)
    bodies = [b for lines in computations.values() for line in lines for b in re.findall(r"body=%?([\w.\-]+)", line)]
    assert bodies, "no while loop in the decode program"
    offenders = []
    for name in _reachable(computations, bodies):
        lines = computations[name]
        if any(re.search(r" (dot|convolution|custom-call)\(", line) for line in lines):
            continue
        for line in lines:
            m = re.match(r"(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* (slice|dynamic-slice|transpose|copy)\(", line)
            if m and _elements(m.group(1)) in weight_sizes:
                offenders.append(f"{name}: {line[:160]}")
    return offenders


def _weight_sizes(model) -> set[int]:
    """Element counts of one layer's weight matrices (and the head): what a step must read in place."""
    layer = [math.prod(a.shape[1:]) for a in jax.tree.leaves(nnx.state(model.layers)) if a.ndim >= 3]
    return set(layer) | {model.config.dim * model.config.vocab_size}


def _decode_hlo(model, unroll=None, layers=None) -> str:
    """The compiled decode program `generate` runs; `layers` replaces its per-layer weights."""
    job = sampler.inputs(model, PROMPTS, sampler.SamplingParams(max_new_tokens=16, stop_tokens=[]), unroll=unroll)
    weights = job.weights if layers is None else dataclasses.replace(job.weights, layers=layers)
    state = decoding.prefill(job.weights, job.state, job.prompt)
    return decoding.decode.lower(weights, state, job.until).compile().as_text()


def test_the_decode_loop_reads_every_weight_in_place(model):
    assert weight_copies_in_decode_loop(_decode_hlo(model), _weight_sizes(model)) == []


def _dots_in_decode_loop(hlo: str) -> int:
    computations = _computations(hlo)
    bodies = [b for lines in computations.values() for line in lines for b in re.findall(r"body=%?([\w.\-]+)", line)]
    return sum(
        bool(re.search(r" dot\(", line)) for name in _reachable(computations, bodies) for line in computations[name]
    )


def test_the_decode_step_runs_one_dot_for_wq_wk_wv_and_one_for_w1_w3(model):
    """The decode copy fuses wq|wk|wv and w1|w3 (`decoding.layer_weights`, fused by default on one device):
    3 dots fewer per layer than the same step from separate projections."""
    fused = _dots_in_decode_loop(_decode_hlo(model))
    separate = _dots_in_decode_loop(_decode_hlo(model, layers=decoding.layer_weights(model, fuse=False)))
    assert separate - fused == 3 * CONFIG.n_layers


@pytest.mark.parametrize("unroll", [1, True])
def test_the_guard_sees_the_per_step_weight_copies_of_a_scan_over_stacked_weights(model, unroll):
    """The check above can fail: decoding from the stacked [L, ...] buffers (scanned, or unrolled as
    before per-layer weights existed) slices each layer's weights out of them every step."""
    assert weight_copies_in_decode_loop(_decode_hlo(model, unroll), _weight_sizes(model))


def _buffers_with_elements(hlo: str, n: int) -> list[str]:
    return [m.group(0) for m in re.finditer(r"\w+\[([\d,]+)\]", hlo) if _elements(m.group(1)) == n]


def test_prefill_projects_only_the_last_prompt_token_of_each_row_onto_the_vocabulary(model):
    b, p, v = 2, 16, CONFIG.vocab_size
    job = sampler.inputs(model, PROMPTS, sampler.SamplingParams(max_new_tokens=16, stop_tokens=[]))
    graphdef, params = nnx.split(model)
    cache = job.state.cache
    prefill = decoding.prefill.lower(job.weights, job.state, job.prompt)
    assert job.prompt.tokens.shape == (b, p)
    assert _buffers_with_elements(prefill.compile().as_text(), b * p * v) == []
    # The model's own prefill returns [B, V]: its program holds no [B, P, V] buffer either.
    model_prefill = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).prefill(t, c)).lower(
        params, job.prompt.tokens, cache
    )
    assert _buffers_with_elements(model_prefill.compile().as_text(), b * p * v) == []
    # ... while the full forward pass, by design, does: the check can see one.
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(params, job.prompt.tokens)
    assert _buffers_with_elements(forward.compile().as_text(), b * p * v)


def test_prefill_logits_are_the_forward_logits_at_each_rows_last_prompt_token(model):
    graphdef, params = nnx.split(model)
    tokens = np.zeros((2, 16), np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = p
    lengths = np.asarray([len(p) for p in PROMPTS], np.int32)
    cache = sampler._empty_cache(model, 2, 32, by_layer=False)
    logits_bv, _ = jax.jit(lambda s, t, c, n: nnx.merge(graphdef, s).prefill(t, c, n))(params, tokens, cache, lengths)
    full = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(np.asarray(logits_bv), full[np.arange(2), lengths - 1], rtol=1e-5, atol=1e-5)


# ---- per-layer weights compute what the stacked scan computes --------------------------------------------


def _fp8_model():
    """Layer 1 of 3 in rowwise FP8 (random values), layers 0 and 2 in `dense_ffn`, as the release."""
    m = Llama(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(1), options=Options(fp8=quant.Fp8Spec(quantized_layers=(1,))))
    rng = np.random.default_rng(0)
    for name in ("w1", "w2", "w3"):
        w = getattr(m.layers.feed_forward, name)
        w.set_value(jnp.asarray(rng.normal(0, 0.1, w.shape), jnp.float32).astype(quant.FP8))
    return m


def _lora_model():
    """Adapters on attention and FFN projections, with B != 0 so they change the output."""
    m = lora.add_adapters(
        Llama(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(2)), LoraSpec(rank=2, targets=("wq", "wo", "w1", "w2"))
    )
    rng = np.random.default_rng(1)
    for path, b in nnx.to_flat_state(nnx.state(m, nnx.LoRAParam)):
        if path[-1] == "b":
            b.set_value(jnp.asarray(rng.normal(0, 0.5, b.shape), jnp.float32))
    return m


@pytest.mark.parametrize("make", [_fp8_model, _lora_model], ids=["fp8", "lora"])
def test_decoding_from_per_layer_weights_equals_the_stacked_scan(make):
    m = make()
    ours = sampler.generate(m, PROMPTS, max_new_tokens=8, stop_tokens=[], logprobs=True)
    scanned = sampler.generate(m, PROMPTS, max_new_tokens=8, stop_tokens=[], logprobs=True, unroll=1)
    assert [r.tokens for r in ours] == [r.tokens for r in scanned]
    np.testing.assert_allclose([r.logprobs for r in ours], [r.logprobs for r in scanned], atol=1e-5)


def test_per_layer_weights_are_made_once_per_model_and_remade_for_new_weights(model):
    m = nnx.merge(*nnx.split(model))
    first = decoding.layer_weights(m)
    assert decoding.layer_weights(m) is first
    before = sampler.generate(m, PROMPTS, max_new_tokens=4, stop_tokens=[], logprobs=True)
    w2 = m.layers.feed_forward.w2
    w2.set_value(w2[...] * 3.0)  # a new array, as a training step or `nnx.update` leaves
    assert decoding.layer_weights(m) is not first
    after = sampler.generate(m, PROMPTS, max_new_tokens=4, stop_tokens=[], logprobs=True)
    scanned = sampler.generate(m, PROMPTS, max_new_tokens=4, stop_tokens=[], logprobs=True, unroll=1)
    assert [r.logprobs for r in after] != [r.logprobs for r in before]
    np.testing.assert_allclose([r.logprobs for r in after], [r.logprobs for r in scanned], atol=1e-5)


def test_a_model_whose_layer_copy_would_not_fit_decodes_from_the_stacked_weights(model, monkeypatch):
    """The per-layer copy holds the layer weights twice: past `COPY_BUDGET` of a device's memory (405B on
    16 v5p chips) `unroll=None` scans the stacked weights instead of copying them. (A GPU holds such a
    model's layers unstacked instead: `test_loading`.)"""
    layer_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model.layers)))
    assert unstacked.device_memory_limit(jax.devices()[0]) is None  # CPU reports no limit: always fits
    fits = decoding.Weights.of(model)
    assert fits.layers is not None and fits.unroll == 1  # `unroll` only ever means the scan's unroll factor
    monkeypatch.setattr(unstacked, "device_memory_limit", lambda device: int(layer_bytes / unstacked.COPY_BUDGET))
    assert decoding.Weights.of(model).layers is not None  # exactly at the budget
    monkeypatch.setattr(unstacked, "device_memory_limit", lambda device: layer_bytes)
    stacked = decoding.Weights.of(model)
    assert stacked.layers is None and stacked.unroll == 1  # a rolled scan
    unrolled = decoding.Weights.of(model, True)
    assert unrolled.layers is None and unrolled.unroll is True  # an explicit choice stands
    m = nnx.merge(*nnx.split(model))
    results = sampler.generate(m, PROMPTS, max_new_tokens=4, stop_tokens=[])
    assert m not in decoding._LAYER_WEIGHTS  # no second copy was made
    assert [r.tokens for r in results] == [
        r.tokens for r in sampler.generate(m, PROMPTS, max_new_tokens=4, stop_tokens=[], unroll=1)
    ]


def test_the_decode_loop_reads_and_writes_the_kv_cache_in_place(model):
    """A step reads key blocks straight from the `[L, B, K, S, H]` cache and writes one entry per row:
    no layer of the cache (`[B, K, S, H]`) is sliced out or copied inside the loop."""
    model = model.with_options(attention_block=8)  # several key blocks in the 32-entry cache
    job = sampler.inputs(model, PROMPTS, sampler.SamplingParams(max_new_tokens=16, stop_tokens=[]))
    layer_elements = math.prod(job.state.cache.k.shape[1:])
    assert weight_copies_in_decode_loop(_decode_hlo(model), {layer_elements}) == []


def test_where_a_scan_would_copy_layers_every_program_runs_them_one_by_one_over_a_cache_per_layer(model, monkeypatch):
    """On a GPU (forced here: `unstacked.scan_copies`) prefill reads the per-layer weights too and
    `generate`'s cache is one `[B, K, S, H]` buffer per layer, so no layer of weights or cache is ever a
    slice of a stack: the same tokens and log-probs as this CPU's stacked cache and scanned prefill."""
    m = nnx.merge(*nnx.split(model))
    params = sampler.SamplingParams(max_new_tokens=6, stop_tokens=[], temperature=1.0, seed=5, logprobs=True)
    want = sampler.generate(m, PROMPTS, params)
    assert isinstance(sampler.inputs(m, PROMPTS, params).state.cache.k, jax.Array)
    monkeypatch.setattr(unstacked, "scan_copies", lambda platform: True)
    job = sampler.inputs(m, PROMPTS, params)
    assert decoding.by_layer(job.weights) and isinstance(job.state.cache.k, unstacked.Unstacked)
    assert job.state.cache.k.shape == (CONFIG.n_layers, 2, CONFIG.n_kv_heads, 16 + 16, CONFIG.head_dim)
    got = sampler.generate(m, PROMPTS, params)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    np.testing.assert_allclose([r.logprobs for r in got], [r.logprobs for r in want], atol=1e-5)
