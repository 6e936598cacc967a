"""Kernel tests run the Triton kernels through the interpreter on CPU (set before Triton is first
imported: dsv4 imports kernels lazily, so nothing has yet), or compiled on a CUDA GPU when there
is one. One torch thread: the CPU is shared."""
from __future__ import annotations

import os

import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
