"""munit-compile: static-scaled FP8 training through torch.compile.

    model = torch.compile(model, backend="munit")
    model = torch.compile(model, backend=munit.backend(munit.Config(...)))
    report = munit.inspect(model, *example_inputs, measure=True)
"""
from munit_compile.backend import backend
from munit_compile.config import Config
from munit_compile.inspect import Report, inspect
from munit_compile import optim
from munit_compile.optim import param_groups
from munit_compile.unit_scale import UnitScaleConfig, UnitScaled, unit_scale

__version__ = "0.1.0"
__all__ = ["backend", "Config", "inspect", "Report", "unit_scale", "UnitScaled", "UnitScaleConfig", "optim", "param_groups", "__version__"]
