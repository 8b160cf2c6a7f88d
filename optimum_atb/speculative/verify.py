"""Which draft tokens a row keeps, and the token the target adds after them.

Greedy: a draft token is kept while it equals the target's argmax. Sampling: the rejection rule of
Leviathan et al. 2023 (Algorithm 1) / Chen et al. 2023: keep draft token ``d ~ q`` with probability
``min(1, p(d) / q(d))``; at the first rejection draw from ``normalize(max(p - q, 0))``; when every draft
token is kept, draw a bonus token from ``p``. Every committed token is then distributed exactly as the
target alone would sample it. A deterministic draft (n-gram lookup) is the case ``q = one_hot(d)``.
"""

from __future__ import annotations

import torch


def _leading_true(ok: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading entries of the bool matrix `ok` are True."""
    return ok.to(torch.int32).cumprod(dim=1).sum(dim=1).to(torch.long)


def accept_greedy(scores: torch.Tensor, drafts: torch.Tensor, counts: torch.Tensor):
    """scores (B, k+1, V) processed target scores, drafts (B, k), counts (B,) proposed per row.

    Returns (accepted (B,), next_token (B,)).
    """
    best = scores.argmax(dim=-1)
    k = drafts.shape[1]
    ok = (drafts == best[:, :k]) & (torch.arange(k, device=drafts.device) < counts[:, None])
    accepted = _leading_true(ok)
    return accepted, best.gather(1, accepted[:, None]).squeeze(1)


def accept_sampled(
    scores: torch.Tensor, drafts: torch.Tensor, counts: torch.Tensor, draft_probs: torch.Tensor | None
):
    """Rejection sampling. `draft_probs` (B, k, V) is the draft's processed distribution per position,
    or None for a deterministic draft. Returns (accepted (B,), next_token (B,))."""
    b, k = drafts.shape
    rows = torch.arange(b, device=drafts.device)
    p = torch.softmax(scores.float(), dim=-1)
    p_draft = p[:, :k].gather(2, drafts[..., None]).squeeze(2)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(2, drafts[..., None]).squeeze(2)
    u = torch.rand(p_draft.shape, device=p.device)
    ok = (u * q_draft < p_draft) & (torch.arange(k, device=drafts.device) < counts[:, None])
    accepted = _leading_true(ok)

    p_next = p[rows, accepted]
    rejected = accepted < counts
    at = accepted.clamp(max=max(k - 1, 0))
    if k == 0:
        q_next = torch.zeros_like(p_next)
    elif draft_probs is None:
        q_next = torch.nn.functional.one_hot(drafts[rows, at], p.shape[-1]).to(p.dtype)
    else:
        q_next = draft_probs[rows, at].float()
    residual = torch.where(rejected[:, None], (p_next - q_next).clamp(min=0), p_next)
    # p == q up to rounding leaves an empty residual: the target distribution itself is then exact.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, p_next, residual)
    return accepted, torch.multinomial(residual, 1).squeeze(1)
