"""Saving and loading a session: a folder holding `kv.safetensors` and `manifest.json`.

kv.safetensors  the cache's `state_tensors()` (the KV of every token fed so far)
manifest.json   format + version, the model's fingerprint, the session's token ids and how many of
                them the cache holds (the rest are fed on the next call), and the KV storage dtype

The fingerprint (`model_fingerprint`) hashes the model's config and a strided sample of every
weight, so a session is never continued on a model whose KV it does not belong to.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dsv4.runtime.errors import SessionFormatError, SessionMismatch

FORMAT, VERSION = "dsv4-session", 1
MANIFEST, TENSORS = "manifest.json", "kv.safetensors"
_SAMPLES_PER_TENSOR = 64


def config_dict(cfg: Any) -> dict:
    """A JSON-able dict of a config object (dataclass, pydantic model or plain object)."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    if hasattr(cfg, "model_dump"):
        return cfg.model_dump()
    return dict(vars(cfg))


def model_fingerprint(model: torch.nn.Module, cfg: Any) -> str:
    """sha256 over the config and, per tensor, its name, dtype, shape and 64 strided elements."""
    h = hashlib.sha256()
    h.update(json.dumps(config_dict(cfg), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            sample = flat[::step][:_SAMPLES_PER_TENSOR].contiguous().cpu()
            h.update(bytes(sample.view(torch.uint8).tolist()))
    return h.hexdigest()


def write_session(path: str | os.PathLike, *, fingerprint: str, token_ids: list[int],
                  cache_length: int, tensors: dict[str, torch.Tensor], kv_dtype: str) -> Path:
    """Write the folder; files are written under temporary names and renamed into place."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model_fingerprint": fingerprint,
        "kv_dtype": kv_dtype,
        "cache_length": cache_length,
        "token_ids": [int(t) for t in token_ids],
    }
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(cpu, folder / (TENSORS + ".tmp"), metadata={"format": FORMAT})
    (folder / (MANIFEST + ".tmp")).write_text(json.dumps(manifest))
    os.replace(folder / (TENSORS + ".tmp"), folder / TENSORS)
    os.replace(folder / (MANIFEST + ".tmp"), folder / MANIFEST)
    return folder


def read_manifest(path: str | os.PathLike) -> dict:
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise SessionFormatError(f"{folder} is not a saved session: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise SessionFormatError(f"{file} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise SessionFormatError(f"{file} is not a {FORMAT} manifest (format={manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise SessionFormatError(f"{file} has version {manifest.get('version')!r}; this engine reads {VERSION}")
    ids, length = manifest.get("token_ids"), manifest.get("cache_length")
    if not isinstance(ids, list) or not isinstance(length, int) or not 0 <= length <= len(ids):
        raise SessionFormatError(f"{file}: cache_length must be an int in [0, len(token_ids)]")
    return manifest


def read_session(path: str | os.PathLike, *, fingerprint: str,
                 device: torch.device | str = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a saved session made by the model with this fingerprint; returns (manifest, tensors)."""
    manifest = read_manifest(path)
    if manifest["model_fingerprint"] != fingerprint:
        raise SessionMismatch(
            f"session {path} was saved by a different model (fingerprint "
            f"{manifest['model_fingerprint'][:16]}..., this engine's model is {fingerprint[:16]}...)"
        )
    file = Path(path) / TENSORS
    if not file.is_file():
        raise SessionFormatError(f"{path} is missing {TENSORS}")
    return manifest, load_file(file, device=str(device))
