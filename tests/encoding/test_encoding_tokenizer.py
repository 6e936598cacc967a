"""The real DSV4 tokenizer: special-token ids (docs/dsv4-reference.md §5.1), a known tokenisation,
lossless decode, batched encoding of long texts, loading from a file."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel

from encoding import Tokenizer, encode_messages
from test_encoding_official import load_case


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def test_special_token_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id) == (0, 1, 128803, 128804)
    assert (tok.think_start_id, tok.think_end_id, tok.dsml_id, tok.latest_reminder_id) == (128821, 128822, 128825, 128828)
    expected = {"<｜action｜>": 128829, "<｜query｜>": 128830, "<｜authority｜>": 128831, "<｜domain｜>": 128832,
                "<｜title｜>": 128836, "<｜read_url｜>": 128845}
    assert {t: tok.special_ids[t] for t in expected} == expected
    assert tok.token_to_id("<｜extracted_url｜>") == 128844
    assert tok.vocab_size == 129280
    with pytest.raises(KeyError):
        tok.token_to_id("<｜no such token｜>")


def test_known_tokenisation(tok):
    text = "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>"
    assert tok.encode(text) == [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]
    assert tok.decode([128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]) == text


def test_default_is_loaded_once(tok):
    assert Tokenizer.default() is tok


@pytest.mark.parametrize("case", [1, 3, 4])
def test_decode_inverts_encode_on_official_prompts(tok, case):
    messages, text = load_case(case)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text


def test_long_text_is_encoded_in_a_batch_with_the_same_ids(tok):
    rng = random.Random(7)
    turns = []
    for i in range(400):
        turns.append({"role": "user", "content": f"step {i}: " + "".join(rng.choice("ab 中\n{}") for _ in range(300))})
        turns.append({"role": "assistant", "reasoning_content": "think " * 20, "content": "ok " * 30})
    text = encode_messages(turns, "thinking", drop_thinking=False)
    assert len(text) > 200_000  # past the batch threshold
    single = tok._hf.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == single
    assert tok.encode_batch([text[:1000], "x"]) == [tok.encode(text[:1000]), tok.encode("x")]


def test_from_file_and_directory(tmp_path, tok):
    path = tok.source
    assert Tokenizer.from_file(path).encode("hello world") == tok.encode("hello world")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "missing.json")
    # A tokenizer without the DSV4 special tokens is refused by name.
    other = HFTokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a DSV4 tokenizer"):
        Tokenizer.from_file(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"


_TEXTS = st.lists(st.sampled_from(list("ab 1\n\t中é😀<>｜/") + ["</think>", "<｜User｜>", "\n\n", "  "]), max_size=20).map("".join)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(before=_TEXTS, after=_TEXTS, marker=st.sampled_from(["<｜end▁of▁sentence｜>", "<think>", "<｜Assistant｜>", "</think>"]))
def test_ids_after_a_special_token_do_not_depend_on_the_text_before(before, after, marker):
    """The invariant AppendOnlyEncoder rests on: text is cut at added tokens before tokenizing."""
    tok = Tokenizer.default()
    assert tok.encode(before + marker) + tok.encode(after) == tok.encode(before + marker + after)


def test_plain_text_boundaries_do_change_ids(tok):
    """Why appends must start at a special token: a split inside plain text is not additive."""
    assert tok.encode("hel") + tok.encode("lo world") != tok.encode("hello world")
