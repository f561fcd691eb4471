"""Fine-tuning: what must hold for SFT, LoRA, distillation, resumption and sharded training."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax.jobs import data
from llama_jax.jobs.losses import full_kl, topk_kl
from llama_jax.jobs.train import TrainConfig, Trainer, TrainJob, run_job
from llama_jax.model.config import LlamaConfig
from llama_jax.model.model import Llama, LoraSpec
from llama_jax.sharding.mesh import make_mesh
from llama_jax.weights import layout, lora
from llama_jax.weights.placement import shard_model
from tests import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = LlamaConfig(
    vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, rope_scaling=None, max_seq_len=128
)


def tiny_model(seed: int = 0, config: LlamaConfig = TINY) -> Llama:
    return Llama(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))


def sequences(rows: np.ndarray, mask: np.ndarray | None = None) -> data.Examples:
    """Examples from whole sequences [N, T + 1]: one document per row, every target trained."""
    n, t = rows.shape[0], rows.shape[1] - 1
    return data.Examples(
        tokens=rows[:, :-1].astype(np.int32),
        targets=rows[:, 1:].astype(np.int32),
        loss_mask=np.ones((n, t), np.float32) if mask is None else mask.astype(np.float32),
        positions=np.tile(np.arange(t, dtype=np.int32), (n, 1)),
        segment_ids=np.ones((n, t), np.int32),
    )


def random_examples(n=16, t=32, seed=0, vocab=256) -> data.Examples:
    return sequences(np.random.default_rng(seed).integers(1, vocab, (n, t + 1)))


def params_of(model: Llama, filter=nnx.Param) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, filter)))


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ---- SFT ------------------------------------------------------------------------------------------------


def test_loss_falls_and_the_model_then_reproduces_a_memorised_sequence_greedily():
    sequence = np.random.default_rng(1).integers(1, 256, 33)
    loader = data.Loader(sequences(np.tile(sequence, (8, 1))), 8, seed=0)
    trainer = Trainer(tiny_model(), TrainConfig(steps=60, batch_size=8, learning_rate=3e-3, warmup_steps=5))
    history = trainer.fit(loader, progress=False)

    assert history[-1]["loss"] < 0.05 * history[0]["loss"]
    [out] = llama_jax.generate(trainer.model, [sequence[:4].tolist()], max_new_tokens=29, stop_tokens=[])
    assert list(out.tokens) == sequence[4:].tolist()


def test_gradient_accumulation_changes_memory_not_the_result():
    loader = data.Loader(random_examples(), 8, seed=0)
    results = []
    for accum in (1, 4):
        trainer = Trainer(tiny_model(), TrainConfig(steps=2, batch_size=8, grad_accum=accum, learning_rate=1e-2))
        trainer.fit(loader, progress=False)
        results.append(jax.tree.map(np.asarray, trainer.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *results)


def test_a_bfloat16_model_trains_float32_master_weights_and_keeps_its_dtype():
    model = Llama(TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    trainer = Trainer(model, TrainConfig(steps=2, batch_size=8, learning_rate=1e-4, warmup_steps=0, remat=False))
    trainer.fit(data.Loader(random_examples(), 8, seed=0), progress=False)
    assert {x.dtype for x in jax.tree.leaves(trainer.params)} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(trainer.opt_state[1][0].mu)} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(params_of(trainer.model))} == {jnp.dtype("bfloat16")}
    # 1e-4 steps are far below bf16's resolution near 0.02: the master copy still records them.
    moved = np.asarray(trainer.params["layers"]["attention"]["wq"]) - np.asarray(
        model.layers.attention.wq[...], np.float32
    )
    assert np.abs(moved).max() > 0 and np.abs(moved).max() < 1e-3


def test_loss_counts_only_masked_targets():
    examples = random_examples(n=8)
    mask = np.zeros_like(examples.loss_mask)
    mask[:, 5:9] = 1
    masked = dataclasses.replace(examples, loss_mask=mask)
    changed = dataclasses.replace(masked, targets=np.where(mask > 0, masked.targets, 7).astype(np.int32))
    trainer = Trainer(tiny_model(), TrainConfig(steps=1, batch_size=8))
    loss, grads = trainer.loss_and_grads(data.Loader(masked, 8, seed=0, shuffle=False).batch(0))
    loss2, grads2 = trainer.loss_and_grads(data.Loader(changed, 8, seed=0, shuffle=False).batch(0))
    assert loss == loss2
    assert_trees_equal(grads, grads2)


# ---- parity of gradients with PyTorch ---------------------------------------------------------------------


@pytest.mark.parametrize("tie, remat", [(False, False), (True, True)], ids=["untied", "tied-remat"])
def test_gradients_match_transformers(tmp_path, tie, remat):
    import torch

    hf = checkpoints.hf_checkpoint(tmp_path, tie=tie)
    model = llama_jax.load(tmp_path, dtype="float32")
    rows = np.random.default_rng(0).integers(0, 384, (3, 17))
    mask = np.random.default_rng(1).random((3, 16)) < 0.7
    trainer = Trainer(model, TrainConfig(steps=1, batch_size=3, remat=remat))
    loss, grads = trainer.loss_and_grads(data.Loader(sequences(rows, mask), 3, seed=0, shuffle=False).batch(0))

    labels = torch.tensor(rows)
    labels[:, 1:][torch.tensor(~mask)] = -100  # HF shifts labels itself; -100 = not trained
    hf.train()
    out = hf(input_ids=torch.tensor(rows), labels=labels)
    out.loss.backward()
    torch_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}

    assert abs(loss - out.loss.item()) <= 1e-5 * abs(out.loss.item())
    config = model.config
    for rule in layout.rules_for(config):
        ours = grads
        for part in rule.path:
            ours = ours[part]
        for i in range(config.n_layers) if rule.per_layer else [None]:
            name = rule.hf.format(i=i)
            mine = rule.to_source(np.asarray(ours if i is None else ours[i]), config)
            ref = torch_grads[name]
            rel = np.abs(mine - ref).max() / np.abs(ref).max()
            print(f"gradient parity {name}: {rel:.1e}")
            assert rel <= 1e-4, f"{name}: max|diff|/max|ref| = {rel:.2e}"


# ---- LoRA -------------------------------------------------------------------------------------------------


def test_lora_trains_only_the_adapters_and_merges_into_the_same_logits():
    base = tiny_model()
    before = params_of(base, nnx.Not(nnx.LoRAParam))
    model = lora.add_adapters(base, LoraSpec(rank=4, alpha=8, targets=("wq", "wv", "wo", "w1", "w2")))
    start = params_of(model, nnx.LoRAParam)
    trainer = Trainer(model, TrainConfig(steps=5, batch_size=8, learning_rate=1e-2, warmup_steps=1))
    trainer.fit(data.Loader(random_examples(), 8, seed=0), progress=False)
    trained = trainer.model

    assert_trees_equal(params_of(trained, nnx.Not(nnx.LoRAParam)), before)  # the base is untouched
    adapters = params_of(trained, nnx.LoRAParam)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), adapters, start)
    assert all(jax.tree.leaves(changed)), changed  # every adapter matrix moved (B starts at zero)
    assert {x.dtype for x in jax.tree.leaves(trainer.params)} == {np.dtype("float32")}  # the master copy

    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 12)))
    merged = lora.merge(trained)
    assert merged.lora is None and not nnx.state(merged, nnx.LoRAParam)
    np.testing.assert_allclose(merged(tokens), trained(tokens), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(merged(tokens) - base(tokens))).max() > 1e-3  # and the training did something


def test_a_model_held_unstacked_trains_adapters_as_the_stacked_one_and_refuses_full_fine_tuning(tmp_path, monkeypatch):
    """Where a GPU cannot hold a per-layer copy beside the stack (405B FP8 on 8 H100s; forced here), `load` holds
    the layers `Unstacked`: LoRA trains on it as on the stacked model (same loss, same adapters), merges layer
    by layer into an `Unstacked` model with the stacked merge's logits; full fine-tuning, whose float32 master
    and AdamW state could not fit there, is refused with the reason."""
    from llama_jax.model import unstacked

    checkpoints.hf_checkpoint(tmp_path)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2), ("fsdp", "tensor"))
    spec = LoraSpec(rank=4, alpha=8, targets=("wq", "wv", "w2"))
    stacked = lora.add_adapters(llama_jax.load(tmp_path, dtype="float32", mesh=mesh), spec)
    monkeypatch.setattr(unstacked, "wanted", lambda platform, layer_bytes, device_bytes: True)
    base = llama_jax.load(tmp_path, dtype="float32", mesh=mesh)
    held = lora.add_adapters(base, spec)
    assert unstacked.held(held) and not unstacked.held(stacked)

    config = TrainConfig(steps=1, batch_size=4, learning_rate=1e-2, warmup_steps=0)
    trainers = [Trainer(m, config) for m in (held, stacked)]
    for trainer in trainers:
        trainer.fit(data.Loader(random_examples(n=8, t=16, vocab=200), 4, seed=0), progress=False)
    assert trainers[0].history[-1]["loss"] == pytest.approx(trainers[1].history[-1]["loss"], rel=1e-5)
    merged = [lora.merge(t.model) for t in trainers]
    assert isinstance(merged[0].layers.attention.wq.get_value(), unstacked.Unstacked)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 200, (2, 12)))
    np.testing.assert_allclose(merged[0](tokens), merged[1](tokens), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(merged[0](tokens) - base(tokens))).max() > 1e-4  # the adapters moved
    with pytest.raises(ValueError, match="full fine-tuning of a model held Unstacked .* train adapters"):
        Trainer(base, config)


def test_a_fresh_adapter_changes_nothing():
    base = tiny_model()
    model = lora.add_adapters(base, LoraSpec(rank=2, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3")))
    tokens = jnp.arange(20).reshape(2, 10)
    np.testing.assert_array_equal(model(tokens), base(tokens))


# ---- distillation -----------------------------------------------------------------------------------------


def test_a_student_equal_to_its_teacher_has_zero_distillation_loss():
    model = tiny_model()
    batch = data.Loader(random_examples(n=4), 4, seed=0).batch(0)
    online = Trainer(model, TrainConfig(steps=1, batch_size=4, distill_temperature=2.0), teacher=tiny_model())
    loss, _ = online.loss_and_grads(batch)
    assert abs(loss) < 1e-6

    logits = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]))
    logprobs, ids = jax.lax.top_k(jax.nn.log_softmax(logits), 5)
    offline = Trainer(model, TrainConfig(steps=1, batch_size=4))
    loss, _ = offline.loss_and_grads(
        {**batch, "teacher_ids": np.asarray(ids), "teacher_logprobs": np.asarray(logprobs)}
    )
    assert abs(loss) < 1e-6


def test_kl_losses_against_direct_computation():
    rng = np.random.default_rng(0)
    student, teacher = (jnp.asarray(rng.normal(size=(2, 3, 11)), jnp.float32) for _ in range(2))
    mask = jnp.asarray([[1, 1, 0], [1, 0, 1]], jnp.float32)
    p, q = jax.nn.softmax(teacher / 2), jax.nn.softmax(student / 2)
    expected = 4 * np.sum(np.asarray(mask)[..., None] * np.asarray(p * (jnp.log(p) - jnp.log(q))))
    np.testing.assert_allclose(full_kl(student, teacher, mask, 2.0), expected, rtol=1e-5)

    # Top-K with K = V - 1: the "rest" category is the one token left out, so the K + 1 categories
    # are the whole vocabulary and the top-K KL is the full KL.
    t_logp = jax.nn.log_softmax(teacher)
    values, ids = jax.lax.top_k(t_logp, 10)
    np.testing.assert_allclose(
        topk_kl(student, ids, values, mask, 1.0), full_kl(student, teacher, mask, 1.0), rtol=1e-4
    )


def test_the_batch_jobs_top_logprobs_are_distillation_data_aligned_to_the_teacher(tmp_path, llama3_tokenizer_path):
    from llama_jax.jobs.batch import run_batch
    from llama_jax.text.tokenizer import Tokenizer

    teacher = tiny_model(
        config=TINY.replace(vocab_size=128_256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)
    )
    tokenizer = Tokenizer.from_file(llama3_tokenizer_path)
    prompts = ["The sky is", "Paris is the capital of", "One, two,", "JAX compiles"]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    run_batch(
        teacher,
        tokenizer,
        tmp_path / "in.jsonl",
        tmp_path / "out.jsonl",
        progress=False,
        max_new_tokens=4,
        temperature=0.0,
        top_logprobs=4,
    )
    examples = data.load_examples(tmp_path / "out.jsonl", tokenizer=None, seq_len=16, kind="distill")
    assert examples.teacher_ids.shape == (4, 16, 4) and examples.loss_mask.sum() > 0

    # A student equal to the teacher has zero loss only if every stored distribution sits on the
    # position whose logits produced it.
    trainer = Trainer(teacher, TrainConfig(steps=1, batch_size=4))
    loss, _ = trainer.loss_and_grads(data.Loader(examples, 4, seed=0).batch(0))
    assert abs(loss) < 1e-5
    shifted = dataclasses.replace(
        examples,
        teacher_ids=np.roll(examples.teacher_ids, 1, axis=1),
        teacher_logprobs=np.roll(examples.teacher_logprobs, 1, axis=1),
    )
    loss, _ = trainer.loss_and_grads(data.Loader(shifted, 4, seed=0).batch(0))
    assert loss > 1e-3


def test_distillation_brings_the_student_towards_a_larger_teacher():
    teacher = tiny_model(seed=7, config=TINY.replace(dim=96, n_layers=3, ffn_dim=192, n_heads=6, n_kv_heads=3))
    trainer = Trainer(
        tiny_model(),
        TrainConfig(steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=2, distill_temperature=2.0),
        teacher=teacher,
    )
    history = trainer.fit(data.Loader(random_examples(), 8, seed=0), progress=False)
    assert history[-1]["kl"] < 0.5 * history[0]["kl"]


# ---- checkpoints and resumption ---------------------------------------------------------------------------


def distill_records(path, n=24, t=20, k=4, seed=0):
    """Batch-job output records with top-K teacher log-probs, ids < 384 (the tiny HF vocabulary)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            sequence = rng.integers(0, 384, t).tolist()
            logits = rng.normal(size=(t - 5, 384))
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            top = np.argsort(-logp, axis=-1)[:, :k]
            record = {
                "id": i,
                "sequence": sequence,
                "completion_start": 5,
                "top_logprobs": {"ids": top.tolist(), "logprobs": np.take_along_axis(logp, top, -1).tolist()},
            }
            f.write(json.dumps(record) + "\n")


