"""Issue #13 items 2 and 8: segmentation with merged punctuation tokens (Llama-3 / Qwen2.5 style vocabularies)
and the spaCy mode's stream over generated tokens.

Llama-3 and Qwen2.5 have single tokens such as ``".\\n"``, ``"?\\n\\n"``, ``".\\""`` and ``".\\"\\n"``; no such
tokenizer is available offline, so a constructed vocabulary with those entries is tokenized by greedy longest match
(what BPE produces for these strings) and runs through the same classification as a real tokenizer
(``TokenClasses.from_tokenizer``: every id decoded on its own).
"""

from __future__ import annotations

import pytest

from sentencekv_vllm.core.segmentation import (
    IncrementalSegmenter,
    LengthRule,
    PunctSegmenter,
    SpacySegmenter,
    TokenClasses,
    spans_from_ends,
)

RULE = LengthRule(min_len=2, max_len=128)

# Merged punctuation entries taken from the Llama-3 / Qwen2.5 vocabularies (as decoded strings).
MERGED = [".\n", ".\n\n", "?\n", "?\n\n", "!\n", ".\"", ".\"\n", "?\"", ".)", ".”", "。\n", ":\n"]
WORDS = ["The", " cat", " sat", " on", " the", " mat", "Was", " it", " happy", "Yes", " He", " said", " so",
         "It", " purred", " loudly", " x", " =", " 3", ".", "5", " e", "g", " a", " dog", "我", "很", "好", " \"",
         "\"", " ", "\n", "Items", "1", " one", "He", " It", " (", "on", " mat"]
# every single character too, so any test text encodes (as byte-level BPE falls back to bytes)
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "。"]


class VocabTokenizer:
    """A real-shaped tokenizer over a fixed vocabulary: greedy longest match, like BPE on these strings."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = list(dict.fromkeys(vocab))
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        self.longest = max(map(len, self.vocab))

    def __len__(self) -> int:
        return len(self.vocab)

    def decode(self, ids, **kwargs) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            for n in range(min(self.longest, len(text) - i), 0, -1):
                if text[i:i + n] in self.ids:
                    out.append(self.ids[text[i:i + n]])
                    i += n
                    break
            else:
                raise ValueError(f"no token for {text[i:]!r}")
        return out


@pytest.fixture(scope="module")
def tok() -> VocabTokenizer:
    return VocabTokenizer(WORDS + MERGED + CHARS)


@pytest.fixture(scope="module")
def seg(tok) -> PunctSegmenter:
    return PunctSegmenter(TokenClasses.from_tokenizer(tok), RULE)


def split(tok, seg, text: str) -> list[str]:
    ids = tok.encode(text)
    return [tok.decode(ids[s:e]) for s, e in spans_from_ends(seg.segment(ids)).tolist()]


def streamed(seg, ids: list[int], start: int = 0) -> list[int]:
    stream = seg.stream(start=start)
    ends = [e for i in ids for e in stream.push(i)]
    return ends + stream.finish()


@pytest.mark.parametrize("text,expected", [
    ("The cat sat.\nThe cat sat.", ["The cat sat.\n", "The cat sat."]),
    ("Was it happy?\n\nYes it sat.", ["Was it happy?\n\n", "Yes it sat."]),
    ("Was it happy?\nYes it sat.", ["Was it happy?\n", "Yes it sat."]),
    ("The cat sat!\nHe said so.", ["The cat sat!\n", "He said so."]),
    ("He said \"The cat sat.\"\nIt purred loudly.", ["He said \"The cat sat.\"\n", "It purred loudly."]),
    ("He said \"The cat sat.\" It purred loudly.", ["He said \"The cat sat.\"", " It purred loudly."]),
    ("The cat sat (on the mat.) It purred.", ["The cat sat (on the mat.)", " It purred."]),
    ("我很好。\n我很好。", ["我很好。\n", "我很好。"]),
])
def test_merged_punctuation_tokens_close_sentences(tok, seg, text, expected):
    assert split(tok, seg, text) == expected


def test_merged_tokens_are_whole_tokens(tok):
    """The test exercises what it claims: each merged string is one token here."""
    for text in (".\n", "?\n\n", ".\"", ".\"\n", "。\n"):
        assert len(tok.encode(text)) == 1


def test_colon_newline_and_decimals_do_not_close(tok, seg):
    assert split(tok, seg, "Items:\n1 one") == ["Items:\n1 one"]
    assert split(tok, seg, "x = 3.5 e.g a dog.") == ["x = 3.5 e.g a dog."]


def test_stream_matches_batch_on_merged_tokens(tok, seg):
    ids = tok.encode("The cat sat.\nWas it happy?\n\nYes it sat.\"\nHe said so.) It purred.\nThe cat sat")
    assert streamed(seg, ids) == seg.segment(ids)
    assert len(seg.segment(ids)) == 6


# -- item 2: the spaCy mode segments generated text with the punct stream ------------------------------------

@pytest.fixture(scope="module")
def spacy_seg(tok) -> SpacySegmenter:
    return SpacySegmenter(tok, RULE)


def test_spacy_segmenter_has_a_stream_for_generated_tokens(tok, spacy_seg):
    """``state.new_stream`` calls ``segmenter.stream(start=prompt_len)`` once the prefill is done."""
    prompt = tok.encode("The cat sat. He said so.")
    generated = tok.encode(" It purred loudly.\nThe cat sat on the mat.")
    stream = spacy_seg.stream(start=len(prompt))
    assert isinstance(stream, IncrementalSegmenter)
    stream.prev = prompt[-1]
    ends = [e for i in generated for e in stream.push(i)] + stream.finish()
    text = [tok.decode((prompt + generated)[s:e]) for s, e in zip([len(prompt)] + ends[:-1], ends, strict=True)]
    assert text == [" It purred loudly.\n", "The cat sat on the mat."]


def test_spacy_stream_agrees_with_punct_stream(tok, seg, spacy_seg):
    ids = tok.encode("The cat sat.\nWas it happy?\n\nYes it sat.\"\nHe said so.")
    assert streamed(spacy_seg, ids, 0) == streamed(seg, ids, 0)
