"""DPO: the loss, rewards and gradients are TRL's `DPOTrainer`'s; training on preferences raises the margin."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax.jobs import data, dpo
from llama_jax.jobs.losses import dpo_loss
from llama_jax.jobs.train import TrainConfig, Trainer, TrainJob, run_job
from llama_jax.model.model import Llama, LoraSpec
from llama_jax.weights import layout, lora
from tests import checkpoints
from tests.test_train import TINY

# Sigmoid DPO, robust DPO (label smoothing as a flip rate) and IPO; online and precomputed references.
VARIANTS = [("sigmoid", 0.0, "online"), ("robust", 0.1, "precomputed"), ("ipo", 0.0, "precomputed")]


def trl_tokenizer():
    """A word-level HF tokenizer over the tiny vocabulary: "w<i>" is id i; ids 0-2 are pad, eos and unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, 384)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def preference_texts(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def words(k):
        return " ".join(f"w{i}" for i in rng.integers(3, 384, k))

    # Replies start with a space, so that prompt + reply tokenizes as prompt ids + reply ids.
    return [
        {
            "prompt": words(rng.integers(2, 7)),
            "chosen": " " + words(rng.integers(1, 6)),
            "rejected": " " + words(rng.integers(1, 6)),
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random tiny HF policy and a perturbed copy as the reference, saved and loaded into llama-jax."""
    import torch

    tmp = tmp_path_factory.mktemp("dpo")
    policy = checkpoints.hf_checkpoint(tmp / "policy")
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference.save_pretrained(tmp / "reference")
    return policy, reference, tmp


@pytest.mark.parametrize("loss, smoothing, ref_mode", VARIANTS, ids=[f"{a}-{b}-{c}" for a, b, c in VARIANTS])
def test_loss_rewards_and_gradients_equal_trls_dpo_trainer(models, tmp_path, loss, smoothing, ref_mode):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, reference, tmp = models
    policy = copy.deepcopy(policy)
    beta = 0.3
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=beta,
        loss_type=[loss],
        label_smoothing=smoothing,
        report_to="none",
        use_cpu=True,
        bf16=False,
        precompute_ref_log_probs=False,
    )
    trl = DPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=Dataset.from_list(preference_texts(5)),
        processing_class=trl_tokenizer(),
    )
    rows = [trl.train_dataset[i] for i in range(5)]
    policy.train()
    trl_loss = trl._compute_loss(policy, trl.data_collator(rows), False)
    trl_loss.backward()
    trl_grads = {name: p.grad.numpy() for name, p in policy.named_parameters()}
    trl_metrics = {k: v[-1] for k, v in trl._metrics["train"].items() if k.startswith("rewards/")}

    # The same token ids as pairs for llama-jax (TRL tokenized them: prompt, reply + eos).
    pairs = dpo.pairs_from_ids(
        [r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows], [r["rejected_ids"] for r in rows], seq_len=16
    )
    model = llama_jax.load(tmp / "policy", dtype="float32")
    ref_model = llama_jax.load(tmp / "reference", dtype="float32")
    config = TrainConfig(
        steps=1, batch_size=5, objective="dpo", dpo_beta=beta, dpo_loss=loss, dpo_label_smoothing=smoothing, remat=False
    )
    if ref_mode == "online":
        trainer = Trainer(model, config, teacher=ref_model)
    else:
        pairs = pairs.with_reference(dpo.reference_logps(ref_model, pairs, batch_size=4))
        trainer = Trainer(model, config)
    batch = data.Loader(pairs, 5, seed=0, shuffle=False).batch(0)
    ours_loss, grads = trainer.loss_and_grads(batch)
    metrics = trainer.evaluate(batch)

    assert abs(ours_loss - trl_loss.item()) <= 1e-5 * max(1.0, abs(trl_loss.item()))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(metrics[name] - trl_metrics[name]) <= 1e-5 * max(1.0, abs(trl_metrics[name])), name
    for rule in layout.rules_for(model.config):
        ours = grads
        for part in rule.path:
            ours = ours[part]
        for i in range(model.config.n_layers) if rule.per_layer else [None]:
            name = rule.hf.format(i=i)
            mine = rule.to_source(np.asarray(ours if i is None else ours[i]), model.config)
            ref = trl_grads[name]
            rel = np.abs(mine - ref).max() / np.abs(ref).max()
            assert rel <= 1e-5, f"{name}: max|diff|/max|ref| = {rel:.2e}"


def test_conservative_dpo_is_the_label_smoothed_sigmoid_loss():
    # cDPO (Mitchell 2023; TRL 0.x's sigmoid with label_smoothing): the expected DPO loss when a label is
    # flipped with probability ε. TRL 1.x no longer has it, so this checks the formula directly.
    logps = jnp.array([[-3.0, -5.0], [-4.0, -2.0]])
    ref = jnp.array([[-3.5, -4.0], [-4.5, -2.5]])
    beta, eps = 0.5, 0.2
    per_pair, metrics = dpo_loss(logps, ref, jnp.ones((2, 2)), beta=beta, label_smoothing=eps)
    h = beta * np.array([(-3.0 + 3.5) - (-5.0 + 4.0), (-4.0 + 4.5) - (-2.0 + 2.5)])
    expected = -(1 - eps) * np.log(1 / (1 + np.exp(-h))) - eps * np.log(1 / (1 + np.exp(h)))
    np.testing.assert_allclose(per_pair, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], h, rtol=1e-6)
    np.testing.assert_array_equal(metrics["rewards/accuracies"], [1.0, 0.0])


def synthetic_preferences(n=16, seed=0) -> dpo.PairExamples:
    """Prompts of random ids; the chosen reply repeats token 7, the rejected one token 9."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(10, 256, 6)) for _ in range(n)]
    return dpo.pairs_from_ids(prompts, [[7] * 4] * n, [[9] * 4] * n, seq_len=12)


@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_training_on_synthetic_preferences_raises_the_margin(adapters):
    model = Llama(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0))
    if adapters:
        model = lora.add_adapters(model, LoraSpec(rank=4, alpha=8.0))
    pairs = synthetic_preferences()
    pairs = pairs.with_reference(dpo.reference_logps(model, pairs))
    loader = data.Loader(pairs, 8, seed=0)
    trainer = Trainer(
        model,
        TrainConfig(
            steps=12,
            batch_size=8,
            objective="dpo",
            dpo_beta=0.1,
            learning_rate=1e-2 if adapters else 1e-3,
            warmup_steps=0,
        ),
    )
    history = trainer.fit(loader, progress=False)
    assert abs(history[0]["rewards/margins"]) < 1e-6  # the policy starts as its reference
    assert history[-1]["rewards/margins"] > 0.5
    assert history[-1]["rewards/accuracies"] == 1.0
    assert history[-1]["loss"] < history[0]["loss"] - 0.3


def test_pair_rows_train_only_the_replies(tokenizer):
    pairs = dpo.pair_examples(
        [
            ("a", {"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}),
            ("b", {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}),
        ],
        tokenizer,
        seq_len=32,
    )
    chat = llama_jax.ChatFormat(tokenizer)
    prompt = chat.encode_dialog([{"role": "user", "content": "Hi"}])
    reply = tokenizer.encode("Hello!", bos=False, eos=False) + [tokenizer.eot_id]
    n = len(prompt) + len(reply)
    np.testing.assert_array_equal(pairs.tokens[0, 0, :n], prompt + reply)
    trained = pairs.targets[0, 0][pairs.loss_mask[0, 0] > 0]
    np.testing.assert_array_equal(trained, reply)
    trained_text = pairs.targets[1, 1][pairs.loss_mask[1, 1] > 0]
    np.testing.assert_array_equal(trained_text, tokenizer.encode(" 5", bos=False, eos=True))
    with pytest.raises(ValueError, match="c: a preference pair needs"):
        dpo.pair_examples([("c", {"prompt": "x", "chosen": "y"})], tokenizer, seq_len=8)


def test_the_dpo_job_reads_pairs_resumes_and_logs_rewards(tmp_path, llama3_tokenizer_path):
    records = [{"prompt": f"Question {i}:", "chosen": " yes", "rejected": " no"} for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    job = TrainJob(
        data=str(path),
        data_kind="pairs",
        objective="dpo",
        steps=1,
        batch_size=4,
        seq_len=16,
        lora_rank=4,
        workdir=str(tmp_path / "run"),
        export="none",
        progress=False,
        checkpoint_every=1,
        tokenizer=str(llama3_tokenizer_path),
    )
    history = run_job(job).history
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(history[-1])
    assert (tmp_path / "run" / "reference_logps.npy").is_file()
    # Resuming at the end re-runs nothing and reads the cached reference pass.
    resumed = run_job(dataclasses_replace(job, resume=True, steps=2)).history
    assert [m["step"] for m in resumed] == [2]


def dataclasses_replace(job, **changes):
    import dataclasses

    return dataclasses.replace(job, **changes)


def test_dpo_on_a_mesh_matches_one_device():
    from llama_jax.sharding.mesh import make_mesh
    from llama_jax.weights.placement import shard_model

    pairs = synthetic_preferences(n=8)
    with_ref = pairs.with_reference(dpo.reference_logps(Llama(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0)), pairs))
    results = []
    for mesh in (None, make_mesh("fsdp=2,tensor=4")):
        model = Llama(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0))
        if mesh is not None:
            shard_model(model, mesh, "fsdp_tp")
        trainer = Trainer(model, TrainConfig(steps=2, batch_size=8, objective="dpo", learning_rate=1e-3))
        trainer.fit(data.Loader(with_ref, 8, seed=0), progress=False)
        results.append(jax.tree.map(np.asarray, trainer.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *results)


def test_the_dpo_config_file_is_a_valid_train_job():
    from llama_jax.jobs import jobs
    from llama_jax.model.config import load_config_file

    job = jobs.config_from_mapping(TrainJob, load_config_file("dpo").to_dict(), source="dpo")
    assert (job.objective, job.dpo_beta, job.dpo_reference) == ("dpo", 0.1, "precompute")