def final_state(workdir, step):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "state").absolute())


def distill_job(tmp_path, tokenizer_path, **fields) -> TrainJob:
    """A job training a tiny HF checkpoint on batch-job records with teacher log-probs, both written here."""
    checkpoints.hf_checkpoint(tmp_path / "model")
    distill_records(tmp_path / "data.jsonl")
    return TrainJob(
        checkpoint=str(tmp_path / "model"),
        tokenizer=str(tokenizer_path),
        dtype="float32",
        data=str(tmp_path / "data.jsonl"),
        seq_len=24,
        batch_size=4,
        progress=False,
        **fields,
    )


def test_resuming_after_sigkill_gives_bit_identical_params(tmp_path, llama3_tokenizer_path):
    job = distill_job(
        tmp_path,
        llama3_tokenizer_path,
        steps=40,
        learning_rate=1e-3,
        distill_weight=0.5,
        checkpoint_every=5,
        export="none",
    )
    run_job(dataclasses.replace(job, workdir=str(tmp_path / "straight")))

    killed = tmp_path / "killed"
    args = [
        f"--config.{f.name}={getattr(job, f.name)}"
        for f in dataclasses.fields(job)
        if f.name not in ("lora_targets", "teacher", "teacher_rules", "mesh")
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_jax", "train", *args, f"--workdir={killed}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "5").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert not (killed / "checkpoints" / "40").exists()

    history = run_job(dataclasses.replace(job, workdir=str(killed), resume=True)).history
    assert history[0]["step"] > 5
    assert_trees_equal(final_state(killed, 40), final_state(tmp_path / "straight", 40))
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 41))  # steps the killed run logged past its checkpoint were redone once


