"""Append-only row storage with amortised growth: the compressed KV entries and indexer keys of one
layer are appended a few rows a step and truncated on rollback (dsv4/network/cache.py); the
quantised layouts of dsv4/formats/kv_fp8.py store their rows the same way."""
from __future__ import annotations

import torch


class GrowingRows:
    """Append-only rows [n, width]; capacity doubles (at least 16 rows) up to `max_rows`."""

    def __init__(self, width: int, max_rows: int, dtype: torch.dtype, device: torch.device | str):
        self.width, self.max_rows = width, max_rows
        self.data = torch.empty(0, width, dtype=dtype, device=device)
        self.n = 0

    def view(self) -> torch.Tensor:
        """The filled rows [n, width] (a view, not a copy)."""
        return self.data[: self.n]

    def stored(self) -> torch.Tensor:
        """The filled rows as stored (what is saved); `view()` for plain rows."""
        return self.data[: self.n]

    def capacity_for(self, rows: int, capacity: int | None = None) -> int:
        """The capacity holding `rows` rows, grown from `capacity` (default: the current one): that
        if it suffices, else doubled (at least to `rows`, at least 16, at most `max_rows`)."""
        capacity = self.data.shape[0] if capacity is None else capacity
        if rows <= capacity:
            return capacity
        if rows > self.max_rows:
            raise RuntimeError(f"cache full: {rows} compressed entries exceed {self.max_rows} "
                               f"(raise ModelConfig.max_seq_len)")
        return min(self.max_rows, max(rows, 2 * capacity, 16))

    def reserve(self, rows: int) -> None:
        """Allocate room for `rows` rows now (as `append` would grow to them)."""
        capacity = self.capacity_for(rows)
        if capacity > self.data.shape[0]:
            grown = torch.empty(capacity, self.width, dtype=self.data.dtype, device=self.data.device)
            grown[: self.n] = self.data[: self.n]
            self.data = grown

    def append(self, rows: torch.Tensor) -> None:
        if rows.shape[0] == 0:          # most decode steps of most rows: no copy to launch
            return
        need = self.n + rows.shape[0]
        self.reserve(need)
        self.data[self.n: need] = rows.to(self.data.dtype)
        self.n = need

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.n:
            raise ValueError(f"cannot truncate {self.n} rows to {n}")
        self.n = n

    def copy_capacity(self) -> int:
        """The capacity of a `copy()`: room for the filled rows only."""
        return self.capacity_for(self.n, 0) if self.n else 0

    def copy(self, device: torch.device | str | None = None) -> GrowingRows:
        out = GrowingRows(self.width, self.max_rows, self.data.dtype, device or self.data.device)
        out.append(self.view())
        return out
