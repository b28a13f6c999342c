"""Text normalisation and the paper's per-example TF-IDF selection (huse_pipeline.text, §4.1.1)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from huse_pipeline.data.text import normalise_text, prepare_texts, split_sentences, tfidf_select, word_scores


def count_words(texts: list[str]) -> list[int]:
    """A tokenizer whose word pieces are whitespace words (additive, like WordPiece over words)."""
    return [len(t.split()) for t in texts]


def count_chars(texts: list[str]) -> list[int]:
    """A deliberately non-additive tokenizer: one piece per character, spaces included."""
    return [len(t) for t in texts]


# ---------------------------------------------------------------------------------- normalise


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  Men   Blue\tShirt \n", "Men Blue Shirt"),
        ("Men&#39;s &amp; Women&apos;s", "Men's & Women's"),
        ("<b>Blue</b><br/>Shirt", "Blue Shirt"),  # a tag separates words
        ("<p class='x'>Red <i>Kurta</i></p>", "Red Kurta"),
        ("a < b and c > d", "a < b and c > d"),  # not tags
        ("Price &lt;b&gt;100", "Price <b>100"),  # an escaped tag is text, not markup
        ("Tee<script>alert(1)</script> shirt<!-- hidden -->", "Tee shirt"),
        ("Ｔｅｅ ﬁt ①", "Tee fit 1"),  # NFKC: full-width, ligature, circled digit
        ("no\u00a0break&nbsp;space", "no break space"),
        ("zero\u200bwidth soft\u00adhyphen bell\x07", "zerowidth softhyphen bell"),
        ("line\r\nbreak\x0bvt", "line break vt"),
        ("   \t\n ", ""),
        ("<br><br>", ""),
        ("&nbsp;", ""),
    ],
)
def test_normalise_text(raw, clean):
    assert normalise_text(raw) == clean


def test_normalise_is_idempotent_and_handles_non_strings():
    messy = "<b>Blue</b>&amp;&nbsp;Ｒｅｄ\x00  shirt"
    once = normalise_text(messy)
    assert normalise_text(once) == once == "Blue & Red shirt"
    assert normalise_text(None) == ""  # type: ignore[arg-type]


def test_split_sentences():
    assert split_sentences("One two. Three? Four! Five; six") == ["One two.", "Three?", "Four!", "Five;", "six"]
    assert split_sentences("v1.5 inch 3.5mm jack") == ["v1.5 inch 3.5mm jack"]  # no space after the dot


# ---------------------------------------------------------------------------------- TF-IDF


def _catalogue_text(n: int = 8) -> tuple[str, list[str]]:
    """n sentences sharing a common frame; each has one word of its own."""
    own = [f"colour{i}" for i in range(n)]
    return " ".join(f"the product is great and the colour looks {w}." for w in own), own


def test_word_scores_match_a_hand_computed_tfidf():
    text, own = _catalogue_text(4)
    words, scores = word_scores(text)
    assert words == text.split()
    n = 4
    idf_everywhere = math.log((1 + n) / (1 + n)) + 1  # = 1
    idf_once = math.log((1 + n) / (1 + 1)) + 1
    by_word = dict(zip(words, scores))
    assert by_word["the"] == pytest.approx(2 * idf_everywhere)  # twice per sentence
    assert by_word["great"] == pytest.approx(1 * idf_everywhere)
    assert by_word[f"{own[0]}."] == pytest.approx(1 * idf_once)


def test_short_text_is_untouched():
    text = "Quechua Men Sweat Proof Blue T-shirt"
    assert tfidf_select(text, 6, count_words) == text
    assert tfidf_select(text, 100, count_chars) == text


def test_long_text_keeps_the_distinctive_words_in_order():
    text, own = _catalogue_text(8)
    # scores by construction: distinctive words 1 * idf_once ~ 2.5, "the" (twice per sentence)
    # 2 * 1, every other word 1 * 1. A budget of 16 words keeps the 8 distinctive words and the
    # 8 earliest of the 16 equally scored "the"s (ties go to earlier words).
    reduced = tfidf_select(text, 16, count_words)
    words = reduced.split()
    assert len(words) == 16
    assert [w for w in words if w.startswith("colour")] == [f"{w}." for w in own]  # all kept, original order
    assert [w for w in words if not w.startswith("colour")] == ["the"] * 8  # the next best word, earliest first
    assert not {"product", "is", "great", "and", "colour", "looks"} & set(words)  # common ones dropped
    # original order: the kept words are a subsequence of the text
    it = iter(text.split())
    assert all(any(w == x for x in it) for w in words)
    # the 8 "the"s are those of the first four sentences (two per sentence)
    assert reduced.startswith("the the colour0. the the colour1.")


def test_budget_smaller_than_the_distinctive_words():
    text, own = _catalogue_text(8)
    assert tfidf_select(text, 3, count_words) == "colour0. colour1. colour2."


def test_selection_respects_a_non_additive_tokenizer():
    text, _ = _catalogue_text(10)
    for budget in (5, 40, 100, 250):
        reduced = tfidf_select(text, budget, count_chars)
        assert 0 < len(reduced) <= budget
        it = iter(text.split())
        assert all(any(w == x for x in it) for w in reduced.split())


def test_single_sentence_falls_back_to_term_counts():
    text = "red red red shirt cotton"  # one document: idf is the same for all, counts decide
    assert tfidf_select(text, 3, count_words) == "red red red"


def test_prepare_texts_marks_empty_and_reduced():
    text, _ = _catalogue_text(8)
    out = prepare_texts(["  Blue <b>Shirt</b> ", "<br> &nbsp; ", text, "x" * 40], max_tokens=16, count_tokens=count_words)
    assert out.text_used[0] == "Blue Shirt" and out.reason[0] == ""
    assert out.text_used[1] == "" and out.reason[1] == "empty text"
    assert out.reduced.tolist() == [False, False, True, False]
    assert len(out.text_used[2].split()) == 16 and out.reason[2] == ""
    unreducible = prepare_texts(["y" * 40 + " " + "z" * 40], max_tokens=10, count_tokens=count_chars)
    assert unreducible.reason == ["text cannot be reduced"]


def test_word_scores_without_terms():
    words, scores = word_scores("... !!! ---")
    assert words == ["...", "!!!", "---"] and np.all(scores == 0)


def test_hidden_blocks_are_dropped_like_the_regular_expression_in_linear_time():
    """`_drop_hidden_blocks` gives exactly what re.sub with the lazy pattern gives, on random mixes of
    openers and closers; and many unclosed openers cost linear, not quadratic, time."""
    import random
    import re
    import time

    from huse_pipeline.data.text import _drop_hidden_blocks

    pattern = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
    pieces = ["<script>", "<SCRIPT x>", "</script>", "</Script >", "<style>", "</style>", "<!--", "-->", ">", "<", "a",
              " ", "\n", "<scripts>", "</script", "<script", "--", "<style a=1>"]
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        assert _drop_hidden_blocks(text) == pattern.sub(" ", text), text
    for hostile in ("<!--" * 25_000, "<script>" * 12_500, "<script" * 14_000):
        t0 = time.perf_counter()
        _drop_hidden_blocks(hostile)
        assert time.perf_counter() - t0 < 1.0  # the regular expression: about 16 s for the first


def test_prepare_texts_refuses_a_text_over_the_limit_unread():
    from huse_pipeline.data.text import MAX_TEXT_CHARS

    prepared = prepare_texts(["x" * (MAX_TEXT_CHARS + 1), "x" * MAX_TEXT_CHARS], 5, count_words)
    assert prepared.reason == [f"text too long ({MAX_TEXT_CHARS + 1:,} characters > {MAX_TEXT_CHARS:,})", ""]
    assert prepared.text_used[0] == ""
