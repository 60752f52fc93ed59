"""Contamination-free packing: several samples share one row, attention stays inside each.

Rows are filled best-fit by decreasing length (deterministic, O(n log capacity)). A
packed row keeps the lengths of its samples in `Example.segments`; the collator turns
them into positions that restart at 0 for every sample and a block-diagonal causal
mask (or, for flash-attention, only the restarting positions, which transformers reads
as varlen sequences). The first label of every sample is masked: in a packed row it
would be predicted from the previous sample's last token.
"""

from __future__ import annotations

from collections.abc import Sequence

from r1tune.data.encode import IGNORE, Example


def example_lengths(examples) -> list[int]:
    """Token count of every example (without materialising stored ones)."""
    if hasattr(examples, "lengths"):
        return list(examples.lengths())
    return [len(e.input_ids) for e in examples]


def pack_groups(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices per row: longest first, each into the fullest row that still has room."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free = _RoomIndex(capacity)
    rows: list[list[int]] = []
    for i in order:
        size = min(lengths[i], capacity)
        row = free.take(size)
        if row is None:
            rows.append([i])
            free.put(len(rows) - 1, capacity - size)
        else:
            rows[row].append(i)
            free.put(row, free.last_room - size)
    return rows


class _RoomIndex:
    """Rows by free room; finds a row with the least room >= n via a max-segment tree."""

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)  # rows with exactly this room, summed up the tree
        self.rows: dict[int, list[int]] = {}
        self.last_room = 0

    def put(self, row: int, room: int) -> None:
        if room <= 0:
            return
        self.rows.setdefault(room, []).append(row)
        node = room + self.size
        while node:
            self.count[node] += 1
            node //= 2

    def take(self, need: int) -> int | None:
        room = self._first_at_least(need)
        if room is None:
            return None
        row = self.rows[room].pop() if len(self.rows[room]) > 1 else self.rows.pop(room)[0]
        node = room + self.size
        while node:
            self.count[node] -= 1
            node //= 2
        self.last_room = room
        return row

    def _first_at_least(self, need: int) -> int | None:
        """Smallest room >= need that some row has."""
        if need >= self.size:
            return None
        node, lo, hi = 1, 0, self.size - 1
        return self._search(node, lo, hi, need)

    def _search(self, node: int, lo: int, hi: int, need: int) -> int | None:
        if hi < need or self.count[node] == 0:
            return None
        if lo == hi:
            return lo
        mid = (lo + hi) // 2
        found = self._search(2 * node, lo, mid, need)
        return found if found is not None else self._search(2 * node + 1, mid + 1, hi, need)


class PackedRows(Sequence):
    """Packed rows built on access from the underlying examples (which may live on disk)."""

    def __init__(self, examples, groups: list[list[int]]):
        self.examples, self.groups = examples, groups
        lengths = example_lengths(examples)
        self._lengths = [sum(lengths[i] for i in g) for g in groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return join_examples([self.examples[i] for i in self.groups[index]])

    def lengths(self) -> list[int]:
        return self._lengths


def pack_examples(examples, capacity: int) -> PackedRows:
    """Rows of at most `capacity` tokens, each holding one or more whole samples."""
    return PackedRows(examples, pack_groups(example_lengths(examples), capacity))


def join_examples(parts: list[Example]) -> Example:
    """One row holding `parts` side by side; each part's first token is never a target."""
    ids, labels = [], []
    for part in parts:
        ids += part.input_ids
        labels += [IGNORE] + list(part.labels[1:])
    return Example(ids, labels, truncated=any(p.truncated for p in parts),
                   segments=tuple(len(p.input_ids) for p in parts))
