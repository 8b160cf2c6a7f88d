"""What the last speculative `generate()` did, read from ``model.atb_speculative_stats``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpeculativeStats:
    """Counters of one speculative `generate()` call (all rows together).

    ``row_rounds`` counts one per active row per target verification forward, so
    ``tokens_per_target_forward`` is the mean number of tokens a row gains per target forward
    (1.0 = plain decoding). Times are wall seconds spent in draft proposals and target verification.
    ``suspensions`` counts the times drafting was switched off for the whole batch because drafting
    rounds were measured slower per token than plain ones (docs/speculative.md).
    """

    source: str = ""
    rounds: int = 0
    row_rounds: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    new_tokens: int = 0
    draft_forwards: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    total_time_s: float = 0.0
    suspensions: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens (0.0 when nothing was proposed)."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        """New tokens per row per target forward (prompt prefill not counted)."""
        return self.new_tokens / self.row_rounds if self.row_rounds else 0.0

    def as_dict(self) -> dict:
        return {
            **self.__dict__,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_target_forward": self.tokens_per_target_forward,
        }
