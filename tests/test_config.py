import pytest

import munit_compile as munit


def test_defaults_are_valid_and_frozen():
    cfg = munit.Config()
    assert cfg.fp8 and cfg.forward_format == "e4m3" and cfg.grad_format == "e5m2"
    with pytest.raises(AttributeError):
        cfg.fp8 = False


@pytest.mark.parametrize(
    "fields, field_name",
    [
        ({"fp8_enabled": True}, "fp8_enabled"),
        ({"fp8": 1}, "fp8"),
        ({"forward_format": "e3m4"}, "forward_format"),
        ({"grad_format": "fp16"}, "grad_format"),
        ({"gemm_multiple": 0}, "gemm_multiple"),
        ({"gemm_multiple": 16.0}, "gemm_multiple"),
        ({"grad_output_std": -1.0}, "grad_output_std"),
        ({"grad_output_std": float("nan")}, "grad_output_std"),
        ({"inner_compiler": "tvm"}, "inner_compiler"),
        ({"forward_format": "e5m2", "grad_format": "e5m2"}, "forward_format"),
    ],
)
def test_bad_fields_raise_value_error_naming_the_field(fields, field_name):
    with pytest.raises(ValueError, match=field_name):
        munit.Config(**fields)


def test_replace_validates():
    cfg = munit.Config().replace(grad_output_std=1e-3)
    assert cfg.grad_output_std == 1e-3
    with pytest.raises(ValueError, match="gemm_multiple"):
        cfg.replace(gemm_multiple=-4)


def test_backend_rejects_non_config():
    with pytest.raises(ValueError, match="munit.Config"):
        munit.backend({"fp8": True})
