"""Llama 3.1 chat format: dialogs to token ids, and model replies back to messages.

Messages are plain dicts, as most chat APIs use them:

    {"role": "system" | "user" | "assistant" | "tool" | "ipython", "content": str}

A user message may carry `"context"` (Meta's RAG field); an assistant message may carry
`"tool_calls": [{"function": {"name": str, "arguments": dict}}]` (or flat `{"name", "arguments"}`) and
`"stop_reason": "end_of_turn" | "end_of_message" | "out_of_tokens"`.

The token layout is exactly Meta's `ChatFormat.encode_dialog_prompt` (llama-models 0.3.0) and the
parsing of replies exactly its `decode_assistant_message` on well-formed input; see
`parse_assistant_text` for what happens where Meta's parser crashes. Tool calls (their text, finding
one in a reply) are `llama_jax.text.tools`, as Meta keeps them in `tool_utils.py`; the tool-calling prompts
are `llama_jax.text.tool_prompts`, as Meta's `system_prompts.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llama_jax.text.tokenizer import Tokenizer
from llama_jax.text.tool_prompts import custom_tools_message, system_prompt, tool_prompt_messages
from llama_jax.text.tools import (
    BUILTIN_TOOLS,
    TOOL_FORMATS,
    ToolCall,
    ToolFormat,
    expect_str,
    find_tool_call,
    parse_tool_call,
    reject_unknown_keys,
    render_tool_call,
)

# The tool prompts live in `llama_jax.text.tool_prompts`; they stay importable from here, where they were first.
__all__ = [
    "BUILTIN_TOOLS",
    "ChatFormat",
    "custom_tools_message",
    "parse_assistant_text",
    "system_prompt",
    "tool_prompt_messages",
]

Message = Mapping[str, Any]

ROLES = ("system", "user", "assistant", "tool", "ipython")
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")

# Keys a message may carry besides role and content, per role; anything else is most likely a typo.
_EXTRA_KEYS = {"user": {"context"}, "assistant": {"tool_calls", "stop_reason"}}

_ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
_PYTHON_TAG = "<|python_tag|>"
_END_TOKENS = (("<|eot_id|>", "end_of_turn"), ("<|eom_id|>", "end_of_message"))
_CHAT_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)


@dataclass(frozen=True)
class _Message:
    """A validated message; `role` is already the header text ("tool" is rendered as "ipython")."""

    role: str
    content: str
    context: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    stop_reason: str | None = None


class ChatFormat:
    """Token ids of Llama 3 dialogs, and assistant replies parsed back into message dicts."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [t for t in _CHAT_SPECIAL_TOKENS if t not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"ChatFormat needs a Llama 3 tokenizer; this one lacks {', '.join(missing)}")
        self.tokenizer = tokenizer
        self._special = {name: tokenizer.special_tokens[name] for name in _CHAT_SPECIAL_TOKENS}

    def encode_dialog(self, messages: Sequence[Message], *, tool_format: ToolFormat = "json") -> list[int]:
        """bos, every message, then an open assistant header for the model to complete."""
        if isinstance(messages, (str, Mapping)):
            raise TypeError("encode_dialog expects a sequence of message dicts")
        ids = [self._special["<|begin_of_text|>"]]
        for index, message in enumerate(messages):
            ids += self._encode(_parse_message(message, f"messages[{index}]"), tool_format)
        return ids + self._header("assistant")

    def encode_message(self, message: Message, *, tool_format: ToolFormat = "json") -> list[int]:
        """Header, body and end token (`<|eom_id|>` or `<|eot_id|>`) of one message."""
        return self._encode(_parse_message(message, "message"), tool_format)

    def encode_completion(self, text: str) -> list[int]:
        """Prompt for plain (non-chat) completion: bos then the text."""
        return self.tokenizer.encode(text, bos=True, eos=False)

    def decode_assistant(self, tokens: Sequence[int], *, stop_reason: str = "out_of_tokens") -> dict[str, Any]:
        """Parse generated ids (optionally ending in eot/eom) into an assistant message dict."""
        return parse_assistant_text(self.tokenizer.decode(tokens), stop_reason=stop_reason)

    def stop_reason(self, stop_token: int | None) -> str:
        """Meta's stop reason for the token a generation stopped on: eot → "end_of_turn", eom →
        "end_of_message", anything else (no stop token, `<|end_of_text|>`) → "out_of_tokens"."""
        if stop_token is not None and stop_token == self.tokenizer.eot_id:
            return "end_of_turn"
        if stop_token is not None and stop_token == self.tokenizer.eom_id:
            return "end_of_message"
        return "out_of_tokens"

    def decode_result(self, result) -> dict[str, Any]:
        """`decode_assistant` of a `GenerationResult`: its tokens, and the stop reason its stop token gives.

        (`result.tokens` excludes the stop token, so eot vs eom, which tool calls depend on, is read
        from `result.stop_token`.)
        """
        return self.decode_assistant(result.tokens, stop_reason=self.stop_reason(result.stop_token))

    def _text(self, text: str) -> list[int]:
        # Special-token text in content stays text: users must not be able to forge headers.
        return self.tokenizer.encode(text, bos=False, eos=False)

    def _header(self, role: str) -> list[int]:
        return [
            self._special["<|start_header_id|>"],
            *self._text(role),
            self._special["<|end_header_id|>"],
            *self._text("\n\n"),
        ]

    def _encode(self, message: _Message, tool_format: ToolFormat) -> list[int]:
        if tool_format not in TOOL_FORMATS:
            raise ValueError(f"tool_format: expected one of {TOOL_FORMATS}, got {tool_format!r}")
        ids = self._header(message.role)
        # Since llama-models b6dad01 only code is introduced by the python tag in prompts.
        if message.tool_calls and message.tool_calls[0].name == "code_interpreter":
            ids.append(self._special["<|python_tag|>"])
        # Each piece is encoded on its own, as Meta does: BPE never merges across these seams.
        ids += self._text(message.content)
        if message.context is not None:
            ids += self._text("\n\n") + self._text(message.context)
        for call in message.tool_calls:
            ids += self._text(render_tool_call(call, tool_format))
        end = "<|eom_id|>" if message.stop_reason == "end_of_message" else "<|eot_id|>"
        return [*ids, self._special[end]]


