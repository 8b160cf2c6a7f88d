"""Block bookkeeping for the paged KV cache: a free list with reference counts, and per-sequence block tables.

Pure Python over block ids; no tensors. :class:`BlockTables` tells its caller which flat slots to write and
which blocks to copy (copy-on-write), the caller moves the data. Every operation that needs new blocks
first checks that enough are free and raises :class:`~optimum_atb.errors.KVCacheCapacityError` before it
changes anything.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import KVCacheCapacityError


class BlockAllocator:
    """``num_blocks`` block ids, their reference counts, and the free ones (lowest id first).

    :meth:`allocate` takes a preferred block when it is free: sequences that grow into the block after their
    last one stay contiguous in the pool, which lets the CPU attention read them as views, without a gather.
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        # min-heap of free ids; a block taken by preference leaves a stale entry, skipped when popped
        self._heap = list(range(num_blocks))
        self._num_free = num_blocks

    @property
    def num_free(self) -> int:
        return self._num_free

    def free_blocks(self) -> list[int]:
        """The free block ids, ascending."""
        return [b for b, refs in enumerate(self._refs) if refs == 0]

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, prefer: int | None = None) -> int:
        """A free block with reference count 1: ``prefer`` when it is free, else the lowest free id."""
        if not self._num_free:
            raise KVCacheCapacityError(f"all {self.num_blocks} KV blocks are in use")
        if prefer is not None and 0 <= prefer < self.num_blocks and self._refs[prefer] == 0:
            block = prefer
        else:
            block = heapq.heappop(self._heap)
            while self._refs[block]:
                block = heapq.heappop(self._heap)
        self._refs[block] = 1
        self._num_free -= 1
        return block

    def incref(self, block: int) -> None:
        if self._refs[block] < 1:
            raise RuntimeError(f"block {block} is free: it cannot be shared")
        self._refs[block] += 1

    def decref(self, block: int) -> None:
        """Drop one reference; the block returns to the free ones when none is left."""
        if self._refs[block] < 1:
            raise RuntimeError(f"block {block} is already free")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._num_free += 1
            if len(self._heap) >= 2 * self.num_blocks:  # too many stale entries: rebuild
                self._heap = self.free_blocks()
            else:
                heapq.heappush(self._heap, block)

    def grow(self, num_blocks: int) -> None:
        """Add free blocks up to ``num_blocks`` in total (the caller grows its tensors to match)."""
        if num_blocks < self.num_blocks:
            raise ValueError(f"cannot shrink the pool from {self.num_blocks} to {num_blocks} blocks")
        self._refs.extend([0] * (num_blocks - self.num_blocks))
        self._num_free += num_blocks - self.num_blocks
        # ids above every id already there: appended, the list is still a heap
        self._heap.extend(range(self.num_blocks, num_blocks))
        self.num_blocks = num_blocks


@dataclass
class SequenceBlocks:
    """One sequence: ``blocks[i]`` holds its tokens ``(first_block + i) * block_size ...``.

    ``first_block`` counts the blocks dropped from the front (sliding window); ``num_tokens`` counts every
    token written, dropped ones included, so it is also the position of the next token.
    """

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0
    first_block: int = 0


