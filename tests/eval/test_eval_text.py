"""Wikitext cleaning, dump parsing, the calibration/evaluation split and user text files."""

from __future__ import annotations

import bz2
from pathlib import Path

import pytest

from jaxquant.eval import text as T
from jaxquant.eval.text import Article, clean_wikitext, describe_split, load_articles, split, split_text_file

# ----------------------------------------------------------------------------------------------------------
# clean_wikitext on hand-written snippets (exact expected output)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("markup", "expected"),
    [
        # bold, links with and without label, link trail, refs containing templates, nested templates
        (
            "'''Foo''' is a [[bar|baz]] of [[qux]]s.<ref>cite {{x|y}}</ref> It {{convert|1|km}}was "
            "{{outer|{{inner|{{deep}}}}|a}} here.",
            "Foo is a baz of quxs. It was here.",
        ),
        # self-closing refs, named refs, entities, italics, <sup>, <br />, lines joined into a paragraph
        (
            "Water<ref name=\"a\" /> boils<ref name=b>x</ref> at 100&nbsp;°C &ndash; ''mostly''<sup>1</sup>."
            "<br />Next line\njoined.",
            "Water boils at 100 °C – mostly1. Next line joined.",
        ),
        # tables, with a nested table and templates inside, are dropped; blank lines split paragraphs
        (
            'Before.\n{| class="wikitable"\n|-\n| a || {{b}}\n|-\n| {| nested\n| x\n|}\n|}\nAfter.\n\nThird.',
            "Before.\nAfter.\nThird.",
        ),
        # headings: kept as lines when prose follows; lists dropped; cut at "See also"
        (
            "Intro text.\n== History ==\nHistory text.\n=== Empty ===\n* list item\n# numbered\n; term\n"
            ": indented\n== See also ==\nTrailing text.",
            "Intro text.\nHistory\nHistory text.",
        ),
        # file (with a nested link in the caption), category and interlanguage links dropped;
        # a leading colon makes a category link an ordinary link
        (
            "[[File:x.jpg|thumb|A [[caption]] here]]Text with [[Category:Foo]] and [[de:Foo]] "
            "and [[:Category:Bar|bar cat]] and [[Image:y.png]].",
            "Text with and and bar cat and.",
        ),
        # external links: text kept, bare link dropped; comments dropped
        (
            "See [http://example.com the site] or [https://bare.example.org]<!-- hidden {{x}} --> now.",
            "See the site or now.",
        ),
        # IPA-like templates leave empty "( ; ...)" behind: cleaned; {{snd}} becomes a dash; <math> dropped
        (
            "Albert Einstein ({{IPA-de|ˈalbɛɐ̯t|lang}}; 14 March 1879) was a physicist{{snd}}a famous one."
            "<math>E=mc^2</math>",
            "Albert Einstein (14 March 1879) was a physicist – a famous one.",
        ),
        # multi-line templates (infobox) dropped; unclosed template drops the rest
        (
            "{{Infobox person\n| name = x\n| y = {{z|{{w}}}}\n}}\n'''Bold''' start.\n{{unclosed\nrest is lost",
            "Bold start.",
        ),
        # stray closers and mismatched nesting never leak markup
        ("Stray ]] and }} closers.", "Stray and closers."),
        ("[[a {{b ]] c", "a c"),
        ("x [[unclosed|label", "x label"),
        # behaviour switches and horizontal rules
        ("__NOTOC__\nProse.\n----\nMore prose.", "Prose.\nMore prose."),
        ("", ""),
    ],
)
def test_clean_wikitext_exact(markup: str, expected: str) -> None:
    assert clean_wikitext(markup) == expected


def test_clean_wikitext_heading_without_prose_is_dropped() -> None:
    markup = "Lead.\n== A ==\n{{main|X}}\n== B ==\nText of B.\n== C ==\n"
    assert clean_wikitext(markup) == "Lead.\nB\nText of B."


# ----------------------------------------------------------------------------------------------------------
# parsing a small hand-written dump
# ----------------------------------------------------------------------------------------------------------

_PAGE = """  <page>
    <title>{title}</title>
    <ns>{ns}</ns>
    <id>{id}</id>{redirect}
    <revision>
      <id>1</id>
      <text xml:space="preserve">{text}</text>
    </revision>
  </page>
"""


def _write_dump(path: Path, pages: list[tuple[str, int, bool, str]]) -> Path:
    body = "".join(
        _PAGE.format(
            title=t,
            ns=ns,
            id=i,
            redirect='\n    <redirect title="X" />' if red else "",
            text=text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"),
        )
        for i, (t, ns, red, text) in enumerate(pages)
    )
    xml = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">\n' + body + "</mediawiki>\n"
    path.write_bytes(bz2.compress(xml.encode("utf-8")))
    return path


