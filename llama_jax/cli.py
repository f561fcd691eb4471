"""The command line: `python -m llama_jax <command> ...`.

    generate  --prompt TEXT [--checkpoint DIR]     stream a continuation to stdout
    chat      [--checkpoint DIR] [--system TEXT]   an interactive chat on stdin (/exit, EOF or Ctrl-C ends it)
    convert   SRC DST [--to hf|meta|orbax]         see `llama_jax/jobs/convert.py`
    batch     --input F --output F [--config FILE]  a resumable JSONL job, see `llama_jax/jobs/batch.py`
    train     --config FILE [--data F --resume]     fine-tune / distill / DPO, see `llama_jax/jobs/train.py`
    rejection --input F --output F --n N --scorer M:F  best-of-n samples or pairs, see `llama_jax/jobs/rejection.py`
    guard     --message TEXT [--response TEXT]       Llama Guard 3 safety classification, see `llama_jax/jobs/guard.py`
    plan      --config FILE --mesh AXES [--preset P]  per-device memory on a mesh, see `llama_jax/planning/plan.py`

Each command lives in one `register(subparsers)` function that adds its parser and sets
`func=<main(args) -> exit code>`; a new command is one more entry in `COMMANDS`. A command's module is
imported only when that command runs (or when every parser is built, `build_parser()`): `generate`
never imports the training stack. The top-level `--help` lists the commands from `COMMANDS` alone.
Without `--checkpoint`, generate and chat run the embedded default model, whose weights are random.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator

from llama_jax.inference import sampling
from llama_jax.jobs import jobs
from llama_jax.model import settings

__all__ = ["COMMANDS", "build_parser", "main"]


# ---- shared options and helpers ------------------------------------------------------------------------


@settings.declare(jobs.ModelSettings, "checkpoint", "tokenizer", "dtype", "attention", "fp8_matmul")
class ModelOptions:
    """generate's and chat's model options: the jobs' (`jobs.ModelSettings`), all but the mesh and its rules."""


_META_DEFAULTS = dict(temperature=sampling.META_TEMPERATURE, top_p=sampling.META_TOP_P)


@settings.declare(
    sampling.SamplingParams, "top_k", "min_p", "seed", *sampling.CONSTRAINTS, max_new_tokens=64, **_META_DEFAULTS
)
class GenerateSampling:
    """generate's sampling options: `SamplingParams`' settings, with Meta's chat defaults."""


@settings.declare(sampling.SamplingParams, "top_k", "min_p", "seed", max_new_tokens=256, **_META_DEFAULTS)
class ChatSampling:
    """chat's sampling options: generate's, with room for a longer reply."""


def _add_sampling_args(parser: argparse.ArgumentParser, options) -> None:
    t, p = sampling.META_TEMPERATURE, sampling.META_TOP_P
    settings.add_options(parser.add_argument_group(f"sampling (Meta's defaults: temperature {t}, top-p {p})"), options)
    parser.set_defaults(sampling_options=options)


def _sampling_params(args: argparse.Namespace) -> sampling.SamplingParams:
    """The sampling options as one `SamplingParams` (which validates them: a ValueError names the field);
    the stop tokens are the tokenizer's, set once it is read."""
    return sampling.SamplingParams(**{name: getattr(args, name) for name in settings.declared(args.sampling_options)})


def _load(args: argparse.Namespace):
    """(model, tokenizer) from the model options, the one way every job gets them (`jobs.load_model`)."""
    return jobs.load_model(**{name: getattr(args, name) for name in settings.declared(ModelOptions)})


def _stream_text(tokenizer, tokens: Iterator[int], out) -> tuple[list[int], object]:
    """Write the text of `tokens` as they arrive; → (ids, the stream's GenerationResult)."""
    ids: list[int] = []
    shown = ""
    while True:
        try:
            ids.append(next(tokens))
        except StopIteration as stop:
            result = stop.value
            break
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            continue
        out.write(text[len(shown) :] if text.startswith(shown) else text)
        out.flush()
        shown = text
    text = tokenizer.decode(ids)
    out.write(text[len(shown) :] if text.startswith(shown) else "")
    out.flush()
    return ids, result


