"""`munit inspect TARGET`: what munit predicts for a model, what it measured, and what the FP8 plan does.

    munit inspect hf:llama --measure --json r.json --plot r.png --mlir r.mlir
    munit inspect builtin:gpt --unit-scale                  # after munit.unit_scale: every FP8 scale is 1
    munit inspect my_pkg.models:make_model --only all       # or path/to/file.py:make_model

TARGET is one of
  hf:<model_type>        a transformers causal LM (`llama`, `gpt2`, `mistral`, `qwen2`, ...) built from a small
                         config of that type, random init, nothing downloaded; --layers --hidden --heads --vocab
  builtin:gpt            munit's own nanoGPT-style model (munit_compile.models.GPT); the same overrides
  package.module:factory a callable returning a model, or a (model, example_inputs) pair; example_inputs is a
  path/file.py:factory   tuple (positional), a dict (keyword) or one tensor. For a bare model the inputs are
                         token ids [batch, seq]: keyword input_ids=labels=ids for a transformers model, else
                         (ids, ids) when forward takes two positional arguments (the second the targets), else (ids,)

Token ids double as labels, so the loss and its gradient are part of the analysed graph.

Output: a table on stdout (GEMMs only unless --only all), progress on stderr, and optionally
  --json FILE   the whole report (every row), schema: `JSON_SCHEMA` below (`validate_json` checks a document)
  --plot FILE   a PNG: predicted and measured σ of every GEMM operand (x, W forward; d output backward) on a
                log2 axis, the σ after the static scale, and the E4M3 / E5M2 normal ranges shaded (implies --measure)
  --mlir FILE   the planned graph(s), forward and backward, in torch-mlir's torch dialect; munit's FP8 ops
                expanded into their saturating casts, so the f8E4M3FN / f8E5M2 tensor types are visible
                (needs the optional extra: pip install munit-compile[mlir])

Exit codes: 0 ok; 2 bad arguments or target (the message says what and how to fix it); 1 the analysis failed.
"""
from munit_compile.inspect_cli.command import build_parser, main, run  # noqa: F401
from munit_compile.inspect_cli.schema import JSON_SCHEMA, ROW_SCHEMA, report_document, validate_json  # noqa: F401
from munit_compile.inspect_cli.targets import Target, hf_config, load_target  # noqa: F401
from munit_compile.inspect_cli.plot import write_plot  # noqa: F401
