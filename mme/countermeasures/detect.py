"""Adaptive countermeasures of ``mme attack``: find and drop a text trigger from the published
files only (the protected shards and their public ``manifest.json``).

Nothing here reads, or is handed, a private folder: the only inputs are captions and the
public trigger length ``k``. Two detectors, both fitted on the whole split first (passes over
its captions; no image is decoded) and then applied image by image:

``detect-trigger[:K]``
    Per image, the ``K``-word window that sits at the same word index ``w`` in every caption
    long enough to hold it, those being at least two and a majority of the image's captions
    (natural captions of one image vary; an inserted trigger repeats verbatim). Several such
    windows: the rarest in the corpus wins, ``sum_i log((N + V) / (c(word_i) + 1))`` with the
    counts below; then the smallest ``w``. No such window: the captions are kept. One-caption
    images are never touched.

``detect-ngram[:K]``
    Per caption, the ``K`` contiguous words whose removal makes the caption most likely under a
    word bigram model of the *other* images' captions (leave-one-image-out, so that a trigger
    repeated in the image's own captions counts as unseen). Interpolated absolute discounting
    (Ney, Essen and Kneser 1994) with an add-one unigram:

    ``P(w | v) = max(c(v, w) - D, 0) / c(v) + D * T(v) / c(v) * P1(w)``,
    ``P1(w) = (c(w) + 1) / (N + V + 1)``, ``D = 0.75``,

    ``c(w)``, ``c(v, w)``: the number of images whose captions use the word / the pair,
    ``c(v) = sum_w c(v, w)``, ``T(v)`` the distinct followers of ``v``, ``N = sum c(w)``, ``V``
    the vocabulary. The split it is fitted on carries the triggers, so it is refitted
    (:data:`NGRAM_FITS` fits in all) on the captions without the windows found so far.
    Works per caption, so it also catches triggers at different places in different captions.
    A caption of ``K`` words or fewer is kept (an empty caption is no training pair).

A removal is a *window* ``(w, k)``: words ``w .. w + k - 1`` of the whitespace-split caption.
:func:`drop_window` removes it so that a caption written by ``protected_caption(trigger, clean,
w)`` comes back as exactly ``clean``, byte for byte. Words are compared as written; corpus
counts are over lower-cased words. Counts are capped (``MAX_CORPUS_WORDS``,
``MAX_CORPUS_BIGRAMS``, ``MAX_CORPUS_CAPTIONS`` of :mod:`mme.limits`): a split over a cap is
refused, never subsampled.
"""

from __future__ import annotations

import math
import re
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mme import limits

Window = tuple[int, int]  # (first word, number of words)
WORD_RE = re.compile(r"\S+")
BOS, EOS = 0, 1  # ids of the sentence boundaries in the bigram model
SHIFT = 1 << 32  # bigram key = v * SHIFT + w (word ids stay below the caps)
DISCOUNT = 0.75


def spans(caption: str) -> list[tuple[int, int]]:
    """``(start, end)`` character offsets of each whitespace-separated word."""
    return [m.span() for m in WORD_RE.finditer(caption)]


def drop_window(caption: str, window: Window | None) -> str:
    """``caption`` without words ``w .. w + k - 1``; the exact inverse of inserting ``k`` words
    and one space before word ``w`` (or, past the last word, one space and the words at the end).
    ``None`` or a window that does not fit leaves the caption as it is."""
    if window is None:
        return caption
    w, k = window
    s = spans(caption)
    if k < 1 or w < 0 or w + k > len(s):
        return caption
    if w + k < len(s) or w == 0:  # inserted before a word: the words and the space after them
        end = s[w + k][0] if w + k < len(s) else s[w + k - 1][1] + 1
        return caption[: s[w][0]] + caption[end:]
    return caption[: s[w][0] - 1]  # appended: one space and the words


def apply(captions: list[str], windows: list[Window | None]) -> list[str]:
    """Each caption with its window dropped (:func:`drop_window`)."""
    return [drop_window(c, win) for c, win in zip(captions, windows, strict=True)]


