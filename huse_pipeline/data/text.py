"""Stage one's text side: clean a catalogue text and, when it is longer than the text encoder reads,
reduce it with the paper's per-example TF-IDF token selection (§4.1.1) instead of truncating it.
"""
from __future__ import annotations

import html
import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

log = logging.getLogger(__name__)

_HIDDEN_BLOCKS = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>|<![^<>]*>")  # a tag starts with a letter: "a < b" is text
_SPACE = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
TOKEN_PATTERN = r"(?u)\b\w+\b"  # every word counts, single letters and digits too
_TERM = re.compile(TOKEN_PATTERN)

NORMALISATION = (
    "drop <script>/<style> blocks and comments; HTML tags -> space; HTML entities unescaped; "
    "unicode NFKC; control and format characters (Cc, Cf, Cs) removed, whitespace controls -> space; "
    "whitespace collapsed and stripped"
)
TFIDF_SETTINGS = {
    "sentences": "split after . ! ? ; followed by whitespace; each sentence is one document",
    "vectorizer": "sklearn TfidfVectorizer(lowercase=True, token_pattern=r'(?u)\\b\\w+\\b', norm=None): "
                  "smooth idf, raw term counts",
    "score": "a word occurrence scores tf-idf(term, its sentence) of its best term",
    "selection": "words by score (ties: earlier first) while their word pieces fit the budget, kept in original order",
}


def normalise_text(text: str) -> str:
    """Clean one catalogue text; the result may be "" (the row is then skipped as "empty text").

    In order: `<script>`/`<style>` blocks and comments dropped; every other HTML tag replaced by a
    space (so `Blue<br>Shirt` stays two words); HTML entities unescaped (`&amp;` -> `&`, `&nbsp;`
    -> no-break space); unicode NFKC (full-width letters, ligatures, no-break spaces folded);
    control, format and surrogate characters removed (tab/newline become spaces); runs of
    whitespace collapsed to one space; ends stripped.
    """
    if not isinstance(text, str):
        return ""
    text = _HIDDEN_BLOCKS.sub(" ", text)
    text = _TAG.sub(" ", text)
    text = html.unescape(text)
    text = unicodedata.normalize("NFKC", text)
    text = "".join(
        " " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf", "Cs")
    )
    return _SPACE.sub(" ", text).strip()


def split_sentences(text: str) -> list[str]:
    """Sentences of a normalised text: split after `.`, `!`, `?` or `;` followed by whitespace."""
    return [s for s in _SENTENCE_END.split(text) if s.strip()]


def word_scores(text: str) -> tuple[list[str], np.ndarray]:
    """The whitespace-separated words of `text` and each word's TF-IDF score, (n_words,) float64.

    The example's sentences are the documents: `TfidfVectorizer` (smooth idf, raw term counts, no
    normalisation) is fitted on them and gives tf-idf(term, sentence) = count of the term in that
    sentence x idf, where idf = ln((1 + n_sentences) / (1 + sentences containing the term)) + 1.
    A word occurrence scores the tf-idf of its term in ITS sentence; a word with several terms
    (`"t-shirt,"` -> `t`, `shirt`) scores its best one; a word without terms (punctuation) scores
    0. So a word found in every sentence of the example scores low, a word particular to one
    sentence scores high. A text with a single sentence falls back to term counts.
    """
    sentences = split_sentences(text)
    words = [w for s in sentences for w in s.split()]  # == text.split(): sentences split at whitespace
    try:
        vectorizer = TfidfVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN, norm=None)
        tfidf = vectorizer.fit_transform(sentences).toarray()  # (n_sentences, vocab)
    except ValueError:  # no terms at all: nothing is more important than anything else
        return words, np.zeros(len(words))
    vocab = vectorizer.vocabulary_
    scores = [
        max((tfidf[s, vocab[t]] for t in _TERM.findall(w.lower()) if t in vocab), default=0.0)
        for s, sentence in enumerate(sentences)
        for w in sentence.split()
    ]
    return words, np.asarray(scores, dtype=np.float64)


def tfidf_select(text: str, budget: int, count_tokens: Callable[[list[str]], list[int]]) -> str:
    """Reduce `text` to at most `budget` encoder word pieces with the paper's TF-IDF rule (§4.1.1).

    Exact rule: score every whitespace-separated word with `word_scores` (per-example TF-IDF,
    the example's sentences as documents). Visit the words by decreasing score (ties: earlier word
    first) and keep a word if its word pieces (`count_tokens([word])`) still fit in the budget,
    else skip it and go on with the next. Join the kept words in their ORIGINAL order with single
    spaces. If the tokenizer is not additive over words and the joined text still exceeds the
    budget, the lowest-scoring kept words are dropped until it fits. Texts within the budget are
    returned unchanged.
    """
    if count_tokens([text])[0] <= budget:
        return text
    words, scores = word_scores(text)
    costs = np.asarray(count_tokens(words), dtype=np.int64)  # (n_words,) word pieces of each word
    order = np.lexsort((np.arange(len(words)), -scores))  # by score desc, then position
    keep = np.zeros(len(words), dtype=bool)
    used = 0
    for i in order:  # greedy fill of the budget; one pass over the words of ONE text
        if used + costs[i] <= budget:
            keep[i] = True
            used += costs[i]
    while True:
        kept = np.flatnonzero(keep)
        reduced = " ".join(words[i] for i in kept)
        excess = count_tokens([reduced])[0] - budget
        if excess <= 0 or len(kept) == 0:
            return reduced
        by_score = kept[np.lexsort((-kept, scores[kept]))]  # lowest score first, later words first
        keep[by_score[:excess]] = False


@dataclass
class PreparedTexts:
    """The text stage's output for a batch of rows."""

    text_used: list[str]  # (B,) what the encoder is given ("" where the row is unusable)
    reason: list[str]  # (B,) "", "empty text" or "text cannot be reduced"
    reduced: np.ndarray  # (B,) bool: the text was longer than the budget and was reduced


def prepare_texts(texts: Sequence[str], max_tokens: int, count_tokens: Callable[[list[str]], list[int]]) -> PreparedTexts:
    """Normalise a batch of texts and TF-IDF-reduce those longer than `max_tokens` word pieces."""
    cleaned = [normalise_text(t) for t in texts]
    reason = ["" if t else "empty text" for t in cleaned]
    present = [i for i, t in enumerate(cleaned) if t]
    counts = count_tokens([cleaned[i] for i in present]) if present else []
    reduced = np.zeros(len(cleaned), dtype=bool)
    for i, n in zip(present, counts):
        if n > max_tokens:
            cleaned[i] = tfidf_select(cleaned[i], max_tokens, count_tokens)
            reduced[i] = True
            if not cleaned[i]:  # every word alone is longer than the budget
                reason[i] = "text cannot be reduced"
    return PreparedTexts(text_used=cleaned, reason=reason, reduced=reduced)


def describe(max_tokens: int) -> dict[str, Any]:
    """What the feature file records about the text preprocessing."""
    return {"normalisation": NORMALISATION, "max_tokens": max_tokens, "long_text_rule": "paper §4.1.1 per-example TF-IDF",
            "tfidf": TFIDF_SETTINGS}
