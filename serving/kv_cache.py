"""The paged KV cache: a pool of fixed-size blocks, one block table per sequence, and the prefix cache.

Layout (shared with ``serving.kernels.paged_attention``, see helpers' PAGED_INTERFACE): per layer one K and one
V tensor ``[num_blocks, kv_heads, block_size, head_dim]`` (int8 with ``[num_blocks, kv_heads, block_size, 1]``
scales in the model dtype). Block 0 is never handed out: padded rows of a CUDA graph write there and block
tables are padded with it, so a padded row can never touch a sequence's data.

Prefix cache: every full block gets a key, the hash of (parent block's key, its tokens, the model/adapter id),
so one key stands for the whole prefix up to that block. A new sequence takes the longest chain of cached
blocks matching its prompt by reference (shared, ref-counted). A block whose count drops to 0 keeps its key
and K/V and waits in an LRU list; it is reused by a later prompt or evicted only when no never-used free block
is left. Only full blocks are shared and a sequence only writes past its shared part, so shared blocks are
read-only.

No torch here except the tensor allocation in ``KVBlocks``: the bookkeeping is plain Python and tested alone.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

NULL_BLOCK = 0


def block_key(parent: bytes | None, tokens: list[int] | tuple[int, ...], extra: str = "") -> bytes:
    """Key of a full block: blake2b over the parent's key, the model/adapter id and the token ids (16 bytes: a
    collision among 2^64 blocks is far beyond any cache)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(extra.encode())
    h.update(b"|")
    h.update(",".join(map(str, tokens)).encode())
    return h.digest()


class BlockPool:
    """Block ids 1..num_blocks-1 with reference counts, a key -> block table for full cached blocks, and an LRU
    list of cached blocks nobody references (evictable)."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("a block pool needs at least 2 blocks (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block (referenced or evictable)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 and keyed, oldest first
        self.free: deque[int] = deque(range(1, num_blocks))  # ref 0, no key
        self.evictions = 0

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks a sequence could take now (never used + evictable cached ones)."""
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int:
        """One fresh block (ref 1). Takes a never-used one first; only then evicts the least recently used
        cached block. Raises ``MemoryError`` when there is none (callers check ``num_free`` first)."""
        if self.free:
            b = self.free.popleft()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)
            key = self.key_of[b]
            if key is not None and self.cached.get(key) == b:
                del self.cached[key]
            self.key_of[b] = None
            self.evictions += 1
        else:
            raise MemoryError("no free KV blocks")
        self.ref[b] = 1
        return b

    def lookup(self, key: bytes) -> int | None:
        return self.cached.get(key) if self.prefix_caching else None

    def take(self, block: int) -> None:
        """One more reference to a cached block (revives it from the LRU list)."""
        if self.ref[block] == 0:
            self.evictable.pop(block, None)
        self.ref[block] += 1

    def register(self, block: int, key: bytes) -> None:
        """A block just became full: make it findable under ``key`` (first writer wins on a duplicate)."""
        if not self.prefix_caching or self.key_of[block] is not None:
            return
        if key not in self.cached:
            self.cached[key] = block
            self.key_of[block] = key

    def release(self, block: int) -> None:
        if self.ref[block] <= 0:
            raise AssertionError(f"block {block} released more often than taken")
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if self.key_of[block] is not None:
                self.evictable[block] = None  # most recently used at the end
            else:
                self.free.append(block)

    def reset_prefix_cache(self) -> None:
        """Forget every evictable cached block (the graph warm-up writes garbage through block 0 only, but a test
        or an adapter swap may want a clean cache)."""
        for b in list(self.evictable):
            del self.cached[self.key_of[b]]
            self.key_of[b] = None
            self.free.append(b)
        self.evictable.clear()


@dataclass
class BlockTable:
    """One sequence's blocks, the keys of its full blocks, and how many of its tokens came from the cache."""

    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # keys[i] is block i's key once block i is full
    cached_tokens: int = 0


