"""The command line: `python -m llama_jax <command> ...`.

    generate  --prompt TEXT [--checkpoint DIR]     stream a continuation to stdout
    chat      [--checkpoint DIR] [--system TEXT]   an interactive chat on stdin (/exit or EOF ends it)
    convert   SRC DST [--to hf|meta|orbax]         see `llama_jax/convert.py`
    batch     --input F --output F [--config FILE]  a resumable JSONL job, see `llama_jax/batch.py`
    train     --config FILE [--data F --resume]     fine-tune / distill / DPO, see `llama_jax/train.py`
    rejection --input F --output F --n N --scorer M:F  best-of-n samples or pairs, see `llama_jax/rejection.py`
    guard     --message TEXT [--response TEXT]       Llama Guard 3 safety classification, see `llama_jax/guard.py`
    plan      --config FILE --mesh AXES [--preset P]  per-device memory on a mesh, see `llama_jax/plan.py`

Each command lives in one `register(subparsers)` function that adds its parser and sets
`func=<main(args) -> exit code>`; a new command is one more entry in `COMMANDS`. A command's module is
imported only when that command runs (or when every parser is built, `build_parser()`): `generate`
never imports the training stack. The top-level `--help` lists the commands from `COMMANDS` alone.
Without `--checkpoint`, generate and chat run the embedded default model, whose weights are random.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Callable, Iterator

from llama_jax import sampling
from llama_jax.attention import BACKENDS

__all__ = ["COMMANDS", "build_parser", "main"]


# ---- shared options and helpers ------------------------------------------------------------------------


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=pathlib.Path,
        help="HF or Meta checkpoint directory (default: the embedded model, RANDOM weights)",
    )
    parser.add_argument(
        "--tokenizer",
        type=pathlib.Path,
        help="tokenizer.model (default: found in the checkpoint, or llama-models' Llama 3 one)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        help="weights and compute dtype (default: bfloat16 for checkpoints, float32 for the default)",
    )
    parser.add_argument(
        "--attention",
        choices=BACKENDS,
        default="auto",
        help="attention backend (default auto: blockwise on CPU, cudnn on GPU, splash on TPU)",
    )
    parser.add_argument(
        "--fp8-matmul",
        choices=("auto", "fp8", "dequant"),
        default="auto",
        help="FP8 checkpoints: fp8×fp8 GEMMs ('fp8'), upcast in the matmul ('dequant'), or by "
        "device ('auto', default: fp8 on GPUs with FP8 tensor cores)",
    )


def _add_sampling_args(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    t, p = sampling.META_TEMPERATURE, sampling.META_TOP_P
    group = parser.add_argument_group(f"sampling (Meta's defaults: temperature {t}, top-p {p})")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    group.add_argument("--temperature", type=float, default=t, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=p, help="nucleus mass, 1 = off")
    group.add_argument("--top-k", type=int, default=0, help="0 = off")
    group.add_argument("--min-p", type=float, default=0.0, help="keep p >= min_p * p_max, 0 = off")
    group.add_argument("--seed", type=int, default=0)


def _sampling_params(args: argparse.Namespace, stop_tokens) -> sampling.SamplingParams:
    """The sampling options as one `SamplingParams` (which validates them: a ValueError names the field)."""
    return sampling.SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop_tokens=stop_tokens,
    )


def _load(args: argparse.Namespace):
    """(model, tokenizer) from the model options, the one way every job gets them (`jobs.load_model`)."""
    from llama_jax.jobs import load_model

    return load_model(
        args.checkpoint,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        attention=args.attention,
        fp8_matmul=args.fp8_matmul,
    )


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
    _add_model_args(parser)
    _add_sampling_args(parser, max_new_tokens=64)
    parser.set_defaults(func=generate_main)


def generate_main(args: argparse.Namespace) -> int:
    from llama_jax import platform, sampler

    platform.enable_compile_cache()
    try:
        model, tokenizer = _load(args)
        prompt = tokenizer.encode(args.prompt, bos=True, eos=False)
        start = time.perf_counter()
        tokens = sampler.stream(model, prompt, _sampling_params(args, tokenizer.stop_tokens))
        ids, result = _stream_text(tokenizer, tokens, sys.stdout)
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
        description="Chat with the model: one user message per stdin line; "
        "'/exit' or end of input quits, '/reset' clears the history.",
    )
    parser.add_argument("--system", help="system prompt")
    _add_model_args(parser)
    _add_sampling_args(parser, max_new_tokens=256)
    parser.set_defaults(func=chat_main)


def chat_main(args: argparse.Namespace) -> int:
    from llama_jax import platform, sampler
    from llama_jax.chat import ChatFormat

    platform.enable_compile_cache()
    try:
        model, tokenizer = _load(args)
        chat = ChatFormat(tokenizer)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        return _fail("chat", e)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("user> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(system)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        try:
            tokens = sampler.stream(model, chat.encode_dialog(messages), _sampling_params(args, tokenizer.stop_tokens))
            ids, result = _stream_text(tokenizer, tokens, sys.stdout)
        except ValueError as e:  # e.g. the dialog outgrew the context: say so, keep the session
            messages.pop()
            print(file=sys.stdout, flush=True)
            print(f"chat: error: {e}", file=sys.stderr, flush=True)
            continue
        print(flush=True)
        reply = chat.decode_assistant(ids, stop_reason=chat.stop_reason(result.stop_token))
        messages.append({k: v for k, v in reply.items() if k in ("role", "content", "tool_calls", "stop_reason")})
    return 0


# ---- the parser ----------------------------------------------------------------------------------------


def _register_convert(subparsers) -> None:
    from llama_jax import convert

    convert.register(subparsers)


def _register_batch(subparsers) -> None:
    from llama_jax import batch

    batch.register(subparsers)


def _register_train(subparsers) -> None:
    from llama_jax import train

    train.register(subparsers)


def _register_rejection(subparsers) -> None:
    from llama_jax import rejection

    rejection.register(subparsers)


def _register_guard(subparsers) -> None:
    from llama_jax import guard

    guard.register(subparsers)


def _register_plan(subparsers) -> None:
    from llama_jax import plan

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
    from llama_jax import platform

    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    args = build_parser(command).parse_args(argv)
    # Before any computation starts JAX's backend: XLA reads its flags and memory fraction only then.
    platform.configure_gpu_environment()
    return args.func(args)
