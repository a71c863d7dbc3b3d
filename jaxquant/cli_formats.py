"""``jaxquant export`` and ``jaxquant inspect`` (registered in :data:`jaxquant.cli._PLUGINS`).

::

    jaxquant export --format gguf --scheme q4_k_m --out smollm2-q4_k_m.gguf [--model smollm2-135m|PATH]
    jaxquant export --format gptq --scheme int4-g128-asym --out smollm2-gptq/      # HF GPTQ v1 folder
    jaxquant export --format awq  --scheme int4-g64-asym  --out smollm2-awq/       # HF AWQ GEMM folder
    jaxquant inspect PATH [--json]                                                 # .gguf / .safetensors / folder

``--format gguf`` needs a SPEC that produces GGUF block types (a llama.cpp recipe such as ``q4_k_m``, or
``gguf-<type>``); unquantized kernels are written as F32. ``--format gptq|awq`` needs integer SPECs with
float16 scales (``int4-g128-asym``, ``int4-g128``; AWQ: 4-bit with groups dividing the layer width) or a
calibrated GPTQ/AWQ SPEC. The tokenizer travels with the model (copied from a source GGUF, else rebuilt).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``export`` and ``inspect`` subcommands to ``jaxquant``'s argparse subparsers."""
    e = subparsers.add_parser("export", help="quantize a model by SPEC and write it as GGUF or an HF GPTQ/AWQ folder")
    e.add_argument("--format", required=True, choices=("gguf", "gptq", "awq"), help="output format")
    e.add_argument("--scheme", required=True, help="a SPEC: q4_k_m, q8_0, gguf-q4_0 (gguf); int4-g128-asym (gptq/awq)")
    e.add_argument("--out", required=True, help="output .gguf file (gguf) or folder (gptq/awq)")
    e.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or a .gguf file / HF folder")
    e.add_argument("--name", default=None, help="general.name of the GGUF (default: the source GGUF's)")
    e.set_defaults(_run=_cmd_export)

    i = subparsers.add_parser("inspect", help="tensors, types, shapes, bits/weight of a GGUF/safetensors file")
    i.add_argument("path", help="a .gguf file, a .safetensors file or an HF checkpoint folder")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    i.set_defaults(_run=_cmd_inspect)


def _cmd_inspect(a) -> None:
    from jaxquant.formats.inspect import inspect_path

    rep = inspect_path(a.path)
    print(json.dumps(rep.as_dict()) if a.json else str(rep))


def _cmd_export(a) -> None:
    from jaxquant.eval import assets
    from jaxquant.models import load_model, model_params
    from jaxquant.specs import parse_spec
    from jaxquant.transform import quantize_params, report

    spec = parse_spec(a.scheme)  # fail fast
    if a.format != "gguf" and spec.name in _gguf_spec_names():
        raise ValueError(f"SPEC {spec.name!r} makes GGUF blocks; use --format gguf, or an int SPEC for {a.format}")
    out = os.fspath(a.out)
    if a.format == "gguf" and os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder; --format gguf writes one .gguf file")
    if a.format != "gguf" and os.path.isfile(out):
        raise ValueError(f"--out {out} is a file; --format {a.format} writes a checkpoint folder")
    t0 = time.perf_counter()
    path = assets.model_path(a.model)
    model, tok = load_model(path)
    if spec.build is not None:
        calib = None
        if spec.name not in _gguf_spec_names():  # a calibrated method (GPTQ/AWQ): calibration split tokens
            from jaxquant.eval import text
            from jaxquant.eval.perplexity import encode

            if tok is None:
                raise ValueError(f"SPEC {spec.name!r} is calibrated and needs the model's tokenizer")
            calib = encode(text.calib_text(), tok)
        params = spec.build(model, calib, {})
    elif spec.rules:
        params = quantize_params(model_params(model), list(spec.rules), strict=True)
    else:
        params = model_params(model)
    rep = report(params)
    if a.format == "gguf":
        from jaxquant.formats.gguf_writer import write_gguf
        from jaxquant.formats.specs import RECIPES

        source = path if str(path).endswith(".gguf") and os.path.isfile(path) else None
        write_gguf(
            out,
            model.config,
            params,
            tokenizer=None if source else tok,
            source=source,
            name=a.name if a.name or source else f"jaxquant {spec.name}",
            recipe=spec.name if spec.name in RECIPES else None,
        )
        size = os.path.getsize(out)
    else:
        from jaxquant.formats.hf_awq import save_awq_checkpoint
        from jaxquant.formats.hf_gptq import save_gptq_checkpoint

        save = save_gptq_checkpoint if a.format == "gptq" else save_awq_checkpoint
        save(out, model.config, params, tokenizer=tok)
        size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(
        f"wrote {out} ({a.format}, SPEC {spec.name}): {size:,} bytes, quantized tensors {rep.bits_per_weight:.3f} "
        f"bits/weight, {time.perf_counter() - t0:.1f} s"
    )


def _gguf_spec_names() -> set[str]:
    from jaxquant.formats.gguf_blocks import GGUF_TYPES
    from jaxquant.formats.gguf_recipes import RECIPES

    return set(RECIPES) | {f"gguf-{t.lower()}" for t in GGUF_TYPES}
