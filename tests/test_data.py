"""Fine-tuning data specification: what each row holds, what is trained on, and how batches are drawn.

Chat rows are Meta's dialog tokens with loss on what the assistant says; text rows are packed
documents whose targets never leave their document; distillation rows carry the teacher's top-K
for exactly the targets it predicted; a `Loader` batch depends only on (seed, step).
"""

import json

import numpy as np
import pytest

from llama_jax.jobs.data import (
    Examples,
    Loader,
    chat_examples,
    distill_examples,
    load_examples,
    read_jsonl,
    text_examples,
)

BOS, EOS, PAD, EOM, EOT = 128000, 128001, 128004, 128008, 128009
# `<|start_header_id|>assistant<|end_header_id|>\n\n`, which encode_dialog appends for generation.
ASSISTANT_HEADER = [128006, 78191, 128007, 271]

SIMPLE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there!"},
]
MULTI_TURN = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "12, since (2 + 2) * 3 = 12."},
    {"role": "user", "content": "Thanks"},
]
TOOLS = [
    {"role": "system", "content": "Environment: ipython\nTools: brave_search\n"},
    {"role": "user", "content": "Gold price?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "brave_search", "arguments": {"query": "gold price"}}}],
        "stop_reason": "end_of_message",
    },
    {"role": "tool", "content": '{"price": "2000 USD"}'},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "code_interpreter", "arguments": {"code": "2000*2"}}]},
    {"role": "ipython", "content": "4000"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "SF"}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "Gold costs 2000 USD; two ounces 4000 USD. SF is sunny."},
]
# What the model must learn to say in TOOLS, one string per assistant message (Meta's renderings).
TOOLS_ASSISTANT = [
    'brave_search.call(query="gold price")<|eom_id|>',
    "<|python_tag|>2000*2<|eot_id|>",
    '{"type": "function", "name": "get_weather", "parameters": {"city": "SF"}}<|eot_id|>',
    "Gold costs 2000 USD; two ounces 4000 USD. SF is sunny.<|eot_id|>",
]


