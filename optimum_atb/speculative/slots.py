"""A model plus its KV cache, seen as columns of slots shared by all rows, with a per-row validity mask.

Rows of a speculative batch accept different numbers of draft tokens, so their caches would diverge in
length. Instead of re-aligning them, every forward appends the same number of columns to every row and
the rejected (or padding) columns of each row are switched off in a 2D attention mask (transformers turns
a 2D mask with holes into the right 4D mask for any attention implementation). Position ids count only a
row's valid slots, so the model sees exactly the sequence it would see without the holes. Columns that are
invalid in every row at the tail are cropped from the cache (``Cache.crop``).
"""

from __future__ import annotations

import torch


class SlotCache:
    """Runs `model` forwards on top of `cache` and tracks which cache columns hold each row's tokens."""

    def __init__(self, model, cache, batch: int, device: torch.device):
        self.model = model
        self.cache = cache
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def forward(self, ids: torch.Tensor, valid: torch.Tensor, keep: int) -> torch.Tensor:
        """Append `ids` (B, W) whose `valid` (B, W) entries are real tokens; logits of the last `keep` columns.

        A row's position ids count only its valid slots, so left padding and holes are invisible to it.
        """
        positions = self.mask.sum(1, keepdim=True) + (valid.long().cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([self.mask, valid.to(self.mask.dtype)], dim=1)
        out = self.model(
            input_ids=ids.to(self.model.device),
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        self.mask = mask
        return out.logits

    def truncate(self, limit: torch.Tensor) -> None:
        """Invalidate every column at index >= ``limit[row]`` of each row, then crop all-invalid tail columns."""
        cols = torch.arange(self.width, device=self.mask.device)
        self.mask = self.mask * (cols < limit[:, None]).to(self.mask.dtype)
        used = self.mask.any(0).nonzero()
        keep = int(used[-1]) + 1 if used.numel() else 0
        if keep < self.width:
            self.cache.crop(keep - self.width)
            self.mask = self.mask[:, :keep]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the current batch), in that order."""
        self.cache.batch_select_indices(rows.to(self.mask.device))
        self.mask = self.mask[rows]
