"""Engine-free SentenceKV: segmentation, sentence index, selection mechanics, reference attention (pure torch).

The policies themselves (what each one scores and keeps) are in ``sentencekv_vllm/policies/``."""

from sentencekv_vllm.core.attention import gather_selected, gathered_attention, masked_attention
from sentencekv_vllm.core.index import (
                                        RunningMean,
                                        SentenceIndex,
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
    "FixedLengthSegmenter", "LengthRule", "PAD_POS", "PunctSegmenter", "RunningMean", "SelectionBatch",
    "SentenceIndex", "SpacySegmenter", "TokenClasses", "UnitFeatures", "gather_selected", "gathered_attention",
    "group_mean_query", "masked_attention", "page_bounds", "retention_mask", "sentence_centroids",
    "snapkv_importance", "spans_from_ends",
]
