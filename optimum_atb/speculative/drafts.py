"""Draft sources: a small causal LM (any model with the target's vocabulary, or a quantized copy of the
target from :func:`draft_from`), and n-gram lookup in the row's own prompt and output.

A draft works on a :class:`~optimum_atb.speculative.decoder.RoundView` (committed tokens of the active
rows, their lengths, the logits processors) and writes the tokens it proposes into the view's token
buffer right after each row's committed tokens, where the target verifies them.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from transformers import DynamicCache

from .slots import SlotCache
from .static_slots import COMPILED_ATTR, StaticSlotCache, attach_compiled, capacity_for, compiled_forward


class ModelDraft:
    """Proposes tokens by running a draft causal LM autoregressively on its own (slot) KV cache."""

    source = "draft model"

    def __init__(self, model, k_max: int):
        self.model = model
        self.k_max = k_max
        self.backlog = 0  # committed tokens the last proposal's first forward caught up on (most rows: 1-2)
        self.compiled_now = False  # whether the last proposal compiled a graph (its time is no cost)

    @property
    def caught_up(self) -> bool:
        """Whether the last proposal first caught up on a backlog of tokens missed in idle rounds."""
        return self.backlog > 2

    @property
    def timed(self) -> bool:
        """Whether the last proposal's time is a draft step's cost (no catch-up, no compile)."""
        return not (self.caught_up or self.compiled_now)

    def start(self, prompt: torch.Tensor, mask: torch.Tensor, max_length: int) -> None:
        """Prefill the draft cache with every prompt token but the last (`max_length`: the longest a row
        can grow, prompt included)."""
        batch = prompt.shape[0]
        compiled = compiled_forward(self.model)
        if compiled is not None:
            capacity = capacity_for(max_length, self.k_max)
            self.slots = StaticSlotCache(self.model, compiled, batch, capacity, prompt.device)
        else:
            self.slots = SlotCache(self.model, DynamicCache(config=self.model.config), batch, prompt.device)
        self.cached = torch.zeros(prompt.shape[0], dtype=torch.long, device=prompt.device)
        if prompt.shape[1] > 1:
            self.slots.forward(prompt[:, :-1], mask[:, :-1], keep=1)
            self.cached += prompt.shape[1] - 1
        self.drafted = 0

    def propose(self, view, counts: torch.Tensor):
        """Draft ``counts.max()`` tokens for every row. Returns (drafts, draft_probs | None, counts, forwards)."""
        rows, length = view.rows, view.length
        behind = length - self.cached  # committed tokens the draft has not seen yet (>= 1)
        width = self.backlog = int(behind.max())
        cols = torch.arange(width, device=length.device)
        ids = view.tokens[rows[:, None], (self.cached[:, None] + cols).clamp(max=view.tokens.shape[1] - 1)]
        logits = self.slots.forward(ids, cols < behind[:, None], keep=width)
        compiled_now = self.slots.new_graph
        last = logits[torch.arange(rows.numel(), device=rows.device), behind - 1]
        self.cached = length.clone()
        self.first_draft = self.slots.lengths.clone()

        k = int(counts.max())
        drafts = torch.empty(rows.numel(), k, dtype=torch.long, device=length.device)
        probs = []
        ones = torch.ones(rows.numel(), 1, dtype=torch.long, device=length.device)
        for j in range(k):
            scores = view.score(last, length + j)
            if view.do_sample:
                q = torch.softmax(scores, dim=-1)
                token = torch.multinomial(q, 1).squeeze(1)
                probs.append(q)
            else:
                token = scores.argmax(dim=-1)
            drafts[:, j] = token
            view.tokens[rows, length + j] = token
            if j + 1 < k:
                last = self.slots.forward(token[:, None], ones, keep=1)[:, 0]
                compiled_now = compiled_now or self.slots.new_graph
        self.drafted = k
        self.compiled_now = compiled_now
        return drafts, torch.stack(probs, dim=1) if probs else None, counts, k

    def commit(self, accepted: torch.Tensor) -> None:
        """Keep the accepted draft tokens' cache columns (the last draft token was never fed)."""
        self.slots.truncate(self.first_draft + accepted)
        self.cached = self.cached + accepted.clamp(max=max(self.drafted - 1, 0))

    def select(self, keep: torch.Tensor) -> None:
        self.slots.select(keep)
        self.cached = self.cached[keep]


