"""Suite-wide set-up that must run before any test module is imported.

Triton reads TRITON_INTERPRET once, when it is first imported, and test modules of several
packages import it indirectly (torch's compiler stack, dsv4's kernel dispatch): so the switch to
the interpreter on machines without a GPU (CI) is made here, at the root, ahead of all of them.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
