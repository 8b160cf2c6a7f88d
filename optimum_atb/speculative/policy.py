"""Per-row draft length from each row's acceptance history and the measured cost of a round.

Each row keeps decayed counts of accepted draft tokens and of rejections; ``alpha = accepted /
(accepted + rejections)`` is the maximum-likelihood per-token acceptance of a geometric model. A round
proposing ``k`` tokens then yields ``(1 - alpha**(k+1)) / (1 - alpha)`` tokens on average and costs
``target(k+1 tokens per row) + k * draft_step``, both measured while generating. A row drafts the ``k``
in ``0..k_max`` with the best tokens-per-second; ``k = 0`` is plain decoding, so useless drafts switch
themselves off (a row that stays off probes with one token every ``PROBE_EVERY`` rounds).
"""

from __future__ import annotations

import torch

DECAY = 0.8
PROBE_EVERY = 16


class TargetCostModel:
    """Target forward time as ``a + b * tokens``: the slope from the prompt prefill and the decayed mean
    of the verification rounds, or a least-squares line once the rounds vary enough in width;
    ``0 <= b <= a``."""

    def __init__(self):
        self.prefill: tuple[float, float] | None = None
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self.prefill = (float(tokens), seconds)

    def observe(self, tokens: int, seconds: float) -> None:
        d = 0.9
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + tokens, d * self.sy + seconds
        self.sxx, self.sxy = d * self.sxx + tokens * tokens, d * self.sxy + tokens * seconds

    def line(self) -> tuple[float, float] | None:
        """(a, b) or None before the first round."""
        if self.n == 0:
            return None
        mx, my = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mx * mx
        if var > 0.25:
            b = (self.sxy / self.n - mx * my) / var
        elif self.prefill is not None and self.prefill[0] > mx + 1:
            b = (self.prefill[1] - my) / (self.prefill[0] - mx)
        else:
            b = 0.0
        a = max(my - max(b, 0.0) * mx, 1e-6)
        # Timing noise on shared machines can fake a steep slope; an extra verified token never costs
        # more than a whole decode step (decode is bound by reading the weights once).
        b = min(max(b, 0.0), a)
        return max(my - b * mx, 1e-6), b


class DraftLengthPolicy:
    """Chooses how many tokens each row drafts in the next round."""

    def __init__(self, batch: int, k_max: int, device: torch.device, fixed: bool = False):
        self.k_max = k_max
        self.fixed = fixed
        self.accepted = torch.full((batch,), 2.0, device=device)
        self.rejected = torch.ones(batch, device=device)
        self.idle = torch.zeros(batch, dtype=torch.long, device=device)
        self.target = TargetCostModel()
        self.draft_step_s: float | None = None

    def observe_draft(self, steps: int, seconds: float) -> None:
        if steps:
            t = seconds / steps
            self.draft_step_s = t if self.draft_step_s is None else 0.7 * self.draft_step_s + 0.3 * t

    def lengths(self, rows: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
        """Draft length of each of `rows` (indices into the whole batch), at most `room` per row."""
        if self.fixed:
            return room.clamp(min=0, max=self.k_max)
        line = self.target.line()
        if line is None:  # first round: no timing yet, start moderately
            k = torch.full_like(room, min(4, self.k_max))
        else:
            a, b = line
            active = rows.numel()
            ks = torch.arange(self.k_max + 1, device=room.device, dtype=torch.float32)
            cost = a + b * active * (ks + 1) + ks * (self.draft_step_s or 0.0)
            alpha = (self.accepted[rows] / (self.accepted[rows] + self.rejected[rows])).clamp(max=0.98)
            gain = (1 - alpha[:, None] ** (ks + 1)) / (1 - alpha[:, None])
            k = (gain / cost.clamp(min=1e-9)).argmax(dim=1)
            probe = (k == 0) & (self.idle[rows] >= PROBE_EVERY)
            k = torch.where(probe, torch.ones_like(k), k)
        return torch.minimum(k, room.clamp(min=0))

    def update(self, rows: torch.Tensor, proposed: torch.Tensor, accepted: torch.Tensor) -> None:
        """Record a round: rows that proposed nothing keep their history (and count idle rounds)."""
        drafted = proposed > 0
        a = self.accepted[rows]
        r = self.rejected[rows]
        self.accepted[rows] = torch.where(drafted, DECAY * a + accepted, a)
        self.rejected[rows] = torch.where(drafted, DECAY * r + (accepted < proposed).float(), r)
        self.idle[rows] = torch.where(drafted, torch.zeros_like(self.idle[rows]), self.idle[rows] + 1)
