"""Triton kernels that plug into dsv4 (each beside a torch reference of the same signature).

Imports only torch and Triton; Triton is optional (CPU installs keep the torch references).
dsv4 imports this package lazily, on the device paths that use it, so a test can set
TRITON_INTERPRET=1 before the first import.
"""
from dsv4_kernels import mhc
from dsv4_kernels.fp8_gemm import act_quant, act_quant_reference, fp8_linear, fp8_linear_reference
from dsv4_kernels.fused_moe import Fp4Experts, fused_moe, fused_moe_reference
from dsv4_kernels.indexer_topk import indexer_topk, indexer_topk_reference
from dsv4_kernels.sparse_attention import (
    KernelConfig,
    sparse_attention,
    sparse_attention_reference,
    triton_available,
)

__all__ = ["Fp4Experts", "KernelConfig", "act_quant", "act_quant_reference", "fp8_linear",
           "fp8_linear_reference", "fused_moe", "fused_moe_reference", "indexer_topk",
           "indexer_topk_reference", "mhc", "sparse_attention", "sparse_attention_reference",
           "triton_available"]
