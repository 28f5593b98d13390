"""Test-only fixes for Triton's CPU interpreter (TRITON_INTERPRET=1), so kernel tests can be bit-exact.

The interpreter's own float conversions round ties away from zero, lose the carry into the exponent, do
not saturate and truncate BF16; its BF16 `tl.dot` multiplies raw bits. `install()` routes every float
conversion through torch (round to nearest even) with saturation to the FP8 formats' finite range (what
Hopper's `cvt.rn.satfinite` does), and computes `tl.dot` of 8/16-bit floats on their exact float32 values.

libdevice (`triton.language.extra.libdevice`) does not run in the interpreter at all: its functions are
stubs the compiler swaps for the CUDA ones. `install()` gives the interpreter the functions in `LIBDEVICE`,
computed by torch in the tensor's own dtype: torch's CUDA kernels call the same CUDA math library
(`expf`, `erff`, `tanhf`) the GPU kernel links, and on CPU torch is what the reference uses. The
interpreter's own transcendental functions would not do: `tl.exp` is numpy's float32 `exp` (differs from
torch's in ~40% of elements), `tl.math.erf` is Python's float64 `math.erf` rounded to float32 (~1%).
These stay as they are; kernels that must match torch call libdevice.

Compiling for a GPU target (PTX checks) in a process that interprets: `@triton.jit` then makes
InterpretedFunctions, triton.language's own helpers (`tl.cdiv`, ...) included, and the compiler calls
those as Python functions on IR values, which fails. `compilable(fn)` and the `compiling(module)` context
give the compiler JITFunctions instead. (A warm Triton cache from a non-interpreted run hides this failure.)
Worse, the interpreter leaves `triton.language.core`'s builtins patched to its own semantics after any
kernel that calls a @jit helper (a device-function call patches the language and never restores it), so
compiling after interpreting fails even then; `install()` makes device-function calls restore the patch.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime import interpreter

_TORCH = {  # triton dtype -> (torch dtype, numpy storage dtype the interpreter uses)
    tl.float8e4nv: (torch.float8_e4m3fn, np.uint8),
    tl.float8e5: (torch.float8_e5m2, np.uint8),
    tl.bfloat16: (torch.bfloat16, np.uint16),
    tl.float16: (torch.float16, np.float16),
    tl.float32: (torch.float32, np.float32),
    tl.float64: (torch.float64, np.float64),
}
_SATURATE = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
LIBDEVICE = {"exp": torch.exp, "erf": torch.erf, "tanh": torch.tanh}  # libdevice name -> torch op (mutable for tests)


def _to_torch(data: np.ndarray, dtype) -> torch.Tensor:
    torch_dtype, storage = _TORCH[dtype]
    raw = torch.from_numpy(np.ascontiguousarray(data).view(storage).copy())
    return raw.view(torch_dtype) if storage in (np.uint8, np.uint16) else raw


def _to_numpy(t: torch.Tensor, dtype) -> np.ndarray:
    _, storage = _TORCH[dtype]
    if storage == np.uint8:
        return t.contiguous().view(torch.uint8).numpy()
    if storage == np.uint16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def convert(data: np.ndarray, src, dst) -> np.ndarray:
    """Exact conversion src -> dst through torch; FP8 targets saturate to their finite range."""
    value = _to_torch(data, src)
    target, _ = _TORCH[dst]
    if target in _SATURATE:
        value = value.to(torch.float32).clamp(-_SATURATE[target], _SATURATE[target])
    return _to_numpy(value.to(target), dst)


def _libdevice(name: str):
    """The interpreter's `libdevice.<name>`: LIBDEVICE[name] (looked up per call) on the tensor's values."""

    def apply(x, _semantic=None):
        value = LIBDEVICE[name](_to_torch(x.handle.data, x.dtype))
        return tl.core.tensor(interpreter.TensorHandle(_to_numpy(value, x.dtype), x.dtype), x.type)

    return apply


def install() -> None:
    """Patch the interpreter (idempotent)."""
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_munit_shim", False):
        return
    original_cast = builder.cast_impl

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        data = convert(src.data, src.dtype.scalar, dst_type.scalar)
        return interpreter.TensorHandle(data, dst_type.scalar)

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if s in _TORCH and d in _TORCH and s.is_floating() and d.is_floating():
            return interpreter.TensorHandle(convert(src.data, s, d), d)
        return original_cast(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        exact = [_to_torch(x.data, x.dtype.scalar).to(torch.float32).numpy() if x.dtype.scalar in _TORCH else x.data
                 for x in (a, b)]
        return interpreter.TensorHandle(np.matmul(exact[0], exact[1], dtype=np.float32) + d.data, d.dtype.scalar)

    builder.create_fp_to_fp = create_fp_to_fp
    builder.cast_impl = cast_impl
    builder.create_fp_ext = cast_impl
    builder.create_fp_trunc = cast_impl
    original_patch_lang = interpreter._patch_lang

    def patch_lang(fn):  # while a kernel runs, the libdevice stubs compute (the scope restores them after)
        scope = original_patch_lang(fn)
        for name in LIBDEVICE:
            scope.set_attr(libdevice, name, _libdevice(name))
        return scope

    def call_device_function(self, *args, **kwargs):  # as InterpretedFunction.__call__, restoring the patch
        scope = interpreter._patch_lang(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e
        finally:
            scope.restore()

    builder.create_dot = create_dot
    interpreter._patch_lang = patch_lang
    interpreter.InterpretedFunction.__call__ = call_device_function
    builder._munit_shim = True


def compilable(fn) -> triton.runtime.jit.JITFunction:
    """fn as a JITFunction the compiler can take (it is an InterpretedFunction under TRITON_INTERPRET=1)."""
    return fn if isinstance(fn, triton.runtime.jit.JITFunction) else triton.runtime.jit.JITFunction(fn.fn)


@contextlib.contextmanager
def compiling(*kernel_modules):
    """While `triton.compile` runs: the @jit helpers of triton.language and of `kernel_modules` (the
    modules whose kernels call their own helpers) as JITFunctions (restored after)."""
    modules = (tl, tl.core, tl.math, tl.standard, *kernel_modules)
    swapped = [(m, name, value) for m in modules for name, value in vars(m).items()
               if isinstance(value, interpreter.InterpretedFunction)]
    try:
        for m, name, value in swapped:
            setattr(m, name, compilable(value))
        yield
    finally:
        for m, name, value in swapped:
            setattr(m, name, value)
