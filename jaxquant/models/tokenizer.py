"""Byte-level BPE tokenizers rebuilt from a GGUF file's vocabulary (with the ``tokenizers`` package).

A GGUF "gpt2"-model tokenizer stores its vocabulary (``tokenizer.ggml.tokens``, in id order), its merges
(``tokenizer.ggml.merges``, ``"left right"`` strings in rank order), token types (3 = control/special,
4 = user-defined) and a pre-tokenizer name (``tokenizer.ggml.pre``) that selects the splitting regex llama.cpp
uses. Supported pre-tokenizers:

* GPT-2 style splitting (``'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``) preceded by
  splitting every digit on its own: ``smollm`` (SmolLM/SmolLM2), ``starcoder``, ``refact``, ``codeshell``,
  ``command-r``, ``exaone``, ``minerva``.
* plain GPT-2 splitting: ``gpt2``, ``default`` or a missing key.
* Llama-3 splitting (numbers in groups of up to three digits): ``llama3``, ``llama-bpe``, ``llama-v3``.

Other pre-tokenizers and SentencePiece ("llama") vocabularies raise ``ValueError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from jaxquant.files import atomic_write
from jaxquant.models._gguf import GGUFError, get_field, open_gguf

if TYPE_CHECKING:  # the ``tokenizers`` package is imported only when a tokenizer is built or loaded
    import tokenizers

__all__ = ["TextTokenizer", "tokenizer_from_gguf"]

_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_GPT2_PRE = {"gpt2", "default", ""}
_LLAMA3_PRE = {"llama3", "llama-bpe", "llama-v3"}
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4


class TextTokenizer:
    """A small wrapper around a ``tokenizers.Tokenizer`` with the model's BOS/EOS ids.

    Attributes:
      hf: the underlying ``tokenizers.Tokenizer``.
      bos_id / eos_id: begin/end-of-sequence token ids (``None`` if unknown).
      add_bos: whether :meth:`encode` prepends BOS by default (GGUF ``tokenizer.ggml.add_bos_token``).
    """

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool = False,
    ):
        self.hf = hf
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        """Number of token ids (including special tokens)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special-token strings (``<|im_start|>``) map to their ids.

        ``add_bos``: prepend ``bos_id`` (default: the tokenizer's ``add_bos`` setting).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for several texts (parallel inside ``tokenizers``)."""
        out = [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]
        if self.add_bos and self.bos_id is not None:
            out = [[self.bos_id, *ids] for ids in out]
        return out

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ``ids`` (byte-level BPE decodes exactly what was encoded)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary string (byte-level form, e.g. ``"Ġthe"``), or ``None``."""
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """Vocabulary string of an id, or ``None``."""
        return self.hf.id_to_token(int(i))

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` and ``jaxquant_tokenizer.json`` (BOS/EOS settings) into ``folder``."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        atomic_write(os.path.join(folder, "tokenizer.json"), self.hf.to_str(), mode=0o644)
        meta = {"bos_id": self.bos_id, "eos_id": self.eos_id, "add_bos": self.add_bos}
        atomic_write(os.path.join(folder, "jaxquant_tokenizer.json"), json.dumps(meta, indent=1), mode=0o644)

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], *, bos_id: int | None = None, eos_id: int | None = None
    ) -> TextTokenizer:
        """Load ``tokenizer.json`` from ``folder`` (BOS/EOS from ``jaxquant_tokenizer.json`` if present)."""
        folder = os.fspath(folder)
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        import tokenizers

        hf = tokenizers.Tokenizer.from_file(path)
        add_bos = False
        meta_path = os.path.join(folder, "jaxquant_tokenizer.json")
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            bos_id = meta.get("bos_id", bos_id) if bos_id is None else bos_id
            eos_id = meta.get("eos_id", eos_id) if eos_id is None else eos_id
            add_bos = bool(meta.get("add_bos", False))
        return cls(hf, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def _pre_tokenizer(pre: str, where: str) -> tuple[Any, bool]:
    """(pre-tokenizer, ignore_merges) for a GGUF ``tokenizer.ggml.pre`` value."""
    from tokenizers import Regex, pre_tokenizers

    if pre in _DIGIT_SPLIT_PRE:
        pt = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        return pt, False
    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in _LLAMA3_PRE:
        pt = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        return pt, True
    known = sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE | _LLAMA3_PRE - {""})
    raise GGUFError(f"{where}: unsupported tokenizer.ggml.pre {pre!r} (supported: {known})")


def tokenizer_from_gguf(path_or_reader: str | os.PathLike[str] | Any, *, name: str | None = None) -> TextTokenizer:
    """Build a :class:`TextTokenizer` from the tokenizer stored in a GGUF file.

    Args:
      path_or_reader: a ``.gguf`` path or an open ``gguf.GGUFReader``.
      name: the file name to use in error messages when a reader is passed.

    Raises:
      FileNotFoundError / ValueError: as :func:`jaxquant.models.load_gguf`; also for non-BPE vocabularies
        and unknown pre-tokenizers.
    """
    if isinstance(path_or_reader, str | os.PathLike):
        where = os.fspath(path_or_reader)
        reader = open_gguf(where)
    else:
        reader = path_or_reader
        where = name or "GGUF"
    kind = get_field(reader, "tokenizer.ggml.model", path=where)
    if kind != "gpt2":
        raise GGUFError(
            f"{where}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') vocabularies are supported"
        )
    tokens = list(get_field(reader, "tokenizer.ggml.tokens", path=where))
    merges_raw = list(get_field(reader, "tokenizer.ggml.merges", path=where))
    types = list(get_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens), path=where))
    pre = get_field(reader, "tokenizer.ggml.pre", "default", path=where)
    if len(types) != len(tokens):
        raise GGUFError(f"{where}: {len(types)} token types for {len(tokens)} tokens")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicate string keeps its first id
    merges = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise GGUFError(f"{where}: malformed BPE merge {m!r} (expected 'left right')")
        merges.append((left, right))
    import tokenizers
    from tokenizers import AddedToken, decoders, models

    pre_tok, ignore_merges = _pre_tokenizer(pre, where)
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges)
    hf = tokenizers.Tokenizer(model)
    hf.pre_tokenizer = pre_tok
    hf.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, y in zip(tokens, types) if y == _CONTROL]
    user = [AddedToken(t, normalized=False) for t, y in zip(tokens, types) if y == _USER_DEFINED]
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)
    bos = get_field(reader, "tokenizer.ggml.bos_token_id", None, path=where)
    eos = get_field(reader, "tokenizer.ggml.eos_token_id", None, path=where)
    add_bos = bool(get_field(reader, "tokenizer.ggml.add_bos_token", False, path=where))
    return TextTokenizer(
        hf,
        bos_id=None if bos is None else int(bos),
        eos_id=None if eos is None else int(eos),
        add_bos=add_bos,
    )
