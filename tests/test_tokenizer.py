"""Tokenizer specification: the same ids as Meta's reference tokenizers, on every kind of text."""

import base64
import random
import re
import sys

import pytest
import sentencepiece
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from llama_jax.text.tokenizer import (
    Llama3Tokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    find_tokenizer,
    split_long_runs,
)

# The eight languages Llama 3.1 supports, plus text that stresses the pre-tokenizer.
TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see.",
    "german": "Größere Übungen für Straßenbahnfahrer \u2013 naïve Bärenjäger schützen Öl.",
    "french": "L'été dernier, où étiez-vous ? « Ça va », répondit-elle à l'hôpital.",
    "italian": "Perché l'università è così lontana? Più caffè, per piacere.",
    "portuguese": "Não sei se você já ouviu falar de coração e ação — é ótimo!",
    "hindi": "नमस्ते, आप कैसे हैं? मुझे हिंदी पढ़ना अच्छा लगता है।",
    "spanish": "¿Dónde está el niño? ¡Mañana iremos a la montaña con pingüinos!",
    "thai": "สวัสดีครับ วันนี้อากาศดีมาก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "code": 'def f(x: int) -> int:\n\tif x <= 1:\n\t\treturn 1  # base\n\treturn x * f(x - 1)\r\n\n\n    print("ok")',
    "emoji": "Family 👨‍👩‍👧‍👦, flags 🇩🇪🇹🇭, skin tone 👍🏽, keycap 1️⃣ and 🦙🦙🦙",
    "cjk": "大型语言模型。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "numbers": "1234567890 3.14159 1e-10 ١٢٣ ⅷ",
    "contractions": "I'LL SAY IT'S YOU'RE WE'VE THEY'D i'm",
    "empty": "",
    "whitespace_only": " \t\n\r\n  \u00a0\u3000",
    "lone_surrogate": "bad \ud800 surrogate",
    "user_typed_special_tokens": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nhi<|eot_id|>",
}

LONG_TEXTS = {
    "over_400k_chars": "The quick brown fox, 42 times. " * 13_000,  # 403,000 chars, cut mid-sentence
    "30k_run_without_whitespace": "x" * 30_000,
    "30k_whitespace_run": "a" + " " * 30_000 + "b",
    "30k_mixed_newlines_run": "start" + "\n\r\t " * 7_500 + "end",
    "50k_digits": "7" * 50_001,
}


def plain_ids(tokenizer, text):
    return tokenizer.encode(text, bos=False, eos=False)


@pytest.fixture(scope="module")
def meta(llama3_tokenizer_path):
    return MetaTokenizer(llama3_tokenizer_path)


# -------------------------------------------------------------------------------------------------
# Llama 3 vocabulary and special tokens


def test_llama3_file_loads_as_tiktoken_tokenizer(tokenizer):
    assert isinstance(tokenizer, Llama3Tokenizer)


def test_vocabulary_is_128000_ranks_plus_256_special_tokens(tokenizer, meta):
    assert tokenizer.n_words == tokenizer.vocab_size == meta.n_words == 128_256
    assert len(tokenizer.special_tokens) == 256
    assert min(tokenizer.special_tokens.values()) == 128_000


def test_special_token_names_and_ids_match_meta(tokenizer, meta):
    assert tokenizer.special_tokens == meta.special_tokens


@pytest.mark.parametrize(
    "attribute, token_id",
    [
        ("bos_id", 128000),
        ("eos_id", 128001),
        ("pad_id", 128004),
        ("eom_id", 128008),
        ("eot_id", 128009),
        ("python_tag_id", 128010),
    ],
)
def test_control_token_ids(tokenizer, meta, attribute, token_id):
    assert getattr(tokenizer, attribute) == getattr(meta, attribute) == token_id


@pytest.mark.parametrize(
    "name, token_id",
    [("<|step_id|>", 128005), ("<|image|>", 128011), ("<|reserved_special_token_2|>", 128012)],
)
def test_special_tokens_use_llama_models_0_3_names(tokenizer, name, token_id):
    assert tokenizer.special_tokens[name] == token_id
    assert tokenizer.special_tokens["<|reserved_special_token_245|>"] == 128255


def test_stop_tokens_are_end_of_text_end_of_message_end_of_turn(tokenizer, meta):
    assert tokenizer.stop_tokens == (128001, 128008, 128009)
    assert list(tokenizer.stop_tokens) == meta.stop_tokens


# -------------------------------------------------------------------------------------------------
# Encoding and decoding


def test_meta_reference_vector(tokenizer):
    # From llama-models llama3/tests/api/test_tokenizer.py.
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tokenizer.encode("This is a test sentence.", bos=True, eos=True) == ids
    assert tokenizer.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


