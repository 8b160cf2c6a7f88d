"""``PagedCache``: a transformers ``Cache`` whose K/V live in a pool of fixed-size blocks (vLLM-style).

Layout: per layer, a K pool and a V pool ``[num_blocks, block_size, kv_heads, head_dim]``; layers that share a
window size share one :class:`~optimum_atb.block_allocator.BlockTables` (a block id means the same slots in
each of their pools). Blocks are taken as sequences grow, shared by reference count across beams / returned
sequences and copied only on a diverging write, freed by ``crop``, ``reset``, :meth:`PagedCache.free_sequence`
and, on sliding-window layers, as soon as they fall wholly out of the window.

Two ways in, one per cache lifetime (mixing them raises):

* stock attention (eager, sdpa, "atb" without ``to_atb()``): ``update()`` writes every new token, pad tokens
  included, and returns the gathered K/V ``(B, H, S, D)`` exactly as ``DynamicCache`` would (same length, same
  sliding-window trimming), so the masks transformers builds from ``get_mask_sizes`` line up.
* after ``to_atb()``: the patched attention calls :meth:`PagedCache.paged_attention_forward`, which writes with
  ``ops.reshape_and_cache`` and reads with ``ops.paged_attention`` straight from the pool. Pad tokens are not
  stored (slot -1, as vLLM): ``context_lens`` counts real tokens, so pads need no mask. Only left padding is
  supported there (what ``generate`` uses for decoder-only models).

Per-step metadata (slots, block tables, context lengths) is built once per model forward, at the first layer
that reaches the cache, for every layer group at once, so a capacity error is raised before anything is written.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from . import ops
from .block_allocator import BlockAllocator, BlockTables
from .errors import KVCacheCapacityError

CACHE_IMPLEMENTATION = "atb_paged"
_SLIDING_TYPES = ("sliding_attention", "chunked_attention")


def default_block_size(device: torch.device | str | None) -> int:
    """128 tokens per block on Ascend NPUs (the ATB paged-attention granularity), 16 elsewhere."""
    return 128 if torch.device(device or "cpu").type == "npu" else 16


@dataclass
class _StepMeta:
    """What one model forward needs in every layer of a group (built once per forward)."""

    slot_mapping: torch.Tensor  # int64 [B * Sq], -1 = not stored
    block_tables: torch.Tensor  # int32 [B, max_live_blocks]
    context_lens: torch.Tensor  # int32 [B], live tokens (the new ones included)
    gather_index: torch.Tensor | None = None  # stock path: int64 [B, V] flat slots of the returned columns
    gather_valid: torch.Tensor | None = None  # stock path: bool [B, V], or None when every column is stored
    full_rows: torch.Tensor | None = None  # paged path, some row has pads: rows whose new tokens are all real
    padded_rows: tuple[tuple[int, int], ...] = ()  # ... and (row, leading pads) of the others


class _Group:
    """Layers with the same window: one allocator and block table, one K and V pool per layer."""

    def __init__(self, window: int | None, layers: list[int]):
        self.window = window
        self.layers = layers
        self.tables: BlockTables | None = None
        self.k_pools: dict[int, torch.Tensor] = {}
        self.v_pools: dict[int, torch.Tensor] = {}
        self.meta: _StepMeta | None = None


class PagedLayer(CacheLayerMixin):
    """One layer's view of a :class:`PagedCache` (the data and the bookkeeping live in the cache)."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, cache: PagedCache, layer_idx: int, sliding_window: int | None):
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the cache allocates every pool at the first forward."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._cache._stock_update(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Same as DynamicLayer / DynamicSlidingWindowLayer: exactly what :meth:`update` returns."""
        past = self._cache.get_seq_length()
        if self.sliding_window is None:
            return past + query_length, 0
        return min(past, self.sliding_window - 1) + query_length, max(past - self.sliding_window + 1, 0)

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length()

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    # The container does these once per group, not per layer.
    def reset(self) -> None: ...
    def crop(self, tokens_to_remove: int) -> None: ...
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None: ...
    def batch_repeat_interleave(self, repeats: int) -> None: ...
    def batch_select_indices(self, indices: torch.Tensor) -> None: ...


