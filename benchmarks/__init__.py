"""munit benchmarks: `python -m benchmarks <name> [--json FILE] [--smoke]` (`--list` names them)."""
