"""FP8 GEMM for Hopper with the scale/bias/multiplier epilogue fused (reference: `reference.scaled_mm`).

    out[M, N] = ((a_q @ b_qᵀ)·inv_scale + bias)·α      a_q [M, K] row-major, b_q [N, K] K-major ("TN")
fp32 accumulation in `tl.dot` (wgmma on sm_90a), one rounding to the output dtype; inv_scale = 1/(s_a·s_b)
undoes the static operand scales, α is the μS output multiplier. Tiles are swizzled in groups of
GROUP_M rows so neighbouring programs share B tiles in L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TL_OUT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


@triton.jit
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
                    stride_cm, stride_cn, inv_scale, alpha,
                    HAS_BIAS: tl.constexpr, OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * tiles_n)) // rows_in_group
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        ks = k * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + ks[:, None] * stride_bk,
                    mask=(rn[None, :] < N) & (ks[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc)
    acc = acc * inv_scale
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    acc = acc * alpha
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(OUT),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def scaled_mm(a_q: torch.Tensor, b_t_q: torch.Tensor, inv_scale: float, bias: torch.Tensor | None = None,
              alpha: float = 1.0, out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None) -> torch.Tensor:
    """Launch `fp8_gemm_kernel`: a_q [M, K] and b_t_q [N, K] FP8 (E4M3, or one E5M2 operand)."""
    if a_q.dim() != 2 or b_t_q.dim() != 2 or a_q.shape[1] != b_t_q.shape[1]:
        raise ValueError(f"scaled_mm needs a[M,K] and b_t[N,K], got {tuple(a_q.shape)} and {tuple(b_t_q.shape)}")
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    M, K = a_q.shape
    N = b_t_q.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    fp8_gemm_kernel[grid](
        a_q, b_t_q, c, bias if bias is not None else c, M, N, K, a_q.stride(0), a_q.stride(1),
        b_t_q.stride(0), b_t_q.stride(1), c.stride(0), c.stride(1), float(inv_scale), float(alpha),
        HAS_BIAS=bias is not None, OUT=TL_OUT[out_dtype], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return c