@pytest.mark.parametrize(
    "text, ids",
    [("user", [882]), ("system", [9125]), ("assistant", [78191]), ("ipython", [23799, 4690]), ("\n\n", [271])],
)
def test_chat_role_words(tokenizer, text, ids):
    assert tokenizer.encode(text, bos=False, eos=False) == ids


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_ids_match_meta(tokenizer, meta, text):
    assert tokenizer.encode(text, bos=False, eos=False) == meta.encode(text, bos=False, eos=False)


ROUND_TRIP_TEXTS = {name: text for name, text in TEXTS.items() if name != "lone_surrogate"}


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS.values(), ids=ROUND_TRIP_TEXTS.keys())
def test_decode_inverts_encode_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, bos=False, eos=False)) == text


def test_lone_surrogates_are_replaced_like_tiktoken(tokenizer):
    # tiktoken cannot encode a lone surrogate; it replaces it with U+FFFD, as Meta's tokenizer does.
    assert tokenizer.decode(tokenizer.encode("a\ud800b", bos=False, eos=False)) == "a\ufffdb"


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("eos", [False, True])
def test_bos_and_eos_only_when_asked(tokenizer, meta, bos, eos):
    ids = tokenizer.encode("hello", bos=bos, eos=eos)
    assert ids == meta.encode("hello", bos=bos, eos=eos)
    assert (ids[0] == 128000) == bos
    assert (ids[-1] == 128001) == eos


@pytest.mark.parametrize("bos, eos, ids", [(False, False, []), (True, True, [128000, 128001])])
def test_empty_text(tokenizer, bos, eos, ids):
    assert tokenizer.encode("", bos=bos, eos=eos) == ids


def test_special_token_text_typed_by_a_user_is_plain_text(tokenizer):
    ids = tokenizer.encode("<|eot_id|>", bos=False, eos=False)
    assert ids == [27, 91, 68, 354, 851, 91, 29]
    assert not set(ids) & set(tokenizer.special_tokens.values())


def test_allowed_special_all_parses_control_tokens(tokenizer, meta):
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    ids = tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
    assert ids == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert ids == [128006, 882, 128007, 271, 6151, 128009]


def test_allowed_special_subset_parses_only_those_tokens(tokenizer, meta):
    text = "<|python_tag|>x<|eom_id|>"
    kwargs = {"bos": False, "eos": False, "allowed_special": {"<|python_tag|>"}}
    ids = tokenizer.encode(text, **kwargs)
    assert ids == meta.encode(text, **kwargs)
    assert ids[0] == 128010 and 128008 not in ids


def test_disallowed_special_all_rejects_special_token_text(tokenizer):
    with pytest.raises(ValueError, match="<\\|eot_id\\|>"):
        tokenizer.encode("hi<|eot_id|>", bos=False, eos=False, disallowed_special="all")


def test_decode_renders_special_ids_as_their_text(tokenizer):
    assert tokenizer.decode([128006, 78191, 128007, 128010]) == (
        "<|start_header_id|>assistant<|end_header_id|><|python_tag|>"
    )


def test_encode_rejects_non_str(tokenizer):
    with pytest.raises(TypeError, match="expects str, got bytes"):
        tokenizer.encode(b"bytes", bos=False, eos=False)


# -------------------------------------------------------------------------------------------------
# Long and pathological inputs: Meta's 400,000-char slices and 25,000-char runs


@pytest.mark.parametrize("text", LONG_TEXTS.values(), ids=LONG_TEXTS.keys())
def test_long_inputs_match_meta_and_round_trip(tokenizer, meta, text):
    ids = tokenizer.encode(text, bos=True, eos=False)
    assert ids == meta.encode(text, bos=True, eos=False)
    assert tokenizer.decode(ids[1:]) == text


def test_text_is_encoded_in_independent_400k_char_slices(tokenizer):
    text = LONG_TEXTS["over_400k_chars"]
    head, tail = text[:400_000], text[400_000:]
    assert plain_ids(tokenizer, text) == plain_ids(tokenizer, head) + plain_ids(tokenizer, tail)


def test_runs_over_25k_chars_are_cut_every_25k_chars(tokenizer):
    assert plain_ids(tokenizer, "x" * 30_000) == plain_ids(tokenizer, "x" * 25_000) + plain_ids(tokenizer, "x" * 5_000)


@pytest.mark.parametrize("max_run", [1, 2, 3, 7])
def test_run_splitting_matches_meta_scan(max_run):
    rng = random.Random(max_run)
    alphabet = "ab \n\t\u00a0\u2003é"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        expected = list(MetaTokenizer._split_whitespaces_or_nonwhitespaces(text, max_run))
        assert list(split_long_runs(text, max_run)) == expected, text


def test_regex_whitespace_class_is_str_isspace():
    # split_long_runs relies on `\s` meaning exactly what Meta's `str.isspace` scan means.
    every_char = "".join(map(chr, range(sys.maxunicode + 1)))
    assert "".join(re.findall(r"\s", every_char)) == "".join(c for c in every_char if c.isspace())