class KVCacheManager:
    """Block tables over a ``BlockPool`` for the scheduler: prefix lookup at admission, growth, release."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, extra_key: str = ""):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.extra_key = extra_key  # model (and adapter) identity: a prefix is only shared within one model
        self.tables: dict[str, BlockTable] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.pool.usable * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _chain(self, tokens: list[int], full_blocks: int) -> list[bytes]:
        keys, parent, bs = [], None, self.block_size
        for i in range(full_blocks):
            parent = block_key(parent, tokens[i * bs:(i + 1) * bs], self.extra_key)
            keys.append(parent)
        return keys

    def match_prefix(self, tokens: list[int]) -> tuple[list[bytes], list[int]]:
        """Keys of the prompt's full blocks and the cached blocks of its longest cached prefix. At least the last
        token is always left to compute (its logits start the reply), so a fully cached prompt stops one block
        short."""
        if not self.pool.prefix_caching:
            return [], []
        keys = self._chain(tokens, (len(tokens) - 1) // self.block_size)
        hits = []
        for k in keys:
            b = self.pool.lookup(k)
            if b is None:
                break
            hits.append(b)
        return keys, hits

    def can_admit(self, tokens: list[int]) -> tuple[bool, int, int]:
        """(fits now, blocks needed beyond the cache hits, cached tokens) for a prompt about to be prefilled."""
        _, hits = self.match_prefix(tokens)
        need = self.blocks_for(len(tokens)) - len(hits)
        return need <= self._free_besides(hits), need, len(hits) * self.block_size

    def _free_besides(self, hits: list[int]) -> int:
        # evictable hits are counted in num_free but are taken, not allocated
        return self.pool.num_free - sum(1 for b in hits if self.pool.ref[b] == 0)

    def headroom_after_admit(self, tokens: list[int]) -> int:
        """Free blocks left once ``tokens`` were admitted (negative: they do not fit now)."""
        _, hits = self.match_prefix(tokens)
        return self._free_besides(hits) - (self.blocks_for(len(tokens)) - len(hits))

    def admit(self, seq_id: str, tokens: list[int]) -> int:
        """Allocate the blocks for ``tokens`` (the prompt, or prompt + output for a recompute), sharing the cached
        prefix. Returns the number of cached tokens (prefill starts there). Raises ``MemoryError`` when it does
        not fit (``can_admit`` first)."""
        ok, need, _ = self.can_admit(tokens)
        if not ok:
            raise MemoryError("not enough free KV blocks")
        keys, hits = self.match_prefix(tokens)
        table = BlockTable(cached_tokens=len(hits) * self.block_size)
        for b in hits:
            self.pool.take(b)
        table.blocks = list(hits)
        table.keys = keys[:len(hits)]
        for _ in range(need):
            table.blocks.append(self.pool.allocate())
        self.tables[seq_id] = table
        return table.cached_tokens

    def append_slot_needed(self, seq_id: str, pos: int) -> bool:
        """Whether writing position ``pos`` needs one more block."""
        return pos // self.block_size >= len(self.tables[seq_id].blocks)

    def grow(self, seq_id: str) -> None:
        self.tables[seq_id].blocks.append(self.pool.allocate())

    def commit_full_blocks(self, seq_id: str, tokens: list[int], num_computed: int) -> None:
        """Register every block that is full after ``num_computed`` tokens (``tokens`` = the sequence so far)."""
        t = self.tables[seq_id]
        full = num_computed // self.block_size
        if len(t.keys) >= full or not self.pool.prefix_caching:
            return
        bs = self.block_size
        parent = t.keys[-1] if t.keys else None
        for i in range(len(t.keys), full):
            parent = block_key(parent, tokens[i * bs:(i + 1) * bs], self.extra_key)
            t.keys.append(parent)
            self.pool.register(t.blocks[i], parent)

    def free(self, seq_id: str) -> None:
        t = self.tables.pop(seq_id, None)
        if t is None:
            return
        for b in reversed(t.blocks):  # tail first: the LRU keeps a prefix's head longer than its tail
            self.pool.release(b)

    def slot(self, seq_id: str, pos: int) -> int:
        """Flat cache slot (block * block_size + offset) of position ``pos``."""
        t = self.tables[seq_id]
        return t.blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def usage(self) -> float:
        """Fraction of usable blocks referenced by running sequences (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.pool.num_free / self.pool.usable


class KVBlocks:
    """The cache tensors: per layer K and V ``[num_blocks, kv_heads, block_size, head_dim]`` (+ int8 scales)."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, quantized: bool):
        shape = (num_blocks, kv_heads, block_size, head_dim)
        self.quantized, self.dtype, self.num_blocks, self.block_size = quantized, dtype, num_blocks, block_size
        store = torch.int8 if quantized else dtype
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(layers)]
        self.ks: list[torch.Tensor | None] = [None] * layers
        self.vs: list[torch.Tensor | None] = [None] * layers
        if quantized:
            self.ks = [torch.ones(shape[:-1] + (1,), dtype=dtype, device=device) for _ in range(layers)]
            self.vs = [torch.ones(shape[:-1] + (1,), dtype=dtype, device=device) for _ in range(layers)]

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, quantized: bool) -> int:
        elem = 1 if quantized else torch.tensor([], dtype=dtype).element_size()
        scale = 2 * torch.tensor([], dtype=dtype).element_size() if quantized else 0
        return layers * kv_heads * (2 * head_dim * elem + scale)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, *self.ks, *self.vs) if t is not None)
