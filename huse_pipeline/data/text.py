"""Stage one's text side: clean a catalogue text and, when it is longer than the text encoder reads,
reduce it with the paper's per-example TF-IDF token selection (§4.1.1) instead of truncating it.
Every step is linear in the text's length (a hostile text costs time in proportion, never more),
and texts over MAX_TEXT_CHARS characters are refused with a reason.
"""
from __future__ import annotations

import html
import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 100_000  # longer raw texts are skipped ("text too long"): no product text is this long
# the start of a <script>/<style> block or a comment; its end is looked for by _drop_hidden_blocks
_HIDDEN_START = re.compile(r"<(?:(script|style)\b|!--)", re.IGNORECASE)
_HIDDEN_END = {"script": re.compile(r"</script\s*>", re.IGNORECASE), "style": re.compile(r"</style\s*>", re.IGNORECASE)}
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
    "max_text_chars": MAX_TEXT_CHARS,
}


def _drop_hidden_blocks(text: str) -> str:
    """Replace each `<script ...>...</script>`, `<style ...>...</style>` (case-insensitive) and
    `<!--...-->` by a space, leftmost first, each ending at its first closing tag; an opening tag
    without a closing one is left for the tag rule. Linear time: the regular expression
    `<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->` gives the same result but rescans the rest of the
    text from every unclosed opening tag, quadratic in a text of many `<!--`."""
    out, kept_to, pos = [], 0, 0
    next_gt = -2  # the first ">" after the last script/style opener looked at (-1: none; -2: not yet)
    unclosed: set[str] = set()  # kinds with no closing tag after the last opener tried: none later either
    while (m := _HIDDEN_START.search(text, pos)) is not None:
        kind = m.group(1).lower() if m.group(1) else "--"
        if kind in unclosed:
            pos = m.start() + 1
            continue
        if kind == "--":
            body = m.end()
            end = text.find("-->", body)
            end = end + 3 if end >= 0 else -1
        else:
            if next_gt == -2 or (next_gt >= 0 and next_gt < m.end()):
                next_gt = text.find(">", m.end())
            if next_gt < 0:  # no ">" after this opener: neither script nor style can open any more
                unclosed.update(("script", "style"))
                pos = m.start() + 1
                continue
            closing = _HIDDEN_END[kind].search(text, next_gt + 1)
            end = closing.end() if closing else -1
        if end < 0:
            unclosed.add(kind)
            pos = m.start() + 1
            continue
        out += [text[kept_to:m.start()], " "]
        kept_to = pos = end
    out.append(text[kept_to:])
    return "".join(out)


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
    text = _drop_hidden_blocks(text)
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
    from sklearn.feature_extraction.text import TfidfVectorizer  # here: the catalogue reader needs no sklearn

    sentences = split_sentences(text)
    words = [w for s in sentences for w in s.split()]  # == text.split(): sentences split at whitespace
    try:
        vectorizer = TfidfVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN, norm=None)
        tfidf = vectorizer.fit_transform(sentences).tocsr()  # (n_sentences, vocab), sparse: memory ~ words
    except ValueError:  # no terms at all: nothing is more important than anything else
        return words, np.zeros(len(words))
    vocab = vectorizer.vocabulary_
    scores = []
    for s, sentence in enumerate(sentences):
        lo, hi = tfidf.indptr[s], tfidf.indptr[s + 1]
        row = dict(zip(tfidf.indices[lo:hi].tolist(), tfidf.data[lo:hi].tolist()))  # this sentence's terms
        scores += [max((row.get(vocab[t], 0.0) for t in _TERM.findall(w.lower()) if t in vocab), default=0.0)
                   for w in sentence.split()]
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
    reason: list[str]  # (B,) "", "empty text", "text too long (...)" or "text cannot be reduced"
    reduced: np.ndarray  # (B,) bool: the text was longer than the budget and was reduced


def prepare_texts(texts: Sequence[str], max_tokens: int, count_tokens: Callable[[list[str]], list[int]]) -> PreparedTexts:
    """Normalise a batch of texts and TF-IDF-reduce those longer than `max_tokens` word pieces.
    A raw text over MAX_TEXT_CHARS characters is not looked at: its reason is "text too long"."""
    too_long = [isinstance(t, str) and len(t) > MAX_TEXT_CHARS for t in texts]
    cleaned = ["" if long else normalise_text(t) for t, long in zip(texts, too_long)]
    reason = [f"text too long ({len(t):,} characters > {MAX_TEXT_CHARS:,})" if long else "" if c else "empty text"
              for t, c, long in zip(texts, cleaned, too_long)]
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
