"""FP8 GEMM for Hopper with the whole epilogue fused (reference: `reference.scaled_mm`, `codegen.epilogue`).

    y[M, N] = act(((a_q @ b_qᵀ)·inv_scale + bias)·α)·gate      a_q [M, K] row-major, b_q [N, K] K-major ("TN")
    y = c_skip·residual + c_branch·y
    out = y.to(BF16/FP16/FP32)   or   sat(y·out_scale).to(FP8), and optionally outᵀ [N, M] (FP8)
fp32 accumulation in `tl.dot` (wgmma on sm_90a), every epilogue step in fp32, one rounding to the output
dtype (read from the output pointer); inv_scale = 1/(s_a·s_b) undoes the static operand scales, α is the
μS output multiplier. The transposed FP8 copy is the K-major operand the backward GEMM reads, written
from the same registers. Tiles are swizzled in groups of GROUP_M rows so neighbouring programs share B
tiles in L2.

Two schedules, one main loop per operand path and one epilogue (`epilogue_store`), so they cannot drift:
"tiled" (`fp8_gemm_kernel`) launches a program per output tile; "persistent" (`fp8_gemm_persistent_kernel`)
launches min(#SMs, #tiles) programs that stride over the tiles in the same order, and reads the operands
through device-side TMA descriptors (`tl.make_tensor_descriptor`, zero-filling ragged edges; their scratch
comes from `triton.set_allocator`) when the host finds both operands TMA-eligible (`tma_blocker`), with
masked pointer loads otherwise. Tile configs per shape: `gemm_configs`.

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
from munit_compile.codegen.triton import gemm_configs

DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, EPILOGUE_SPLIT=1)
COMPILE_OPTIONS = dict(enable_fp_fusion=False)  # a·b + c stays two roundings, as in the reference
FP8_OPERANDS = (torch.float8_e4m3fn, torch.float8_e5m2)
SCHEDULES = ("tiled", "persistent")
INTERPRETER_SMS = 4  # persistent programs under TRITON_INTERPRET (no SMs to count); a config's NUM_SMS overrides

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
def tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row, column) of output tile number `tile`: tiles run down groups of GROUP_M tile rows, column by
    column, so consecutive tiles share B tiles in L2."""
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = tile // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * tiles_n)) % rows_in_group
    pid_n = (tile % (GROUP_M * tiles_n)) // rows_in_group
    return pid_m, pid_n


