"""Compiled speculative forwards: :class:`~.slots.SlotCache`'s shared-columns mode on a
:class:`~transformers.StaticCache`, with the batch and cache length fixed so that the draft's steps and
the target's verify forwards run through ``torch.compile`` graphs (one for a single token, one for any
wider forward). Used for a draft made with ``draft_from(compile=True)`` / ``compile_draft`` and for a
target converted with ``to_atb(compile=True)``.

What stays fixed, and how:

* the batch: rows that finish stay in the cache as idle slots (they are fed a masked pad token), so the
  graph never sees a smaller batch;
* the cache length (``capacity``) and the 2D attention mask (``(batch, capacity)``, columns past the
  written ones are zero); the columns written so far are the static cache's own counter;
* the forward width: one graph for one token, one with a dynamic width for the rest; the first forward
  (the prompt, which creates the cache's tensors) runs eagerly.

Rows share columns, so a row that keeps fewer tokens than another leaves holes (masked columns). When
the next forward would not fit, the valid columns of every row are moved to the left (:meth:`_compact`);
a forward that still does not fit runs in pieces.
"""

from __future__ import annotations

import logging

import torch
from torch._dynamo.utils import counters
from transformers import StaticCache

from ..kernels.torch_ops import rows_vary_between_calls
from .slots import keep_first_valid, positions_of

logger = logging.getLogger("optimum_atb")

COMPILED_ATTR = "_atb_compiled_forward"
RECOMPILE_LIMIT = 64


