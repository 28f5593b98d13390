"""Which implementation a munit op runs: the Triton kernels on CUDA, the exact reference elsewhere.

MUNIT_KERNELS=triton forces the Triton kernels on CPU tensors too (with TRITON_INTERPRET=1: how the
tests check the kernel path end to end); MUNIT_KERNELS=reference forces the reference on CUDA.
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

from munit_compile.codegen import reference


def kernels_for(t: torch.Tensor) -> ModuleType:
    choice = os.environ.get("MUNIT_KERNELS", "")
    if choice not in ("", "triton", "reference"):
        raise ValueError(f"MUNIT_KERNELS must be 'triton' or 'reference', got {choice!r}")
    if choice == "triton" or (t.is_cuda and choice != "reference"):
        from munit_compile.codegen.triton import linear

        return linear
    return reference
