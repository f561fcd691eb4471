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

    run.env = env
    return run


def test_generate_with_the_embedded_default_streams_text_and_says_the_weights_are_random(
    run_cli, llama3_tokenizer_path
):
    proc = run_cli("generate", "--prompt", "The capital of France is", "--max-new-tokens", "6", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM" in proc.stderr and "--checkpoint" in proc.stderr
    # Greedy from the seeded default model: exactly the text of what `generate` produces in-process.
    from llama_jax.inference import sampler
    from llama_jax.text.tokenizer import Tokenizer
    from llama_jax.weights import default_model

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


# ---- the chat loop: scripted input, Ctrl-C injected -----------------------------------------------------


class Script:
    """stdin from a list: each item is a line, or an exception that reading it raises (Ctrl-C)."""

    def __init__(self, *lines):
        self.lines = list(lines)

    def isatty(self):
        return False

    def readline(self):
        if not self.lines:
            return ""
        line = self.lines.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line + "\n"


@pytest.fixture(scope="module")
def default_model():
    from llama_jax.weights import default_model

    return default_model.default_model(warn=False)


class Prompts(list):
    interrupt_at = None  # the reply (1-based) that Ctrl-C interrupts


@pytest.fixture
def prompts(monkeypatch):
    """Every prompt the chat loop sends to `sampler.stream`; `prompts.interrupt_at = n` makes the n-th
    reply raise KeyboardInterrupt after two tokens, as Ctrl-C during a reply does."""
    from llama_jax.inference import sampler

    stream = sampler.stream
    sent = Prompts()

    def spy(model, prompt, params):
        sent.append(list(prompt))
        tokens = stream(model, prompt, params)
        if len(sent) != sent.interrupt_at:
            return tokens

        def interrupted():
            yield next(tokens)
            yield next(tokens)
            raise KeyboardInterrupt

        return interrupted()

    monkeypatch.setattr(sampler, "stream", spy)
    return sent


def chat_loop(model, chat, *lines, context=None, system="Be brief."):
    import io

    from llama_jax import cli
    from llama_jax.inference.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=4, stop_tokens=chat.tokenizer.stop_tokens)
    stdout, stderr = io.StringIO(), io.StringIO()
    code = cli.chat_loop(
        model, chat, params, system=system, stdin=Script(*lines), stdout=stdout, stderr=stderr, context=context
    )
    return code, stdout.getvalue(), stderr.getvalue()


def user(text):
    return {"role": "user", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}


def test_ctrl_c_during_a_reply_drops_that_turn_and_keeps_the_dialog(default_model, chat, prompts):
    prompts.interrupt_at = 2
    code, out, err = chat_loop(default_model, chat, "First question", "Second question", "Third question")
    assert code == 0 and "[interrupted: reply discarded]" in err
    assert out.count("assistant> ") == 3
    first, third = chat.tokenizer.decode(prompts[0]), chat.tokenizer.decode(prompts[2])
    assert third.startswith(first) and "First question" in third
    assert "Second question" not in third and "Third question" in third


def test_ctrl_c_or_end_of_input_at_the_prompt_ends_the_chat(default_model, chat, prompts):
    code, out, err = chat_loop(default_model, chat, "Hello", KeyboardInterrupt(), "never read")
    assert code == 0 and out.count("assistant> ") == 1 and len(prompts) == 1
    code, out, err = chat_loop(default_model, chat, "Hello")
    assert code == 0 and out.count("assistant> ") == 1


def test_reset_clears_the_history_and_says_so(default_model, chat, prompts):
    code, out, err = chat_loop(default_model, chat, "Hi", "/reset", "Hello again")
    assert code == 0 and "[history cleared, the system message kept]" in err
    assert prompts[1] == chat.encode_dialog([SYSTEM, user("Hello again")])


def test_a_dialog_outgrowing_the_context_drops_its_oldest_turns_keeping_the_system_message(
    default_model, chat, prompts
):
    first = "first " * 20
    context = len(chat.encode_dialog([SYSTEM, user(first)])) + 4  # room for one turn and its 4-token reply
    too_long = "long " * 200
    code, out, err = chat_loop(default_model, chat, first, "Second", too_long, "Third", context=context)
    assert code == 0 and out.count("assistant> ") == 3
    assert prompts[0] == chat.encode_dialog([SYSTEM, user(first)])
    assert prompts[1] == chat.encode_dialog([SYSTEM, user("Second")])  # the first question and its reply went
    assert "[context full: dropped the 2 oldest message(s)]" in err
    assert "do not fit the context" in err  # the long message alone: refused, the chat goes on
    assert prompts[2][: len(prompts[1])] == prompts[1]  # the dialog goes on from the second question
    assert chat.tokenizer.decode(prompts[2]).count("Third") == 1
    assert all(len(p) + 4 <= context for p in prompts)


def test_ctrl_c_through_the_cli_stops_the_reply_then_ends_cleanly_at_the_prompt(run_cli):
    """A real SIGINT: during a long reply, then at the prompt; no traceback, exit status 0."""
    import signal
    import threading
    import time

    env = run_cli.env
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_jax", "chat", "--max-new-tokens", "100000", "--temperature", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
        # A shell's background job (nohup ... &) ignores SIGINT, and a child inherits that: chat gets Ctrl-C's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = threading.Timer(300, proc.kill)  # a chat deaf to SIGINT fails the test, never hangs it
    watchdog.start()
    try:
        proc.stdin.write("Tell me a long story\n")
        proc.stdin.flush()
        seen = ""
        while len(seen) < len("assistant> ") + 20:  # the reply is streaming
            seen += proc.stdout.read(1)
        proc.send_signal(signal.SIGINT)
        said = ""
        while "[interrupted: reply discarded]" not in said:  # the reply is dropped, however loaded the machine
            said += proc.stderr.readline() or pytest.fail(f"chat exited during the reply: {said}")
        time.sleep(0.5)  # the loop is back at the prompt, waiting on stdin
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        err = said + err
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 0, err
    assert "[interrupted: reply discarded]" in err and "Traceback" not in err
