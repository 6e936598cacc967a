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

    def append(self, rows: torch.Tensor) -> None:
        if rows.shape[0] == 0:          # most decode steps of most rows: no copy to launch
            return
        need = self.n + rows.shape[0]
        if need > self.max_rows:
            raise RuntimeError(f"cache full: {need} compressed entries exceed {self.max_rows} "
                               f"(raise ModelConfig.max_seq_len)")
        if need > self.data.shape[0]:
            capacity = min(self.max_rows, max(need, 2 * self.data.shape[0], 16))
            grown = torch.empty(capacity, self.width, dtype=self.data.dtype, device=self.data.device)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n: need] = rows.to(self.data.dtype)
        self.n = need

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.n:
            raise ValueError(f"cannot truncate {self.n} rows to {n}")
        self.n = n

    def copy(self, device: torch.device | str | None = None) -> GrowingRows:
        out = GrowingRows(self.width, self.max_rows, self.data.dtype, device or self.data.device)
        out.append(self.view())
        return out