def trained_spans(tokenizer, examples: Examples, row: int) -> list[str]:
    """Decoded targets of each maximal run of loss_mask == 1 in `row`."""
    mask = examples.loss_mask[row] > 0
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return [tokenizer.decode(examples.targets[row, a:b].tolist()) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def rendered(chat, dialog) -> list[int]:
    """Meta's dialog tokens without the trailing generation header."""
    ids = chat.encode_dialog(dialog)
    assert ids[-len(ASSISTANT_HEADER) :] == ASSISTANT_HEADER
    return ids[: -len(ASSISTANT_HEADER)]


# ----------------------------------------------------------------------------------------------
# Chat


@pytest.mark.parametrize("dialog", [SIMPLE, MULTI_TURN, TOOLS], ids=["simple", "multi_turn", "tools"])
def test_chat_row_is_encode_dialog_without_the_generation_header(chat, dialog):
    ids = rendered(chat, dialog)
    ex = chat_examples([dialog], chat, seq_len=len(ids) + 5)
    n = len(ids)
    assert ex.tokens[0, :n].tolist() == ids
    assert ex.tokens[0, n:].tolist() == [PAD] * 5
    assert ex.targets[0, : n - 1].tolist() == ids[1:]
    assert ex.targets[0, n - 1 :].tolist() == [0] * 6  # nothing follows the last end token
    assert ex.positions[0, :n].tolist() == list(range(n))
    assert ex.segment_ids[0].tolist() == [1] * n + [0] * 5
    assert ids[-1] in (EOT, EOM)


def test_chat_loss_is_on_assistant_content_and_its_end_token_only(tokenizer, chat):
    ex = chat_examples([SIMPLE, {"messages": MULTI_TURN}], chat, seq_len=96)  # a list or a JSONL record
    assert trained_spans(tokenizer, ex, 0) == ["Hello there!<|eot_id|>"]
    assert trained_spans(tokenizer, ex, 1) == ["4<|eot_id|>", "12, since (2 + 2) * 3 = 12.<|eot_id|>"]


def test_chat_tool_calls_are_trained_as_chat_format_renders_them_and_tool_results_are_not(tokenizer, chat):
    ex = chat_examples([TOOLS], chat, seq_len=256)
    assert trained_spans(tokenizer, ex, 0) == TOOLS_ASSISTANT
    # Token for token: each trained span is the assistant message's encoding after its 4 header ids.
    spans = [chat.encode_message(m)[len(ASSISTANT_HEADER) :] for m in TOOLS if m["role"] == "assistant"]
    assert ex.targets[0][ex.loss_mask[0] > 0].tolist() == sum(spans, [])


def test_chat_headers_and_bos_are_never_trained(chat):
    ex = chat_examples([SIMPLE, MULTI_TURN, TOOLS], chat, seq_len=256)
    trained = ex.targets[ex.loss_mask > 0]
    # Meta's llama-recipes leaves the "\n\n" (271) after the assistant header trained; we do not.
    assert not np.isin(trained, [BOS, PAD, 128006, 128007, 78191, 271]).any()
    assert set(np.unique(ex.loss_mask)) == {0.0, 1.0}


def test_chat_long_dialog_is_truncated_and_keeps_the_next_token_as_last_target(tokenizer, chat):
    ids = rendered(chat, SIMPLE)
    answer_start = len(ids) - len(chat.encode_message(SIMPLE[-1])) + len(ASSISTANT_HEADER)
    seq_len = answer_start + 2  # the row ends inside the answer
    ex = chat_examples([SIMPLE], chat, seq_len=seq_len)
    assert (ex.n_documents, ex.n_truncated, ex.n_dropped) == (1, 1, 0)
    assert ex.tokens[0].tolist() == ids[:seq_len]
    assert ex.targets[0].tolist() == ids[1 : seq_len + 1]
    [span] = trained_spans(tokenizer, ex, 0)
    assert "Hello there!".startswith(span) and span


def test_chat_dialogs_with_nothing_to_train_are_dropped(chat):
    no_assistant = SIMPLE[:2]
    answer_cut_off = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "Yes."}]
    ex = chat_examples([no_assistant, SIMPLE, answer_cut_off], chat, seq_len=32)
    assert (len(ex), ex.n_documents, ex.n_truncated, ex.n_dropped) == (1, 3, 0, 2)
    assert ex.tokens[0, : len(rendered(chat, SIMPLE))].tolist() == rendered(chat, SIMPLE)


def test_chat_bad_message_names_dialog_and_message(chat):
    with pytest.raises(ValueError, match=r"dialogs\[1\]: messages\[0\]: .*role"):
        chat_examples([SIMPLE, [{"role": "robot", "content": "x"}]], chat, seq_len=32)


# ----------------------------------------------------------------------------------------------
# Text packing

TEXTS = [
    "Hello world",
    "Bye",
    "The quick brown fox jumps over the lazy dog, then runs far away into the forest and sleeps.",
    "",
    "Short one.",
    "A second long document: " + " ".join(str(i) for i in range(40)),
    "End.",
]


def segments(ex: Examples):
    """(row, slice) of every segment, in row-major order."""
    for row in range(len(ex)):
        for segment in range(1, ex.segment_ids[row].max() + 1):
            where = np.flatnonzero(ex.segment_ids[row] == segment)
            yield row, slice(where[0], where[-1] + 1)


def test_text_documents_are_bos_text_eos_and_appear_in_order(tokenizer):
    ex = text_examples(TEXTS, tokenizer, seq_len=16)
    stream = np.concatenate([ex.tokens[row, span] for row, span in segments(ex)]).tolist()
    assert stream == sum((tokenizer.encode(t, bos=True, eos=True) for t in TEXTS), [])
    assert ex.n_documents == len(TEXTS)


