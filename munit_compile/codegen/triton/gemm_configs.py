"""Tile configurations of the FP8 GEMM for Hopper (H100/H200): a small table, a default per shape class,
and an opt-in timing loop that picks the fastest on a real GPU.

Why these tiles. Operands are FP8 (1 byte), so one pipeline stage holds (BLOCK_M + BLOCK_N)·BLOCK_K bytes
of shared memory and a config needs

    smem ≈ num_stages·(BLOCK_M + BLOCK_N)·BLOCK_K      ≤ 227 KB per block (228 KB per SM on H100/H200)
(the epilogue's layout conversions reuse that space after the main loop). wgmma works on 64-row slabs
per warpgroup (4 warps), so BLOCK_M is a multiple of 64 and 128-row tiles take 8 warps (two warpgroups);
a 128×256 fp32 accumulator is then 128 registers per thread, which still leaves room for the epilogue.
BLOCK_K = 128 is four k32 wgmma steps per stage and 128-byte rows, the widest TMA/ldmatrix swizzle.
Big tiles halve the operand traffic per FLOP but need enough tiles to fill the 132 SMs: `config_for`
takes 128×256 when there are at least one wave of them, 128×128 otherwise, and 64-row/64-column tiles
for skinny GEMMs (M or N ≤ 64, where a 128 tile would be mostly padding).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB; the SM has 228 KB)
HOPPER_SMS = {"H100 PCIE": 114, "H100": 132, "H200": 132}  # SM count by product name (first match wins)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """BLOCK_M × BLOCK_N output tiles, BLOCK_K deep, swizzled in groups of GROUP_M rows; launch options."""
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3
    EPILOGUE_SPLIT: int = 1  # 2: the epilogue runs on two [BLOCK_M, BLOCK_N/2] halves (fewer live registers)

    def __post_init__(self):
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0 and value & (value - 1) == 0):
                raise ValueError(f"TileConfig.{name} must be a positive power of two, got {value!r}")
        if self.BLOCK_K < 16:
            raise ValueError(f"TileConfig.BLOCK_K must be at least 16 (one FP8 dot step), got {self.BLOCK_K}")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"TileConfig.num_stages must be a positive integer, got {self.num_stages!r}")
        if self.EPILOGUE_SPLIT not in (1, 2):
            raise ValueError(f"TileConfig.EPILOGUE_SPLIT must be 1 or 2, got {self.EPILOGUE_SPLIT!r}")

    def smem_bytes(self) -> int:
        """Shared memory of the FP8 operand pipeline: num_stages·(BLOCK_M + BLOCK_N)·BLOCK_K bytes."""
        return self.num_stages * (self.BLOCK_M + self.BLOCK_N) * self.BLOCK_K

    def as_dict(self) -> dict:
        """The `config` dict `fp8_gemm.scaled_mm` takes."""
        return dataclasses.asdict(self)


CONFIGS: dict[str, TileConfig] = {  # name: config  # operand pipeline's smem; when config_for picks it
    "128x256x128": TileConfig(128, 256, 128, num_warps=8, num_stages=3, EPILOGUE_SPLIT=2),  # 144 KB; a wave of tiles
    "128x128x128": TileConfig(128, 128, 128, num_warps=8, num_stages=4),  # 128 KB; under a wave of 128×256 tiles
    "128x128x64": TileConfig(128, 128, 64, num_warps=8, num_stages=4),    # 64 KB; K ≤ 64
    "64x128x128": TileConfig(64, 128, 128, num_warps=4, num_stages=4),    # 96 KB; M ≤ 64 (one warpgroup)
    "128x64x128": TileConfig(128, 64, 128, num_warps=4, num_stages=4),    # 96 KB; N ≤ 64
}
SHAPE_CLASSES = {"large": "128x256x128", "medium": "128x128x128", "short_k": "128x128x64",
                 "skinny_m": "64x128x128", "skinny_n": "128x64x128"}


def hopper_sms(device_name: str) -> int:
    """The SM count of an H100/H200 from its name (torch.cuda.get_device_name); ValueError otherwise."""
    upper = str(device_name).upper()
    for product, sms in HOPPER_SMS.items():
        if product in upper:
            return sms
    raise ValueError(f"config_for has tiles for Hopper only ({', '.join(HOPPER_SMS)}), got device {device_name!r}")


def shape_class(M: int, N: int, K: int, sms: int) -> str:
    """Which entry of `SHAPE_CLASSES` an [M, K] × [K, N] GEMM on `sms` SMs falls in."""
    if M <= 64:
        return "skinny_m"
    if N <= 64:
        return "skinny_n"
    if K <= 64:
        return "short_k"
    wide_tiles = -(-M // 128) * -(-N // 256)
    return "large" if wide_tiles >= sms else "medium"


def config_for(M: int, N: int, K: int, device_name: str) -> TileConfig:
    """The default tile config for an [M, K] × [K, N] FP8 GEMM on an H100/H200 (pure: no device query)."""
    for name, value in (("M", M), ("N", N), ("K", K)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config_for: {name} must be a positive integer, got {value!r}")
    return CONFIGS[SHAPE_CLASSES[shape_class(M, N, K, hopper_sms(device_name))]]


_TUNED: dict[tuple, TileConfig] = {}


def autotune(launch: Callable[[TileConfig], object], key: tuple, candidates=None,
             timer: Callable[[Callable[[], object]], float] | None = None) -> TileConfig:
    """The fastest of `candidates` (default: every `CONFIGS` entry) for `launch`, timed once per key.

    `timer(fn)` returns seconds per call (default: triton's do_bench, so CUDA only; callers must not
    autotune under the interpreter). The winner is cached under `key`; a later call returns it untimed.
    """
    if key in _TUNED:
        return _TUNED[key]
    timer = timer or _do_bench
    candidates = list(CONFIGS.values() if candidates is None else candidates)
    if not candidates:
        raise ValueError("autotune needs at least one candidate config")
    times = {config: timer(lambda config=config: launch(config)) for config in candidates}
    _TUNED[key] = min(candidates, key=times.__getitem__)
    return _TUNED[key]


def _do_bench(fn: Callable[[], object]) -> float:
    """Median seconds per call of fn on the current CUDA device (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3