class StaticSlotCache:
    """Runs `model` forwards on a static cache of `capacity` columns, through `compiled` (a
    :class:`CompiledForward`) once the cache exists."""

    def __init__(self, model, compiled, batch: int, capacity: int, device: torch.device):
        self.model = model
        self.compiled = compiled
        self.cache = StaticCache(config=model.config, max_cache_len=capacity)
        self.capacity = capacity
        self.mask = torch.zeros(batch, capacity, dtype=torch.long, device=device)  # valid columns
        self.used = 0  # columns written (mirrors the cache's own counter)
        self.slots = torch.arange(batch, device=device)  # the cache slot of each active row
        self.slot_lengths = torch.zeros(batch, dtype=torch.long, device=device)  # valid tokens per slot
        self.new_graph = False  # whether the last forward compiled a graph (its time is not a step's cost)

    @property
    def lengths(self) -> torch.Tensor:
        """Valid tokens of each active row."""
        return self.slot_lengths[self.slots]

    def forward(self, ids: torch.Tensor, valid: torch.Tensor, keep: int) -> torch.Tensor:
        """Same contract as :meth:`SlotCache.forward <.slots.SlotCache.forward>` for the active rows."""
        self.new_graph = False
        width = ids.shape[1]
        if self.used + width > self.capacity:
            self._compact()
        room = self.capacity - self.used
        if width > room:  # only after a long idle stretch on rows with many holes
            if room < 1:
                raise RuntimeError(
                    f"speculative static cache full: all {self.capacity} columns hold valid tokens"
                )
            from_first = keep - (width - room)  # logits wanted from the first piece (logits_to_keep=0: all)
            first = self.forward(ids[:, :room], valid[:, :room], keep=max(from_first, 1))
            rest = self.forward(ids[:, room:], valid[:, room:], keep=min(keep, width - room))
            return (
                torch.cat([first[:, first.shape[1] - from_first :], rest], dim=1) if from_first > 0 else rest
            )

        batch = self.mask.shape[0]
        full_ids = torch.zeros(batch, width, dtype=ids.dtype, device=ids.device)
        full_valid = torch.zeros(batch, width, dtype=torch.long, device=ids.device)
        full_ids[self.slots] = ids
        full_valid[self.slots] = valid.to(torch.long)
        positions = positions_of(self.slot_lengths, full_valid)
        self.mask[:, self.used : self.used + width] = full_valid
        step = self.model  # eager for the first forward (it creates the cache's tensors) and split pieces
        if keep == width and self.cache.layers[0].is_initialized:
            step, keep = self.compiled, 0  # 0: all columns' logits (a constant, not one graph per width)
        out = step(
            input_ids=full_ids,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        self.new_graph = step is self.compiled and self.compiled.last_compiled
        self.used += width
        self.slot_lengths = self.slot_lengths + full_valid.sum(1)
        return out.logits[self.slots]

    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep the first ``lengths[row]`` valid tokens of each active row (at most the ones it has)."""
        lengths = torch.minimum(lengths, self.lengths)
        keep = self.slot_lengths.clone()
        keep[self.slots] = lengths
        self.mask.copy_(keep_first_valid(self.mask, keep))  # in place: the compiled graphs read this tensor
        used = self.mask[:, : self.used].any(0).nonzero()
        self._set_used(int(used[-1]) + 1 if used.numel() else 0)
        self.slot_lengths = keep

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the active rows), in that order; the others become idle slots."""
        self.slots = self.slots[rows.to(self.slots.device)]

    def _set_used(self, used: int) -> None:
        if used < self.used:
            self.cache.crop(used - self.used)  # moves the static cache's write position back
            self.mask[:, used:] = 0
        self.used = used

    def _compact(self) -> None:
        """Move every slot's valid columns to the left, in order; the rest become free columns."""
        written = self.mask[:, : self.used]
        order = torch.sort(written == 0, dim=1, stable=True).indices  # valid columns first, in order
        for layer in self.cache.layers:
            for states in (layer.keys, layer.values):
                index = order[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
                states[:, :, : self.used] = states[:, :, : self.used].gather(2, index)
        count = written.sum(1)
        self.mask[:, : self.used] = (torch.arange(self.used, device=count.device) < count[:, None]).long()
        self._set_used(int(count.max()))


class CompiledForward:
    """``torch.compile`` of a model's forward for :class:`StaticSlotCache`, kept on the model across
    ``generate`` calls (``model.__dict__[COMPILED_ATTR]``). Per batch size and cache length: one graph for
    a single token and, where the model's code allows (the width marked dynamic), one for every wider
    forward (inside it ``ops.linear`` does not choose its float32 form by row count).
    ``last_compiled`` says whether the last call compiled a graph (its time is not a step's cost)."""

    def __init__(self, model, options: dict | None = None):
        self.model, self.options = model, options
        # a static graph for one token has fewer guards to check per call than a dynamic one (~0.4 ms)
        self.single = torch.compile(model.forward, dynamic=False, fullgraph=False, options=options)
        self.wide = torch.compile(model.forward, dynamic=None, fullgraph=False, options=options)
        self.compiles = 0  # calls that compiled at least one graph
        self.last_compiled = False

    def __deepcopy__(self, memo):
        return CompiledForward(memo.get(id(self.model), self.model), self.options)  # a copy compiles its own

    def __call__(self, *, input_ids, position_ids, **inputs):
        graphs = counters["stats"]["unique_graphs"]
        if input_ids.shape[1] == 1:
            out = self.single(input_ids=input_ids, position_ids=position_ids, **inputs)
        else:
            torch._dynamo.maybe_mark_dynamic(input_ids, 1)
            torch._dynamo.maybe_mark_dynamic(position_ids, 1)
            with rows_vary_between_calls():
                out = self.wide(input_ids=input_ids, position_ids=position_ids, **inputs)
        self.last_compiled = counters["stats"]["unique_graphs"] != graphs
        self.compiles += self.last_compiled
        return out


def attach_compiled(model, options: dict | None = None) -> None:
    """Give `model` a :class:`CompiledForward` compiled with inductor `options` (kept; idempotent).

    Every graph of every model of a class counts towards ``torch._dynamo``'s recompile limit for its
    ``forward`` (8 by default; past it dynamo runs the forward eagerly): a draft and a target of the same
    class, at two batch sizes, already need 8. The limit is raised to ``RECOMPILE_LIMIT`` (logged once).
    """
    config = torch._dynamo.config
    if config.recompile_limit < RECOMPILE_LIMIT:
        logger.info(
            "optimum-atb: torch._dynamo.config.recompile_limit raised from %d to %d for compiled "
            "speculative forwards (two graphs per model, batch size and cache length)",
            config.recompile_limit,
            RECOMPILE_LIMIT,
        )
        config.recompile_limit = RECOMPILE_LIMIT
    if COMPILED_ATTR not in model.__dict__:  # a copy of `options`: the caller's dict may change later
        model.__dict__[COMPILED_ATTR] = CompiledForward(model, dict(options) if options else None)


def compiled_forward(model) -> CompiledForward | None:
    return model.__dict__.get(COMPILED_ATTR)


def capacity_for(max_length: int, k_max: int) -> int:
    """Static cache length for rows of up to `max_length` tokens plus drafts: rounded up to 128 so that
    different prompt lengths share compiled graphs."""
    return -(-(max_length + 2 * k_max + 2) // 128) * 128