def test_text_packing_layout_matches_the_packing_docstring(tokenizer):
    ex = text_examples(["Hello world", "Hi"], tokenizer, seq_len=8)
    hello, hi = (tokenizer.encode(t, bos=True, eos=True) for t in ("Hello world", "Hi"))
    assert ex.tokens.tolist() == [hello + hi + [PAD]]
    assert ex.targets.tolist() == [hello[1:] + [0] + hi[1:] + [0, 0]]
    assert ex.loss_mask.tolist() == [[1, 1, 1, 0, 1, 1, 0, 0]]
    assert ex.positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert ex.segment_ids.tolist() == [[1, 1, 1, 1, 2, 2, 2, 0]]


def test_text_segments_restart_positions_and_targets_never_leave_the_document(tokenizer):
    ex = text_examples(TEXTS, tokenizer, seq_len=16)
    pieces = list(segments(ex))
    for i, (row, span) in enumerate(pieces):
        n = span.stop - span.start
        assert ex.positions[row, span].tolist() == list(range(n))
        assert ex.targets[row, span][:-1].tolist() == ex.tokens[row, span][1:].tolist()
        last_target, last_mask = ex.targets[row, span.stop - 1], ex.loss_mask[row, span.stop - 1]
        if ex.tokens[row, span.stop - 1] == EOS:  # the document ends here: nothing to predict
            assert (last_target, last_mask) == (0, 0)
        else:  # continued: the next piece, first in the next row, starts with this target
            next_row, next_span = pieces[i + 1]
            assert next_row == row + 1 and next_span.start == 0
            assert (last_target, last_mask) == (ex.tokens[next_row, 0], 1)
    assert ex.n_continued == 2


def test_text_loss_is_on_every_token_after_bos_exactly_once(tokenizer):
    ex = text_examples(TEXTS, tokenizer, seq_len=16)
    docs = [tokenizer.encode(t, bos=True, eos=True) for t in TEXTS]
    assert ex.targets[ex.loss_mask > 0].tolist() == sum((d[1:] for d in docs), [])
    padding = ex.segment_ids == 0
    assert (ex.tokens[padding] == PAD).all() and (ex.loss_mask[padding] == 0).all()


def test_text_documents_that_fit_in_a_row_are_never_split(tokenizer):
    ex = text_examples(TEXTS, tokenizer, seq_len=16)
    whole = [ex.tokens[row, span].tolist() for row, span in segments(ex)]
    docs = [tokenizer.encode(t, bos=True, eos=True) for t in TEXTS]
    assert [d in whole for d in docs] == [len(d) <= 16 for d in docs]


def test_text_a_document_of_exactly_one_row_fills_it(tokenizer):
    doc = tokenizer.encode(TEXTS[2], bos=True, eos=True)
    ex = text_examples([TEXTS[1], TEXTS[2]], tokenizer, seq_len=len(doc))
    assert ex.tokens[1].tolist() == doc and ex.segment_ids[1].tolist() == [1] * len(doc)
    assert (len(ex), ex.n_continued) == (2, 0)


# ----------------------------------------------------------------------------------------------
# Distillation records

RECORD = {
    "id": "r0",
    "sequence": [BOS, 10, 11, 12, 13, EOT],
    "completion_start": 3,
    # One entry per token of sequence[3:] = [12, 13, EOT], the sampled token first here.
    "top_logprobs": {"ids": [[12, 5], [13, 6], [EOT, 7]], "logprobs": [[-0.1, -2.5], [-0.2, -1.8], [-0.05, -3.0]]},
}


