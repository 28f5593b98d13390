"""The `--json` document of `munit inspect`: its schema, a small validator, and the report as a document."""
from __future__ import annotations

import json
import math


_NUMBER_OR_NULL = {"type": ["number", "null"]}
_SCALE = {"type": "number", "exclusiveMinimum": 0, "description": "static power-of-two scale s (cast input = σ·s)"}
_FP8_FORMAT = {"enum": ["e4m3", "e5m2"]}

ROW_SCHEMA = {
    "type": "object",
    "description": "one node of the analysed graph (pre-dispatch ATen)",
    "required": ["name", "op", "shape", "pred_std", "pred_grad_std", "meas_std", "meas_grad_std",
                 "fp8", "fused_kernel", "status", "reason"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "description": "FX node name"},
        "op": {"type": "string", "description": "e.g. aten.linear.default, or placeholder / get_attr"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "pred_std": {**_NUMBER_OR_NULL, "description": "predicted σ of the value; null where unknown"},
        "pred_grad_std": {**_NUMBER_OR_NULL, "description": "predicted RMS of d loss / d value"},
        "meas_std": {**_NUMBER_OR_NULL, "description": "measured σ (null without --measure)"},
        "meas_grad_std": {**_NUMBER_OR_NULL, "description": "measured gradient RMS (null without --measure)"},
        "fp8": {
            "type": ["object", "null"],
            "description": "the static FP8 plan of a GEMM, null for every other node and high-precision GEMMs",
            "required": ["x_format", "x_scale", "w_format", "w_scale", "grad_format", "grad_scale"],
            "additionalProperties": False,
            "properties": {"x_format": _FP8_FORMAT, "x_scale": _SCALE, "w_format": _FP8_FORMAT,
                           "w_scale": _SCALE, "grad_format": _FP8_FORMAT, "grad_scale": _SCALE},
        },
        "fused_kernel": {"type": ["string", "null"], "description": "the fused kernel the node runs in, if any"},
        "status": {"enum": ["ok", "unknown", "high_precision"]},
        "reason": {"type": "string", "description": "why unknown / high precision, or the predicted FP8 underflow"},
    },
}

JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "munit inspect report",
    "type": "object",
    "required": ["schema_version", "target", "options", "rows", "summary", "operand_checks"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": 1},
        "target": {"type": "string", "description": "TARGET as given on the command line"},
        "options": {
            "type": "object",
            "required": ["batch", "seq", "measure", "unit_scale"],
            "additionalProperties": False,
            "properties": {
                "batch": {"type": "integer", "minimum": 1},
                "seq": {"type": "integer", "minimum": 1},
                "measure": {"type": "boolean"},
                "unit_scale": {"type": "boolean"},
                "model": {"type": "object", "description": "the size of a hf: / builtin: model (layers, hidden, ...)"},
            },
        },
        "rows": {"type": "array", "items": ROW_SCHEMA, "description": "every node, whatever --only says"},
        "summary": {
            "type": "object",
            "required": ["gemms_total", "gemms_fp8", "unknown_ops", "frac_within_sqrt2", "max_abs_log2_error"],
            "additionalProperties": False,
            "properties": {
                "gemms_total": {"type": "integer", "minimum": 0, "description": "weight GEMMs (LM head included)"},
                "gemms_fp8": {"type": "integer", "minimum": 0, "description": "GEMMs planned in static FP8"},
                "unknown_ops": {"type": "array", "items": {"type": "string"},
                                "description": "ops where the analysis lost track"},
                "frac_within_sqrt2": {**_NUMBER_OR_NULL, "minimum": 0, "maximum": 1,
                                      "description": "share of GEMM operands predicted within √2 (measured only)"},
                "max_abs_log2_error": {**_NUMBER_OR_NULL, "minimum": 0,
                                       "description": "worst |log2(predicted/measured)| over GEMM operands"},
            },
        },
        "operand_checks": {
            "type": "array",
            "description": "per GEMM operand: predicted and measured σ (empty without --measure)",
            "items": {
                "type": "object",
                "required": ["gemm", "operand", "predicted", "measured", "log2_error"],
                "additionalProperties": False,
                "properties": {
                    "gemm": {"type": "string"},
                    "operand": {"enum": ["x", "w", "grad_out"]},
                    "predicted": {"type": "number", "exclusiveMinimum": 0},
                    "measured": {"type": "number", "exclusiveMinimum": 0},
                    "log2_error": {"type": "number"},
                },
            },
        },
    },
}

_JSON_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
}


def validate_json(value, schema: dict = JSON_SCHEMA, path: str = "$") -> list[str]:
    """The ways `value` breaks `schema` (the JSON Schema subset JSON_SCHEMA uses: type, enum, const,
    properties, required, additionalProperties, items, minimum, maximum, exclusiveMinimum); [] if none."""
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_JSON_TYPES[t](value) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.60}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if _JSON_TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: {value} <= exclusive minimum {schema['exclusiveMinimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: missing key {k!r}" for k in schema.get("required", ()) if k not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: unexpected key {k!r}" for k in value if k not in props]
        for k, sub in props.items():
            if k in value:
                errors += validate_json(value[k], sub, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate_json(item, schema["items"], f"{path}[{i}]")
    return errors


def report_document(report, target: str, options: dict) -> dict:
    """The --json document (JSON_SCHEMA): the report's rows and summary, the operand checks, the call."""
    checks = [{"gemm": c.gemm, "operand": c.operand, "predicted": c.predicted, "measured": c.measured,
               "log2_error": c.log2_error} for c in report.operand_checks]
    doc = {"schema_version": 1, "target": target, "options": options, "rows": report.rows,
           "summary": report.summary, "operand_checks": checks}
    return _finite(doc)


def _finite(value):
    """A copy with non-finite floats as null: strict JSON has no NaN / Infinity."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
