"""Meta's released layouts beyond Llama 3's own: Llama 2 params.json and shards (`rope.freqs` included),
the 405B MP16 release's duplicated KV heads, Llama 3.2's int4 QLoRA/SpinQuant releases (refused). Each
is checked against code nobody here wrote: Meta's `Transformer` and transformers' `LlamaForCausalLM`
on the HF conversion of the same weights (fp32, bound 1e-4)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import llama_jax
from llama_jax.jobs.convert import convert
from llama_jax.model.config import LlamaConfig
from llama_jax.weights import meta
from tests import checkpoints
from tests.test_parity import TOLERANCE, hf_logits, relative_error

LLAMA2_ROPE = {"rope_type": "default", "rope_theta": 10_000.0}
TOKENS = np.random.RandomState(1).randint(0, checkpoints.LLAMA2_VOCAB, size=(2, 20))


def permute(w: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """transformers' `convert_llama_weights_to_hf.py` (src/transformers/models/llama/, not in the wheel):
    `w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)`, "permute for
    sliced rotary", applied to wq with n_heads and to wk with n_kv_heads and dim1 = n_kv_heads · head_dim."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def transformers_model(state: dict, c: LlamaConfig, *, rope: dict, max_positions: int):
    """`LlamaForCausalLM` of architecture `c` holding Meta-layout `state`, converted as the transformers
    script converts it."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    dim, n_layers, n_heads, n_kv_heads = c.dim, c.n_layers, c.n_heads, c.n_kv_heads
    config = HFConfig(
        vocab_size=c.vocab_size,
        hidden_size=dim,
        intermediate_size=c.ffn_dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=c.norm_eps,
        max_position_embeddings=max_positions,
        rope_parameters=dict(rope),
    )
    head_dim = dim // n_heads
    hf = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        hf[h + "self_attn.q_proj.weight"] = permute(state[m + "attention.wq.weight"], n_heads, dim, dim)
        hf[h + "self_attn.k_proj.weight"] = permute(
            state[m + "attention.wk.weight"], n_kv_heads, n_kv_heads * head_dim, dim
        )
        hf[h + "self_attn.v_proj.weight"] = state[m + "attention.wv.weight"]
        hf[h + "self_attn.o_proj.weight"] = state[m + "attention.wo.weight"]
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            hf[h + f"mlp.{theirs}.weight"] = state[m + f"feed_forward.{ours}.weight"]
        hf[h + "input_layernorm.weight"] = state[m + "attention_norm.weight"]
        hf[h + "post_attention_layernorm.weight"] = state[m + "ffn_norm.weight"]
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(hf, strict=True)
    return model


# ---- Llama 2 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama2_state():
    return checkpoints.meta_state_dict(checkpoints.LLAMA2_PARAMS, vocab_size=checkpoints.LLAMA2_VOCAB)


def test_llama2_params_json_reads_as_llama2(tmp_path, llama2_state):
    checkpoints.write_meta_checkpoint(tmp_path, checkpoints.LLAMA2_PARAMS, llama2_state, mp=2)
    config = llama_jax.open_checkpoint(tmp_path).config
    # vocabulary from the embedding (the tokenizer's size), Llama 2's θ and context, no llama3 scaling, MHA
    assert config.vocab_size == checkpoints.LLAMA2_VOCAB
    assert (config.rope_theta, config.max_seq_len, config.rope_scaling) == (10_000.0, 4096, None)
    assert config.n_kv_heads == config.n_heads == 8
    for f in sorted(tmp_path.glob("consolidated.*.pth")):  # as released: Meta's training-time buffer in each shard
        freqs = torch.load(f, weights_only=True)["rope.freqs"]
        assert freqs.dtype == torch.bfloat16 and freqs.shape == (config.head_dim // 2,)


@pytest.mark.parametrize(
    "theta_in, params_change, bad_files",
    [
        (1e6, {}, ["consolidated.01.pth"]),  # one shard's rope.freqs of another θ (CodeLlama's)
        (10_000.0, {"rope_theta": 500_000.0}, ["consolidated.00.pth", "consolidated.01.pth"]),  # params.json's θ
    ],
    ids=["shard-freqs-of-another-theta", "params-json-theta-disagrees"],
)
def test_llama2_rope_freqs_that_disagree_with_theta_are_an_error_naming_file_and_tensor(
    tmp_path, llama2_state, theta_in, params_change, bad_files
):
    params = dict(checkpoints.LLAMA2_PARAMS, **params_change)
    checkpoints.write_meta_checkpoint(tmp_path, params, llama2_state, mp=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["rope.freqs"] = checkpoints.llama2_rope_freqs(params["dim"] // params["n_heads"], theta=theta_in)
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError) as error:
        llama_jax.load(tmp_path)
    message = str(error.value)
    theta = params.get("rope_theta", 10_000.0)
    for name in ("consolidated.00.pth", "consolidated.01.pth"):
        wrong = (
            f"tensor 'rope.freqs' in {tmp_path / name} is not the rotary inverse frequencies of rope_theta={theta:g}"
        )
        assert (wrong in message) == (name in bad_files), message
    assert "unexpected tensor" not in message


def test_llama2_rope_freqs_of_another_head_dim_is_an_error_naming_file_and_tensor(tmp_path, llama2_state):
    checkpoints.write_meta_checkpoint(tmp_path, checkpoints.LLAMA2_PARAMS, llama2_state, mp=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["rope.freqs"] = checkpoints.llama2_rope_freqs(16)
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(
        ValueError, match=re.escape(f"'rope.freqs' in {tmp_path / 'consolidated.01.pth'} has shape [8]")
    ):
        llama_jax.load(tmp_path)


# Llama-2-70b's params.json (7B and 13B give a subset: no n_kv_heads, no ffn_dim_multiplier)
LLAMA2_70B_KEYS = {
    "dim",
    "multiple_of",
    "ffn_dim_multiplier",
    "n_heads",
    "n_kv_heads",
    "n_layers",
    "norm_eps",
    "vocab_size",
}


def test_llama2_meta_converts_and_our_meta_export_is_written_as_released(tmp_path, llama2_state):
    """Meta Llama 2 → HF and → Meta (MP 2): the same logits; the Meta output has the release's
    params.json keys, its embedding split and `rope.freqs` (Meta's own computation) in every shard."""
    params = checkpoints.LLAMA2_PARAMS
    checkpoints.write_meta_checkpoint(tmp_path / "src", params, llama2_state, mp=2)
    want = np.asarray(llama_jax.load(tmp_path / "src", dtype="float32")(TOKENS))
    for to in ("hf", "meta"):
        out = convert(tmp_path / "src", tmp_path / to, to=to, mp=2 if to == "meta" else 1, progress=False)
        assert relative_error(np.asarray(llama_jax.load(out, dtype="float32")(TOKENS)), want) == 0.0, to
    written_params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert set(written_params) <= LLAMA2_70B_KEYS and written_params["vocab_size"] == -1
    vocab = checkpoints.LLAMA2_VOCAB
    assert LlamaConfig.from_meta_params(written_params, vocab_size=vocab) == LlamaConfig.from_meta_params(
        params, vocab_size=vocab
    )
    for rank in range(2):
        written = torch.load(tmp_path / "meta" / f"consolidated.{rank:02d}.pth", weights_only=True)
        source = torch.load(tmp_path / "src" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert written.keys() == source.keys()
        for name, t in source.items():
            assert t.dtype == written[name].dtype and torch.equal(t, written[name]), name


@pytest.mark.parametrize("mp", [1, 2])
def test_llama2_logits_match_meta_transformer_and_transformers(tmp_path, llama2_state, mp):
    """Shards split as Llama 2's fairscale layers split them (embedding along the model dim)."""
    params, vocab = checkpoints.LLAMA2_PARAMS, checkpoints.LLAMA2_VOCAB
    checkpoints.write_meta_checkpoint(tmp_path, params, llama2_state, mp=mp)
    if mp == 2:
        shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
        assert shard["tok_embeddings.weight"].shape == (vocab, 32)  # ParallelEmbedding: [V, D / mp]
    got = np.asarray(llama_jax.load(tmp_path, dtype="float32")(TOKENS))

    # Meta's Transformer, run with Llama 2's hyper-parameters (θ 10,000, no rope scaling, MHA)
    llama2_args = dict(params, vocab_size=vocab, rope_theta=10_000.0, use_scaled_rope=False)
    meta = checkpoints.meta_reference_model(llama2_args, llama2_state)
    assert relative_error(got, meta(torch.tensor(TOKENS), 0).float().numpy()) <= TOLERANCE

    c = LlamaConfig.from_meta_params(params, vocab_size=vocab)
    assert c.n_kv_heads == c.n_heads  # Llama 2 7B: multi-head attention
    hf = transformers_model(llama2_state, c, rope=LLAMA2_ROPE, max_positions=4096)
    assert relative_error(got, hf_logits(hf, TOKENS)) <= TOLERANCE


@pytest.mark.parametrize(
    "params, key",
    [
        ({"dim": 64, "n_layers": 2, "n_heads": 8, "vocab_size": -1, "use_scaled_rope": True}, "'use_scaled_rope'"),
        ({"dim": 64, "n_layers": 2, "n_heads": 8, "vocab_size": -1, "rope_scaling_factor": 8}, "'rope_scaling_factor'"),
        ({"dim": 64, "n_layers": 2, "n_heads": 8}, "'vocab_size'"),
        ({"dim": 64, "n_layers": 2, "n_heads": 8, "vocab_size": 0}, "'vocab_size' = 0"),
    ],
    ids=["llama2-vocab-with-scaled-rope", "llama2-vocab-with-factor", "neither-vocab-nor-theta", "zero-vocab"],
)
def test_ambiguous_params_json_is_an_error_naming_file_and_key(tmp_path, llama2_state, params, key):
    checkpoints.write_meta_checkpoint(tmp_path, checkpoints.LLAMA2_PARAMS, llama2_state)
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=f"{tmp_path / 'params.json'}: .*{key}"):
        llama_jax.load(tmp_path)


# ---- 405B MP16: duplicated KV heads ----------------------------------------------------------------

GQA = dict(checkpoints.META_PARAMS, rope_theta=500_000.0)


def duplicate_kv_heads(state: dict, n_kv_heads: int, head_dim: int) -> dict:
    """What llama-models' `checkpoint.reshard_mp` writes when MP exceeds the KV heads: each head
    repeated consecutively (`repeat_qk_qv`), kv'[2j] = kv'[2j+1] = kv[j]."""
    out = dict(state)
    for name, w in state.items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            out[name] = w.view(n_kv_heads, 1, head_dim, -1).expand(-1, 2, -1, -1).reshape(2 * n_kv_heads * head_dim, -1)
    return out


@pytest.fixture(scope="module")
def mp_duplicated(tmp_path_factory):
    """GQA 8:2 weights written like the MP16 release: n_kv_heads doubled to 4, 4 ranks of one KV head."""
    state = checkpoints.meta_state_dict(GQA)
    path = tmp_path_factory.mktemp("mp_dup")
    c = LlamaConfig.from_meta_params(GQA)
    checkpoints.write_meta_checkpoint(path, dict(GQA, n_kv_heads=4), duplicate_kv_heads(state, 2, c.head_dim), mp=4)
    return path, state, c


def test_duplicated_kv_heads_are_merged_and_match_transformers(mp_duplicated):
    path, state, c = mp_duplicated
    assert json.loads((path / "params.json").read_text())["n_kv_heads"] == 4
    model = llama_jax.load(path, dtype="float32")
    assert model.config.n_kv_heads == 2 and model.layers.attention.wk[...].shape == (2, 64, 2, 8)
    assert c.n_kv_heads == 2  # the real heads, not the release's duplicated ones
    hf = transformers_model(state, c, rope=checkpoints.LLAMA3_ROPE, max_positions=131072)
    tokens = TOKENS % c.vocab_size
    assert relative_error(model(tokens), hf_logits(hf, tokens)) <= TOLERANCE


@pytest.mark.parametrize("tensor", ["wk", "wv"])
@pytest.mark.parametrize("layer", [0, 1], ids=["layer-0-where-the-copies-are-detected", "later-layer"])
def test_kv_head_copies_that_differ_fail_naming_file_tensor_and_head(mp_duplicated, tmp_path, layer, tensor):
    path, _, _ = mp_duplicated
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    shard = torch.load(tmp_path / "consolidated.03.pth", weights_only=True)
    shard[f"layers.{layer}.attention.{tensor}.weight"][0, 0] += 1.0  # rank 3 holds the 2nd copy of real head 1
    torch.save(shard, tmp_path / "consolidated.03.pth")
    name = f"layers.{layer}.attention.{tensor}.weight"
    message = f"{tmp_path / 'consolidated.03.pth'}: '{name}' head 2: duplicated KV head copy 1 differs from copy 0 "
    with pytest.raises(ValueError, match=re.escape(message + f"(in {tmp_path / 'consolidated.02.pth'})")):
        llama_jax.load(tmp_path)


# ---- Llama 3.2 int4 QLoRA / SpinQuant: refused, pointing at the bf16 release ---------------------


def write_int4_release(directory, quantization_args: dict, lora_args: dict | None) -> None:
    """A Llama 3.2 int4 release at a tiny size: llama-models' `sku_list.llama3_2_quantized_models`
    params.json (`arch_args` plus `quantization_args`, and `lora_args` for QLoRA), and a shard in the
    state dict its `quantization/loader.py` loads: every linear's int4 values in int8 `weight` with
    float32 group `scales` (and the LoRA `adaptor.A`/`adaptor.B`), int8 embedding and output with
    row `scales`, bf16 norms."""
    params = dict(checkpoints.META_PARAMS, quantization_args=quantization_args)
    if lora_args:
        params["lora_args"] = lora_args
    group = quantization_args["group_size"]
    shard = {}
    for name, w in checkpoints.meta_state_dict(checkpoints.META_PARAMS).items():
        if "norm" in name:
            shard[name] = w.bfloat16()
            continue
        stem, rows = name.removesuffix(".weight"), w.shape[0]
        per_group = w.shape[1] if stem in ("tok_embeddings", "output") else group
        scales = w.reshape(rows, -1, per_group).abs().amax(-1) / (127 if per_group == w.shape[1] else 7)
        shard[name] = (w.reshape(rows, -1, per_group) / scales[..., None]).round().to(torch.int8).reshape(w.shape)
        shard[stem + ".scales"] = scales.squeeze(-1) if per_group == w.shape[1] else scales
        if lora_args and per_group == group:
            shard[stem + ".adaptor.A.weight"] = torch.zeros(lora_args["rank"], w.shape[1]).bfloat16()
            shard[stem + ".adaptor.B.weight"] = torch.zeros(rows, lora_args["rank"]).bfloat16()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    torch.save(shard, directory / "consolidated.00.pth")


INT4 = "int4_weight_int8_dynamic_activation"  # llama-models `QuantizationScheme`, the only one its loader takes


@pytest.mark.parametrize(
    "quantization_args, lora_args",
    [
        ({"group_size": 32, "scheme": INT4}, {"rank": 4, "scale": 2.0}),
        ({"group_size": 32, "scheme": INT4, "spinquant": True}, None),
    ],
    ids=["qlora", "spinquant"],
)
def test_int4_release_is_refused_naming_params_json_and_quantization_args(
    tmp_path, monkeypatch, quantization_args, lora_args
):
    write_int4_release(tmp_path, quantization_args, lora_args)
    monkeypatch.setattr(meta, "torch_to_numpy", lambda t: pytest.fail("a tensor was read before the error"))
    with pytest.raises(ValueError) as error:
        llama_jax.load(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'params.json'}: 'quantization_args' = ")
    assert "QLoRA or SpinQuant" in message and "not load" in message and "use the bf16 release" in message
