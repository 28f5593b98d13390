"""What every part of `munit inspect` shares: exit codes, install hints, FP8 ranges, UsageError."""
from __future__ import annotations



EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
PROG = "munit inspect"
MLIR_INSTALL_HINT = "pip install munit-compile[mlir]"
PLOT_INSTALL_HINT = "pip install munit-compile[plot]"

# FP8 normal ranges (ops/formats.py): what the --plot bands show
E4M3_NORMAL = (2.0**-6, 448.0)
E5M2_NORMAL = (2.0**-14, 57344.0)


class UsageError(Exception):
    """Bad arguments or target (exit 2); the message says what is wrong and how to fix it."""
