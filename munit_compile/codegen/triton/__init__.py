"""munit's Triton kernels for Hopper (sm_90a). Each has an exact reference in `codegen.reference`.

Kernels are plain `triton.jit` functions plus a launcher; the custom ops dispatch to them on CUDA and
to the reference elsewhere. On CPU, tests run them with TRITON_INTERPRET=1 (and the test shim that makes
the interpreter's FP8/BF16 conversions exact) and compile them for sm_90a to check the PTX.
"""