class NgramDraft:
    """Prompt lookup: find the most recent earlier occurrence of the row's last n tokens (n = max_ngram
    down to 1) and propose what followed it. A row without a match proposes nothing (and costs nothing)."""

    source = "n-gram prompt lookup"
    timed = True  # runs no model: nothing to catch up on or compile
    caught_up = compiled_now = False

    def __init__(self, k_max: int, max_ngram: int = 3):
        self.k_max = k_max
        self.max_ngram = max_ngram

    def start(self, prompt: torch.Tensor, mask: torch.Tensor, max_length: int) -> None:
        pass

    def _lookup(self, seq: np.ndarray, limit: int) -> np.ndarray:
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            if hits.size:
                begin = hits[-1] + n
                return seq[begin : begin + limit]
        return seq[:0]

    def propose(self, view, counts: torch.Tensor):
        rows, length = view.rows, view.length
        end = int(length.max())
        toks = view.tokens[rows, :end].cpu().numpy()
        starts, lengths, limits = view.start.tolist(), length.tolist(), counts.tolist()
        found = [
            self._lookup(toks[i, starts[i] : lengths[i]], limits[i]) if limits[i] > 0 else toks[i, :0]
            for i in range(len(lengths))
        ]
        got = torch.tensor([len(f) for f in found], dtype=torch.long, device=length.device)
        k = int(got.max()) if got.numel() else 0
        drafts = torch.zeros(rows.numel(), k, dtype=torch.long, device=length.device)
        for i, f in enumerate(found):
            if len(f):
                drafts[i, : len(f)] = torch.from_numpy(f.copy()).to(length.device)
        if k:
            cols = length[:, None] + torch.arange(k, device=length.device)
            view.tokens[rows[:, None], cols] = drafts
        return drafts, None, got, 0

    def commit(self, accepted: torch.Tensor) -> None:
        pass

    def select(self, keep: torch.Tensor) -> None:
        pass


def compile_draft(model, compile_options: dict | None = None):
    """Make `model`, used as ``assistant_model``, draft through compiled static-shape steps and return it.

    The draft's forwards then run through ``torch.compile`` on a static cache (:mod:`.static_slots`): on
    a CPU this removes most of the Python and dispatch cost of a small draft's step. The first
    ``generate`` per batch size compiles two graphs (30-50 s each for SmolLM2-135M on a 2-core CPU); their
    time is not counted as draft cost by the adaptive draft length. Give it a model
    converted with ``to_atb()`` (its single-query attention avoids SDPA's slow CPU path in half precision).
    ``compile_options`` are inductor's options for these graphs (as given; None: inductor's defaults); given,
    they replace the ones a draft copied from a compiled target carries.
    Raises :class:`~optimum_atb.BackendUnavailableError` when no C++ compiler is installed (CPU) and
    :class:`~optimum_atb.CompileOptionsError` for options inductor does not know.
    """
    from ..compiled_decode import check_compiler, check_options

    check_options(compile_options, compile=True)
    check_compiler(next(model.parameters()).device)
    if compile_options is not None:  # else a forward copied from a compiled target is kept
        model.__dict__.pop(COMPILED_ATTR, None)
    attach_compiled(model, compile_options)
    return model


def draft_from(
    model,
    quantize: str = "int4",
    group_size: int = 32,
    include_lm_head: bool = True,
    compile: bool = False,
    compile_options: dict | None = None,
):
    """A weight-quantized copy of `model` to use as its own draft: ``generate(assistant_model=draft)``.

    ``quantize`` is ``"int4"`` or ``"int8"``; the output projection is quantized too by default (a
    draft trades a little acceptance for speed). ``compile``: the copy is converted with ``to_atb()``
    (when `model` is not) and drafts through compiled steps (:func:`compile_draft`), with inductor's
    ``compile_options`` (by default those of a target converted with ``to_atb(compile=True,
    compile_options=...)``, else inductor's defaults). `model` itself is left untouched.
    """
    bits = {"int4": 4, "int8": 8}.get(quantize)
    if bits is None:
        raise ValueError(f"quantize must be 'int4' or 'int8', got {quantize!r}")
    from ..compiled_decode import check_compiler, check_options

    check_options(compile_options, compile)
    if compile:
        check_compiler(next(model.parameters()).device)
    from ..convert import to_atb
    from ..quantization import quantize as quantize_model

    draft = copy.deepcopy(model)
    if compile:
        to_atb(draft)  # no-op when `model` was converted already
    quantized = quantize_model(
        draft, bits=bits, group_size=group_size if bits == 4 else None, include_lm_head=include_lm_head
    )
    draft = (quantized if quantized is not None else draft).eval()
    if not compile:
        draft.__dict__.pop(COMPILED_ATTR, None)  # copied from a target converted with compile=True
    return compile_draft(draft, compile_options) if compile else draft
