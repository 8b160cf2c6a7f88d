"""Per-row draft length from each row's acceptance history and the measured cost of a round.

Each row keeps decayed counts of accepted draft tokens and of rejections; ``alpha = accepted /
(accepted + rejections)`` is the maximum-likelihood per-token acceptance of a geometric model. A round
proposing ``k`` tokens then yields ``(1 - alpha**(k+1)) / (1 - alpha)`` tokens on average and costs
``target(k+1 tokens per row) + k * draft_step``, both measured while generating (the target per forward
width, see :class:`TargetCostModel`; the draft step only in rounds whose first draft forward caught up on at
most two tokens: a draft that sat idle first catches up on every token it missed). A row drafts the ``k``
in ``0..k_max`` with the best tokens-per-second; ``k = 0`` is plain decoding, so useless drafts switch
themselves off (a row that stays off probes with one token after ``PROBE_EVERY`` idle rounds, twice as many
after each rejected probe, back to ``PROBE_EVERY`` after a fully accepted round; no probe when drafting
could not pay even at the best acceptance: then the target's cost keeps it off, not the draft).

The model leaves costs out (a draft catching up after idle rounds, bookkeeping, rows drafting different
lengths in one shared-width verify), and a width not seen yet is tried once per call. So a guard over the
whole batch, :class:`RoundRateGuard`, compares what rounds really cost per committed token, drafting
(``JUDGE_ROUNDS`` rounds at a time, not counting a draft's catch-up after idle rounds) against plain (if no
plain round was timed yet, one is run): when drafting rounds turn out slower, drafting is suspended
(no drafts, no probes) for ``HOLD_ROUNDS`` rounds, twice as long each time it is found slower again
(at most ``MAX_HOLD_ROUNDS``). On a 2-core CPU at batch 4 a verify of ``k + 1`` columns costs nearly
``k + 1`` plain steps (the matmuls are compute-bound there), so the guard is what keeps speculation from
falling far below plain decoding.
"""

from __future__ import annotations

import torch

DECAY = 0.8
PROBE_EVERY = 4  # idle rounds before a probe; doubles after each rejected probe
MAX_ALPHA = 0.98  # acceptance estimates are capped here (a geometric run never has certain acceptance)
JUDGE_ROUNDS = 3  # drafting rounds timed together before the guard compares them with plain rounds
HOLD_ROUNDS = 8  # rounds drafting stays suspended after drafting rounds were found slower than plain ones
MAX_HOLD_ROUNDS = 128


class TargetCostModel:
    """Time of a target forward over ``tokens`` tokens (rows x columns), measured while generating.

    Each width seen keeps a decayed mean of its rounds. The cost is not linear in the width on a CPU:
    up to a few tokens a forward streams the weights once (barely dearer than one token), past that the
    matmuls become compute-bound (measured on SmolLM2 fp32: 23-26 ms for 1-4 tokens, 46 ms for 5-8). A
    width not seen yet is estimated optimistically, so that it gets tried once and then measured: as the
    nearest narrower width seen (a forward is never cheaper than a narrower one), in proportion to the
    narrowest seen below all of them, and above the widest seen growing at the prefill's per-token rate.
    """

    def __init__(self):
        self.prefill: tuple[int, float] | None = None
        self.seen: dict[int, float] = {}

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self.prefill = (tokens, seconds)

    def observe(self, tokens: int, seconds: float) -> None:
        old = self.seen.get(tokens)
        self.seen[tokens] = seconds if old is None else DECAY * old + (1 - DECAY) * seconds

    def _slope_above(self, widest: int) -> float:
        """Seconds per token past the widest width seen: the prefill's rate, at most a whole forward."""
        top = self.seen[widest]
        if self.prefill is None or self.prefill[0] <= widest:
            return top / widest
        return min(max((self.prefill[1] - top) / (self.prefill[0] - widest), 0.0), self.seen[min(self.seen)])

    def cost(self, tokens: list[int]) -> list[float] | None:
        """Estimated seconds of a forward over each width in `tokens`; None before the first round."""
        if not self.seen:
            return None
        widths = sorted(self.seen)
        out = []
        for w in tokens:
            if w in self.seen:
                out.append(self.seen[w])
            elif w < widths[0]:
                out.append(self.seen[widths[0]] * w / widths[0])
            elif w > widths[-1]:
                out.append(self.seen[widths[-1]] + (w - widths[-1]) * self._slope_above(widths[-1]))
            else:
                out.append(self.seen[max(x for x in widths if x < w)])
        return out


