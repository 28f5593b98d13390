"""Kernel implementations of munit's fused ops: `reference` (exact, any device) and, later, Triton."""
