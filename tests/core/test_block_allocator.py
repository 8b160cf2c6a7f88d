"""Properties of the block allocator and block tables, checked against a plain model of who owns what."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_atb.block_allocator import BlockAllocator, BlockTables
from optimum_atb.errors import KVCacheCapacityError

BLOCK = 4


def _check_invariants(tables: BlockTables) -> None:
    alloc = tables.allocator
    owners = Counter(b for seq in tables.seqs for b in seq.blocks)
    free = alloc.free_blocks()
    assert alloc.num_free == len(free)
    assert set(free) <= set(alloc._heap), "a free block cannot be handed out"
    for block in range(alloc.num_blocks):
        # a block is shared by several sequences only through its reference count
        assert alloc.refcount(block) == owners.get(block, 0)
        assert (block in free) == (owners.get(block, 0) == 0)
    for seq in tables.seqs:
        live = seq.num_tokens - seq.first_block * BLOCK
        assert len(seq.blocks) == -(-live // BLOCK)


def test_allocate_free_and_refcounts():
    alloc = BlockAllocator(3)
    a, b = alloc.allocate(), alloc.allocate()
    assert (a, b) == (0, 1) and alloc.num_free == 1
    alloc.incref(a)
    alloc.decref(a)
    assert alloc.num_free == 1
    alloc.decref(a)
    assert alloc.num_free == 2
    with pytest.raises(RuntimeError):
        alloc.decref(a)
    alloc.allocate(), alloc.allocate()
    with pytest.raises(KVCacheCapacityError):
        alloc.allocate()


def test_allocate_takes_the_preferred_block_when_free():
    alloc = BlockAllocator(4)
    assert alloc.allocate(prefer=2) == 2
    assert [alloc.allocate(prefer=2), alloc.allocate()] == [0, 1]  # taken: the lowest free ids instead
    alloc.decref(0)
    assert alloc.allocate(prefer=9) == 0  # out of range: ignored
    assert alloc.allocate() == 3 and alloc.num_free == 0


def test_sequences_growing_together_stay_contiguous():
    """Each sequence starts at its share of the pool and grows into the next block: no interleaving."""
    tables = BlockTables(BlockAllocator(12), BLOCK)
    tables.resize_batch(3)
    tables.append([5, 1, 6])
    for _ in range(10):
        tables.append([1, 1, 1])
    assert [s.blocks for s in tables.seqs] == [[0, 1, 2, 3], [4, 5, 6], [8, 9, 10, 11]]
    _check_invariants(tables)


def test_append_returns_slots_in_order():
    tables = BlockTables(BlockAllocator(8), BLOCK)
    tables.resize_batch(2)
    slots, copies = tables.append([6, 3])
    assert copies == []
    blocks0, blocks1 = tables.seqs[0].blocks, tables.seqs[1].blocks
    assert slots[0] == [blocks0[p // BLOCK] * BLOCK + p % BLOCK for p in range(6)]
    assert slots[1] == [blocks1[0] * BLOCK + p for p in range(3)]
    assert set(blocks0).isdisjoint(blocks1)


def test_fork_shares_then_copies_on_write():
    tables = BlockTables(BlockAllocator(8), BLOCK)
    tables.resize_batch(1)
    tables.append([6])  # one full block, one half-full
    full, partial = tables.seqs[0].blocks
    tables.select([0, 0])
    assert tables.allocator.refcount(full) == 2 and tables.allocator.refcount(partial) == 2
    assert tables.blocks_needed([1, 1]) == 1  # the first fork copies, the second then owns the block alone
    slots, copies = tables.append([1, 1])
    assert copies == [(partial, tables.seqs[0].blocks[1])]
    assert tables.seqs[1].blocks[1] == partial and tables.allocator.refcount(partial) == 1
    assert tables.seqs[0].blocks[0] == tables.seqs[1].blocks[0] == full  # the full block stays shared
    assert slots[0] != slots[1]
    _check_invariants(tables)


def test_capacity_error_changes_nothing():
    tables = BlockTables(BlockAllocator(3), BLOCK)
    tables.resize_batch(2)
    tables.append([4, 4])
    before = [(list(s.blocks), s.num_tokens) for s in tables.seqs]
    with pytest.raises(KVCacheCapacityError, match="needs 2 more blocks but only 1"):
        tables.append([1, 1])
    assert [(list(s.blocks), s.num_tokens) for s in tables.seqs] == before
    assert tables.allocator.num_free == 1


def test_drop_before_frees_only_whole_blocks():
    tables = BlockTables(BlockAllocator(8), BLOCK)
    tables.resize_batch(1)
    tables.append([10])
    tables.drop_before([7])  # block 0 (tokens 0-3) is out, block 1 (4-7) still holds token 7
    assert tables.seqs[0].first_block == 1 and len(tables.seqs[0].blocks) == 2
    assert tables.allocator.num_free == 6
    tables.append([3])
    _check_invariants(tables)


def test_grow_adds_free_blocks():
    tables = BlockTables(BlockAllocator(2), BLOCK)
    tables.resize_batch(1)
    tables.append([8])
    tables.allocator.grow(4)
    assert tables.allocator.num_free == 2
    tables.append([8])
    _check_invariants(tables)


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("grow"), st.lists(st.integers(0, 9), min_size=1, max_size=6)),
        st.tuples(st.just("crop"), st.integers(0, 12)),
        st.tuples(st.just("fork"), st.lists(st.integers(0, 5), min_size=1, max_size=6)),
        st.tuples(st.just("free"), st.integers(0, 5)),
        st.tuples(st.just("slide"), st.integers(1, 12)),
        st.tuples(st.just("reset"), st.none()),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(ops=_ops)
def test_random_operations_never_leak_or_double_own(ops):
    """grow (append) / crop / fork (select) / free / sliding drop / reset in any order, 40 x <=40 ops."""
    tables = BlockTables(BlockAllocator(24), BLOCK)
    tables.resize_batch(3)
    for op, arg in ops:
        n = len(tables)
        if op == "grow" and n:
            counts = (arg * n)[:n]
            before = (tables.allocator.num_free, [s.num_tokens for s in tables.seqs])
            try:
                tables.append(counts)
            except KVCacheCapacityError:
                assert (tables.allocator.num_free, [s.num_tokens for s in tables.seqs]) == before
        elif op == "crop":
            tables.crop(arg)
        elif op == "fork" and n:
            tables.select([i % n for i in arg])
        elif op == "free" and n:
            tables.free_sequence(arg % n)
        elif op == "slide":
            tables.drop_before([s.num_tokens - arg for s in tables.seqs])
        elif op == "reset":
            tables.free_all()
            assert tables.allocator.num_free == tables.allocator.num_blocks
            tables.resize_batch(3)
        _check_invariants(tables)
    tables.free_all()
    assert tables.allocator.free_blocks() == list(range(24))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_thousand_operations_leave_no_leak(seed):
    """1,000 random operations per example; the invariants hold after each, every block is free at the end."""
    rng = random.Random(seed)
    tables = BlockTables(BlockAllocator(32), BLOCK)
    tables.resize_batch(4)
    for _ in range(1000):
        n, op = len(tables), rng.choice(["grow", "grow", "crop", "fork", "free", "slide"])
        if op == "grow" and n:
            try:
                tables.append([rng.randint(0, 6) for _ in range(n)])
            except KVCacheCapacityError:
                tables.crop(rng.randint(1, 8))
        elif op == "crop":
            tables.crop(rng.randint(0, 8))
        elif op == "fork" and n:
            tables.select([rng.randrange(n) for _ in range(rng.randint(1, 5))])
        elif op == "free" and n:
            tables.free_sequence(rng.randrange(n))
        elif op == "slide":
            tables.drop_before([s.num_tokens - rng.randint(1, 10) for s in tables.seqs])
        _check_invariants(tables)
    tables.free_all()
    assert tables.allocator.num_free == 32 and tables.allocator.free_blocks() == list(range(32))