class RoundRateGuard:
    """Wall seconds per committed token of drafting rounds and of plain rounds, measured whole (draft,
    verify, bookkeeping); suspends drafting while it is the slower of the two.

    Drafting is judged over ``JUDGE_ROUNDS`` drafting rounds at a time (one round is too noisy: a single
    rejection or a slow step would switch off a draft that pays), leaving out rounds whose draft first
    caught up on a backlog (after a suspension it has missed every token: that one-off cost is not what
    drafting costs per round)."""

    def __init__(self):
        self.plain_s: float | None = None  # decayed seconds per token of rounds without drafts
        self.window_s, self.window_tokens = 0.0, 0  # drafting rounds not judged yet: seconds, tokens
        self.judged = 0  # drafting rounds in the window
        self.hold = HOLD_ROUNDS
        self.suspended = 0  # rounds left without drafting
        self.suspensions = 0

    def observe(self, drafted: bool, seconds: float, tokens: int, caught_up: bool = False) -> None:
        """Record a round (not one that compiled a graph) that committed `tokens` tokens in all rows;
        `caught_up`: its draft first caught up on a backlog of missed tokens."""
        if tokens <= 0:
            return
        if not drafted:
            rate = seconds / tokens
            self.plain_s = rate if self.plain_s is None else DECAY * self.plain_s + (1 - DECAY) * rate
            self.suspended = max(self.suspended - 1, 0)
            return
        if caught_up:
            return
        self.window_s += seconds
        self.window_tokens += tokens
        self.judged += 1
        if self.judged < JUDGE_ROUNDS:
            return
        if self.plain_s is None:  # nothing to compare against yet: the next round runs plain, measured
            self.suspended = 1
            return
        slower = self.window_s / self.window_tokens > self.plain_s
        self.window_s, self.window_tokens, self.judged = 0.0, 0, 0
        if slower:
            self.suspended, self.hold = self.hold, min(2 * self.hold, MAX_HOLD_ROUNDS)
            self.suspensions += 1
        else:
            self.hold = HOLD_ROUNDS


class DraftLengthPolicy:
    """Chooses how many tokens each row drafts in the next round."""

    def __init__(self, batch: int, k_max: int, device: torch.device, fixed: bool = False):
        self.k_max = k_max
        self.fixed = fixed
        self.accepted = torch.full((batch,), 2.0, device=device)
        self.rejected = torch.ones(batch, device=device)
        self.idle = torch.zeros(batch, dtype=torch.long, device=device)
        self.probe_every = torch.full((batch,), PROBE_EVERY, dtype=torch.long, device=device)
        self.target = TargetCostModel()
        self.draft_step_s: float | None = None
        self.guard = RoundRateGuard()

    def observe_draft(self, steps: int, seconds: float) -> None:
        if steps:
            t = seconds / steps
            self.draft_step_s = t if self.draft_step_s is None else 0.7 * self.draft_step_s + 0.3 * t

    def lengths(self, rows: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
        """Draft length of each of `rows` (indices into the whole batch), at most `room` per row."""
        if self.fixed:
            return room.clamp(min=0, max=self.k_max)
        if self.guard.suspended:
            return torch.zeros_like(room)
        active = rows.numel()
        verify = self.target.cost([active * (k + 1) for k in range(self.k_max + 1)])
        if verify is None:  # first round: no timing yet; one token times a draft step and a narrow verify
            k = torch.full_like(room, min(1, self.k_max))
        else:
            ks = torch.arange(self.k_max + 1, device=room.device, dtype=torch.float32)
            cost = torch.tensor(verify, device=room.device) + ks * (self.draft_step_s or 0.0)
            alpha = (self.accepted[rows] / (self.accepted[rows] + self.rejected[rows])).clamp(max=MAX_ALPHA)
            k = self._best(alpha, ks, cost)
            # Probe a row that stays off, unless drafting would not pay even if every draft were accepted
            # (then the target's cost, not the draft's quality, keeps it off, and a probe only costs).
            probe = (k == 0) & (self.idle[rows] >= self.probe_every[rows])
            if probe.any() and self._best(torch.full((1,), MAX_ALPHA, device=ks.device), ks, cost).item() > 0:
                k = torch.where(probe, torch.ones_like(k), k)
        return torch.minimum(k, room.clamp(min=0))

    @staticmethod
    def _best(alpha: torch.Tensor, ks: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
        """The k with the most expected tokens per second for each acceptance in `alpha`."""
        gain = (1 - alpha[:, None] ** (ks + 1)) / (1 - alpha[:, None])
        return (gain / cost.clamp(min=1e-9)).argmax(dim=1)

    def update(self, rows: torch.Tensor, proposed: torch.Tensor, accepted: torch.Tensor) -> None:
        """Record a round: rows that proposed nothing keep their history (and count idle rounds)."""
        drafted = proposed > 0
        # A rejected probe doubles the row's wait before the next one (a probe after idle rounds makes a
        # draft model catch up on every token it missed); a fully accepted round resets it.
        every, missed = self.probe_every[rows], accepted < proposed
        was_probe = drafted & (self.idle[rows] >= every)
        self.probe_every[rows] = torch.where(
            drafted & ~missed, PROBE_EVERY, torch.where(was_probe & missed, 2 * every, every)
        )
        a = self.accepted[rows]
        r = self.rejected[rows]
        self.accepted[rows] = torch.where(drafted, DECAY * a + accepted, a)
        self.rejected[rows] = torch.where(drafted, DECAY * r + missed.float(), r)
        self.idle[rows] = torch.where(drafted, torch.zeros_like(self.idle[rows]), self.idle[rows] + 1)