class BlockTables:
    """The block tables of a batch of sequences over one :class:`BlockAllocator`."""

    def __init__(self, allocator: BlockAllocator, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.allocator = allocator
        self.block_size = block_size
        self.seqs: list[SequenceBlocks] = []

    def _home(self, index: int) -> int:
        """Where sequence ``index`` of the batch starts when its first block is free: the pool is split
        evenly between the sequences, so each one can grow into the blocks after its own."""
        return index * (self.allocator.num_blocks // max(len(self.seqs), 1))

    def __len__(self) -> int:
        return len(self.seqs)

    def lengths(self) -> list[int]:
        return [s.num_tokens for s in self.seqs]

    def resize_batch(self, batch_size: int) -> None:
        """Start ``batch_size`` empty sequences (only valid while the table holds no block)."""
        if any(s.blocks for s in self.seqs):
            raise RuntimeError("the batch size of a non-empty cache cannot change; reset() it first")
        self.seqs = [SequenceBlocks() for _ in range(batch_size)]

    def blocks_needed(self, new_tokens: Sequence[int]) -> int:
        """Fresh blocks that :meth:`append` would take for ``new_tokens[i]`` more tokens in sequence ``i``."""
        bs, need = self.block_size, 0
        moved: dict[int, int] = {}  # shared partial blocks already copied away from, as append does in order
        for seq, n in zip(self.seqs, new_tokens):
            if n <= 0:
                continue
            end = seq.num_tokens + n
            have = seq.first_block + len(seq.blocks)
            need += max(0, -(-end // bs) - have)
            if seq.num_tokens % bs and seq.blocks:
                last = seq.blocks[-1]
                if self.allocator.refcount(last) - moved.get(last, 0) > 1:
                    need += 1  # the shared partial block is copied before it is written
                    moved[last] = moved.get(last, 0) + 1
        return need

    def append(self, new_tokens: Sequence[int]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """Reserve room for ``new_tokens[i]`` tokens at the end of sequence ``i``.

        Returns the flat slots (``block * block_size + offset``) to write for each sequence and the
        ``(src, dst)`` block copies to do first (copy-on-write of a shared partial block).
        Raises :class:`KVCacheCapacityError` with nothing changed when the free blocks do not suffice.
        """
        if len(new_tokens) != len(self.seqs):
            raise ValueError(
                f"got token counts for {len(new_tokens)} sequences, the cache holds {len(self.seqs)}"
            )
        need = self.blocks_needed(new_tokens)
        if need > self.allocator.num_free:
            raise KVCacheCapacityError(
                f"the paged KV cache needs {need} more blocks but only {self.allocator.num_free} of "
                f"{self.allocator.num_blocks} are free"
            )
        bs, alloc = self.block_size, self.allocator
        slots: list[list[int]] = []
        copies: list[tuple[int, int]] = []
        for i, (seq, n) in enumerate(zip(self.seqs, new_tokens)):
            if n > 0 and seq.num_tokens % bs and alloc.refcount(seq.blocks[-1]) > 1:
                src, dst = seq.blocks[-1], alloc.allocate()
                copies.append((src, dst))
                alloc.decref(src)
                seq.blocks[-1] = dst
            row = []
            for pos in range(seq.num_tokens, seq.num_tokens + n):
                idx = pos // bs - seq.first_block
                if idx == len(seq.blocks):
                    seq.blocks.append(alloc.allocate(seq.blocks[-1] + 1 if seq.blocks else self._home(i)))
                row.append(seq.blocks[idx] * bs + pos % bs)
            seq.num_tokens += max(n, 0)
            slots.append(row)
        return slots, copies

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``tokens_to_remove`` tokens of every sequence (fewer where a sequence is shorter)."""
        self.crop_rows([tokens_to_remove] * len(self.seqs))

    def crop_rows(self, tokens_to_remove: Sequence[int]) -> None:
        """Drop the last ``tokens_to_remove[i]`` tokens of sequence ``i``; emptied blocks are freed."""
        if len(tokens_to_remove) != len(self.seqs) or any(n < 0 for n in tokens_to_remove):
            raise ValueError(
                f"need one count >= 0 per sequence ({len(self.seqs)}), got {list(tokens_to_remove)}"
            )
        bs = self.block_size
        for seq, n in zip(self.seqs, tokens_to_remove):
            seq.num_tokens = max(seq.num_tokens - n, seq.first_block * bs)
            keep = -(-seq.num_tokens // bs) - seq.first_block
            for block in seq.blocks[keep:]:
                self.allocator.decref(block)
            del seq.blocks[keep:]

    def drop_before(self, positions: Sequence[int]) -> None:
        """Free the blocks of sequence ``i`` that hold only tokens before ``positions[i]`` (sliding window)."""
        bs = self.block_size
        for seq, pos in zip(self.seqs, positions):
            drop = min(max(pos, 0) // bs - seq.first_block, len(seq.blocks))
            if drop <= 0:
                continue
            for block in seq.blocks[:drop]:
                self.allocator.decref(block)
            del seq.blocks[:drop]
            seq.first_block += drop

    def select(self, indices: Sequence[int]) -> None:
        """New batch where sequence ``j`` is old sequence ``indices[j]``: blocks are shared, not copied.

        Serves beam-search reordering, ``repeat_interleave`` and batch selection alike.
        """
        new = []
        for i in indices:
            src = self.seqs[i]
            for block in src.blocks:
                self.allocator.incref(block)
            new.append(SequenceBlocks(list(src.blocks), src.num_tokens, src.first_block))
        self.free_all()
        self.seqs = new

    def free_sequence(self, index: int) -> None:
        """Release sequence ``index`` (it stays in the batch, empty)."""
        seq = self.seqs[index]
        for block in seq.blocks:
            self.allocator.decref(block)
        self.seqs[index] = SequenceBlocks()

    def free_all(self) -> None:
        """Release every sequence's blocks and forget the sequences."""
        for i in range(len(self.seqs)):
            self.free_sequence(i)
        self.seqs = []

    def padded_table(self, width: int | None = None) -> list[list[int]]:
        """Each sequence's live blocks, right-padded with 0 to ``width`` (default: the longest)."""
        width = max((len(s.blocks) for s in self.seqs), default=0) if width is None else width
        return [s.blocks + [0] * (width - len(s.blocks)) for s in self.seqs]