def test_distill_teacher_entries_align_with_the_targets_they_predicted():
    ex = distill_examples([RECORD], seq_len=8)
    assert ex.tokens[0].tolist() == RECORD["sequence"] + [PAD, PAD]
    assert ex.targets[0].tolist() == [10, 11, 12, 13, EOT, 0, 0, 0]
    assert ex.loss_mask[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert ex.teacher_ids.shape == ex.teacher_logprobs.shape == (1, 8, 2)
    trained = ex.loss_mask[0] > 0
    # The teacher's top id was the sampled token, i.e. the target, wherever loss is taken.
    assert ex.teacher_ids[0, trained, 0].tolist() == ex.targets[0, trained].tolist()
    assert ex.teacher_ids[0, trained].tolist() == RECORD["top_logprobs"]["ids"]
    np.testing.assert_array_equal(ex.teacher_logprobs[0, trained], np.float32(RECORD["top_logprobs"]["logprobs"]))
    assert not ex.teacher_ids[0, ~trained].any() and not ex.teacher_logprobs[0, ~trained].any()


def test_distill_truncation_and_dropping():
    ex = distill_examples([RECORD, {**RECORD, "completion_start": 6, "top_logprobs": {"ids": [], "logprobs": []}}], 4)
    assert (len(ex), ex.n_truncated, ex.n_dropped) == (1, 1, 1)
    assert ex.tokens[0].tolist() == [BOS, 10, 11, 12]
    assert ex.loss_mask[0].tolist() == [0, 0, 1, 1]
    assert ex.teacher_ids[0, 2:].tolist() == [[12, 5], [13, 6]]  # entry for position 3 predicts sequence[4]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"completion_start": 0}, "completion_start"),
        ({"top_logprobs": {"ids": [[12, 5]], "logprobs": [[-0.1, -2.5]]}}, "one entry per completion token"),
        ({"top_logprobs": {"ids": [[12], [13], [EOT]], "logprobs": [[-0.1], [-0.2], [-0.05]]}}, "K = 1"),
        ({"top_logprobs": {"ids": [[12.5, 5]] * 3, "logprobs": [[-0.1, -2.5]] * 3}}, "ids: expected"),
        ({"top_logprobs": {"ids": [[12, 5]] * 3, "logprobs": [[float("nan"), -2.5]] * 3}}, "NaN"),
        ({"sequence": "abc"}, "sequence"),
    ],
)
def test_distill_bad_records_are_named(change, message):
    with pytest.raises(ValueError, match=rf"records\[1\]: .*{message}"):
        distill_examples([RECORD, {**RECORD, **change}], seq_len=8)


# ----------------------------------------------------------------------------------------------
# Loader


def numbered_examples(n: int, seq_len: int = 3) -> Examples:
    """n rows whose tokens are their own row number, so a batch shows which rows it holds."""
    rows = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)
    ones = np.ones((n, seq_len), np.int32)
    return Examples(rows, rows, ones.astype(np.float32), rows * 0, ones)


def rows_of(batch) -> list[int]:
    return batch["tokens"][:, 0].tolist()


def test_loader_batch_depends_only_on_seed_and_step():
    a, b = Loader(numbered_examples(10), 3, seed=7), Loader(numbered_examples(10), 3, seed=7)
    for step in (5, 0, 12, 5, 1):  # any order, repeated
        assert rows_of(a.batch(step)) == rows_of(b.batch(step))
    assert [rows_of(a.batch(s)) for s in range(6)] != [
        rows_of(Loader(numbered_examples(10), 3, seed=8).batch(s)) for s in range(6)
    ]


def test_loader_each_epoch_is_a_permutation_with_a_different_remainder():
    loader = Loader(numbered_examples(10), 3, seed=0)
    assert loader.steps_per_epoch == 3
    left_out = set()
    for epoch in range(6):
        steps = range(epoch * 3, epoch * 3 + 3)
        assert {loader.epoch(s) for s in steps} == {epoch}
        rows = sum((rows_of(loader.batch(s)) for s in steps), [])
        assert len(set(rows)) == 9
        left_out |= set(range(10)) - set(rows)
        expected = np.random.default_rng((0, epoch)).permutation(10)[:9].tolist()
        assert rows == expected
    assert len(left_out) > 1


