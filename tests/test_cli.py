"""`python -m llama_jax generate|chat`, run as a user runs them: a subprocess, no checkpoint (the
embedded default model with random weights and the real Llama 3 tokenizer), stdin for chat."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_cli(tmp_path_factory):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    # One compilation cache for this module's runs, never the user's.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))

    def run(*args, stdin=""):
        return subprocess.run(
            [sys.executable, "-m", "llama_jax", *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=300,
        )

    return run


def test_generate_with_the_embedded_default_streams_text_and_says_the_weights_are_random(
    run_cli, llama3_tokenizer_path
):
    proc = run_cli("generate", "--prompt", "The capital of France is", "--max-new-tokens", "6", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM" in proc.stderr and "--checkpoint" in proc.stderr
    # Greedy from the seeded default model: exactly the text of what `generate` produces in-process.
    from llama_jax import default_model, sampler
    from llama_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(llama3_tokenizer_path)
    prompt = tokenizer.encode("The capital of France is", bos=True, eos=False)
    result = sampler.generate(default_model.default_model(warn=False), [prompt], max_new_tokens=6)[0]
    assert proc.stdout == tokenizer.decode(list(result.tokens)) + "\n"
    assert proc.stdout.strip()


def test_chat_answers_each_stdin_line_until_exit(run_cli):
    stdin = "Hello!\nWhat is the capital of France?\n/exit\nthis line is never read\n"
    proc = run_cli("chat", "--system", "Be brief.", "--max-new-tokens", "5", "--seed", "1", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM" in proc.stderr
    replies = proc.stdout.split("assistant> ")[1:]
    assert len(replies) == 2
    assert all(reply.strip() for reply in replies)


def test_chat_ends_at_end_of_input(run_cli):
    proc = run_cli("chat", "--max-new-tokens", "3", stdin="Hi\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 1


def test_a_missing_checkpoint_is_a_clear_error(run_cli, tmp_path):
    proc = run_cli("generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi")
    assert proc.returncode == 2
    assert "generate: error:" in proc.stderr and "nope" in proc.stderr


def test_commands_are_subcommands():
    from llama_jax import cli

    parser = cli.build_parser()
    for command in ("generate", "chat", "convert"):
        assert parser.parse_args(_minimal(command)).command == command
    with pytest.raises(SystemExit):
        parser.parse_args(["no-such-command"])


def _minimal(command):
    return {"generate": ["generate", "--prompt", "x"], "chat": ["chat"], "convert": ["convert", "a", "b"]}[command]