# ----------------------------------------------------------------------------------------------
# Message validation


def _parse_message(message: Message, where: str) -> _Message:
    if not isinstance(message, Mapping):
        raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role: expected one of {ROLES}, got {role!r}")
    reject_unknown_keys(message, {"role", "content"} | _EXTRA_KEYS.get(role, set()), where)
    if "content" not in message:
        raise ValueError(f'{where}.content: missing (use "" for an empty message)')
    content = expect_str(message["content"], f"{where}.content")
    context = message.get("context")
    if context is not None:
        context = expect_str(context, f"{where}.context")
    stop_reason = message.get("stop_reason")
    if stop_reason is not None and stop_reason not in STOP_REASONS:
        raise ValueError(f"{where}.stop_reason: expected one of {STOP_REASONS}, got {stop_reason!r}")
    calls = message.get("tool_calls") or ()
    if isinstance(calls, (str, Mapping)) or not isinstance(calls, Sequence):
        raise ValueError(f"{where}.tool_calls: expected a list of tool calls, got {type(calls).__name__}")
    return _Message(
        role="ipython" if role == "tool" else role,
        content=content,
        context=context,
        tool_calls=tuple(parse_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)),
        stop_reason=stop_reason,
    )


# ----------------------------------------------------------------------------------------------
# Parsing model replies


def parse_assistant_text(text: str, *, stop_reason: str = "out_of_tokens") -> dict[str, Any]:
    """Decoded model output -> `{"role": "assistant", "content", "tool_calls", "stop_reason"}`.

    Follows Meta's `decode_assistant_message_from_content` step by step: strip spaces, drop an
    assistant header, note and drop a leading `<|python_tag|>`, read the stop reason from a trailing
    `<|eot_id|>`/`<|eom_id|>` (else keep `stop_reason`), then look for one tool call, in order:
    `<function=name>{...}`, a JSON object with "name" and "parameters", a Python list of keyword calls
    (first call only), `tool.call(query="...")`, and finally code after the python tag. A builtin tool
    named in a custom call gets `{"query": <first argument>}`. With a tool call, content is "".

    Differences from Meta, only on input where Meta's parser crashes or prints:
    - A custom call Meta cannot turn into a tool call (JSON with "name" but no "parameters", a
      non-str name, "parameters" that is not an object, a builtin tool with no arguments, Python-list
      arguments that are not literals, nesting too deep) is treated as no custom call: parsing goes
      on to the builtin pattern and the python tag, as Meta does after a bad `<function=...>` body.
    - A `<function=...>` body that is not JSON is skipped silently (Meta prints the exception).
    - Arguments nested deeper than Meta's pydantic `ToolCall` type allows are returned as parsed
      (Meta raises a ValidationError).
    Kept from Meta on purpose, since they decide what a well-formed reply means: nested objects in a
    `<function=...>` body do not parse (the pattern stops at the first "}"), single quotes become
    double quotes there, builtin queries cannot contain '"', and only the first of several calls in
    a Python list is returned.
    """
    if stop_reason not in STOP_REASONS:
        raise ValueError(f"stop_reason: expected one of {STOP_REASONS}, got {stop_reason!r}")
    content = text.strip(" ")
    content = content.removeprefix(_ASSISTANT_HEADER)
    ipython = content.startswith(_PYTHON_TAG)
    content = content.removeprefix(_PYTHON_TAG)
    for token, reason in _END_TOKENS:
        if content.endswith(token):
            content = content[: -len(token)]
            stop_reason = reason
            break
    call = find_tool_call(content, ipython)
    return {
        "role": "assistant",
        "content": "" if call else content,
        "tool_calls": [{"function": {"name": call.name, "arguments": call.arguments}}] if call else [],
        "stop_reason": stop_reason,
    }
