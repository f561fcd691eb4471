"""What every model-loading command checks before it reads a weight: its settings, paths, the attention
backend on this platform, then the checkpoint, then the tokenizer (in that order, so the first error
reported is the real one). A spy on the loader proves that no weight was read."""

import json
import shutil

import pytest

from llama_jax import cli
from llama_jax.weights import default_model, loading
from tests import checkpoints


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, llama3_tokenizer_path):
    """A whole tiny HF checkpoint, tokenizer included: every command could load it."""
    path = tmp_path_factory.mktemp("ckpt")
    checkpoints.hf_checkpoint(path, vocab_size=128_256, n_layers=1)
    shutil.copy(llama3_tokenizer_path, path / "tokenizer.model")
    return path


@pytest.fixture
def files(tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n")
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "Hi"}) + "\n")
    (tmp_path / "a_file").write_text("")
    return tmp_path


@pytest.fixture
def loader_spy(monkeypatch):
    """Records every checkpoint the loader opens and every weight load it starts (and refuses to start one)."""
    opened, loaded = [], []
    open_checkpoint = loading.open_checkpoint

    def spy_open(path):
        opened.append(path)
        return open_checkpoint(path)

    def spy_load_from(ckpt, **kwargs):
        loaded.append(ckpt)
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading, "open_checkpoint", spy_open)
    monkeypatch.setattr(loading, "load_from", spy_load_from)
    return opened, loaded


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


# The engine's paged cache (batch, rejection) runs auto or blockwise attention only.
PAGED_ONLY = "--attention %s: the engine's paged KV cache (batch and rejection jobs) cannot run it"
# (argv with {ckpt} and {dir} placeholders, what the error must say)
SETTINGS_ERRORS = [
    (["generate", "--prompt", "x", "--top-p", "1.5"], "top_p: expected a number in (0, 1]"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-1"], "max_new_tokens: expected an integer >= 0"),
    (["generate", "--prompt", "x", "--attention", "cudnn"], "attention='cudnn' needs an NVIDIA GPU"),
    (["generate", "--prompt", "x", "--attention", "splash"], "attention='splash' needs a TPU"),
    (["chat", "--temperature", "-1"], "temperature: expected a number >= 0"),
    (["batch", "--input", "{dir}/missing.jsonl", "--output", "{dir}/out.jsonl"], "input: {dir}/missing.jsonl does not"),
    (["batch", "--input", "{dir}/in.jsonl", "--output", "{dir}/a_file/out.jsonl"], "{dir}/a_file is a file"),
    (["batch", "--input", "{dir}/in.jsonl", "--output", "{dir}"], "output: {dir} is a directory"),
    (["batch", "--input", "{dir}/in.jsonl", "--output", "{dir}/o.jsonl", "--top-p", "1.5"], "top_p: expected"),
    (["batch", "--input", "{dir}/in.jsonl", "--output", "{dir}/o.jsonl", "--attention", "cudnn"], PAGED_ONLY % "cudnn"),
    (["batch", "--input", "{dir}/in.jsonl", "--output", "{dir}/o.jsonl", "--attention", "dense"], PAGED_ONLY % "dense"),
    (
        ["rejection", "--input", "{dir}/in.jsonl", "--output", "{dir}/o.jsonl", "--attention", "dense"],
        PAGED_ONLY % "dense",
    ),
    (
        ["batch", "--input", "{dir}/in.jsonl", "--output", "{dir}/o.jsonl", "--fp8-matmul", "fp9"],
        "fp8_matmul: expected",
    ),
    (["batch", "--input", "{dir}/in.jsonl", "--output", "{dir}/o.jsonl", "--mesh", "fsdp=3"], "mesh"),
    (["rejection", "--input", "{dir}/in.jsonl", "--output", "{dir}/o.jsonl", "--config.top_p=2"], "top_p: expected"),
    (["rejection", "--input", "{dir}/in.jsonl", "--output", "{dir}/o.jsonl", "--config.reward_model={dir}"], "layout"),
    (["train", "--data", "{dir}/missing.jsonl"], "data: {dir}/missing.jsonl does not exist"),
    (["train", "--data", "{dir}/data.jsonl", "--workdir", "{dir}/a_file"], "workdir: {dir}/a_file is a file"),
    (["train", "--data", "{dir}/data.jsonl", "--batch-size", "8", "--config.grad_accum=3"], "not divisible"),
]


@pytest.mark.parametrize(("argv", "message"), SETTINGS_ERRORS)
def test_a_bad_setting_is_reported_before_the_checkpoint_is_opened(argv, message, ckpt, files, loader_spy, capsys):
    fill = lambda s: s.replace("{dir}", str(files))  # noqa: E731
    code, err = run([*map(fill, argv), "--checkpoint", ckpt], capsys)
    assert code == 2 and f"{argv[0]}: error:" in err
    assert fill(message) in err
    opened, loaded = loader_spy
    assert ckpt not in opened and not loaded


def test_a_wrong_directory_reports_its_layout_not_a_missing_tokenizer(tmp_path, loader_spy, capsys):
    (tmp_path / "notes.txt").write_text("")
    for command in (["generate", "--prompt", "x"], ["chat"], ["guard", "--message", "x"]):
        code, err = run([*command, "--checkpoint", tmp_path], capsys)
        assert code == 2 and "unknown checkpoint layout" in err and "notes.txt" in err, err
        assert "no tokenizer.model" not in err
    assert not loader_spy[1]


def test_a_missing_tokenizer_says_where_it_looked_and_what_to_do(ckpt, tmp_path, loader_spy, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns("tokenizer.model"))
    code, err = run(["generate", "--prompt", "x", "--checkpoint", bare], capsys)
    assert code == 2
    assert f"looked for {bare}/tokenizer.model and {bare}/original/tokenizer.model" in err
    assert "pass --tokenizer PATH" in err and "llama-models" not in err
    assert loader_spy[0] == [bare] and not loader_spy[1]  # the checkpoint was checked, no weight read

    code, err = run(["generate", "--prompt", "x", "--checkpoint", bare, "--tokenizer", tmp_path / "nope"], capsys)
    assert code == 2 and f"--tokenizer {tmp_path / 'nope'}: no such file" in err


def test_without_llama_models_the_default_model_asks_for_it_or_a_tokenizer(monkeypatch, loader_spy, capsys):
    monkeypatch.setattr(default_model, "tokenizer_path", lambda: None)
    code, err = run(["generate", "--prompt", "x"], capsys)
    assert code == 2 and "pip install llama-models" in err and "--tokenizer PATH" in err
    assert not loader_spy[1]  # the embedded model goes through the same sequence: no weight drawn or placed