class PagedCache(Cache):
    """Paged KV cache for ``generate``/``forward`` on LLaMA-family models.

    Args:
        config: the model config (its text config is used: layer types, sliding window).
        block_size: tokens per block (default :func:`default_block_size` of the device).
        num_blocks: blocks per layer pool. Fixed capacity: when exhausted, writing raises
            :class:`~optimum_atb.errors.KVCacheCapacityError`.
        max_memory: bytes for all K/V pools together; sets ``num_blocks`` (exclusive with it).
        dtype, device: of the pools (default: those of the first key states written).

    Without ``num_blocks``/``max_memory`` the pool is sized for the ``generate`` call (batch x expansions x
    max length) and grows by doubling if ever needed; used outside ``generate`` it starts at what the first
    forward needs.
    """

    is_atb_paged = True

    def __init__(
        self,
        config,
        block_size: int | None = None,
        num_blocks: int | None = None,
        max_memory: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        if num_blocks is not None and max_memory is not None:
            raise ValueError("give num_blocks or max_memory, not both")
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if max_memory is not None and max_memory <= 0:
            raise ValueError(f"max_memory must be > 0 bytes, got {max_memory}")
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        text_config = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        windows: list[int | None] = []
        for i, (kind, kw) in enumerate(zip(layer_types, layer_kwargs)):
            if kind == "full_attention":
                windows.append(None)
            elif kind in _SLIDING_TYPES:
                windows.append(int(kw["sliding_window"]))
            else:
                raise ValueError(f"PagedCache does not support layer {i} of type {kind!r}")
        super().__init__(layers=[PagedLayer(self, i, w) for i, w in enumerate(windows)])
        self._groups = [
            _Group(w, [i for i, x in enumerate(windows) if x == w]) for w in dict.fromkeys(windows)
        ]
        self._group_of = {i: g for g in self._groups for i in g.layers}
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_memory = max_memory
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self._fixed_capacity = num_blocks is not None or max_memory is not None
        self._size_hint: tuple[int, int] | None = None
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self._columns = 0  # tokens per row seen by the model, pads included (= DynamicCache's length)
        self._mode: str | None = None  # "stock" or "paged": fixed by the first write
        self._steps = 0
        self._layer_steps = [0] * len(self.layers)
        self._finished: set[int] = set()
        for g in self._groups:
            if g.tables is not None:
                g.tables.free_all()
            g.meta = None

    def size_for(self, batch_size: int, max_length: int) -> None:
        """Size the pool (when not fixed by ``num_blocks``/``max_memory``) for sequences up to ``max_length``."""
        self._size_hint = (batch_size, max_length)

    @property
    def is_initialized(self) -> bool:
        return self._groups[0].tables is not None

    @property
    def batch_size(self) -> int:
        tables = self._groups[0].tables
        return len(tables) if tables is not None and len(tables) else -1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._columns

    # ------------------------------------------------------------------ pools
    def _init_pools(self, key: torch.Tensor, heads: int, head_dim: int) -> None:
        """Resolve block size / count / dtype / device and allocate every layer's pools."""
        self.device = self.device or key.device
        self.dtype = self.dtype or key.dtype
        self.block_size = self.block_size or default_block_size(self.device)
        per_block = 2 * self.block_size * heads * head_dim * self.dtype.itemsize
        if self.max_memory is not None:
            self.num_blocks = self.max_memory // (per_block * len(self.layers))
            if self.num_blocks < 1:
                raise ValueError(
                    f"max_memory={self.max_memory} bytes holds no block: one block over {len(self.layers)} layers "
                    f"takes {per_block * len(self.layers)} bytes"
                )
        elif self.num_blocks is None and self._size_hint is not None:
            batch, length = self._size_hint
            self.num_blocks = batch * (math.ceil(length / self.block_size) + 1)
        elif self.num_blocks is None:
            self.num_blocks = 1  # grown to what the first forward needs
        for g in self._groups:
            g.tables = BlockTables(BlockAllocator(self.num_blocks), self.block_size)
            for i in g.layers:
                shape = (self.num_blocks, self.block_size, heads, head_dim)
                g.k_pools[i] = torch.zeros(shape, dtype=self.dtype, device=self.device)
                g.v_pools[i] = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _grow(self, g: _Group, num_blocks: int) -> None:
        extra = num_blocks - g.tables.allocator.num_blocks
        g.tables.allocator.grow(num_blocks)
        for pools in (g.k_pools, g.v_pools):
            for i, pool in pools.items():
                pools[i] = torch.cat([pool, pool.new_zeros((extra, *pool.shape[1:]))])

    def _pool_bytes_per_block(self, g: _Group) -> int:
        return sum(
            p[0].numel() * p.element_size() for pools in (g.k_pools, g.v_pools) for p in pools.values()
        )

    # ------------------------------------------------------------------ one step (model forward)
    def _enter(self, layer_idx: int, mode: str, key_bhsd: torch.Tensor, new_token_mask) -> _Group:
        """Book-keeping at each layer call; starts a step (all groups) at the first layer of a forward."""
        if self._mode not in (None, mode):
            raise RuntimeError(
                f"this PagedCache was filled through the {self._mode} attention path and is now used through the "
                f"{mode} one; use one path per cache (call reset() to reuse it)"
            )
        batch, heads, q_len, head_dim = key_bhsd.shape
        if not self.is_initialized:
            self._init_pools(key_bhsd, heads, head_dim)
        g = self._group_of[layer_idx]
        pool = g.k_pools[layer_idx]
        if pool.shape[2:] != (heads, head_dim):
            raise ValueError(
                f"layer {layer_idx}: key states have {heads} heads x {head_dim} dims, the pool "
                f"{tuple(pool.shape[2:])}; PagedCache supports one KV shape for all layers"
            )
        if self._layer_steps[layer_idx] == self._steps:
            self._begin_step(batch, q_len, new_token_mask(batch, q_len), key_bhsd.device, mode)
            self._steps += 1
            self._mode = mode
        elif g.meta is None or g.meta.slot_mapping.numel() != batch * q_len:
            raise RuntimeError(
                f"layer {layer_idx} got {q_len} new tokens, the other layers of this forward did not"
            )
        self._layer_steps[layer_idx] += 1
        return g

    def _begin_step(
        self, batch: int, q_len: int, real: list[int] | None, device: torch.device, mode: str
    ) -> None:
        """Allocate room for the new tokens in every group (all or nothing), then build the step metadata."""
        for g in self._groups:
            if len(g.tables) == 0:
                g.tables.resize_batch(batch)
            elif len(g.tables) != batch:
                raise ValueError(
                    f"the cache holds {len(g.tables)} sequences, the model got a batch of {batch}"
                )
        counts = [0 if b in self._finished else (q_len if real is None else real[b]) for b in range(batch)]
        for g in self._groups:
            if g.window is not None:  # blocks wholly out of every future query's window
                g.tables.drop_before([n - g.window + 1 for n in g.tables.lengths()])
        needs = [g.tables.blocks_needed(counts) for g in self._groups]
        for g, need in zip(self._groups, needs):
            alloc = g.tables.allocator
            if need <= alloc.num_free:
                continue
            if self._fixed_capacity:
                in_use = alloc.num_blocks - alloc.num_free
                raise KVCacheCapacityError(
                    f"PagedCache is full: this forward needs {need} more KV blocks of {self.block_size} tokens "
                    f"({'sliding-window' if g.window else 'full-attention'} layers), {alloc.num_free} of "
                    f"{alloc.num_blocks} are free. Nothing was written; the cached sequences are intact. Size the "
                    f"pool with PagedCache(..., num_blocks>={in_use + need}) or max_memory>="
                    f"{(in_use + need) * sum(self._pool_bytes_per_block(x) for x in self._groups)} bytes"
                )
        for g, need in zip(self._groups, needs):
            alloc = g.tables.allocator
            if need > alloc.num_free:
                self._grow(g, max(2 * alloc.num_blocks, alloc.num_blocks - alloc.num_free + need))
        self._columns += q_len
        for g in self._groups:
            slots, copies = g.tables.append(counts)
            if copies:
                src = torch.tensor([s for s, _ in copies], device=device)
                dst = torch.tensor([d for _, d in copies], device=device)
                for pools in (g.k_pools, g.v_pools):
                    for pool in pools.values():
                        pool[dst] = pool[src]
            flat = []
            for row in slots:  # left padding: the stored tokens are the last ones of the row
                flat += [-1] * (q_len - len(row)) + row
            g.meta = self._step_meta(g, flat, q_len, device, stock=mode == "stock")
            if any(c < q_len for c in counts):
                g.meta.full_rows = torch.tensor(
                    [b for b, c in enumerate(counts) if c == q_len], device=device
                )
                g.meta.padded_rows = tuple((b, q_len - c) for b, c in enumerate(counts) if 0 < c < q_len)

    def _step_meta(
        self, g: _Group, flat_slots: list[int], q_len: int, device: torch.device, stock: bool
    ) -> _StepMeta:
        tables, bs = g.tables, self.block_size
        live = [s.num_tokens - s.first_block * bs for s in tables.seqs]
        meta = _StepMeta(
            slot_mapping=torch.tensor(flat_slots, dtype=torch.long, device=device),
            block_tables=torch.tensor(
                tables.padded_table(max(1, *(len(s.blocks) for s in tables.seqs))),
                dtype=torch.int32,
                device=device,
            ),  # fmt: skip
            context_lens=torch.tensor(live, dtype=torch.int32, device=device),
        )
        if stock:
            past = self._columns - q_len
            width = past + q_len if g.window is None else min(past, g.window - 1) + q_len
            # column c of the returned K/V is token (len - width + c) of the row: right-aligned like the 2D mask
            pos = torch.arange(width, device=device) + (torch.tensor(live, device=device)[:, None] - width)
            valid = pos >= 0
            block = meta.block_tables.long().gather(1, (pos.clamp(min=0) // bs))
            meta.gather_index = block * bs + pos.clamp(min=0) % bs
            meta.gather_valid = None if bool(valid.all()) else valid
        return meta

    # ------------------------------------------------------------------ the two attention paths
    def _stock_update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        """Stock attention path: store (B, H, S, D) states, return the layer's K/V as DynamicCache would."""
        g = self._enter(layer_idx, "stock", key, lambda b, s: None)
        kp, vp = g.k_pools[layer_idx], g.v_pools[layer_idx]
        b, h, s, d = key.shape
        ops.reshape_and_cache(
            key.transpose(1, 2).reshape(b * s, h, d).to(kp.dtype),
            value.transpose(1, 2).reshape(b * s, h, value.shape[-1]).to(vp.dtype),
            kp, vp, g.meta.slot_mapping,
        )  # fmt: skip
        out = []
        for pool, like in ((kp, key), (vp, value)):
            x = pool.view(-1, *pool.shape[2:])[g.meta.gather_index]  # (B, V, H, D)
            if g.meta.gather_valid is not None:
                x = x * g.meta.gather_valid[..., None, None]
            out.append(x.transpose(1, 2).to(like.dtype))
        return out[0], out[1]

    def paged_attention_forward(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        scaling: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Write q/k/v ``(B, S, H, D)`` (after rotary) and attend from the pool; returns ``(B, S, Hq, D)``.

        ``attention_mask`` is the mask transformers built for this layer (4D bool/float, 2D, or None); it is
        read only to find pad tokens in multi-token forwards (a single-token forward is always stored).
        """
        g = self._group_of[layer_idx]
        if sliding_window is not None and g.window is not None and sliding_window > g.window:
            raise ValueError(
                f"layer {layer_idx} attends over a window of {sliding_window}, the cache keeps {g.window} tokens"
            )
        window = sliding_window if sliding_window is not None else g.window
        g = self._enter(
            layer_idx, "paged", key.transpose(1, 2), functools.partial(_real_token_counts, attention_mask)
        )
        kp, vp = g.k_pools[layer_idx], g.v_pools[layer_idx]
        b, s, h, d = key.shape
        check = layer_idx == g.layers[0]  # the step's metadata is shared by the group: checked once
        ops.reshape_and_cache(
            key.reshape(b * s, h, d).to(kp.dtype),
            value.reshape(b * s, h, value.shape[-1]).to(vp.dtype),
            kp, vp, g.meta.slot_mapping, validate=check,
        )  # fmt: skip
        q, meta = query.to(kp.dtype), g.meta
        attend = functools.partial(
            ops.paged_attention, k_cache=kp, v_cache=vp, scale=scaling, sliding_window=window, softcap=softcap,
            validate=check,
        )  # fmt: skip
        if meta.full_rows is None:
            return attend(q, block_tables=meta.block_tables, context_lens=meta.context_lens).to(query.dtype)
        # Some rows start with pads (not stored): their pad queries see nothing and get zeros, their real
        # queries attend on their own (paged_attention wants every context to cover the Sq new tokens).
        out = q.new_zeros(q.shape)
        if meta.full_rows.numel():
            rows = meta.full_rows
            out[rows] = attend(
                q[rows], block_tables=meta.block_tables[rows], context_lens=meta.context_lens[rows]
            )
        for row, pads in meta.padded_rows:
            sl = slice(row, row + 1)
            out[sl, pads:] = attend(
                q[sl, pads:], block_tables=meta.block_tables[sl], context_lens=meta.context_lens[sl]
            )
        return out.to(query.dtype)

    # ------------------------------------------------------------------ Cache API
    def reset(self) -> None:
        """Free every block (the pools stay allocated for reuse)."""
        self._reset_state()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as transformers' caches)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as for DynamicCache"
            )
        n = min(-tokens_to_remove, self._columns)
        self._crop_tables(lambda tables: tables.crop(n))
        self._columns -= n

    def _crop_tables(self, crop) -> None:
        """Apply `crop` to every group's block tables, then drop the blocks that left a window."""
        for g in self._groups:
            if g.tables is None:
                continue
            crop(g.tables)
            if g.window is not None:
                g.tables.drop_before([x - g.window + 1 for x in g.tables.lengths()])

    def crop_rows(self, tokens_to_remove: Sequence[int]) -> None:
        """Drop the last ``tokens_to_remove[i]`` tokens of row ``i`` (speculative decoding: each row rejects
        its own number of draft tokens). Emptied blocks go back to the pool; nothing is copied.

        Paged attention path only (after ``to_atb()``): there each row holds its own number of tokens. The
        stock path returns K/V of one length for all rows and raises ``RuntimeError``.
        """
        if self._mode == "stock":
            raise RuntimeError(
                "crop_rows() needs the paged attention path (a model converted with to_atb()); the stock "
                "attention path keeps every row at one length: use crop()"
            )
        counts = [int(n) for n in tokens_to_remove]
        if len(counts) != max(self.batch_size, 0) or any(n < 0 for n in counts):
            raise ValueError(f"need one count >= 0 per row ({self.batch_size} rows), got {counts}")
        self._crop_tables(lambda tables: tables.crop_rows(counts))
        self._columns -= min(counts, default=0)

    def _select(self, indices: list[int]) -> None:
        for g in self._groups:
            if g.tables is not None and len(g.tables):
                g.tables.select(indices)
        self._finished = {j for j, i in enumerate(indices) if i in self._finished}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``j`` becomes old row ``beam_idx[j]``; blocks are shared, copied on write."""
        self._select(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select([i for i in range(max(self.batch_size, 0)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._select(indices.tolist())

    def free_sequence(self, index: int) -> None:
        """Release the blocks of a finished sequence; it stays in the batch and stores nothing more."""
        for g in self._groups:
            if g.tables is not None and len(g.tables):
                g.tables.free_sequence(index)
        self._finished.add(index)

    def memory_stats(self) -> dict[str, int]:
        """Blocks in use, tokens they hold (shared blocks counted once), their bytes and the unused slots."""
        stats = {
            "block_size": self.block_size or 0,
            "num_blocks": 0,
            "allocated_blocks": 0,
            "tokens_stored": 0,
        }
        stats.update(allocated_bytes=0, pool_bytes=0, wasted_slots=0)
        for g in self._groups:
            if g.tables is None:
                continue
            alloc, bs = g.tables.allocator, self.block_size
            fill: dict[int, int] = {}
            for seq in g.tables.seqs:
                for i, block in enumerate(seq.blocks):
                    used = min(bs, seq.num_tokens - (seq.first_block + i) * bs)
                    fill[block] = max(fill.get(block, 0), used)
            in_use = alloc.num_blocks - alloc.num_free
            per_block = self._pool_bytes_per_block(g)
            stats["num_blocks"] += alloc.num_blocks
            stats["allocated_blocks"] += in_use
            stats["tokens_stored"] += sum(fill.values())
            stats["wasted_slots"] += in_use * bs - sum(fill.values())
            stats["allocated_bytes"] += in_use * per_block
            stats["pool_bytes"] += alloc.num_blocks * per_block
        return stats


def reads_from_pool(model) -> bool:
    """Whether `model`'s attention layers write and read a :class:`PagedCache` themselves (``to_atb()``),
    so that rows may hold different numbers of tokens (:meth:`PagedCache.crop_rows`)."""
    from .patches.fused import AttentionPlan

    return any(isinstance(getattr(m, "_atb", None), AttentionPlan) for m in model.modules())


def _real_token_counts(mask: torch.Tensor | None, batch: int, q_len: int) -> list[int] | None:
    """Real (non-pad) tokens among each row's ``q_len`` new ones, from the layer's attention mask.

    A real token attends to itself, a pad token attends to nothing (transformers' padding mask), so the
    diagonal of the new tokens tells them apart. ``None`` = all real. Pads must lead the row (left padding).
    """
    if mask is None or q_len == 1:
        return None
    if mask.dim() == 4:
        m = mask[:, 0]
        idx = torch.arange(q_len, device=m.device)
        diag = m[:, idx, m.shape[-1] - q_len + idx]
    elif mask.dim() == 2:
        diag = mask[:, -q_len:]
    else:
        raise ValueError(f"unsupported attention mask shape {tuple(mask.shape)}")
    real = diag if diag.dtype == torch.bool else (diag == 0 if mask.dim() == 4 else diag != 0)
    real = real.expand(batch, q_len).cpu()
    counts = real.sum(1)
    leading_pads = q_len - counts
    cols = torch.arange(q_len)
    if not bool((real == (cols[None, :] >= leading_pads[:, None])).all()):
        raise ValueError(
            "paged attention supports left padding only (pad tokens before the real ones in each row); "
            "use tokenizer.padding_side = 'left'"
        )
    return counts.tolist()


def register() -> None:
    """Make ``cache_implementation="atb_paged"`` build a :class:`PagedCache` in ``generate`` (idempotent)."""
    from transformers.generation import configuration_utils
    from transformers.generation.utils import GenerationMixin

    if CACHE_IMPLEMENTATION not in configuration_utils.ALL_CACHE_IMPLEMENTATIONS:
        configuration_utils.ALL_CACHE_IMPLEMENTATIONS = (
            *configuration_utils.ALL_CACHE_IMPLEMENTATIONS,
            CACHE_IMPLEMENTATION,
        )
    original = GenerationMixin._prepare_cache_for_generation
    if getattr(original, "_optimum_atb_paged", False):
        return

    @functools.wraps(original)
    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ):
        rows = batch_size * max(generation_config.num_beams, generation_config.num_return_sequences)
        cache = model_kwargs.get("cache")
        wants_paged = generation_config.cache_implementation == CACHE_IMPLEMENTATION
        if wants_paged and cache is None and generation_config.use_cache is not False:
            kwargs = dict(generation_config.cache_config or {})
            kwargs.setdefault("device", self.device)
            cache = model_kwargs["cache"] = PagedCache(self.config, **kwargs)
        else:  # every other case, a cache object passed with cache_implementation included (transformers raises)
            original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        if isinstance(cache, PagedCache):
            cache.size_for(rows, max_cache_length + 1)

    _prepare_cache_for_generation._optimum_atb_paged = True
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation
