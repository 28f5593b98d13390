"""munit-compile: static-scaled FP8 training through torch.compile.

    model = torch.compile(model, backend="munit")
    model = torch.compile(model, backend=munit.backend(munit.Config(...)))
"""
from munit_compile.backend import backend
from munit_compile.config import Config

__version__ = "0.1.0"
__all__ = ["backend", "Config", "__version__"]
