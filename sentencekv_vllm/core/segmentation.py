"""Sentence segmentation over token ids.

Two modes share one output format, a list of sentence *end* indices (exclusive) over the token sequence:

* ``punct``: boundaries from token ids alone. Each vocabulary entry is classified once (``TokenClasses``);
  a sentence ends after token ``i`` when ``i`` ends with ``. ! ? …`` and token ``i+1`` starts with whitespace
  (so ``3.50`` or ``e.g.x`` do not split), when ``i`` contains a blank line, when ``i`` ends with CJK ``。！？``,
  or when ``i`` ends a line and ``i+1`` starts one (paragraph). Because the decision about token ``i`` needs token
  ``i+1``, the incremental segmenter used on generated tokens closes a sentence one token late.
* ``spacy``: ``spacy.blank("en")`` + ``sentencizer`` (or a given pipeline) on the decoded text; sentence start
  characters map back to tokens through per-token character offsets. Better on ``Dr.`` / ``p.m.``; prompt only:
  generated tokens go through the ``punct`` stream (:meth:`SpacySegmenter.stream`).

Both then apply the same length rule (``LengthRule``): a candidate boundary closing a sentence shorter than
``min_len`` is skipped (the sentence continues), and a sentence reaching ``max_len`` tokens is cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

FINAL_PUNCT = (".", "!", "?", "…")
CJK_FINAL = ("。", "！", "？")
CLOSERS = "\"')]}”’»"


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the segmenters need."""

    def decode(self, ids: Sequence[int], **kwargs) -> str: ...

    def __len__(self) -> int: ...


def _strip_closers(text: str) -> str:
    """The token text without its trailing whitespace and closing quotes/brackets, in any order.

    Why: vocabularies such as Llama-3's and Qwen2.5's merge the punctuation with what follows it into one token
    (``".\n"``, ``"?\n\n"``, ``".\""``, ``".\"\n"``); the punctuation must still be seen at the end.
    """
    end = len(text)
    while end and (text[end - 1].isspace() or text[end - 1] in CLOSERS):
        end -= 1
    return text[:end]


def _ends_with_own_whitespace(text: str) -> bool:
    """Sentence-final punctuation followed, inside the same token, by whitespace (``".\n"``, ``"!\" "``): the
    look-ahead that a plain ``"."`` needs from the next token is already part of this one."""
    core = _strip_closers(text)
    return core.endswith(FINAL_PUNCT) and any(c.isspace() for c in text[len(core):])


@dataclass(frozen=True)
class TokenClasses:
    """Per-vocabulary boolean tables; index with token ids (vectorised for batches)."""

    weak_end: torch.Tensor     # ends with . ! ? … before closers/whitespace (needs whitespace after to count)
    strong_end: torch.Tensor   # contains a blank line, ends with CJK final punctuation, or with . ! ? … followed
                               # by whitespace inside the token (".\n", merged in Llama-3 / Qwen2.5 vocabularies)
    ends_newline: torch.Tensor
    starts_space: torch.Tensor
    starts_newline: torch.Tensor

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "TokenClasses":
        """Classify token strings (index = token id)."""
        def table(pred: Callable[[str], bool]) -> torch.Tensor:
            return torch.tensor([pred(t) for t in texts], dtype=torch.bool)

        return cls(
            weak_end=table(lambda t: _strip_closers(t).endswith(FINAL_PUNCT)),
            strong_end=table(lambda t: "\n\n" in t or _strip_closers(t).endswith(CJK_FINAL)
                             or _ends_with_own_whitespace(t)),
            ends_newline=table(lambda t: t.endswith("\n")),
            starts_space=table(lambda t: t[:1].isspace()),
            starts_newline=table(lambda t: t.startswith("\n")),
        )

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "TokenClasses":
        """Decode every id once; works for any HF tokenizer (byte-level BPE, sentencepiece, ...)."""
        return cls.from_texts(token_texts(tokenizer, range(len(tokenizer))))

    def candidates(self, ids: torch.Tensor, closed: bool = True) -> torch.Tensor:
        """Bool mask over ``ids``: a sentence may end after token i. ``closed``: the sequence ends after the last
        token (prompt end), so a final weak boundary needs no look-ahead."""
        ids = ids.long()
        ws_next = torch.zeros_like(ids, dtype=torch.bool)
        nl_next = torch.zeros_like(ids, dtype=torch.bool)
        if ids.numel() > 1:
            ws_next[:-1] = self.starts_space[ids[1:]]
            nl_next[:-1] = self.starts_newline[ids[1:]]
        if closed and ids.numel() > 0:
            ws_next[-1] = True
        return (self.strong_end[ids] | (self.weak_end[ids] & ws_next)
                | (self.ends_newline[ids] & nl_next))

    def pair_boundary(self, prev_id: int, next_id: int) -> bool:
        """Incremental form of :meth:`candidates`: does a sentence end after ``prev_id`` given ``next_id``?"""
        return bool(self.strong_end[prev_id]
                    or (self.weak_end[prev_id] and self.starts_space[next_id])
                    or (self.ends_newline[prev_id] and self.starts_newline[next_id]))


