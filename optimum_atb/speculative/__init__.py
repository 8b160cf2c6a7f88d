"""Speculative decoding: lossless (greedy and sampled), batched with per-row acceptance, adaptive draft
length. Draft sources: any causal LM with the target's vocabulary, a quantized copy of the target
(:func:`draft_from`), or n-gram prompt lookup. See docs/speculative.md.
"""

from .drafts import compile_draft, draft_from
from .errors import SpeculativeDecodingError
from .hooks import attach, detach, is_attached
from .stats import SpeculativeStats

__all__ = [
    "SpeculativeDecodingError",
    "SpeculativeStats",
    "attach",
    "compile_draft",
    "detach",
    "draft_from",
    "is_attached",
]