def test_a_second_run_in_a_used_workdir_must_say_resume(tmp_path):
    loader = data.Loader(random_examples(n=8), 8, seed=0)
    Trainer(tiny_model(), TrainConfig(steps=1, batch_size=8), workdir=tmp_path).fit(loader, progress=False)
    with pytest.raises(ValueError, match="resume"):
        Trainer(tiny_model(), TrainConfig(steps=2, batch_size=8), workdir=tmp_path).fit(loader, progress=False)


def test_the_lora_job_exports_a_merged_model_that_loads_back(tmp_path, llama3_tokenizer_path):
    job = distill_job(
        tmp_path,
        llama3_tokenizer_path,
        steps=3,
        learning_rate=1e-2,
        lora_rank=4,
        lora_targets=("wq", "w2"),
        workdir=str(tmp_path / "run"),
    )
    trained = run_job(job).model
    assert trained.lora is not None
    exported = llama_jax.load(tmp_path / "run" / "model", dtype="float32")
    assert exported.lora is None
    assert llama_jax.find_tokenizer(tmp_path / "run" / "model").read_bytes() == llama3_tokenizer_path.read_bytes()
    tokens = jnp.arange(24).reshape(2, 12)
    np.testing.assert_allclose(exported(tokens), trained(tokens), rtol=1e-5, atol=1e-5)


