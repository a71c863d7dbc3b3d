"""Evaluation and calibration text: Wikipedia prose from an XML dump, or the user's own text file.

Wikipedia (the default, see :func:`jaxquant.eval.assets.wiki_path`)
    :func:`load_articles` streams the bz2 XML dump and keeps main-namespace pages that are not
    redirects. :func:`clean_wikitext` turns their markup into plain prose:

    * dropped with their content: comments ``<!-- -->``, ``<ref>…</ref>`` and ``<ref/>``, the content
      of ``<math>``, ``<gallery>``, ``<timeline>``, ``<score>``, ``<imagemap>``, ``<syntaxhighlight>``,
      ``<source>``, templates ``{{…}}`` (nested), tables ``{|…|}`` (nested), ``[[File:…]]`` /
      ``[[Image:…]]`` / ``[[Media:…]]`` / ``[[Category:…]]`` links and interlanguage links
      (``[[de:…]]``). A few typographic templates that stand for one character (``{{snd}}``,
      ``{{ndash}}``, ``{{mdash}}``, ``{{nbsp}}``, ``{{'}}``) are replaced by it instead;
    * kept as text: internal links (``[[a|b]]`` → ``b``, ``[[a]]`` → ``a``), the text of external
      links (``[http://x text]`` → ``text``; a bare ``[http://x]`` is dropped), the content of other
      HTML tags (``<small>``, ``<sup>``, ``<span>`` …), and bold/italic text without its quote marks;
    * lines that are list items (``*``, ``#``), definitions or indents (``;``, ``:``), table residue
      (``|``, ``!``, ``{``, ``}``) or rules (``----``) are dropped; consecutive prose lines are joined
      with a space (as MediaWiki renders them) into one paragraph, one paragraph per output line;
    * headings become plain lines, kept only when prose follows them before the next heading; the
      article is cut at the first trailing section ("See also", "References", "External links",
      "Notes", "Further reading", …);
    * HTML entities are decoded, runs of whitespace collapsed, empty parentheses left by removed
      templates deleted.

    Articles with fewer than :data:`MIN_ARTICLE_CHARS` characters of prose after cleaning are dropped.

    :func:`split` assigns each article by a hash of its title: the first 8 bytes of the SHA-256 of the
    UTF-8 title, read as a big-endian integer and divided by 2**64, give u in [0, 1); u <
    ``eval_fraction`` (default 0.5) → evaluation, else calibration. An article's assignment never
    depends on the other articles, their order or the cleaning rules, so the two sets are disjoint and
    stable. Within each set articles keep dump order and are joined with ``"\\n\\n"`` (paragraphs
    inside an article are separated by ``"\\n"``).

A user's plain text file (``text_file=...``, the CLI's ``--text-file``)
    :func:`split_text_file` cuts it once into two contiguous parts: the first part is the calibration
    text, the rest the evaluation text. The cut is the paragraph boundary (a blank line) nearest to the
    middle of the text in characters; if there is no blank line, the line break nearest to the middle;
    if there is none either, the whitespace nearest to the middle; otherwise the exact middle.
    Surrounding whitespace of each part is stripped.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import gzip
import hashlib
import html
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "MIN_ARTICLE_CHARS",
    "Article",
    "SplitStats",
    "calib_text",
    "clean_wikitext",
    "describe_split",
    "eval_text",
    "load_articles",
    "split",
    "split_text_file",
]

#: Articles with less prose than this (characters, after cleaning) are dropped.
MIN_ARTICLE_CHARS = 500

#: Section titles (lower case) at which an article's prose ends: what follows is lists and citations.
_TRAILING_SECTIONS = frozenset(
    {
        "see also",
        "references",
        "external links",
        "notes",
        "notes and references",
        "references and notes",
        "footnotes",
        "further reading",
        "bibliography",
        "sources",
        "citations",
        "works cited",
        "selected bibliography",
        "publications",
        "discography",
        "filmography",
        "works",
        "selected works",
        "gallery",
    }
)

#: Link namespaces dropped with their content (lower case, without the colon).
_DROPPED_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})

# Tags whose whole content is dropped (besides <ref>, handled first).
_DROPPED_TAGS = (
    "math",
    "gallery",
    "timeline",
    "score",
    "imagemap",
    "syntaxhighlight",
    "source",
    "graph",
    "chem",
)


class Article(NamedTuple):
    """One article: its title and its cleaned prose (paragraphs separated by ``"\\n"``)."""

    title: str
    text: str


# ------------------------------------------------------------------------------------------------------------
# wikitext cleaning
# ------------------------------------------------------------------------------------------------------------

_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_SELF_CLOSING_RE = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_REF_RE = re.compile(r"<ref\b[^>]*>.*?(?:</ref\s*>|\Z)", re.I | re.S)
_DROPPED_TAGS_RE = re.compile(
    "<(" + "|".join(_DROPPED_TAGS) + r")\b[^>]*?(?:/\s*>|>.*?(?:</\1\s*>|\Z))",
    re.I | re.S,
)
# Nesting tokens: templates, links, tables (whose delimiters must start a line, after optional indentation).
_NEST_TOKEN_RE = re.compile(r"\{\{|\}\}|\[\[|\]\]|^[ \t:]*\{\||^[ \t]*\|\}", re.M)
# Typographic templates that stand for a character: replaced instead of dropped so words do not run together.
_CHAR_TEMPLATES_RE = re.compile(r"\{\{\s*(snd|spnd|spaced ndash|ndash|mdash|nbsp|'|·|dot)\s*\}\}", re.I)
_CHAR_TEMPLATES = {
    "snd": " – ",
    "spnd": " – ",
    "spaced ndash": " – ",
    "ndash": "–",
    "mdash": "—",
    "nbsp": " ",
    "'": "'",
    "·": " · ",
    "dot": " · ",
}
_EXTERNAL_LINK_RE = re.compile(r"\[(?:[a-z][a-z0-9+.-]*:)?//[^\s\]]*(?:\s+([^\]]*))?\]", re.I)
_BR_RE = re.compile(r"<br\s*/?\s*>", re.I)
_TAG_RE = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")
_QUOTES_RE = re.compile(r"'{2,}")
_BEHAVIOUR_SWITCH_RE = re.compile(r"__[A-Z]+__")
_HEADING_RE = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_INTERLANGUAGE_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$")
_SPACES_RE = re.compile(r"[ \t\u00a0\u2000-\u200b\u202f\u205f\u3000]+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r" +([,.;:!?)])")
_EMPTY_PARENS_RE = re.compile(r"\(\s*[,;]?\s*\)")
_PAREN_LEADING_PUNCT_RE = re.compile(r"\(\s*[,;]\s*")


def _render_link(content: str) -> str:
    """Text shown for an internal link ``[[content]]`` ('' for files, categories, interlanguage links)."""
    target, sep, label = content.partition("|")
    target = target.strip()
    leading_colon = target.startswith(":")
    bare = target.lstrip(":").strip()
    prefix, has_ns, _ = bare.partition(":")
    prefix = prefix.strip().lower()
    if has_ns and not leading_colon:
        if prefix in _DROPPED_LINK_NAMESPACES:
            return ""
        if not sep and _INTERLANGUAGE_RE.match(prefix):
            return ""
    if sep:
        label = label.strip()
        return label if label else bare
    return bare


def _render_nested(text: str) -> str:
    """Resolve templates (dropped), tables (dropped) and internal links (text kept), all possibly nested.

    A closer without an opener is dropped. A frame left unclosed (at the end of the text, or inside a frame
    that closes first) ends there: an unclosed template or table drops the text after its opener, an unclosed
    link keeps its rendered text. No opener or closer is ever left in the output.
    """
    # Each frame: (kind, opener text, pieces); kind is "{{", "[[" or "{|".
    root: list[str] = []
    stack: list[tuple[str, str, list[str]]] = []
    pos = 0

    def close(kind: str, pieces: list[str]) -> str:
        inner = "".join(pieces)
        return _render_link(inner) if kind == "[[" else ""

    closers = {"}}": "{{", "]]": "[[", "|}": "{|"}
    for m in _NEST_TOKEN_RE.finditer(text):
        (stack[-1][2] if stack else root).append(text[pos : m.start()])
        pos = m.end()
        tok = m.group().strip(" \t:")
        if tok in ("{{", "[[", "{|"):
            stack.append((tok, m.group(), []))
            continue
        want = closers[tok]
        depth = next((i for i in range(len(stack) - 1, -1, -1) if stack[i][0] == want), None)
        if depth is None:  # stray closer: dropped
            continue
        while len(stack) > depth + 1:  # frames opened after the one being closed were never closed
            kind, _, pieces = stack.pop()
            stack[-1][2].append(close(kind, pieces))
        kind, _, pieces = stack.pop()
        (stack[-1][2] if stack else root).append(close(kind, pieces))
    (stack[-1][2] if stack else root).append(text[pos:])
    while stack:  # unclosed at the end of the text
        kind, _, pieces = stack.pop()
        (stack[-1][2] if stack else root).append(close(kind, pieces))
    return "".join(root)


def _clean_inline(line: str) -> str:
    line = _SPACES_RE.sub(" ", line).strip()
    line = _EMPTY_PARENS_RE.sub("", line)
    line = _PAREN_LEADING_PUNCT_RE.sub("(", line)
    line = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", line)
    return _SPACES_RE.sub(" ", line).strip()


def clean_wikitext(markup: str) -> str:
    """Turn MediaWiki markup into plain prose (see the module docstring for the exact rules).

    Args:
      markup: the wikitext of one article (as stored in the XML dump, entities already decoded by XML).

    Returns:
      The prose, one paragraph (or heading) per line, no trailing newline; ``""`` if nothing is left.
    """
    s = _COMMENT_RE.sub("", markup)
    s = _REF_SELF_CLOSING_RE.sub("", s)
    s = _REF_RE.sub("", s)
    s = _DROPPED_TAGS_RE.sub("", s)
    s = _CHAR_TEMPLATES_RE.sub(lambda m: _CHAR_TEMPLATES[m.group(1).lower()], s)
    s = _render_nested(s)
    s = _EXTERNAL_LINK_RE.sub(lambda m: m.group(1) or "", s)
    s = _BR_RE.sub(" ", s)
    s = _TAG_RE.sub("", s)
    s = _QUOTES_RE.sub("", s)
    s = _BEHAVIOUR_SWITCH_RE.sub("", s)
    s = html.unescape(s)

    # Group lines into blocks: ("h", text) for headings, ("p", text) for paragraphs.
    blocks: list[tuple[str, str]] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            para = _clean_inline(" ".join(current))
            if para:
                blocks.append(("p", para))
            current.clear()

    for raw in s.split("\n"):
        line = raw.strip()
        heading = _HEADING_RE.match(line)
        if heading:
            flush()
            title = _clean_inline(heading.group(2))
            if title.lower().rstrip(":") in _TRAILING_SECTIONS:
                break
            blocks.append(("h", title))
        elif not line or line[0] in "*#;:|!{}" or line.startswith("----"):
            flush()
        else:
            current.append(line)
    flush()

    out: list[str] = []
    for i, (kind, txt) in enumerate(blocks):
        if kind == "h":
            nxt = blocks[i + 1][0] if i + 1 < len(blocks) else None
            if nxt != "p" or not txt:
                continue  # a heading with no prose under it
        out.append(txt)
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------


def _open_maybe_compressed(path: Path):
    with open(path, "rb") as f:
        magic = f.read(3)
    if magic == b"BZh":
        return bz2.open(path, "rb")
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _iter_pages(path: Path):
    """Yield (title, namespace, is_redirect, wikitext) for each <page> of a MediaWiki XML export."""
    with _open_maybe_compressed(path) as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            title, ns, redirect, text = "", "0", False, ""
            for child in elem.iter():
                name = _local(child.tag)
                if name == "title":
                    title = child.text or ""
                elif name == "ns":
                    ns = (child.text or "0").strip()
                elif name == "redirect":
                    redirect = True
                elif name == "text":
                    text = child.text or ""
            yield title, ns, redirect, text
            elem.clear()


@functools.lru_cache(maxsize=4)
def _load_articles_cached(path: str, _mtime_ns: int, _size: int, min_chars: int) -> tuple[Article, ...]:
    articles = []
    for title, ns, redirect, markup in _iter_pages(Path(path)):
        if ns != "0" or redirect or markup.lstrip()[:9].upper() == "#REDIRECT":
            continue
        prose = clean_wikitext(markup)
        if len(prose) >= min_chars:
            articles.append(Article(title, prose))
    return tuple(articles)


def load_articles(path: str | os.PathLike[str] | None = None, *, min_chars: int = MIN_ARTICLE_CHARS) -> list[Article]:
    """Parse a MediaWiki XML dump (bz2, gzip or plain) into cleaned articles, in dump order.

    Args:
      path: the dump; ``None`` uses the Wikipedia test dump (fetched on first use, see
        :func:`jaxquant.eval.assets.wiki_path`).
      min_chars: articles with less prose than this are dropped.

    Returns:
      Main-namespace, non-redirect articles with at least ``min_chars`` characters of prose. The result is
      cached per file (keyed on path, size and modification time).
    """
    if path is None:
        from jaxquant.eval.assets import wiki_path

        path = wiki_path()
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return list(_load_articles_cached(str(p), st.st_mtime_ns, st.st_size, min_chars))


def _title_fraction(title: str) -> float:
    digest = hashlib.sha256(title.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split(articles: Sequence[Article], eval_fraction: float = 0.5) -> tuple[list[Article], list[Article]]:
    """Deterministically split articles into ``(calibration, evaluation)`` by a hash of each title.

    An article goes to evaluation when ``int(sha256(title)[:8]) / 2**64 < eval_fraction``, else to
    calibration; order within each set is the input order. Articles with the same title go to the same set.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    calib, evals = [], []
    for a in articles:
        (evals if _title_fraction(a.title) < eval_fraction else calib).append(a)
    return calib, evals


