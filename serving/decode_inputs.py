"""The decode step's inputs on the host, kept from one step to the next: one int32 tensor of rows
``[last token, position, slot, context length, block table...]`` (``PACKED_COLUMNS`` then the table), updated in
place.

Why: the engine rebuilt every row, block table included, from Python lists each step and copied it in a fresh
tensor; a rollout's batch keeps the same sequences step after step and a row's table only changes when it opens a
block (one step in ``block_size``). Here a step writes the four changing columns of every row in one copy, and a
row's table only when it grew or another sequence took its row. Rows past the batch hold the padding a CUDA graph's
unused rows need (block 0, one position), so the engine copies the bucket's rows to the device in one transfer
(from pinned memory on CUDA) and the graph reads them as they are. Plain torch on the host; no model here.
"""

from __future__ import annotations

from typing import Any

import torch

TOKEN, POS, SLOT, LEN = range(4)
PACKED_COLUMNS = 4


def pad_rows(host: torch.Tensor) -> None:
    """Rows a graph runs beyond the batch: token 0 at position 0, slot 0 of the reserved block 0, one position."""
    host.zero_()
    host[:, LEN] = 1


class DecodeInputs:
    """Persistent host rows for up to ``max_rows`` sequences with tables ``width`` blocks wide."""

    def __init__(self, max_rows: int, width: int, block_size: int, pin: bool = False):
        self.block_size = block_size
        self.width = width
        self.host = torch.empty(max_rows, PACKED_COLUMNS + width, dtype=torch.int32, pin_memory=pin)
        # writes go through a numpy view of the same memory: assigning a list of 16 rows there took 2.9 us on the
        # 2-core CPU, against 10.4 us for torch.tensor(list) and a tensor copy
        self.np = self.host.numpy()
        pad_rows(self.host)
        self.tables: list[Any] = []  # the block table (object) whose entries row i holds
        self.blocks: list[int] = []  # how many of its entries row i holds

    def fill(self, seqs: list[Any], tables: dict[str, Any], ahead: int = 0) -> int:
        """Write this step's rows for ``seqs`` (``tables``: the KV manager's block tables by sequence id); returns
        the longest context (positions including the new token). ``ahead=1``: the rows of the step after this one
        (each position one further; the token column then holds the current last token, for the caller to
        replace on the device).

        A row's table is rewritten whole when it holds another table object (another sequence, or the same one
        admitted again after a preemption: new blocks), else only its new entries are written (tables only grow)."""
        bs, host, held, have = self.block_size, self.np, self.tables, self.blocks
        n = len(seqs)
        if len(held) > n:  # rows the batch left: padding again
            pad_rows(self.host[n:len(held)])
            del held[n:], have[n:]
        cols, longest = [], 0
        for i, s in enumerate(seqs):
            t = tables[s.id]
            blocks = t.blocks
            if i == len(held):
                held.append(t)
                have.append(0)
                host[i, PACKED_COLUMNS:] = 0
            elif held[i] is not t:
                held[i], have[i] = t, 0
                host[i, PACKED_COLUMNS:] = 0
            if have[i] != len(blocks):
                host[i, PACKED_COLUMNS + have[i]:PACKED_COLUMNS + len(blocks)] = blocks[have[i]:]
                have[i] = len(blocks)
            p = s.num_computed + ahead
            cols.append((s.output_ids[-1], p, blocks[p // bs] * bs + p % bs, p + 1))
            if p >= longest:
                longest = p + 1
        if cols:
            host[:n, :PACKED_COLUMNS] = cols
        return longest

    def reset(self) -> None:
        """Forget every row (the next ``fill`` rewrites them all)."""
        pad_rows(self.host)
        self.tables, self.blocks = [], []
