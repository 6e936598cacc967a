"""The KV cache of one sequence.

Per main layer (reference §3.1), all owned by `LayerCache`:
- `window`      [window_size, head_dim]: ring of the last 128 tokens' K=V (slot = pos % 128);
- CSA / HCA layers: `compressor` (the not-yet-complete block: raw kv and gate scores + ape, fp32,
  plus for CSA the previous complete block, whose "a" halves the next entry also pools) and
  `compressed` (one K=V entry per complete block of m tokens, appended);
- CSA layers: `indexer_compressor` and `indexer_keys` (the Lightning Indexer's own entries).
Fixed-size state (rings, compressor blocks) is overwritten in place; compressed entries only grow,
in `GrowingRows` buffers that double their capacity up to `max_seq_len // m`, so memory stays
linear in the context (Flash: ~6.7 KiB per token over 43 layers in bf16) and 1M tokens fit.

`ModelCache` bundles the layers with the token count. `snapshot()` copies only the fixed-size
state and records the entry counts; `restore()` copies it back and cuts the growing buffers back,
which is valid because entries before the snapshot are never rewritten. A lineage of "epochs"
catches restoring a snapshot whose rows were overwritten since (after a restore or a clone).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from dsv4.formats.rows import GrowingRows
from dsv4.network.config import ModelConfig

_epoch_ids = itertools.count(1)


@dataclass
class CompressorState:
    """A compressor's partial blocks: raw kv and gate scores (+ ape) of the tokens of the current,
    incomplete block, and for CSA (overlap) also those of the previous complete block.
    Layout as the official buffers: [c*m, c*d], CSA slots 0..m-1 = previous block, m..2m-1 =
    current block; HCA slots 0..m-1 = current block. Empty slots: kv 0, score -inf."""

    kv: torch.Tensor      # [c*m, c*d] fp32
    score: torch.Tensor   # [c*m, c*d] fp32

    @classmethod
    def empty(cls, ratio: int, head_dim: int, device: torch.device | str) -> CompressorState:
        c = 2 if ratio == 4 else 1
        kv = torch.zeros(c * ratio, c * head_dim, dtype=torch.float32, device=device)
        return cls(kv, torch.full_like(kv, float("-inf")))

    def copy(self, device: torch.device | str | None = None) -> CompressorState:
        return CompressorState(self.kv.to(device or self.kv.device, copy=True),
                               self.score.to(device or self.score.device, copy=True))


@dataclass
class LayerCache:
    """One main layer's state for one sequence (see the module docstring)."""

    window: torch.Tensor                                   # [window_size, head_dim]
    compressor: CompressorState | None = None
    compressed: GrowingRows | None = None                  # [n, head_dim]
    indexer_compressor: CompressorState | None = None
    indexer_keys: GrowingRows | None = None                # [n, index_head_dim]

    @classmethod
    def empty(cls, cfg: ModelConfig, layer_id: int, device: torch.device | str,
              dtype: torch.dtype, kv_fp8: bool = False) -> LayerCache:
        """kv_fp8: compressed entries stored in the 584-byte FP8 layout and indexer keys in MXFP4
        (dsv4/kv_fp8.py)."""
        ratio = cfg.compress_ratios[layer_id]
        cache = cls(window=torch.zeros(cfg.window_size, cfg.head_dim, dtype=dtype, device=device))
        if ratio:
            cache.compressor = CompressorState.empty(ratio, cfg.head_dim, device)
            if kv_fp8:
                from dsv4.formats.kv_fp8 import Fp8KVLayout, Fp8Rows
                layout = Fp8KVLayout(cfg.head_dim, cfg.rope_head_dim)
                cache.compressed = Fp8Rows(layout, cfg.max_seq_len // ratio, dtype, device)
            else:
                cache.compressed = GrowingRows(cfg.head_dim, cfg.max_seq_len // ratio, dtype, device)
        if ratio == 4:
            cache.indexer_compressor = CompressorState.empty(ratio, cfg.index_head_dim, device)
            if kv_fp8:
                from dsv4.formats.kv_fp8 import Fp4Rows
                cache.indexer_keys = Fp4Rows(cfg.index_head_dim, cfg.max_seq_len // ratio, dtype, device)
            else:
                cache.indexer_keys = GrowingRows(cfg.index_head_dim, cfg.max_seq_len // ratio, dtype, device)
        return cache

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every state tensor by name (growing buffers trimmed to their filled rows)."""
        out = {"window": self.window}
        if self.compressor is not None:
            out |= {"compressor.kv_state": self.compressor.kv, "compressor.score_state": self.compressor.score,
                    "compressed": self.compressed.stored()}
        if self.indexer_compressor is not None:
            out |= {"indexer.compressor.kv_state": self.indexer_compressor.kv,
                    "indexer.compressor.score_state": self.indexer_compressor.score,
                    "indexer.keys": self.indexer_keys.stored()}
        return out

    def copy(self, device: torch.device | str | None = None) -> LayerCache:
        def cp(x):
            return None if x is None else x.copy(device)
        return LayerCache(self.window.to(device or self.window.device, copy=True), cp(self.compressor),
                          cp(self.compressed), cp(self.indexer_compressor), cp(self.indexer_keys))


@dataclass(frozen=True)
class CacheSnapshot:
    """What `ModelCache.snapshot()` returns; opaque to callers apart from `length`."""

    length: int
    epoch: int
    fixed: list[dict[str, torch.Tensor]] = field(repr=False)   # per layer: ring + compressor states
    rows: list[tuple[int, int]] = field(repr=False)             # per layer: (compressed, indexer) counts


class ModelCache:
    """The KV cache of one sequence: one `LayerCache` per main layer, and the token count."""

    def __init__(self, cfg: ModelConfig, layers: list[LayerCache], length: int = 0):
        if len(layers) != cfg.n_layers:
            raise ValueError(f"expected {cfg.n_layers} layer caches, got {len(layers)}")
        self.cfg, self.layers, self.length = cfg, layers, length
        self._epoch = next(_epoch_ids)
        self._parents: dict[int, tuple[int | None, int]] = {self._epoch: (None, length)}

    @classmethod
    def empty(cls, cfg: ModelConfig, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, kv_fp8: bool = False) -> ModelCache:
        return cls(cfg, [LayerCache.empty(cfg, i, device, dtype, kv_fp8) for i in range(cfg.n_layers)])

    @property
    def device(self) -> torch.device:
        return self.layers[0].window.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].window.dtype

    def nbytes(self) -> int:
        """Bytes held in memory (growing buffers count their whole allocated capacity)."""
        return self.fixed_nbytes() + sum(rows.data.nbytes for rows, _ in self._buffers())

    def _buffers(self):
        """(growing buffer, compression ratio) of every layer."""
        for layer, ratio in zip(self.layers, self.cfg.compress_ratios):
            for rows in (layer.compressed, layer.indexer_keys):
                if rows is not None:
                    yield rows, ratio

    def growth_bytes(self, length: int, cloned: bool = False) -> int:
        """Bytes the growing buffers must add to hold `length` tokens (what `reserve(length)`, or
        appending up to that length in one go, allocates); `cloned`: to those of a `clone()`."""
        total = 0
        for rows, ratio in self._buffers():
            have = rows.copy_capacity() if cloned else rows.data.shape[0]
            total += (rows.capacity_for(length // ratio, have) - have) * rows.width * rows.data.element_size()
        return total

    def clone_nbytes(self) -> int:
        """Bytes a `clone()` allocates (growing buffers copied without their spare room)."""
        return self.fixed_nbytes() + sum(rows.copy_capacity() * rows.width * rows.data.element_size()
                                         for rows, _ in self._buffers())

    def reserve(self, length: int) -> None:
        """Allocate the growing buffers' room for `length` tokens now, so that feeding up to there
        allocates nothing more, however it is chunked."""
        for rows, ratio in self._buffers():
            rows.reserve(length // ratio)

    def fixed_nbytes(self) -> int:
        """Bytes of the fixed-size state (sliding rings, compressor partial blocks): what a
        `snapshot()` copies."""
        total = 0
        for layer in self.layers:
            total += layer.window.nbytes
            for st in (layer.compressor, layer.indexer_compressor):
                if st is not None:
                    total += st.kv.nbytes + st.score.nbytes
        return total

    # ---- copies and rollback ------------------------------------------------------------------
    def _new_epoch(self, base_length: int) -> None:
        child = next(_epoch_ids)
        self._parents[child] = (self._epoch, base_length)
        self._epoch = child

    def clone(self) -> ModelCache:
        """An independent deep copy; snapshots taken before the clone restore on either copy."""
        out = ModelCache(self.cfg, [layer.copy() for layer in self.layers], self.length)
        out._parents, out._epoch = dict(self._parents), self._epoch
        out._new_epoch(self.length)
        self._new_epoch(self.length)
        return out

    def snapshot(self) -> CacheSnapshot:
        fixed, rows = [], []
        for layer in self.layers:
            fixed.append({k: v.clone() for k, v in layer.tensors().items()
                          if k not in ("compressed", "indexer.keys")})
            rows.append((layer.compressed.n if layer.compressed else 0,
                         layer.indexer_keys.n if layer.indexer_keys else 0))
        return CacheSnapshot(self.length, self._epoch, fixed, rows)

    def _still_valid(self, snap: CacheSnapshot) -> bool:
        """True when no row written before `snap` has been overwritten since."""
        limit, epoch = self.length, self._epoch
        while epoch is not None:
            if epoch == snap.epoch:
                return snap.length <= limit
            parent, base = self._parents[epoch]
            limit, epoch = min(limit, base), parent
        return False

    def restore(self, snap: CacheSnapshot) -> None:
        """Return to the state of `snap` (taken on this cache or on one it was cloned from)."""
        if not self._still_valid(snap):
            raise ValueError(f"snapshot at length {snap.length} no longer matches this cache "
                             f"(its history was rewritten by a restore or it belongs to another clone)")
        for layer, fixed, (n_comp, n_idx) in zip(self.layers, snap.fixed, snap.rows):
            layer.window.copy_(fixed["window"])
            if layer.compressor is not None:
                layer.compressor.kv.copy_(fixed["compressor.kv_state"])
                layer.compressor.score.copy_(fixed["compressor.score_state"])
                layer.compressed.truncate(n_comp)
            if layer.indexer_compressor is not None:
                layer.indexer_compressor.kv.copy_(fixed["indexer.compressor.kv_state"])
                layer.indexer_compressor.score.copy_(fixed["indexer.compressor.score_state"])
                layer.indexer_keys.truncate(n_idx)
        self.length = snap.length
        self._new_epoch(snap.length)

    # ---- save / load / move -------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor dict (safetensors-ready), e.g. `layers.3.compressed`, `length`."""
        out = {"length": torch.tensor([self.length], dtype=torch.int64)}
        for i, layer in enumerate(self.layers):
            out |= {f"layers.{i}.{k}": v.contiguous() for k, v in layer.tensors().items()}
        return out

    @classmethod
    def from_state_tensors(cls, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                           device: torch.device | str | None = None) -> ModelCache:
        """Rebuild a cache saved by `state_tensors()`; every name and shape is checked."""
        if "length" not in tensors:
            raise ValueError("cache state lacks 'length'")
        device = device or tensors["length"].device
        dtype = tensors["layers.0.window"].dtype if "layers.0.window" in tensors else torch.float32
        kv_fp8 = any(k.endswith(".compressed") and t.dtype == torch.uint8 for k, t in tensors.items())
        cache = cls.empty(cfg, device, dtype, kv_fp8)
        cache.length = int(tensors["length"].item())
        expected = cache.state_tensors()
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise ValueError(f"unexpected cache tensors for this config: {extra[:5]}")
        for i, layer in enumerate(cache.layers):
            for name, target in layer.tensors().items():
                key = f"layers.{i}.{name}"
                if key not in tensors:
                    raise ValueError(f"cache state lacks {key!r}")
                t = tensors[key]
                if name in ("compressed", "indexer.keys"):
                    rows = layer.compressed if name == "compressed" else layer.indexer_keys
                    if t.dim() != 2 or t.shape[1] != rows.width:
                        raise ValueError(f"{key}: expected [n, {rows.width}], got {list(t.shape)}")
                    rows.append(t.to(device))
                elif t.shape != target.shape:
                    raise ValueError(f"{key}: expected {list(target.shape)}, got {list(t.shape)}")
                else:
                    target.copy_(t)
        ratios = cfg.compress_ratios
        for i, layer in enumerate(cache.layers):
            if layer.compressed is not None and layer.compressed.n != cache.length // ratios[i]:
                raise ValueError(f"layers.{i}.compressed: {layer.compressed.n} entries do not match "
                                 f"length {cache.length} // {ratios[i]}")
        cache._parents = {cache._epoch: (None, cache.length)}
        return cache

    def to(self, device: torch.device | str) -> ModelCache:
        """Move every tensor to `device` (in place; returns self), e.g. to spill to CPU."""
        self.layers = [layer.copy(device) for layer in self.layers]
        return self

    def __repr__(self) -> str:
        return f"ModelCache(length={self.length}, layers={len(self.layers)}, nbytes={self.nbytes()})"
