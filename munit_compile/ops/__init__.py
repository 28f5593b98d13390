"""munit's torch custom ops (namespace `munit`). Importing this module registers them."""
from munit_compile.ops.fp8_linear import fp8_gemm, fp8_linear
from munit_compile.ops.formats import FP8_FORMATS, cast_fp8, fp8_format, power_of_two_scale
from munit_compile.ops.grad_scale import grad_scale
from munit_compile.ops.quantize import quantize

__all__ = ["fp8_gemm", "fp8_linear", "grad_scale", "quantize", "FP8_FORMATS", "cast_fp8", "fp8_format", "power_of_two_scale"]
