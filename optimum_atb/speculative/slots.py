"""A model plus its KV cache, where each forward appends columns to every row and each row keeps only its
valid ones.

Rows of a speculative batch accept different numbers of draft tokens, so their caches diverge in length.
Two ways to follow that:

* per row (a :class:`~optimum_atb.PagedCache` read through ``paged_attention``, i.e. after ``to_atb()``):
  each row's cache holds exactly its tokens. A forward stores every column, then the invalid trailing ones
  (fewer drafts in this row) and later the rejected ones are cropped per row (:meth:`PagedCache.crop_rows`):
  no copy, no mask. Leading invalid columns (left padding of the prompt) are not stored at all.
* with holes (any other cache): every forward appends the same columns to every row and a row's invalid
  columns are switched off in a 2D attention mask (transformers turns a 2D mask with holes into the right
  4D mask for any attention implementation). Columns invalid in every row at the tail are cropped.

Either way position ids count only a row's valid tokens, so the model sees exactly the sequence it would
see alone.
"""

from __future__ import annotations

import torch

from ..paged_cache import reads_from_pool


def positions_of(lengths: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Position ids of new columns `valid` (B, W) after ``lengths[row]`` valid tokens: only valid ones count."""
    return lengths[:, None] + (valid.cumsum(1) - 1).clamp(min=0)


def keep_first_valid(mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`mask` (B, C) of valid columns with each row's valid columns after its ``lengths[row]``-th switched off."""
    return mask * (mask.cumsum(1) <= lengths[:, None]).to(mask.dtype)


class SlotCache:
    """Runs `model` forwards on top of `cache` and tracks which cached tokens each row keeps."""

    new_graph = False  # never compiles (see StaticSlotCache)

    def __init__(self, model, cache, batch: int, device: torch.device):
        self.model = model
        self.cache = cache
        self.per_row = bool(getattr(cache, "is_atb_paged", False)) and reads_from_pool(model)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # valid tokens per row
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)  # holes mode: valid columns

    def forward(self, ids: torch.Tensor, valid: torch.Tensor, keep: int) -> torch.Tensor:
        """Append `ids` (B, W) whose `valid` (B, W) entries are real tokens; logits of the last `keep` columns.

        Invalid entries are either leading (left padding) or trailing (a row with fewer tokens), never both
        in one row.
        """
        valid = valid.to(torch.long)
        positions = positions_of(self.lengths, valid)
        if self.per_row:
            pads = valid.cumsum(1) == 0
            mask = valid if bool(pads.any()) else None  # left padding: the cache stores no pad token
        else:
            mask = torch.cat([self.mask, valid], dim=1)
        out = self.model(
            input_ids=ids.to(self.model.device),
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        count = valid.sum(1)
        if self.per_row:
            stored = ids.shape[1] - pads.sum(1)
            if bool((stored > count).any()):
                self.cache.crop_rows((stored - count).tolist())
        else:
            self.mask = mask
        self.lengths = self.lengths + count
        return out.logits

    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep the first ``lengths[row]`` valid tokens of each row (at most the ones it has)."""
        lengths = torch.minimum(lengths, self.lengths)
        if self.per_row:
            drop = self.lengths - lengths
            if bool(drop.any()):
                self.cache.crop_rows(drop.tolist())
        else:
            # the column of each row's lengths[row]-th valid token, +1 = its first column to switch off
            self.mask = keep_first_valid(self.mask, lengths)
            used = self.mask.any(0).nonzero()
            keep = int(used[-1]) + 1 if used.numel() else 0
            if keep < self.mask.shape[1]:
                self.cache.crop(keep - self.mask.shape[1])
                self.mask = self.mask[:, :keep]
        self.lengths = lengths.clone()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the current batch), in that order."""
        self.cache.batch_select_indices(rows.to(self.lengths.device))
        self.lengths = self.lengths[rows]
        self.mask = self.mask[rows]
