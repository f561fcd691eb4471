"""Text: the tokenizers, Meta's chat format and tool calls."""
