"""The speculative decoding loop, run by ``generate()`` as its decoding method (``custom_generate``).

transformers prepares everything before the loop (generation config, inputs and attention mask, logits
processors and warpers, stopping criteria); this module only decides tokens. Each round, for the rows
still running: the draft proposes up to ``k_row`` tokens, the target scores the row's last committed token
plus all drafts in one forward, each row keeps its accepted prefix plus one target token, stopping
criteria cut each row's run at its first stop, and finished rows leave the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from .errors import SpeculativeDecodingError
from .policy import DraftLengthPolicy
from .slots import SlotCache
from .static_slots import StaticSlotCache, capacity_for, compiled_forward
from .stats import SpeculativeStats
from .verify import accept_greedy, accept_sampled

# Processors whose output does not depend on the tokens so far: applied to all positions in one call.
_TOKEN_FREE = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
)
_CONSUMED = ("attention_mask", "position_ids", "cache", "use_cache", "logits_to_keep")


def _sync(device: torch.device) -> None:
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


@dataclass
class RoundView:
    """The active rows of one round, as drafts and the verifier see them."""

    tokens: torch.Tensor  # (batch, capacity) committed tokens of every row, then scratch space
    rows: torch.Tensor  # (active,) indices of the active rows in `tokens`
    length: torch.Tensor  # (active,) committed tokens per active row (left padding included)
    start: torch.Tensor  # (active,) index of each row's first real (non-padding) token
    processors: object
    do_sample: bool

    def score(self, logits: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Processed float32 scores (n, V) of `logits` (n, V) predicting the token after ``prefix[i]`` tokens."""
        return self.score_positions(logits[:, None], prefix)[:, 0]

    def score_positions(self, logits: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Like :meth:`score` for (n, W, V) logits, column j following ``prefix + j`` tokens."""
        logits = logits.float()
        if not self.processors:
            return logits
        n, w, v = logits.shape
        if all(isinstance(p, _TOKEN_FREE) for p in self.processors):
            dummy = torch.zeros(n * w, 1, dtype=torch.long, device=logits.device)
            return self.processors(dummy, logits.reshape(n * w, v)).reshape(n, w, v)
        out = torch.empty_like(logits)
        for j in range(w):
            ends = prefix + j
            for end in ends.unique().tolist():
                sel = (ends == end).nonzero().squeeze(1)
                out[sel, j] = self.processors(self.tokens[self.rows[sel], :end], logits[sel, j])
        return out


def _stop_points(stopping_criteria, view: RoundView, run: torch.Tensor):
    """Cut each row's new run of `run` tokens at its first stop. Returns (kept tokens, finished)."""
    kept = run.clone()
    done = torch.zeros_like(run, dtype=torch.bool)
    for p in range(1, int(run.max()) + 1):
        live = ~done & (p <= run)
        if not live.any():
            break
        ends = view.length + p
        for end in ends[live].unique().tolist():
            sel = (live & (ends == end)).nonzero().squeeze(1)
            hit = stopping_criteria(view.tokens[view.rows[sel], :end], None).to(sel.device)
            stop = sel[hit.bool().expand(sel.shape[0])]
            done[stop] = True
            kept[stop] = p
    return kept, done


def speculative_generate(
    model,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    atb_draft=None,
    atb_streamer=None,
    atb_fixed_length: bool = False,
    **model_kwargs,
):
    """Decoding method passed to ``generate(custom_generate=...)`` by the hook in :mod:`.hooks`."""
    for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(generation_config, flag, False):
            raise SpeculativeDecodingError(f"speculative decoding does not support {flag}=True")
    if generation_config.num_beams > 1:
        raise SpeculativeDecodingError("speculative decoding does not support beam search (num_beams > 1)")
    extra = sorted(k for k, v in model_kwargs.items() if k not in _CONSUMED and v is not None)
    if extra:
        raise SpeculativeDecodingError(f"speculative decoding does not support the model inputs {extra}")
    t_start = time.perf_counter()
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    mask = model_kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask.to(torch.long)
    cache = model_kwargs.get("cache")
    if cache is not None and cache.get_seq_length() > 0:
        raise SpeculativeDecodingError("speculative decoding starts from an empty cache")
    pad = generation_config._pad_token_tensor
    pad_id = int(pad) if pad is not None else 0
    max_length = generation_config.max_length
    draft = atb_draft
    stats = SpeculativeStats(source=draft.source)
    policy = DraftLengthPolicy(batch, draft.k_max, device, fixed=atb_fixed_length)

    tokens = torch.full((batch, max_length + draft.k_max + 2), pad_id, dtype=torch.long, device=device)
    tokens[:, :prompt_len] = input_ids
    length = torch.full((batch,), prompt_len, dtype=torch.long, device=device)
    start = (mask.cumsum(1) == 0).sum(1)
    active = torch.arange(batch, device=device)

    # Prefill every prompt token but the last: each round feeds the last committed token plus drafts.
    compiled = compiled_forward(model)  # to_atb(compile=True)
    if compiled is not None and (cache is None or isinstance(cache, StaticCache)):
        target = StaticSlotCache(model, compiled, batch, capacity_for(max_length, draft.k_max), device)
    else:
        target = SlotCache(
            model, cache if cache is not None else DynamicCache(config=model.config), batch, device
        )
    if prompt_len > 1:
        t0 = time.perf_counter()
        target.forward(input_ids[:, :-1], mask[:, :-1], keep=1)
        _sync(device)
        policy.target.observe_prefill(batch * (prompt_len - 1), time.perf_counter() - t0)
    t0 = time.perf_counter()
    draft.start(input_ids, mask, max_length)
    stats.draft_time_s += time.perf_counter() - t0

    while active.numel():
        t_round = time.perf_counter()
        view = RoundView(
            tokens, active, length[active], start[active], logits_processor, generation_config.do_sample
        )
        room = max_length - view.length - 1
        wanted = policy.lengths(active, room)
        k = 0
        drafts = probs = None
        proposed = torch.zeros_like(wanted)
        if int(wanted.max()) > 0:
            t0 = time.perf_counter()
            drafts, probs, proposed, forwards = draft.propose(view, wanted)
            _sync(device)
            spent = time.perf_counter() - t0
            if draft.timed:  # not after catching up on a backlog or compiling
                policy.observe_draft(forwards, spent)
            stats.draft_time_s += spent
            stats.draft_forwards += forwards
            k = int(proposed.max())
            drafts = drafts[:, :k]
            probs = probs[:, :k] if probs is not None else None

        # Verify: the last committed token and all drafts in one target forward.
        t0 = time.perf_counter()
        cols = torch.arange(k + 1, device=device)
        ids = tokens[active[:, None], view.length[:, None] - 1 + cols]
        before = target.lengths.clone()
        logits = target.forward(ids, cols <= proposed[:, None], keep=k + 1)
        scores = view.score_positions(logits, view.length)
        if generation_config.do_sample:
            accepted, bonus = accept_sampled(scores, drafts if k else ids[:, :0], proposed, probs)
        else:
            accepted, bonus = accept_greedy(scores, drafts if k else ids[:, :0], proposed)
        tokens[active, view.length + accepted] = bonus
        _sync(device)
        spent = time.perf_counter() - t0
        if not target.new_graph:  # compile time is not a verify's cost
            policy.target.observe(active.numel() * (k + 1), spent)
        stats.verify_time_s += spent

        target.truncate(before + 1 + accepted)
        if k:
            draft.commit(accepted)
        policy.update(active, proposed, accepted)
        kept, finished = _stop_points(stopping_criteria, view, accepted + 1)
        if atb_streamer is not None:
            atb_streamer.put(tokens[active[0], view.length[0] : view.length[0] + kept[0]].cpu())
        length[active] = view.length + kept
        stats.rounds += 1
        stats.row_rounds += active.numel()
        stats.proposed_tokens += int(proposed.sum())
        stats.accepted_tokens += int(accepted.sum())
        new_tokens = int(kept.sum())
        stats.new_tokens += new_tokens
        if not (target.new_graph or (k and draft.compiled_now)):  # compiling is not a round's cost
            policy.guard.observe(
                k > 0, time.perf_counter() - t_round, new_tokens, bool(k) and draft.caught_up
            )
        if finished.any():
            keep = (~finished).nonzero().squeeze(1)
            active = active[keep]
            if keep.numel():
                target.select(keep)
                draft.select(keep)

    if atb_streamer is not None:
        atb_streamer.end()
    end = int(length.max())
    out = tokens[:, :end].clone()
    out[torch.arange(end, device=device)[None, :] >= length[:, None]] = pad_id
    stats.total_time_s = time.perf_counter() - t_start
    stats.suspensions = policy.guard.suspensions
    model.atb_speculative_stats = stats
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=out)
    return out
