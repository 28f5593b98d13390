"""`munit inspect --mlir`: the planned graph, forward and backward, in torch-mlir's torch dialect."""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from munit_compile.inspect_cli.common import MLIR_INSTALL_HINT, UsageError
from munit_compile.inspect_cli.targets import Target


def require_torch_mlir() -> None:
    """UsageError with the install line when the optional extra is missing (the thin guard)."""
    try:
        import torch_mlir.extras.fx_importer  # noqa: F401
    except ImportError:
        raise UsageError(f"--mlir needs torch-mlir, which is not installed: {MLIR_INSTALL_HINT}") from None


def _munit_decompositions() -> dict:
    """munit's custom ops as their exact references, so the export shows the FP8 casts themselves."""
    import munit_compile.ops  # noqa: F401  (registers the ops)
    from munit_compile.codegen import reference
    from munit_compile.ops.formats import fp8_format
    from munit_compile.ops.fp8_linear import bind_q_args

    def fp8_linear(x, w, bias, x_scale, w_scale, grad_scale, fwd_format, grad_format, alpha=1.0, activation="none",
                   gate=None, residual=None, c_skip=1.0, c_branch=1.0, x_q=None, grad_multiplier=1.0,
                   x_grad_multiplier=1.0, out_dtype=None, q_scale=None, q_format="e4m3"):
        # the grad multipliers act in backward only, which this decomposition derives from the forward it spells out
        return reference.fp8_linear(x, w, bias, x_scale, w_scale, fwd_format, alpha, activation,
                                    reference.linear_out_dtype(x, residual, out_dtype), gate=gate,
                                    residual=residual, c_skip=c_skip, c_branch=c_branch, x_q=x_q,
                                    q_dtype=None if q_scale is None else fp8_format(q_format).dtype,
                                    q_scale=1.0 if q_scale is None else q_scale)

    def fp8_linear_q(*args, **kwargs):  # (y, y_q)
        *linear, q_scale, q_format = bind_q_args(args, kwargs)
        return fp8_linear(*linear, q_scale=q_scale, q_format=q_format)

    return {
        torch.ops.munit.fp8_linear.default: fp8_linear,
        torch.ops.munit.fp8_linear_q.default: fp8_linear_q,
        torch.ops.munit.fp8_gemm.default: reference.fp8_gemm,
        torch.ops.munit.grad_scale.default: lambda x, scale: x.clone(),
    }


def _joint_graph(planned, inputs, decompositions):
    """The planned graph's forward and backward as one ATen graph: (inputs[, d outputs]) -> (outputs, d params).

    The backward starts from the graph's scalar loss; a graph without one takes its outputs' gradients
    as extra inputs. Parameters (the graph's nn.Parameter inputs) are what it differentiates."""
    from torch.fx.experimental.proxy_tensor import make_fx

    values = [x.detach().requires_grad_(isinstance(x, nn.Parameter)) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    params = [i for i, x in enumerate(inputs) if isinstance(x, nn.Parameter)]
    output = next(n for n in planned.graph.nodes if n.op == "output")
    vals = [n.meta.get("val") for n in output.all_input_nodes]
    floats = [v for v in vals if isinstance(v, torch.Tensor) and v.dtype.is_floating_point]
    has_loss = any(v.numel() == 1 for v in floats)
    seeds = [] if has_loss else [torch.ones(v.shape, dtype=v.dtype) for v in floats]

    def forward_backward(*flat):
        args, d_outs = list(flat[:len(values)]), list(flat[len(values):])
        outputs = planned(*args)
        outputs = [o for o in (outputs if isinstance(outputs, (tuple, list)) else [outputs]) if isinstance(o, torch.Tensor)]
        float_outs = [o for o in outputs if o.dtype.is_floating_point]
        if has_loss:
            pairs = [(next(o for o in float_outs if o.numel() == 1), None)]
        else:
            pairs = list(zip(float_outs, d_outs))
        pairs = [(r, s) for r, s in pairs if r.requires_grad]
        grads = torch.autograd.grad([r for r, _ in pairs], [args[i] for i in params],
                                    None if has_loss else [s for _, s in pairs], allow_unused=True) \
            if pairs and params else ()
        return (*outputs, *[g for g in grads if g is not None])

    with torch.enable_grad():
        return make_fx(forward_backward, decomposition_table=decompositions, tracing_mode="fake")(*values, *seeds)


def write_mlir(target: Target, path: str, progress: "Progress") -> dict[str, int]:
    """Capture and plan `target` as the backend does, trace each planned graph's forward and backward into
    ATen (munit ops expanded), import it with torch-mlir into the torch dialect, and write it to `path`.
    Returns how many casts to each FP8 element type the module holds."""
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.extras.fx_importer import FxImporter

    from munit_compile.config import Config
    from munit_compile.pipeline import run_pipeline

    graphs = []

    def capture(gm, inputs):
        graphs.append((gm, inputs))
        return gm.forward

    with progress.step("export: capturing and planning the graph again for torch-mlir"):
        torch._dynamo.reset()
        torch.compile(target.model, backend=capture, dynamic=False)(*target.args, **target.kwargs)
        planned = [(run_pipeline(gm, inputs, Config())[0], inputs) for gm, inputs in graphs]
    with progress.step("export: tracing forward and backward, importing into the torch dialect"):
        context = ir.Context()
        torch_d.register_dialect(context)
        importer = FxImporter(context=context)
        decompositions = _munit_decompositions()
        for i, (gm, inputs) in enumerate(planned):
            joint = _joint_graph(gm, inputs, decompositions)
            importer.import_graph_module(joint, func_name="forward_backward" if len(planned) == 1
                                         else f"forward_backward_{i}")
        importer.module.operation.verify()
        text = str(importer.module)
    counts = {t: len(re.findall(rf"= torch\.(?:aten\._to_copy|prims\.convert_element_type) .*-> !torch\.vtensor<\[[^\]]*\],{t}>",
                                text)) for t in ("f8E4M3FN", "f8E5M2")}  # conversions, not views of FP8 tensors
    header = (f"// munit inspect {target.description}: the planned graph{'s' if len(planned) > 1 else ''}, forward "
              f"and backward, in torch-mlir's torch dialect.\n// munit::fp8_linear / fp8_gemm are expanded into "
              f"their saturating casts: f8E4M3FN for x and W, f8E5M2 for output gradients.\n")
    Path(path).write_text(header + text)
    return counts