def token_texts(tokenizer: Tokenizer, ids: Sequence[int] | range) -> list[str]:
    """Text of each token on its own (byte-level tokens may decode to U+FFFD; lengths stay consistent)."""
    return [tokenizer.decode([int(i)], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


@dataclass(frozen=True)
class LengthRule:
    min_len: int = 4
    max_len: int = 128

    def apply(self, n_tokens: int, candidates: Sequence[int]) -> list[int]:
        """Turn candidate end indices (exclusive, ascending) into final ends; the last end is ``n_tokens``."""
        ends: list[int] = []
        start = 0
        for end in list(candidates) + [n_tokens]:
            while end - start > self.max_len:
                start += self.max_len
                ends.append(start)
            if end - start >= self.min_len or (end == n_tokens and end > start):
                if not ends or ends[-1] != end:
                    ends.append(end)
                start = end
        if ends and ends[-1] != n_tokens:
            ends.append(n_tokens)
        return ends


class PunctSegmenter:
    """Token-id segmentation; batch via :meth:`segment`, incremental via :meth:`stream`."""

    def __init__(self, classes: TokenClasses, rule: LengthRule) -> None:
        self.classes = classes
        self.rule = rule

    def segment(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        cand = (torch.nonzero(self.classes.candidates(ids_t)).flatten() + 1).tolist()
        return self.rule.apply(len(ids_t), cand)

    def stream(self, start: int = 0) -> "IncrementalSegmenter":
        return IncrementalSegmenter(self.classes, self.rule, start)


class _Stream:
    start: int
    n: int
    max_len: int        # no unit is longer (the planner relies on it: ``integration/planner._plan_decode``)

    def finish(self) -> list[int]:
        """Close the open sentence (end of the sequence)."""
        if self.n > self.start:
            self.start = self.n
            return [self.n]
        return []


class IncrementalSegmenter(_Stream):
    """Feeds tokens one at a time (decode); reports sentence ends as soon as they are decided.

    Invariant (tested): feeding ids one by one and calling :meth:`finish` yields the same ends as
    ``PunctSegmenter.segment`` on the whole list.
    """

    def __init__(self, classes: TokenClasses, rule: LengthRule, start: int = 0) -> None:
        self.classes, self.rule = classes, rule
        self.max_len = rule.max_len
        self.start = start          # index of the first token of the open sentence
        self.n = start              # tokens seen so far (absolute index of the next token)
        self.prev: int | None = None

    def push(self, token_id: int) -> list[int]:
        """Add the token at index ``self.n``; returns the sentence ends decided by it (usually none)."""
        ends: list[int] = []
        if self.prev is not None and self.classes.pair_boundary(self.prev, token_id):
            if self.n - self.start >= self.rule.min_len:
                ends.append(self.n)
                self.start = self.n
        if self.n - self.start >= self.rule.max_len:
            self.start += self.rule.max_len
            ends.append(self.start)
        self.prev = token_id
        self.n += 1
        return ends


def spacy_pipeline_missing(model: str) -> str | None:
    """Why :class:`SpacySegmenter` could not load ``model``, or None when it can: ``blank`` / ``blank:<lang>``, an
    installed pipeline package or a saved pipeline's directory. Checked without loading the pipeline, so that the
    API server can refuse a bad name at start-up instead of the worker failing at the first prompt."""
    from pathlib import Path

    if model == "blank" or model.startswith("blank:"):
        return None
    import spacy.util

    if spacy.util.is_package(model) or Path(model).expanduser().is_dir():
        return None
    return "neither an installed spaCy pipeline package nor a saved pipeline's directory"


class SpacySegmenter:
    """Prompt segmentation with spaCy, mapped back to token indices; generated tokens use the punct stream."""

    def __init__(self, tokenizer: Tokenizer, rule: LengthRule, model: str = "blank") -> None:
        import spacy

        if model == "blank":
            from spacy.pipeline import Sentencizer

            self.nlp = spacy.blank("en")
            # the default sentencizer keeps "..." and blank lines inside sentences
            punct = list(Sentencizer.default_punct_chars) + ["...", "…", "\n\n", "\n\n\n"]
            self.nlp.add_pipe("sentencizer", config={"punct_chars": punct})
        else:
            self.nlp = spacy.load(model, exclude=["ner", "lemmatizer", "textcat"])
        self.tokenizer = tokenizer
        self.rule = rule
        self._classes: TokenClasses | None = None

    def stream(self, start: int = 0) -> "IncrementalSegmenter":
        """Generated tokens arrive one at a time, where spaCy (which needs the whole text) cannot decide; they are
        segmented by the punctuation rules over token ids, with the same length rule."""
        if self._classes is None:
            self._classes = TokenClasses.from_tokenizer(self.tokenizer)
        return IncrementalSegmenter(self._classes, self.rule, start)

    def segment(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        ids = [int(i) for i in ids]
        texts = token_texts(self.tokenizer, ids)
        offsets = torch.tensor([0] + [len(t) for t in texts]).cumsum(0)  # char start of each token (+ total)
        text = "".join(texts)
        starts = [s.start_char for s in self.nlp(text).sents][1:]
        # A sentence starting inside token j starts a new sentence at token j (whitespace belongs to the left).
        tok_starts = torch.searchsorted(offsets[:-1], torch.tensor(starts, dtype=torch.long), right=True) - 1
        cand = sorted({int(t) for t in tok_starts.tolist() if 0 < t < len(ids)})
        return self.rule.apply(len(ids), cand)


def spans_from_ends(ends: Sequence[int]) -> torch.Tensor:
    """``[S, 2]`` (start, end) spans from end indices."""
    ends_t = torch.as_tensor(list(ends), dtype=torch.long)
    starts = torch.cat([ends_t.new_zeros(1), ends_t[:-1]]) if len(ends_t) else ends_t
    return torch.stack([starts, ends_t], dim=1) if len(ends_t) else torch.zeros(0, 2, dtype=torch.long)


class FixedLengthSegmenter:
    """Pages of ``size`` tokens (the ``quest`` baseline); same interface as :class:`PunctSegmenter`."""

    def __init__(self, size: int) -> None:
        self.rule = LengthRule(min_len=size, max_len=size)

    def segment(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        return self.rule.apply(len(ids), [])

    def stream(self, start: int = 0) -> "FixedLengthStream":
        return FixedLengthStream(self.rule.max_len, start)


class FixedLengthStream(_Stream):
    def __init__(self, size: int, start: int = 0) -> None:
        self.size, self.start, self.n = size, start, start
        self.max_len = size

    def push(self, token_id: int) -> list[int]:
        ends = []
        if self.n - self.start >= self.size:
            self.start = self.n
            ends.append(self.n)
        self.n += 1
        return ends
