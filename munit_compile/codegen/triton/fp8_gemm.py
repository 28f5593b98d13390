"""FP8 GEMM for Hopper with the whole epilogue fused (reference: `reference.scaled_mm`, `codegen.epilogue`).

    y[M, N] = act(((a_q @ b_qᵀ)·inv_scale + bias)·α)·gate      a_q [M, K] row-major, b_q [N, K] K-major ("TN")
    y = c_skip·residual + c_branch·y
    out = y.to(BF16/FP16/FP32)   or   sat(y·out_scale).to(FP8), and optionally outᵀ [N, M] (FP8)
fp32 accumulation in `tl.dot` (wgmma on sm_90a), every epilogue step in fp32, one rounding to the output
dtype (read from the output pointer); inv_scale = 1/(s_a·s_b) undoes the static operand scales, α is the
μS output multiplier. The transposed FP8 copy is the K-major operand the backward GEMM reads, written
from the same registers. Tiles are swizzled in groups of GROUP_M rows so neighbouring programs share B
tiles in L2.

Exactness: the kernel is launched without FMA contraction (`enable_fp_fusion=False`), divides with
`div_rn` and takes exp/erf/tanh from libdevice (the functions torch's CUDA kernels call), so each step is
the IEEE operation the reference performs in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from munit_compile.codegen import epilogue

DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
COMPILE_OPTIONS = dict(enable_fp_fusion=False)  # a·b + c stays two roundings, as in the reference
FP8_OPERANDS = (torch.float8_e4m3fn, torch.float8_e5m2)

_SQRT1_2 = tl.constexpr(epilogue.SQRT1_2)
_SQRT_2_OVER_PI = tl.constexpr(epilogue.SQRT_2_OVER_PI)
_GELU_TANH_KAPPA = tl.constexpr(epilogue.GELU_TANH_KAPPA)


@triton.jit
def identity(x):
    """none: x (as `epilogue.identity`)."""
    return x


@triton.jit
def relu(x):
    """relu: 0 where x < 0, else x (as `epilogue.relu`)."""
    return tl.where(x < 0, 0.0, x)


@triton.jit
def gelu(x):
    """gelu (erf form): (x·0.5)·(1 + erf(x·(1/√2))) (as `epilogue.gelu`)."""
    return x * 0.5 * (1.0 + libdevice.erf(x * _SQRT1_2))


@triton.jit
def gelu_tanh(x):
    """gelu_tanh: (x·0.5)·(1 + tanh(√(2/π)·(x + κ·((x·x)·x)))) (as `epilogue.gelu_tanh`)."""
    inner = _SQRT_2_OVER_PI * (x + _GELU_TANH_KAPPA * (x * x * x))
    return x * 0.5 * (1.0 + libdevice.tanh(inner))


@triton.jit
def silu(x):
    """silu: x / (1 + exp(−x)), IEEE division (as `epilogue.silu`)."""
    return tl.math.div_rn(x, 1.0 + libdevice.exp(-x))


ACTIVATIONS = {"none": identity, "relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh, "silu": silu}
assert ACTIVATIONS.keys() == epilogue.ACTIVATIONS.keys(), "every activation needs a kernel helper and a reference"


@triton.jit
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, ct_ptr, bias_ptr, gate_ptr, res_ptr,
                    M, N, K,
                    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_ctn, stride_ctm,
                    stride_gm, stride_gn, stride_rm, stride_rn,
                    inv_scale, alpha, c_skip, c_branch, out_scale,
                    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr, OUT_MAX: tl.constexpr, TRANSPOSED_COPY: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of c (and of ct = cᵀ); ACTIVATION is a helper from `ACTIVATIONS`,
    OUT_MAX the FP8 output's saturation bound (None for BF16/FP16/FP32 outputs)."""
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

    mask = (rm[:, None] < M) & (rn[None, :] < N)
    acc = acc * inv_scale
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    acc = ACTIVATION(acc * alpha)
    if HAS_GATE:
        acc = acc * tl.load(gate_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn, mask=mask,
                            other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=mask, other=0.0)
        acc = c_skip * residual.to(tl.float32) + c_branch * acc
    if OUT_MAX is not None:
        acc = tl.clamp(acc * out_scale, -OUT_MAX, OUT_MAX)
    out = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, out, mask=mask)
    if TRANSPOSED_COPY:
        tl.store(ct_ptr + rn[:, None] * stride_ctn + rm[None, :] * stride_ctm, tl.trans(out), mask=tl.trans(mask))