# ---- sharded training -------------------------------------------------------------------------------------


def test_fsdp_x_tensor_training_on_8_devices_matches_one_device():
    loader = data.Loader(random_examples(), 8, seed=0)
    config = TrainConfig(steps=3, batch_size=8, grad_accum=2, learning_rate=1e-2, warmup_steps=1)
    single = Trainer(tiny_model(), config)
    single.fit(loader, progress=False)

    mesh = make_mesh("fsdp=2,tensor=4")
    sharded = Trainer(shard_model(tiny_model(), mesh, "fsdp_tp"), config)
    wq = sharded.params["layers"]["attention"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    mu = sharded.opt_state[1][0].mu["layers"]["attention"]["wq"]  # clip, then adamw's scale_by_adam
    assert mu.sharding.is_equivalent_to(wq.sharding, wq.ndim)  # optimizer state sharded like the params
    sharded.fit(loader, progress=False)

    assert sharded.params["layers"]["attention"]["wq"].sharding.is_equivalent_to(wq.sharding, wq.ndim)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
        sharded.params,
        single.params,
    )


# ---- the command line -------------------------------------------------------------------------------------


def test_config_files_parse_and_overrides_apply():
    from llama_jax.cli import build_parser
    from llama_jax.jobs import jobs

    args = build_parser().parse_args(
        [
            "train",
            "--config",
            "finetune_lora",
            "--steps",
            "7",
            "--config.lora_targets=wq,w2",
            "--config.remat=false",
            "--resume",
        ]
    )
    job = jobs.config_from_args(TrainJob, args)
    assert (job.steps, job.lora_targets, job.remat, job.resume, job.lora_rank) == (7, ("wq", "w2"), False, True, 16)
    for name in ("finetune_sft", "distill"):
        args = build_parser().parse_args(["train", "--config", name])
        assert jobs.config_from_args(TrainJob, args).steps > 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--config.no_such_field=1"])