def _best_cut(text: str) -> int:
    """Index at which to cut ``text`` in two (see the module docstring)."""
    mid = len(text) / 2
    for pattern in (r"\n[ \t]*\n", r"\n", r"\s"):
        cuts = [m.start() for m in re.finditer(pattern, text)]
        cuts = [c for c in cuts if text[:c].strip() and text[c:].strip()]
        if cuts:
            return min(cuts, key=lambda c: (abs(c - mid), c))
    return len(text) // 2


@functools.lru_cache(maxsize=4)
def _split_text_file_cached(path: str, _mtime_ns: int, _size: int) -> tuple[str, str]:
    text = Path(path).read_text(encoding="utf-8")
    cut = _best_cut(text)
    return text[:cut].strip(), text[cut:].strip()


def split_text_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Split a user's UTF-8 text file into ``(calibration_text, evaluation_text)``: two contiguous parts.

    The cut is at the blank line nearest to the middle of the text (else the nearest line break, else the
    nearest whitespace, else the middle); see the module docstring.
    """
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return _split_text_file_cached(str(p), st.st_mtime_ns, st.st_size)


def _join(articles: Sequence[Article]) -> str:
    return "\n\n".join(a.text for a in articles)


def calib_text(path: str | os.PathLike[str] | None = None, *, text_file: str | os.PathLike[str] | None = None) -> str:
    """Calibration text: calibration articles joined with ``"\\n\\n"``, or the first part of ``text_file``.

    Args:
      path: a MediaWiki XML dump (``None``: the default Wikipedia dump). Ignored if ``text_file`` is given.
      text_file: a user's plain UTF-8 text file, split by :func:`split_text_file`.
    """
    if text_file is not None:
        return split_text_file(text_file)[0]
    return _join(split(load_articles(path))[0])


def eval_text(path: str | os.PathLike[str] | None = None, *, text_file: str | os.PathLike[str] | None = None) -> str:
    """The evaluation text: evaluation articles joined with ``"\\n\\n"``, or the second part of ``text_file``.

    Args:
      path: a MediaWiki XML dump (``None``: the default Wikipedia dump). Ignored if ``text_file`` is given.
      text_file: a user's plain UTF-8 text file, split by :func:`split_text_file`.
    """
    if text_file is not None:
        return split_text_file(text_file)[1]
    return _join(split(load_articles(path))[1])


@dataclasses.dataclass(frozen=True)
class SplitStats:
    """Sizes of the calibration / evaluation split (token counts only when a tokenizer was given)."""

    source: str
    articles: int | None
    calib_articles: int | None
    eval_articles: int | None
    calib_chars: int
    eval_chars: int
    calib_tokens: int | None = None
    eval_tokens: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        def part(name: str, n_art: int | None, chars: int, toks: int | None) -> str:
            bits = [f"{n_art} articles"] if n_art is not None else []
            bits.append(f"{chars:,} chars")
            if toks is not None:
                bits.append(f"{toks:,} tokens")
            return f"{name}: " + ", ".join(bits)

        head = f"{self.source}" + (f" ({self.articles} articles)" if self.articles is not None else "")
        return "; ".join(
            [
                head,
                part("calibration", self.calib_articles, self.calib_chars, self.calib_tokens),
                part("evaluation", self.eval_articles, self.eval_chars, self.eval_tokens),
            ]
        )


def _count_tokens(tokenizer: Any, text: str) -> int:
    from jaxquant.eval.perplexity import encode

    return int(encode(text, tokenizer).size)


def describe_split(
    path: str | os.PathLike[str] | None = None,
    *,
    text_file: str | os.PathLike[str] | None = None,
    tokenizer: Any = None,
) -> SplitStats:
    """Article, character and (given a tokenizer with ``.encode(str) -> list``) token counts of the split.

    Args:
      path: a MediaWiki XML dump (``None``: the default Wikipedia dump). Ignored if ``text_file`` is given.
      text_file: a user's plain text file instead of Wikipedia (article counts are then ``None``).
      tokenizer: optional; when given, the joined texts are tokenized to count tokens.
    """
    if text_file is not None:
        calib, evals = split_text_file(text_file)
        stats = SplitStats(str(text_file), None, None, None, len(calib), len(evals))
    else:
        arts = load_articles(path)
        c, e = split(arts)
        calib, evals = _join(c), _join(e)
        source = "wikipedia" if path is None else str(path)
        stats = SplitStats(source, len(arts), len(c), len(e), len(calib), len(evals))
    if tokenizer is not None:
        stats = dataclasses.replace(
            stats, calib_tokens=_count_tokens(tokenizer, calib), eval_tokens=_count_tokens(tokenizer, evals)
        )
    return stats
