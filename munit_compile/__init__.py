"""munit-compile: static-scaled FP8 training through torch.compile.

    model = torch.compile(model, backend="munit")
    model = torch.compile(model, backend=munit.backend(munit.Config(...)))
    report = munit.inspect(model, *example_inputs, measure=True)
"""
from munit_compile.backend import backend
from munit_compile.config import Config
from munit_compile.inspect import Report, inspect

__version__ = "0.1.0"
__all__ = ["backend", "Config", "inspect", "Report", "__version__"]