def _fail(command: str, error: Exception) -> int:
    print(f"{command}: error: {error}", file=sys.stderr)
    return 2


# ---- generate ------------------------------------------------------------------------------------------


def register_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="continue a prompt, streaming the text to stdout",
        description="Continue --prompt (BOS prepended), streaming the text.",
    )
    parser.add_argument("--prompt", required=True, help="the text to continue")
    settings.add_options(parser, ModelOptions)
    _add_sampling_args(parser, GenerateSampling)
    parser.set_defaults(func=generate_main)


def generate_main(args: argparse.Namespace) -> int:
    from llama_jax.inference import sampler
    from llama_jax.model import platform

    platform.enable_compile_cache()
    try:
        params = _sampling_params(args)  # checked before the model loads: a typo costs no loading time
        model, tokenizer = _load(args)
        params = dataclasses.replace(params, stop_tokens=tokenizer.stop_tokens)
        prompt = tokenizer.encode(args.prompt, bos=True, eos=False)
        start = time.perf_counter()
        ids, result = _stream_text(tokenizer, sampler.stream(model, prompt, params, tokenizer=tokenizer), sys.stdout)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        return _fail("generate", e)
    elapsed = time.perf_counter() - start
    print(file=sys.stdout, flush=True)
    print(f"[{len(ids)} tokens, stop: {result.stop_reason}, {elapsed:.2f} s including compilation]", file=sys.stderr)
    return 0


# ---- chat ----------------------------------------------------------------------------------------------


def register_chat(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="interactive chat (Llama 3.1 chat format) on stdin",
        description="Chat with the model: one user message per stdin line; '/exit', end of input (Ctrl-D) "
        "or Ctrl-C at the prompt quits, '/reset' clears the history. Ctrl-C during a reply stops it and "
        "drops that turn (the question and the partial reply); the dialog before it stays. When the "
        "dialog outgrows the context, the oldest turns are dropped (the system message stays).",
    )
    parser.add_argument("--system", help="system prompt")
    settings.add_options(parser, ModelOptions)
    _add_sampling_args(parser, ChatSampling)
    parser.set_defaults(func=chat_main)


def chat_main(args: argparse.Namespace) -> int:
    from llama_jax.model import platform
    from llama_jax.text.chat import ChatFormat

    platform.enable_compile_cache()
    try:
        params = _sampling_params(args)
        model, tokenizer = _load(args)
        chat = ChatFormat(tokenizer)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        return _fail("chat", e)
    return chat_loop(model, chat, dataclasses.replace(params, stop_tokens=tokenizer.stop_tokens), system=args.system)


