"""Engine-free SentenceKV: segmentation, sentence index, selection mechanics, attention over a selection (pure torch).

The policies themselves (what each one scores and keeps) are in ``sentencekv_vllm/policies/``; the test oracles in
``core/reference.py`` (not exported here)."""

from sentencekv_vllm.core.attention import gathered_attention
from sentencekv_vllm.core.index import (
                                        page_bounds,
                                        retention_mask,
                                        sentence_centroids,
                                        snapkv_importance,
)
from sentencekv_vllm.core.segmentation import (
                                        FixedLengthSegmenter,
                                        LengthRule,
                                        PunctSegmenter,
                                        SpacySegmenter,
                                        TokenClasses,
                                        spans_from_ends,
)
from sentencekv_vllm.core.selection import PAD_POS, SelectionBatch, UnitFeatures, group_mean_query

__all__ = [
    "FixedLengthSegmenter", "LengthRule", "PAD_POS", "PunctSegmenter", "SelectionBatch", "SpacySegmenter",
    "TokenClasses", "UnitFeatures", "gathered_attention", "group_mean_query", "page_bounds", "retention_mask",
    "sentence_centroids", "snapkv_importance", "spans_from_ends",
]