def _check_kernel_arguments(a_q: torch.Tensor, b_t_q: torch.Tensor, bias: torch.Tensor | None,
                            out_dtype: torch.dtype, *others: torch.Tensor | None) -> None:
    """What the kernel needs beyond `epilogue.check`: FP8 operands, a [N] bias, an output it can store."""
    if a_q.dim() != 2 or b_t_q.dim() != 2 or a_q.shape[1] != b_t_q.shape[1]:
        raise ValueError(f"scaled_mm needs a[M,K] and b_t[N,K], got {tuple(a_q.shape)} and {tuple(b_t_q.shape)}")
    if a_q.dtype not in FP8_OPERANDS or b_t_q.dtype not in FP8_OPERANDS:
        raise ValueError(f"scaled_mm needs FP8 operands ({', '.join(map(str, FP8_OPERANDS))}), "
                         f"got a {a_q.dtype} and b_t {b_t_q.dtype}")
    if bias is not None and tuple(bias.shape) != (b_t_q.shape[0],):
        raise ValueError(f"scaled_mm: bias must have shape ({b_t_q.shape[0]},), got {tuple(bias.shape)}")
    if out_dtype not in epilogue.OUT_DTYPES:
        accepted = [str(d) for d in epilogue.OUT_DTYPES]
        raise ValueError(f"scaled_mm: out_dtype must be one of {accepted}, got {out_dtype}")
    devices = {t.device for t in (a_q, b_t_q, bias, *others) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"scaled_mm needs all tensors on one device, got {sorted(map(str, devices))}")


def scaled_mm(a_q: torch.Tensor, b_t_q: torch.Tensor, inv_scale: float, bias: torch.Tensor | None = None,
              alpha: float = 1.0, out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None, *,
              activation: str = "none", gate: torch.Tensor | None = None, residual: torch.Tensor | None = None,
              c_skip: float = 1.0, c_branch: float = 1.0, out_scale: float = 1.0,
              transposed_copy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launch `fp8_gemm_kernel`: a_q [M, K] and b_t_q [N, K] FP8 (E4M3, or one E5M2 operand).

    bias [N]; gate and residual [M, N] in BF16/FP16/FP32; activation one of `ACTIVATIONS`; out_dtype
    BF16/FP16/FP32, or FP8 (float8_e4m3fn / float8_e5m2) with out_scale, and with transposed_copy the
    result is (out [M, N], outᵀ [N, M]). Math and order: `reference.scaled_mm`. ValueError on bad arguments.
    """
    _check_kernel_arguments(a_q, b_t_q, bias, out_dtype, gate, residual)
    M, K = a_q.shape
    N = b_t_q.shape[0]
    epilogue.check(M, N, activation=activation, gate=gate, residual=residual, c_skip=c_skip,
                   c_branch=c_branch, out_dtype=out_dtype, out_scale=out_scale, transposed_copy=transposed_copy)
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    c = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    ct = torch.empty((N, M), dtype=out_dtype, device=a_q.device) if transposed_copy else c
    gate_, res_ = (gate if gate is not None else c), (residual if residual is not None else c)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    fp8_gemm_kernel[grid](
        a_q, b_t_q, c, ct, bias if bias is not None else c, gate_, res_,
        M, N, K,
        a_q.stride(0), a_q.stride(1), b_t_q.stride(0), b_t_q.stride(1), c.stride(0), c.stride(1),
        ct.stride(0), ct.stride(1), gate_.stride(0), gate_.stride(1), res_.stride(0), res_.stride(1),
        float(inv_scale), float(alpha), float(c_skip), float(c_branch), float(out_scale),
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS[activation], HAS_GATE=gate is not None,
        HAS_RESIDUAL=residual is not None, OUT_MAX=epilogue.FP8_MAX.get(out_dtype), TRANSPOSED_COPY=transposed_copy,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **COMPILE_OPTIONS)
    return (c, ct) if transposed_copy else c
