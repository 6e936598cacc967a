"""Kernel tests share two CPU cores with other work: one torch thread. Without a GPU the kernels
run in Triton's interpreter: the root tests/conftest.py sets TRITON_INTERPRET=1 before anything
imports Triton."""
from __future__ import annotations

import torch

torch.set_num_threads(1)