def test_loader_resuming_at_a_step_gives_the_batches_of_an_uninterrupted_run():
    straight = Loader(numbered_examples(11), 4, seed=3)
    through = [rows_of(straight.batch(s)) for s in range(10)]
    resumed = Loader(numbered_examples(11), 4, seed=3)
    assert [rows_of(resumed.batch(s)) for s in range(6, 10)] == through[6:]


def test_loader_batch_holds_every_present_array(chat):
    batch = Loader(chat_examples([SIMPLE] * 3, chat, 32), 2, seed=0).batch(0)
    assert set(batch) == {"tokens", "targets", "loss_mask", "positions", "segment_ids"}
    assert all(v.shape == (2, 32) for v in batch.values())
    batch = Loader(distill_examples([RECORD] * 2, 8), 2, seed=0, shuffle=False).batch(0)
    assert batch["teacher_ids"].shape == batch["teacher_logprobs"].shape == (2, 8, 2)
    assert batch["teacher_ids"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32


def test_loader_without_shuffle_goes_in_order_and_needs_a_full_batch():
    loader = Loader(numbered_examples(5), 2, seed=0, shuffle=False)
    assert [rows_of(loader.batch(s)) for s in range(4)] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    with pytest.raises(ValueError, match="cannot fill one batch"):
        Loader(numbered_examples(3), 4, seed=0)


# ----------------------------------------------------------------------------------------------
# JSONL files


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_load_examples_detects_each_kind(tmp_path, tokenizer, chat):
    chat_file = write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": d}) for d in (SIMPLE, MULTI_TURN)])
    text_file = write_lines(tmp_path / "text.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    # The batch job's results carry the completion's "text" beside "top_logprobs": still distillation records.
    batch_result = {**RECORD, "text": "the completion", "tokens": [12, 13]}
    distill_file = write_lines(tmp_path / "distill.jsonl", [json.dumps(RECORD), "", json.dumps(batch_result)])
    expected = [
        (chat_file, chat_examples([SIMPLE, MULTI_TURN], chat, 64)),
        (text_file, text_examples(TEXTS, tokenizer, 64)),
        (distill_file, distill_examples([RECORD, RECORD], 64)),
    ]
    for path, direct in expected:
        loaded = load_examples(path, tokenizer=tokenizer, seq_len=64)
        assert loaded.arrays.keys() == direct.arrays.keys()
        for name, array in direct.arrays.items():
            np.testing.assert_array_equal(loaded.arrays[name], array, err_msg=f"{path.name}: {name}")
    assert read_jsonl(distill_file) == [RECORD, batch_result]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"messages": [', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "plain text in a chat file"}', "a text record in a chat file"),
        ('{"prompt": "hi"}', "expected exactly one of 'messages'"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\]: .*content"),
        ('{"messages": "hello"}', "expected a list of message dicts"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path, tokenizer, bad_line, message):
    good = json.dumps({"messages": SIMPLE})
    path = write_lines(tmp_path / "data.jsonl", [good, "", bad_line, good])  # the blank line still counts
    with pytest.raises(ValueError, match=rf"data\.jsonl:3: .*{message}"):
        load_examples(path, tokenizer=tokenizer, seq_len=64)


def test_bad_distill_line_is_named_by_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(RECORD), json.dumps({**RECORD, "completion_start": 9})])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: completion_start"):
        load_examples(path, tokenizer=None, seq_len=8)


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: not UTF-8"):
        read_jsonl(path)


def test_examples_reject_inconsistent_arrays():
    ex = numbered_examples(4)
    with pytest.raises(ValueError, match="targets"):
        Examples(ex.tokens, ex.targets[:, :2], ex.loss_mask, ex.positions, ex.segment_ids)
    with pytest.raises(ValueError, match="loss_mask"):
        Examples(ex.tokens, ex.targets, ex.loss_mask.astype(np.float64), ex.positions, ex.segment_ids)
    with pytest.raises(ValueError, match="both or neither"):
        Examples(ex.tokens, ex.targets, ex.loss_mask, ex.positions, ex.segment_ids, teacher_ids=ex.tokens[..., None])