@dataclass
class Corpus:
    """How many images use each word and word pair (lower-cased, ``<s>`` / ``</s>`` framed).

    Counted once per image, not per caption: a trigger repeated in all captions of an image then
    weighs no more than one natural phrase. ``uni``: word id -> images (``</s>`` included,
    ``<s>`` not); ``bi``: ``v * SHIFT + w`` -> images; ``hist``: ``v`` -> its pairs' counts summed
    (so that ``sum_w P(w | v) = 1``); ``types``: ``v`` -> distinct followers; ``n``: ``sum uni``.
    """

    ids: dict[str, int] = field(default_factory=lambda: {"<s>": BOS, "</s>": EOS})
    uni: Counter[int] = field(default_factory=Counter)
    bi: Counter[int] = field(default_factory=Counter)
    hist: Counter[int] = field(default_factory=Counter)
    types: Counter[int] = field(default_factory=Counter)
    n: int = 0

    def encode(self, caption: str, grow: bool = False) -> list[int]:
        """Ids of the caption's lower-cased words framed by ``<s>`` / ``</s>``; an unknown word
        gets a new id (``grow``) or one id shared by all unknown words, with no counts."""
        out = [BOS]
        for word in caption.lower().split():
            i = self.ids.get(word)
            if i is None:
                i = len(self.ids)
                if grow:
                    if i >= limits.MAX_CORPUS_WORDS:
                        raise ValueError(too_large("distinct words", "MAX_CORPUS_WORDS"))
                    self.ids[word] = i
            out.append(i)
        return out + [EOS]

    def add_image(self, captions: list[str]) -> None:
        uni, bi, hist = image_counts([self.encode(c, grow=True) for c in captions])
        self.uni.update(uni)
        self.bi.update(bi)
        self.hist.update(hist)
        self.n += len(uni)
        if len(self.bi) > limits.MAX_CORPUS_BIGRAMS:
            raise ValueError(too_large("distinct word pairs", "MAX_CORPUS_BIGRAMS"))

    def finish(self) -> Corpus:
        """Count the distinct followers of each history; call once, after the last image."""
        self.types = Counter(key // SHIFT for key in self.bi)
        return self

    def rarity(self, word: str) -> float:
        """``log((N + V) / (c(word) + 1))``: large for words that few images use."""
        i = self.ids.get(word.lower())
        count = self.uni.get(i, 0) if i is not None else 0
        return math.log((self.n + len(self.ids)) / (count + 1))


def too_large(what: str, cap: str) -> str:
    return f"the split has over {getattr(limits, cap)} {what} (mme.limits.{cap}): too large"


def image_counts(seqs: list[list[int]]) -> tuple[Counter[int], Counter[int], Counter[int]]:
    """Each word, word pair and history of one image's framed id sequences, counted once."""
    uni = Counter({w for seq in seqs for w in seq[1:]})
    bi = Counter({v * SHIFT + w for seq in seqs for v, w in zip(seq, seq[1:], strict=False)})
    hist = Counter(key // SHIFT for key in bi)
    return uni, bi, hist


def fit(images: Iterable[list[str]]) -> Corpus:
    """The corpus statistics of each image's captions (one pass; memory grows with the
    vocabulary, not with the number of captions)."""
    corpus = Corpus()
    for captions in images:
        corpus.add_image(captions)
    return corpus.finish()


# -- detect-trigger: the window repeated at one word index ------------------------------------


def consistent_window(captions: list[str], k: int, corpus: Corpus) -> int | None:
    """The word index ``w`` of the ``k``-word window shared by an image's captions (see the
    module docstring), or ``None``. Only captions that keep a word after the removal count."""
    words = [c.split() for c in captions]
    best: tuple[float, int] | None = None
    for w in range(max((len(t) for t in words), default=0) - k + 1):
        grams = {tuple(t[w : w + k]) for t in words if len(t) >= w + k and len(t) > k}
        held = sum(1 for t in words if len(t) >= w + k and len(t) > k)
        if len(grams) != 1 or held < 2 or 2 * held <= len(words):
            continue
        score = sum(corpus.rarity(x) for x in next(iter(grams)))
        if best is None or score > best[0]:
            best = (score, w)
    return None if best is None else best[1]


def window_of_image(captions: list[str], k: int, corpus: Corpus) -> list[Window | None]:
    """``detect-trigger``: the shared window of the image, in every caption that holds it."""
    w = consistent_window(captions, k, corpus)
    if w is None:
        return [None] * len(captions)
    return [(w, k) if len(c.split()) >= w + k and len(c.split()) > k else None for c in captions]


# -- detect-ngram: the k words whose removal makes the caption most likely ---------------------


@dataclass
class Held:
    """One image's own counts, subtracted from the corpus's (leave-one-image-out)."""

    uni: Counter[int]
    bi: Counter[int]
    hist: Counter[int]
    gone: Counter[int]  # v -> followers that occur only in this image's captions


def held_out(corpus: Corpus, captions: list[str]) -> Held:
    """What ``captions`` (one image, as they were added to ``corpus``) contributed to it."""
    uni, bi, hist = image_counts([corpus.encode(c) for c in captions])
    gone = Counter(key // SHIFT for key, c in bi.items() if corpus.bi.get(key, 0) == c)
    return Held(uni, bi, hist, gone)


def log_prob(corpus: Corpus, held: Held, v: int, w: int) -> float:
    """``log P(w | v)`` of the module docstring's model, without the held-out image's counts."""
    n = corpus.n - len(held.uni)
    p1 = (corpus.uni.get(w, 0) - held.uni.get(w, 0) + 1) / (n + len(corpus.ids) + 1)
    c_v = corpus.hist.get(v, 0) - held.hist.get(v, 0)
    if c_v <= 0:
        return math.log(p1)
    key = v * SHIFT + w
    c_vw = corpus.bi.get(key, 0) - held.bi.get(key, 0)
    t_v = corpus.types.get(v, 0) - held.gone.get(v, 0)
    return math.log(max(c_vw - DISCOUNT, 0) / c_v + DISCOUNT * t_v / c_v * p1)


def best_removal(seq: list[int], k: int, corpus: Corpus, held: Held) -> int | None:
    """The window start ``w`` (0: first word) that maximises the log-probability of the framed
    sequence ``seq`` without words ``w .. w + k - 1``; ties: the smallest ``w``. O(len * k)."""
    n = len(seq) - 2  # words between <s> and </s>
    if n <= k:
        return None
    lp = [0.0] + [log_prob(corpus, held, v, w) for v, w in zip(seq, seq[1:], strict=False)]
    total = sum(lp)
    best: tuple[float, int] | None = None
    for w in range(n - k + 1):  # seq[w + 1 .. w + k] are removed; lp[i] predicts seq[i]
        score = total - sum(lp[w + 1 : w + k + 2]) + log_prob(corpus, held, seq[w], seq[w + k + 1])
        if best is None or score > best[0]:
            best = (score, w)
    return None if best is None else best[1]


def ngram_windows(
    captions: list[str], k: int, corpus: Corpus, previous: list[Window | None] | None = None
) -> list[Window | None]:
    """``detect-ngram``: per caption, the most likely caption without ``k`` contiguous words.
    ``previous``: the windows the image's captions lost before they were added to ``corpus``."""
    held = held_out(corpus, apply(captions, previous) if previous else captions)
    starts = [best_removal(corpus.encode(c), k, corpus, held) for c in captions]
    return [None if w is None else (w, k) for w in starts]


# The n-gram model is fitted on the protected split itself, whose triggers reuse words across
# images (MEM's on Flickr8K: "boa" in 679 of 5,999): each refit counts the captions without the
# windows found so far, so the model drifts from the triggers towards natural text. Measured on
# the Flickr8K yardstick (docs/attacks.md): precision 0.57, 0.76, 0.80, 0.81, 0.81 after 1-5 fits
# (the whole attack with 4 fits: 14.5 s of CPU, against 4.5 s for detect-trigger).
NGRAM_FITS = 4


class NgramDetector:
    """``detect-ngram`` after :data:`NGRAM_FITS` fits; :meth:`windows` is called once per image,
    in the split's order (it walks the last fit's windows, kept as one int per caption)."""

    def __init__(self, k: int, images: Callable[[], Iterable[list[str]]], fits: int) -> None:
        self.k, self.cursor = k, 0
        self.corpus, self.previous = fit(images()), array("i")
        for _ in range(fits - 1):
            corpus, starts = Corpus(), array("i")
            for captions in images():
                found = ngram_windows(captions, k, self.corpus, self._take(captions))
                starts.extend(-1 if w is None else w[0] for w in found)
                if len(starts) > limits.MAX_CORPUS_CAPTIONS:
                    raise ValueError(too_large("captions", "MAX_CORPUS_CAPTIONS"))
                corpus.add_image(apply(captions, found))
            self.corpus, self.previous, self.cursor = corpus.finish(), starts, 0

    def _take(self, captions: list[str]) -> list[Window | None] | None:
        """The windows the image's captions lost before the last fit counted them."""
        if not self.previous:
            return None
        starts = self.previous[self.cursor : self.cursor + len(captions)]
        self.cursor += len(captions)
        return [None if w < 0 else (w, self.k) for w in starts]

    def windows(self, captions: list[str]) -> list[Window | None]:
        return ngram_windows(captions, self.k, self.corpus, self._take(captions))


class TriggerDetector:
    """``detect-trigger``: one fit (word rarity), then :func:`window_of_image` per image."""

    def __init__(self, k: int, images: Callable[[], Iterable[list[str]]]) -> None:
        self.k, self.corpus = k, fit(images())

    def windows(self, captions: list[str]) -> list[Window | None]:
        return window_of_image(captions, self.k, self.corpus)


DETECTORS = ("detect-trigger", "detect-ngram")
DEFAULT_K = 3  # when the public manifest has no trigger length


def detector(
    name: str, k: int, images: Callable[[], Iterable[list[str]]]
) -> TriggerDetector | NgramDetector:
    """A fitted detector; ``images()`` gives a fresh pass over the split's caption lists, in the
    same order each time (the detectors see nothing else)."""
    if name == "detect-trigger":
        return TriggerDetector(k, images)
    return NgramDetector(k, images, NGRAM_FITS)


def public_k(manifest: dict) -> int:
    """The public ``trigger_len`` of a protected set's manifest, else :data:`DEFAULT_K`."""
    k = manifest.get("trigger_len")
    return k if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 16 else DEFAULT_K