def test_load_articles_filters_pages(tmp_path: Path) -> None:
    long_prose = "This is a sentence of prose. " * 30
    dump = _write_dump(
        tmp_path / "dump.xml.bz2",
        [
            ("Kept", 0, False, "'''Kept''' article.<ref>r</ref> " + long_prose),
            ("Redirect element", 0, True, long_prose),
            ("Redirect text", 0, False, "#REDIRECT [[Somewhere]]\n" + long_prose),
            ("Talk:Other namespace", 1, False, long_prose),
            ("Too short", 0, False, "Short text {{with a template}}."),
            ("Also kept", 0, False, long_prose + "\n== References ==\n{{reflist}}"),
        ],
    )
    arts = load_articles(dump)
    assert [a.title for a in arts] == ["Kept", "Also kept"]
    assert arts[0].text.startswith("Kept article. This is a sentence")
    assert arts[1].text == long_prose.strip()
    assert load_articles(dump, min_chars=10)[1].title == "Too short"


# ----------------------------------------------------------------------------------------------------------
# split
# ----------------------------------------------------------------------------------------------------------


def _fake_articles(n: int) -> list[Article]:
    return [Article(f"Title {i}", f"text {i}") for i in range(n)]


def test_split_deterministic_disjoint_order_independent() -> None:
    arts = _fake_articles(200)
    calib, evals = split(arts)
    assert split(arts) == (calib, evals)
    assert {a.title for a in calib}.isdisjoint({a.title for a in evals})
    assert len(calib) + len(evals) == len(arts)
    assert 60 < len(evals) < 140  # a hash split is roughly balanced
    # the assignment of an article does not depend on the others or on their order
    _, evals_r = split(arts[::-1])
    assert {a.title for a in evals_r} == {a.title for a in evals}
    calib_half, _ = split(arts[:100])
    assert {a.title for a in calib_half} == {a.title for a in calib if int(a.title.split()[1]) < 100}
    # order inside each set is input order
    assert [a.title for a in calib] == [a.title for a in arts if a in calib]


def test_split_fraction_extremes() -> None:
    arts = _fake_articles(20)
    assert split(arts, eval_fraction=0.0) == (arts, [])
    assert split(arts, eval_fraction=1.0) == ([], arts)
    with pytest.raises(ValueError, match="eval_fraction"):
        split(arts, eval_fraction=1.5)


# ----------------------------------------------------------------------------------------------------------
# user text files
# ----------------------------------------------------------------------------------------------------------


def test_split_text_file_at_paragraph_nearest_middle(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("aaaa\n\nbbbb\n\ncccc\n\ndddd\n", encoding="utf-8")
    assert split_text_file(f) == ("aaaa\n\nbbbb", "cccc\n\ndddd")
    assert T.calib_text(text_file=f) == "aaaa\n\nbbbb"
    assert T.eval_text(text_file=f) == "cccc\n\ndddd"


def test_split_text_file_falls_back_to_lines_words_chars(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("line one\nline two\nline three\nline four", encoding="utf-8")
    assert split_text_file(f) == ("line one\nline two", "line three\nline four")
    f.write_text("one two three four", encoding="utf-8")
    assert split_text_file(f) == ("one two", "three four")
    f.write_text("abcdefgh", encoding="utf-8")
    assert split_text_file(f) == ("abcd", "efgh")


def test_describe_split_text_file_with_tokenizer(tmp_path: Path) -> None:
    class CharTokenizer:
        def encode(self, s: str) -> list[int]:
            return [ord(c) for c in s]

    f = tmp_path / "t.txt"
    f.write_text("first part here\n\nsecond part\n", encoding="utf-8")
    st = describe_split(text_file=f, tokenizer=CharTokenizer())
    assert (st.calib_chars, st.eval_chars) == (15, 11)
    assert (st.calib_tokens, st.eval_tokens) == (15, 11)
    assert st.articles is None
    assert "15 chars" in str(st)


# ----------------------------------------------------------------------------------------------------------
# the real Wikipedia dump
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_dump_parses_cleanly() -> None:
    arts = load_articles()
    assert 60 <= len(arts) <= 206  # the shortened dump has 206 pages, about half of them redirects
    assert len({a.title for a in arts}) == len(arts)
    for a in arts:
        for marker in ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "<!--", "'''", "&nbsp;", "&amp;"):
            assert marker not in a.text, (a.title, marker)
        assert len(a.text) >= T.MIN_ARTICLE_CHARS
    titles = [a.title for a in arts]
    assert "Anarchism" in titles
    assert arts[titles.index("Anarchism")].text.startswith("Anarchism is a political philosophy")


@pytest.mark.slow
def test_real_split_deterministic_and_disjoint() -> None:
    arts = load_articles()
    calib, evals = split(arts)
    assert (calib, evals) == split(load_articles())
    assert {a.title for a in calib}.isdisjoint({a.title for a in evals})
    assert len(calib) + len(evals) == len(arts)
    st = describe_split()
    assert (st.articles, st.calib_articles, st.eval_articles) == (len(arts), len(calib), len(evals))
    assert st.calib_chars == len(T.calib_text()) > 500_000
    assert st.eval_chars == len(T.eval_text()) > 500_000
    assert T.eval_text() == "\n\n".join(a.text for a in evals)