@triton.jit
def mainloop(a_ptr, b_ptr, rm, rn, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] = a[rm, :] @ b[rn, :]ᵀ in fp32 from masked pointer loads (zeros outside)."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        ks = k * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + ks[:, None] * stride_bk,
                    mask=(rn[None, :] < N) & (ks[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def mainloop_tma(a_desc, b_desc, off_m, off_n, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """As `mainloop`, the tiles read through TMA descriptors (which pad out-of-bounds elements with zeros)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, k * BLOCK_K])
        b = b_desc.load([off_n, k * BLOCK_K])
        acc = tl.dot(a, b.T, acc)
    return acc


@triton.jit
def epilogue_tile(acc, rm, rn, M, N, c_ptr, ct_ptr, bias_ptr, gate_ptr, res_ptr,
                  stride_cm, stride_cn, stride_ctn, stride_ctm, stride_gm, stride_gn, stride_rm, stride_rn,
                  inv_scale, alpha, c_skip, c_branch, out_scale, q_ptr, stride_qm, stride_qn, q_scale,
                  HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr,
                  HAS_RESIDUAL: tl.constexpr, OUT_MAX: tl.constexpr, TRANSPOSED_COPY: tl.constexpr,
                  Q_MAX: tl.constexpr):
    """The fused epilogue on the fp32 tile acc at rows rm, columns rn (`codegen.epilogue`, in its order),
    stored to c (and ct = cᵀ)."""
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
    else:
        acc = c_branch * acc
    if Q_MAX is not None:  # the next GEMM's FP8 operand, from the same fp32 value: sat(y·q_scale)
        q = tl.clamp(acc * q_scale, -Q_MAX, Q_MAX).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + rm[:, None] * stride_qm + rn[None, :] * stride_qn, q, mask=mask)
    if OUT_MAX is not None:
        acc = tl.clamp(acc * out_scale, -OUT_MAX, OUT_MAX)
    out = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, out, mask=mask)
    if TRANSPOSED_COPY:
        tl.store(ct_ptr + rn[:, None] * stride_ctn + rm[None, :] * stride_ctm, tl.trans(out), mask=tl.trans(mask))


@triton.jit
def epilogue_store(acc, off_m, off_n, M, N, c_ptr, ct_ptr, bias_ptr, gate_ptr, res_ptr,
                   stride_cm, stride_cn, stride_ctn, stride_ctm, stride_gm, stride_gn, stride_rm, stride_rn,
                   inv_scale, alpha, c_skip, c_branch, out_scale, q_ptr, stride_qm, stride_qn, q_scale,
                   HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr, OUT_MAX: tl.constexpr, TRANSPOSED_COPY: tl.constexpr, Q_MAX: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr):
    """`epilogue_tile` on the output tile at (off_m, off_n), the one epilogue both schedules call: whole,
    or (EPILOGUE_SPLIT = 2) as two [BLOCK_M, BLOCK_N/2] halves, which keeps fewer registers live."""
    rm = off_m + tl.arange(0, BLOCK_M)
    if EPILOGUE_SPLIT == 2:
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        rn = off_n + tl.arange(0, BLOCK_N // 2)
        epilogue_tile(left, rm, rn, M, N, c_ptr, ct_ptr, bias_ptr, gate_ptr, res_ptr,
                      stride_cm, stride_cn, stride_ctn, stride_ctm, stride_gm, stride_gn, stride_rm, stride_rn,
                      inv_scale, alpha, c_skip, c_branch, out_scale, q_ptr, stride_qm, stride_qn, q_scale,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RESIDUAL, OUT_MAX, TRANSPOSED_COPY, Q_MAX)
        epilogue_tile(right, rm, rn + BLOCK_N // 2, M, N, c_ptr, ct_ptr, bias_ptr, gate_ptr, res_ptr,
                      stride_cm, stride_cn, stride_ctn, stride_ctm, stride_gm, stride_gn, stride_rm, stride_rn,
                      inv_scale, alpha, c_skip, c_branch, out_scale, q_ptr, stride_qm, stride_qn, q_scale,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RESIDUAL, OUT_MAX, TRANSPOSED_COPY, Q_MAX)
    else:
        tl.static_assert(EPILOGUE_SPLIT == 1, "EPILOGUE_SPLIT is 1 or 2")
        epilogue_tile(acc, rm, off_n + tl.arange(0, BLOCK_N), M, N, c_ptr, ct_ptr, bias_ptr, gate_ptr, res_ptr,
                      stride_cm, stride_cn, stride_ctn, stride_ctm, stride_gm, stride_gn, stride_rm, stride_rn,
                      inv_scale, alpha, c_skip, c_branch, out_scale, q_ptr, stride_qm, stride_qn, q_scale,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RESIDUAL, OUT_MAX, TRANSPOSED_COPY, Q_MAX)


@triton.jit
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, ct_ptr, bias_ptr, gate_ptr, res_ptr,
                    M, N, K,
                    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_ctn, stride_ctm,
                    stride_gm, stride_gn, stride_rm, stride_rn,
                    inv_scale, alpha, c_skip, c_branch, out_scale, q_ptr, stride_qm, stride_qn, q_scale,
                    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr, OUT_MAX: tl.constexpr, TRANSPOSED_COPY: tl.constexpr, Q_MAX: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    EPILOGUE_SPLIT: tl.constexpr):
    """Tiled schedule: one program per [BLOCK_M, BLOCK_N] tile of c (and of ct = cᵀ); ACTIVATION is a
    helper from `ACTIVATIONS`, OUT_MAX the FP8 output's saturation bound (None for BF16/FP16/FP32)."""
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = mainloop(a_ptr, b_ptr, rm, rn, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
                   BLOCK_M, BLOCK_N, BLOCK_K)
    epilogue_store(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, c_ptr, ct_ptr, bias_ptr, gate_ptr, res_ptr,
                   stride_cm, stride_cn, stride_ctn, stride_ctm, stride_gm, stride_gn, stride_rm, stride_rn,
                   inv_scale, alpha, c_skip, c_branch, out_scale, q_ptr, stride_qm, stride_qn, q_scale,
                   HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RESIDUAL, OUT_MAX, TRANSPOSED_COPY, Q_MAX,
                   BLOCK_M, BLOCK_N, EPILOGUE_SPLIT)


@triton.jit
def fp8_gemm_persistent_kernel(a_ptr, b_ptr, c_ptr, ct_ptr, bias_ptr, gate_ptr, res_ptr,
                               M, N, K,
                               stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_ctn,
                               stride_ctm, stride_gm, stride_gn, stride_rm, stride_rn,
                               inv_scale, alpha, c_skip, c_branch, out_scale, q_ptr, stride_qm, stride_qn, q_scale,
                               HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr,
                               HAS_RESIDUAL: tl.constexpr, OUT_MAX: tl.constexpr, TRANSPOSED_COPY: tl.constexpr, Q_MAX: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GROUP_M: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr, NUM_SMS: tl.constexpr,
                               USE_TMA: tl.constexpr):
    """Persistent schedule: min(NUM_SMS, #tiles) programs, program p computing tiles p, p + NUM_SMS, ...
    of the tiled schedule's order, each exactly as `fp8_gemm_kernel` does. USE_TMA: operands through
    device-side TMA descriptors (unit inner strides, 16-byte aligned rows: checked on the host), else
    masked pointer loads."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS):
        pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if USE_TMA:
            acc = mainloop_tma(a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = mainloop(a_ptr, b_ptr, rm, rn, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
                           BLOCK_M, BLOCK_N, BLOCK_K)
        epilogue_store(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, c_ptr, ct_ptr, bias_ptr, gate_ptr, res_ptr,
                       stride_cm, stride_cn, stride_ctn, stride_ctm, stride_gm, stride_gn, stride_rm, stride_rn,
                       inv_scale, alpha, c_skip, c_branch, out_scale, q_ptr, stride_qm, stride_qn, q_scale,
                       HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RESIDUAL, OUT_MAX, TRANSPOSED_COPY, Q_MAX,
                       BLOCK_M, BLOCK_N, EPILOGUE_SPLIT)


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


def tma_blocker(t: torch.Tensor, block_rows: int, block_k: int) -> str | None:
    """Why a TMA descriptor cannot read the FP8 operand t [rows, K] in [block_rows, block_k] boxes, or None:
    TMA needs a unit inner stride, 16-byte aligned base and row stride, and boxes of 16 to 256 bytes wide."""
    rows, k = t.shape
    if rows == 0 or k == 0:
        return f"an empty operand {tuple(t.shape)}"
    if t.stride(1) != 1:
        return f"inner stride {t.stride(1)} (TMA needs 1)"
    if (t.stride(0) * t.element_size()) % 16:
        return f"row stride {t.stride(0) * t.element_size()} B not 16-byte aligned"
    if t.data_ptr() % 16:
        return "base address not 16-byte aligned"
    if not (16 <= block_k * t.element_size() and block_rows <= 256 and block_k <= 256):
        return f"box [{block_rows}, {block_k}] outside TMA's 16 B..256 elements per side"
    return None


def persistent_launch(a_q: torch.Tensor, b_t_q: torch.Tensor, cfg: dict) -> tuple[int, bool]:
    """(programs, use_tma) for the persistent schedule: min(NUM_SMS, #tiles) programs, and TMA operand
    loads when cfg allows them (TMA, default True) and both operands are eligible (`tma_blocker`)."""
    tiles = triton.cdiv(a_q.shape[0], cfg["BLOCK_M"]) * triton.cdiv(b_t_q.shape[0], cfg["BLOCK_N"])
    use_tma = cfg["TMA"] and tma_blocker(a_q, cfg["BLOCK_M"], cfg["BLOCK_K"]) is None \
        and tma_blocker(b_t_q, cfg["BLOCK_N"], cfg["BLOCK_K"]) is None
    return max(1, min(cfg["NUM_SMS"], tiles)), use_tma


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory for the device-side TMA descriptors (128 B per descriptor and program), from torch."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_tma_allocator() -> None:
    """Give Triton an allocator for descriptor scratch unless one is set (the setting is per thread context)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


def default_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """`gemm_configs.config_for` on an H100/H200, `DEFAULT_CONFIG` elsewhere (other GPUs, the interpreter)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:  # with M, N, K ≥ 1 the only ValueError is a card without a table
            return gemm_configs.config_for(max(M, 1), max(N, 1), max(K, 1), name).as_dict()
        except ValueError:
            pass
    return dict(DEFAULT_CONFIG)


def _resolve_config(config: dict | str | None, M: int, N: int, K: int, device: torch.device) -> dict:
    """The launch config: DEFAULT_CONFIG-shaped, with the persistent schedule's NUM_SMS and TMA filled in."""
    if isinstance(config, str) and config != "autotune":
        raise ValueError(f"scaled_mm: config must be a dict, None or 'autotune', got {config!r}")
    cfg = default_config(M, N, K, device) if config is None or config == "autotune" else {**DEFAULT_CONFIG, **config}
    unknown = sorted(set(cfg) - set(DEFAULT_CONFIG) - {"NUM_SMS", "TMA"})
    if unknown:
        raise ValueError(f"scaled_mm: unknown config keys {unknown}; use {sorted(DEFAULT_CONFIG)} and NUM_SMS, TMA")
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else INTERPRETER_SMS
    return {"NUM_SMS": sms, "TMA": True, **cfg}


def scaled_mm(a_q: torch.Tensor, b_t_q: torch.Tensor, inv_scale: float, bias: torch.Tensor | None = None,
              alpha: float = 1.0, out_dtype: torch.dtype = torch.bfloat16, config: dict | str | None = None, *,
              activation: str = "none", gate: torch.Tensor | None = None, residual: torch.Tensor | None = None,
              c_skip: float = 1.0, c_branch: float = 1.0, out_scale: float = 1.0,
              transposed_copy: bool = False, q_dtype: torch.dtype | None = None, q_scale: float = 1.0,
              schedule: str = "tiled") -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The FP8 GEMM with its fused epilogue: a_q [M, K] and b_t_q [N, K] FP8 (E4M3, or one E5M2 operand).

    bias [N]; gate and residual [M, N] in BF16/FP16/FP32; activation one of `ACTIVATIONS`; out_dtype
    BF16/FP16/FP32, or FP8 (float8_e4m3fn / float8_e5m2) with out_scale, and with transposed_copy the
    result is (out [M, N], outᵀ [N, M]); q_dtype (FP8) also returns q = sat(y·q_scale) [M, N], the next GEMM's
    operand from the same fp32 y, last in the tuple. Math and order: `reference.scaled_mm`. schedule: "tiled"
    (`fp8_gemm_kernel`) or "persistent" (`fp8_gemm_persistent_kernel`), bit-identical results. config: a
    dict over `DEFAULT_CONFIG` (plus NUM_SMS, TMA for the persistent schedule), None for `default_config`,
    or "autotune" (CUDA only: `gemm_configs.autotune` times the table once per shape and epilogue).
    ValueError on bad arguments.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"scaled_mm: schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    _check_kernel_arguments(a_q, b_t_q, bias, out_dtype, gate, residual)
    M, K = a_q.shape
    N = b_t_q.shape[0]
    epilogue.check(M, N, activation=activation, gate=gate, residual=residual, c_skip=c_skip,
                   c_branch=c_branch, out_dtype=out_dtype, out_scale=out_scale, transposed_copy=transposed_copy,
                   q_dtype=q_dtype, q_scale=q_scale)
    if config == "autotune" and a_q.device.type != "cuda":
        raise ValueError(f"scaled_mm: config='autotune' times kernels on a CUDA GPU; the operands are on {a_q.device}")
    cfg = _resolve_config(config, M, N, K, a_q.device)
    c = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    ct = torch.empty((N, M), dtype=out_dtype, device=a_q.device) if transposed_copy else c
    q = torch.empty((M, N), dtype=q_dtype, device=a_q.device) if q_dtype is not None else c
    gate_, res_ = (gate if gate is not None else c), (residual if residual is not None else c)
    args = (a_q, b_t_q, c, ct, bias if bias is not None else c, gate_, res_,
            M, N, K,
            a_q.stride(0), a_q.stride(1), b_t_q.stride(0), b_t_q.stride(1), c.stride(0), c.stride(1),
            ct.stride(0), ct.stride(1), gate_.stride(0), gate_.stride(1), res_.stride(0), res_.stride(1),
            float(inv_scale), float(alpha), float(c_skip), float(c_branch), float(out_scale),
            q, q.stride(0), q.stride(1), float(q_scale))
    meta = dict(HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS[activation], HAS_GATE=gate is not None,
                HAS_RESIDUAL=residual is not None, OUT_MAX=epilogue.FP8_MAX.get(out_dtype),
                TRANSPOSED_COPY=transposed_copy, Q_MAX=epilogue.FP8_MAX[q_dtype] if q_dtype is not None else None)
    launch = lambda tile: _launch(schedule, args, meta, {**cfg, **tile.as_dict()})  # noqa: E731
    if config == "autotune":
        key = (M, N, K, a_q.dtype, b_t_q.dtype, out_dtype, schedule, activation, bias is not None,
               None if gate is None else gate.dtype, None if residual is None else residual.dtype, transposed_copy,
               q_dtype,
               torch.cuda.get_device_name(a_q.device))
        cfg.update(gemm_configs.autotune(launch, key).as_dict())
    _launch(schedule, args, meta, cfg)
    outputs = (c, *((ct,) if transposed_copy else ()), *((q,) if q_dtype is not None else ()))
    return outputs if len(outputs) > 1 else c


def _launch(schedule: str, args: tuple, meta: dict, cfg: dict) -> None:
    """Launch the schedule's kernel on the argument tuple `scaled_mm` builds."""
    a_q, b_t_q, M, N = args[0], args[1], args[7], args[8]
    options = {**{k: cfg[k] for k in DEFAULT_CONFIG}, **COMPILE_OPTIONS}
    if schedule == "tiled":
        fp8_gemm_kernel[(triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)](*args, **meta, **options)
        return
    programs, use_tma = persistent_launch(a_q, b_t_q, cfg)
    if use_tma and a_q.device.type == "cuda":
        _ensure_tma_allocator()
    fp8_gemm_persistent_kernel[(programs,)](*args, **meta, **options, NUM_SMS=cfg["NUM_SMS"], USE_TMA=use_tma)
