"""The SmolLM2 tokenizer rebuilt from the GGUF vocabulary, checked against a small independent BPE."""

from __future__ import annotations

import itertools
import re

import gguf
import pytest

pytestmark = pytest.mark.slow

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; it's been "
    "55 years since then! Prices rose 3.5% to $1,234.56 -- didn't they? We'll see.\n\n"
    "    Indented code: x = f(y) + 42\tTabs and  double  spaces."
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_B2U = _bytes_to_unicode()
# ASCII-only transcription of the GPT-2 pre-tokenizer regex (\p{L} -> [A-Za-z], \p{N} -> [0-9])
_ASCII_GPT2 = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


class _ReferenceBPE:
    """Textbook byte-level BPE (lowest-rank merge first) for ASCII text, digits split individually."""

    def __init__(self, path) -> None:
        r = gguf.GGUFReader(path)
        self.vocab = {t: i for i, t in enumerate(r.fields["tokenizer.ggml.tokens"].contents())}
        merges = r.fields["tokenizer.ggml.merges"].contents()
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}

    def _word(self, word: str) -> list[int]:
        parts = [_B2U[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
        return [self.vocab[p] for p in parts]

    def encode(self, text: str) -> list[int]:
        assert text.isascii()
        ids: list[int] = []
        for piece in re.split(r"([0-9])", text):
            if not piece:
                continue
            for word in _ASCII_GPT2.findall(piece):
                ids += self._word(word)
        return ids


def test_metadata_and_basic_ids(tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.id_to_token(tokenizer.bos_id) == "<|im_start|>"
    assert tokenizer.id_to_token(tokenizer.eos_id) == "<|im_end|>"
    ids = tokenizer.encode("The capital of France is")
    assert [tokenizer.id_to_token(i) for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert ids == [504, 3575, 282, 4649, 314]
    assert tokenizer.encode("Hello world") == [19556, 905]
    assert tokenizer.encode("x", add_bos=True)[0] == 1


def test_digits_are_split_individually(tokenizer) -> None:
    ids = tokenizer.encode("12345")
    assert [tokenizer.id_to_token(i) for i in ids] == ["1", "2", "3", "4", "5"]
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode(" 2024")] == ["Ġ", "2", "0", "2", "4"]
    assert len(tokenizer.encode("In 2024, 12345 people paid $3.50.")) == 21


def test_matches_independent_bpe(tokenizer, gguf_path) -> None:
    ref = _ReferenceBPE(gguf_path)
    for text in [ENGLISH, "Hello world", "It's 2am, isn't it?", "a  b   c\n\n\nd", "don't", " leading space"]:
        assert tokenizer.encode(text) == ref.encode(text), text


@pytest.mark.parametrize(
    "text",
    [
        ENGLISH,
        "naïve café — “quotes” 日本語 emoji 🙂 and Ünïcödé",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
        "",
        "   \n\t ",
    ],
)
def test_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_special_tokens_are_single_ids(tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>assistant<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special=True) == "assistant"


def test_batch_and_save(tokenizer, tmp_path) -> None:
    from jaxquant.models import TextTokenizer

    texts = ["one two", "three 456"]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    tokenizer.save(tmp_path)
    again = TextTokenizer.from_folder(tmp_path)
    assert (again.bos_id, again.eos_id) == (1, 2)
    assert again.encode(ENGLISH) == tokenizer.encode(ENGLISH)
    with pytest.raises(TypeError):
        tokenizer.encode(["not", "a", "string"])
