"""`convert` between every pair of released layouts: HF bf16, HF FP8, Meta bf16 (any MP), Meta FP8, Orbax.

Every source is converted into every target and loaded back; its logits must equal the source's
exactly wherever the conversion is lossless (bf16 → bf16, FP8 → FP8: values and scales are carried
over), and stay within FP8 noise where it quantizes or dequantizes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import llama_jax
from llama_jax.jobs.convert import convert
from tests import checkpoints
from tests.test_fp8_layouts import PARAMS, write_hf_fp8, write_meta_fp8
from tests.test_parity import relative_error

TOKENS = np.random.RandomState(3).randint(0, PARAMS["vocab_size"], size=(1, 12))
SOURCES = ("hf", "hf-fp8", "meta-mp2", "meta-fp8-mp2", "orbax")
TARGETS = {  # name: convert options
    "hf": dict(to="hf"),
    "hf-fp8": dict(to="hf", quantize="fp8"),
    "meta-mp4": dict(to="meta", mp=4),  # 4 ranks > 2 KV heads: each KV head written twice, as the MP16 release
    "meta-fp8-mp2": dict(to="meta", quantize="fp8", mp=2),
    "orbax": dict(to="orbax"),
}
FP8_NOISE = 1.5e-2  # measured: quantizing 5.1e-3 at most, dequantizing (bf16 rounding of w·scale) 1.9e-3


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    weights = checkpoints.meta_state_dict(PARAMS)
    checkpoints.write_meta_checkpoint(root / "meta-mp2", PARAMS, weights, mp=2)
    write_meta_fp8(root / "meta-fp8-mp2", weights, mp=2)
    write_hf_fp8(root / "hf-fp8", weights)
    convert(root / "meta-mp2", root / "hf", progress=False)
    convert(root / "hf", root / "orbax", to="orbax", progress=False)
    return root


def logits(path) -> np.ndarray:
    return np.asarray(llama_jax.load(path, dtype="float32")(TOKENS))


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_converts_to_every_target(sources, tmp_path, source):
    want = logits(sources / source)
    for target, options in TARGETS.items():
        out = convert(sources / source, tmp_path / target, progress=False, **options)
        if options["to"] == "meta":
            assert len(list(out.glob("consolidated.*.pth"))) == options["mp"]
            assert len(list(out.glob("fp8_scales_*.pt"))) == (options["mp"] if "quantize" in options else 0)
            assert not (out / ".staging").exists()
        got = logits(out)
        lossless = ("fp8" in source) == ("fp8" in target)
        error = relative_error(got, want)
        if lossless:
            assert error == 0.0, (source, target, error)
        else:
            assert error <= FP8_NOISE, (source, target, error)


def test_meta_writer_repeats_kv_heads_like_reshard_mp(sources, tmp_path):
    """More ranks than KV heads: llama-models' `reshard_mp` repeats each head (`repeat_qk_qv`); so do we."""
    out = convert(sources / "hf", tmp_path / "mp4", to="meta", mp=4, progress=False)
    assert json.loads((out / "params.json").read_text())["n_kv_heads"] == 4
    shards = [torch.load(out / f"consolidated.{r:02d}.pth", weights_only=True) for r in range(4)]
    wk = [s["layers.0.attention.wk.weight"] for s in shards]
    assert torch.equal(wk[0], wk[1]) and torch.equal(wk[2], wk[3]) and not torch.equal(wk[1], wk[2])
    assert llama_jax.open_checkpoint(out).config.n_kv_heads == 2