# -------------------------------------------------------------------------------------------------
# Loading files


def _write_ranks(path, tokens):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def test_special_tokens_follow_the_ranks_of_any_tiktoken_file(tmp_path):
    tokenizer = Tokenizer.from_file(_write_ranks(tmp_path / "tokenizer.model", [bytes([b]) for b in range(256)]))
    assert tokenizer.bos_id == 256 and tokenizer.n_words == 512
    assert tokenizer.encode("hi", bos=True, eos=False) == [256, ord("h"), ord("i")]


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.model"):
        Tokenizer.from_file(tmp_path / "nope.model")


@pytest.mark.parametrize(
    "content", [b"", b"hello world\n", b'{"model": "json"}', b"\x0a\x05junk-not-a-protobuf"], ids=repr
)
def test_unrecognised_file_error_names_the_file(tmp_path, content):
    path = tmp_path / "weird.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"weird\.model"):
        Tokenizer.from_file(path)


def test_malformed_tiktoken_line_error_names_file_and_line(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 1\nnot-base64!! 2\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:3: expected '<base64 token> <rank>'"):
        Tokenizer.from_file(path)


def test_gap_in_tiktoken_ranks_is_an_error(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(ValueError, match=r"cover 0\.\.1 without gaps"):
        Tokenizer.from_file(path)


@pytest.mark.parametrize(
    "layout, found",
    [
        (["tokenizer.model"], "tokenizer.model"),
        (["original/tokenizer.model"], "original/tokenizer.model"),
        (["tokenizer.model", "original/tokenizer.model"], "tokenizer.model"),
        (["params.json"], None),
    ],
)
def test_find_tokenizer_in_checkpoint_directory(tmp_path, layout, found):
    for relative in layout:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    assert find_tokenizer(tmp_path) == (tmp_path / found if found else None)


def test_find_tokenizer_rejects_missing_directory(tmp_path):
    with pytest.raises(NotADirectoryError, match="missing-ckpt"):
        find_tokenizer(tmp_path / "missing-ckpt")


# -------------------------------------------------------------------------------------------------
# Llama 2: sentencepiece


SP_TEXTS = ["hello world", "the llama jumps over the lazy alpaca", "", "  leading spaces", "unseen: ü 日本 🦙", "a\nb"]


def _train_sentencepiece(directory, **options):
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog llama token model alpaca hello world data".split()  # noqa: SIM905
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    prefix = directory / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(prefix),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,  # as Llama 2: unseen characters become byte pieces, never <unk>
        minloglevel=2,
        **options,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return _train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def sp_reference(sp_path):
    return sentencepiece.SentencePieceProcessor(model_file=str(sp_path))


def test_sentencepiece_file_is_detected(sp_path):
    assert isinstance(Tokenizer.from_file(sp_path), SentencePieceTokenizer)


@pytest.mark.parametrize("text", SP_TEXTS)
@pytest.mark.parametrize("bos, eos", [(False, False), (True, False), (False, True), (True, True)])
def test_sentencepiece_ids_match_sentencepiece(sp_path, sp_reference, text, bos, eos):
    expected = [1] * bos + sp_reference.encode(text) + [2] * eos
    assert Tokenizer.from_file(sp_path).encode(text, bos=bos, eos=eos) == expected


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_decode_matches_sentencepiece(sp_path, sp_reference, text):
    tokenizer = Tokenizer.from_file(sp_path)
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert tokenizer.decode(ids) == sp_reference.decode(ids)


def test_sentencepiece_llama2_control_ids(sp_path, sp_reference):
    tokenizer = Tokenizer.from_file(sp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, -1)
    assert tokenizer.stop_tokens == (2,)
    assert tokenizer.n_words == tokenizer.vocab_size == sp_reference.vocab_size() == 300
    assert tokenizer.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert (tokenizer.eot_id, tokenizer.eom_id, tokenizer.python_tag_id) == (None, None, None)


def test_sentencepiece_pad_id_comes_from_the_model(tmp_path):
    tokenizer = Tokenizer.from_file(_train_sentencepiece(tmp_path, pad_id=3))
    assert tokenizer.pad_id == 3
    assert tokenizer.special_tokens["<pad>"] == 3


def test_sentencepiece_control_token_text_is_plain_text(sp_path):
    tokenizer = Tokenizer.from_file(sp_path)
    assert not {1, 2} & set(tokenizer.encode("<s></s>", bos=False, eos=False))


@pytest.mark.parametrize("kwargs", [{"allowed_special": "all"}, {"disallowed_special": "all"}])
def test_sentencepiece_refuses_special_token_parsing_options(sp_path, kwargs):
    with pytest.raises(ValueError, match="never parse special tokens"):
        Tokenizer.from_file(sp_path).encode("<s>", bos=False, eos=False, **kwargs)