def chat_loop(model, chat, params, *, system=None, stdin=None, stdout=None, stderr=None, context=None) -> int:
    """The dialog of `chat` on `stdin` (one user message per line), replies streamed to `stdout`.

    Ctrl-C during a reply stops it and drops the turn (the user's message and the partial reply, which
    the user never finished reading and usually asks again differently); the dialog before it stays.
    Ctrl-C or end of input at the prompt ends the chat. Before each reply, the oldest turns are dropped
    until the dialog and `params.max_new_tokens` fit `context` (default: the model's `max_seq_len`); the
    system message always stays, and stderr says what went.
    """
    from llama_jax.inference import sampler

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    context = context or model.config.max_seq_len
    head = [{"role": "system", "content": system}] if system else []
    turns: list[dict] = []  # every message after the system one
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("user> ", end="", file=stderr, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line or line.strip() == "/exit":
            if interactive:
                print(file=stderr)
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            turns = []
            print("[history cleared" + (", the system message kept]" if system else "]"), file=stderr, flush=True)
            continue
        if not text.strip():
            continue
        turns.append({"role": "user", "content": text})
        kept = _fit_turns(chat, head, turns, context - params.max_new_tokens)
        if kept is None:
            turns.pop()
            print(
                f"chat: error: this message and a {params.max_new_tokens}-token reply do not fit the context "
                f"of {context} tokens even alone: shorten it or lower --max-new-tokens",
                file=stderr,
                flush=True,
            )
            continue
        if kept < len(turns):
            print(f"[context full: dropped the {len(turns) - kept} oldest message(s)]", file=stderr, flush=True)
            turns = turns[len(turns) - kept :]
        print("assistant> ", end="", file=stdout, flush=True)
        try:
            ids, result = _stream_text(
                chat.tokenizer, sampler.stream(model, chat.encode_dialog(head + turns), params), stdout
            )
        except KeyboardInterrupt:
            turns.pop()
            print(file=stdout, flush=True)
            print("[interrupted: reply discarded]", file=stderr, flush=True)
            continue
        except ValueError as e:  # a request the sampler refuses: say so, keep the session
            turns.pop()
            print(file=stdout, flush=True)
            print(f"chat: error: {e}", file=stderr, flush=True)
            continue
        print(file=stdout, flush=True)
        reply = chat.decode_assistant(ids, stop_reason=chat.stop_reason(result.stop_token))
        turns.append({k: v for k, v in reply.items() if k in ("role", "content", "tool_calls", "stop_reason")})


def _fit_turns(chat, head: list[dict], turns: list[dict], budget: int) -> int | None:
    """How many of the latest `turns` to keep so that `head` and them encode to at most `budget` tokens,
    dropping whole turns (a dialog starts with a user message); None when the last message alone is too long."""
    starts = [i for i, message in enumerate(turns) if message["role"] == "user"]
    for start in starts:
        if len(chat.encode_dialog(head + turns[start:])) <= budget:
            return len(turns) - start
    return None


# ---- the parser ----------------------------------------------------------------------------------------


def _register_convert(subparsers) -> None:
    from llama_jax.jobs import convert

    convert.register(subparsers)


def _register_batch(subparsers) -> None:
    from llama_jax.jobs import batch

    batch.register(subparsers)


def _register_train(subparsers) -> None:
    from llama_jax.jobs import train

    train.register(subparsers)


def _register_rejection(subparsers) -> None:
    from llama_jax.jobs import rejection

    rejection.register(subparsers)


def _register_guard(subparsers) -> None:
    from llama_jax.jobs import guard

    guard.register(subparsers)


def _register_plan(subparsers) -> None:
    from llama_jax.planning import plan

    plan.register(subparsers)


# name -> (register, the one line the top-level --help shows)
COMMANDS: dict[str, tuple[Callable[[object], None], str]] = {
    "generate": (register_generate, "continue a prompt, streaming the text to stdout"),
    "chat": (register_chat, "interactive chat (Llama 3.1 chat format) on stdin"),
    "convert": (_register_convert, "convert between HF, Meta and Orbax checkpoints"),
    "batch": (_register_batch, "a resumable JSONL generation job"),
    "train": (_register_train, "fine-tune, distil or DPO-train a model"),
    "rejection": (_register_rejection, "best-of-n sampling scored by a reward model"),
    "guard": (_register_guard, "classify a prompt or a response with Llama Guard 3"),
    "plan": (_register_plan, "per-device memory of a model on a mesh (AOT-compiled, no weights)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser: every command's (None), or only `command`'s, the others listed by name and help only
    (so that their modules, e.g. the training stack for `generate`, are never imported)."""
    parser = argparse.ArgumentParser(prog="python -m llama_jax", description="Llama 3.1 in JAX/Flax NNX.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (register, summary) in COMMANDS.items():
        if command is None or name == command:
            register(subparsers)
        else:
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from llama_jax.model import platform

    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    args = build_parser(command).parse_args(argv)
    # Before any computation starts JAX's backend: XLA reads its flags and memory fraction only then.
    platform.configure_gpu_environment()
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C while loading or working: a line, not a traceback
        print(f"\n{args.command}: interrupted", file=sys.stderr)
        return 130
