"""How a forward pass runs, as opposed to what it computes: which kernels run it and how large the
score workspaces may grow. The logits do not depend on these settings beyond summation order.

    model(ids, caches=caches, options=ForwardOptions(sparse_kernel="off"))   # the engine passes its own
    with ForwardOptions(quant_kernels="always").applied():                     # a layer called directly
        y = linear(x)

`Transformer.forward` applies the options it is given for the duration of the call; the layers read
them with `forward_options()` (a context variable: per thread and task, so forwards running
concurrently with different options never see each other's).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

# fp32 elements of one query block's attention logits or indexer scores, by device type: bounded
# whatever the context length; a GPU gets larger blocks (fewer, bigger matmuls: 1 GiB at most)
DEFAULT_WORKSPACE = {"cpu": 1 << 24, "cuda": 1 << 28}

KernelDispatch = Literal["cuda", "always", "off"]


class ForwardOptions(BaseModel):
    """Kernel dispatch, each "cuda" (CUDA tensors when Triton is installed), "always" (any device
    Triton runs on: the CPU only under TRITON_INTERPRET=1, for tests) or "off" (the torch path,
    every kernel's reference):
    sparse_kernel    the core attention softmax (dsv4_kernels.sparse_attention)
    indexer_kernel   the Lightning Indexer's top-k selection (dsv4_kernels.indexer_topk; one rank)
    quant_kernels    FP8 linears and the fused FP4 MoE (dsv4_kernels.fp8_gemm, .fused_moe)
    compile_sinkhorn the mHC Sinkhorn through torch.compile where the fused mHC kernel does not run
    workspace_elems  fp32 elements of one query block's [queries, heads, keys] attention logits and
                     of the indexer's [queries, heads, entries] scores; None = 2^24 on CPU, 2^28 on
                     CUDA; 1 = one query per block (the path a 1M-token context takes)"""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sparse_kernel: KernelDispatch = "cuda"
    indexer_kernel: KernelDispatch = "cuda"
    quant_kernels: KernelDispatch = "cuda"
    compile_sinkhorn: bool = False
    workspace_elems: int | None = Field(None, ge=1)

    def workspace(self, device_type: str) -> int:
        if self.workspace_elems is not None:
            return self.workspace_elems
        return DEFAULT_WORKSPACE.get(device_type, DEFAULT_WORKSPACE["cpu"])

    @contextmanager
    def applied(self) -> Iterator[ForwardOptions]:
        """These options for the forwards run inside the block (in this thread or task)."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


def kernel_enabled(dispatch: KernelDispatch, x: torch.Tensor) -> bool:
    """Whether a kernel with this dispatch setting runs on tensors like `x`."""
    if dispatch == "off" or (dispatch == "cuda" and not x.is_cuda):
        return False
    import dsv4_kernels  # lazily: Triton must be imported after a test sets TRITON_INTERPRET
    return dsv4_kernels.triton_available()


_CURRENT: ContextVar[ForwardOptions] = ContextVar("dsv4_forward_options", default=ForwardOptions())  # noqa: B039 - frozen


def forward_options() -> ForwardOptions:
    """The options of the forward running now (the defaults outside any)."""
    return _CURRENT.get()
