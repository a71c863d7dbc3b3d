"""``jaxquant quantize``: quantize a model by SPEC (calibrated GPTQ/AWQ/SmoothQuant or any static SPEC) and save it.

::

    jaxquant quantize --scheme gptq-int4-g128-asym --out smollm2-gptq4/ [--model smollm2-135m|PATH]
        [--calib-samples 128] [--calib-seq-len 512] [--act-order/--no-act-order] [--sequential/--no-sequential]
        [--damp 0.01] [--clip-search/--no-clip-search] [--text-file F] [--no-progress]
    jaxquant quantize --scheme mixed --target-bpw 4.5 [--method rtn|gptq] [--proxy fisher|hessian] --out DIR
        (= --scheme mixed-4.5: one setting per tensor to the size target; the plan is printed and saved)
    jaxquant eval --model smollm2-gptq4/ --scheme fp32        # evaluates the saved model as it is
    jaxquant quantize --stream --model HF_FOLDER --scheme int4-g128 --out q/     # larger than RAM: block by block
    jaxquant quantize --mesh model=8 --scheme int4-g128 --out q/                 # each device quantizes its slice

``--stream`` (:mod:`jaxquant.io.streaming`) reads an HF safetensors folder block by block and writes quantized
shards as it goes (static SPECs and GPTQ); ``--mesh`` quantizes every kernel split over the mesh's ``model`` axis
(:mod:`jaxquant.sharding`; on CPU the virtual devices are requested automatically; bit-identical results), and
for GPTQ with ``--stream`` calibrates data-parallel over its ``data`` axis.

The folder is a self-describing orbax checkpoint (:func:`jaxquant.io.checkpoint.save_model`: config,
tokenizer, QArrays, manifest) written atomically; its metadata records the SPEC, the options and the time taken.
Registered in :data:`jaxquant.cli._PLUGINS`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from jaxquant.cli import positive_arg as _positive

__all__ = ["register"]


def _damp(v: str) -> float:
    try:
        d = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--damp must be a number, got {v!r}") from None
    if not 0 <= d < 1e6:
        raise argparse.ArgumentTypeError(f"--damp must be >= 0 (e.g. 0.01), got {v!r}")
    return d


def register(subparsers: Any) -> None:
    """Add the ``quantize`` subcommand to ``jaxquant``'s argparse subparsers."""
    q = subparsers.add_parser("quantize", help="quantize a model by SPEC (GPTQ/AWQ/SmoothQuant/RTN...) and save it")
    q.add_argument("--scheme", required=True, help="a SPEC, e.g. gptq-int4-g128-asym (see `jaxquant schemes`)")
    q.add_argument("--out", required=True, help="output folder (a checkpoint; `jaxquant eval --model OUT` reads it)")
    q.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or a .gguf file / HF folder")
    q.add_argument("--text-file", default=None, help="calibrate on this plain-text file (its first half)")
    q.add_argument("--calib-samples", type=_positive("--calib-samples"), default=None, help="calibration windows")
    q.add_argument("--calib-seq-len", type=_positive("--calib-seq-len"), default=None, help="tokens per window")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None, help="GPTQ act-order")
    q.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None, help="sequential calibration")
    q.add_argument("--damp", type=_damp, default=None, help="GPTQ damping (fraction of mean diag(H))")
    q.add_argument(
        "--clip-search",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPTQ: each group's grid from a clipping search on the calibration Hessian (SPEC default: on)",
    )
    q.add_argument(
        "--target-bpw", type=_positive("--target-bpw", float), default=None, help="mixed SPECs: bits/weight target"
    )
    q.add_argument("--method", choices=("rtn", "gptq"), default=None, help="mixed SPECs: how the plan is applied")
    q.add_argument("--proxy", choices=("fisher", "hessian"), default=None, help="mixed SPECs: sensitivity measure")
    q.add_argument(
        "--stream",
        action="store_true",
        help="HF safetensors folder -> quantized shards, block by block, never the whole model in memory "
        "(static SPECs and GPTQ; prints peak RSS)",
    )
    q.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. model=8 or data=2,model=4: static SPECs split each kernel over 'model'; "
        "GPTQ with --stream splits the calibration batches over 'data'",
    )
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(_run=_cmd_quantize)


def _check_out(out: Path) -> None:
    from jaxquant.io.checkpoint import is_checkpoint

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    from jaxquant.io.streaming import is_streamed

    if out.is_dir() and any(out.iterdir()) and not (is_checkpoint(out) or is_streamed(out)):
        raise ValueError(f"--out {out} is a non-empty folder that is not a jaxquant checkpoint; refusing to replace it")
    parent = out.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: cannot write into {parent}")


def _cmd_quantize(a: argparse.Namespace) -> None:
    from jaxquant.eval.harness import load, quantize_model
    from jaxquant.io.checkpoint import save_model
    from jaxquant.models import model_params
    from jaxquant.specs import parse_spec
    from jaxquant.transform import report

    spec = parse_spec(a.scheme)  # fail fast, before loading anything
    if spec.is_float:
        raise ValueError(f"SPEC {spec.name!r} quantizes nothing; choose a quantized SPEC")
    out = Path(a.out)
    _check_out(out)
    given = {
        "calib_samples": a.calib_samples,
        "calib_seq_len": a.calib_seq_len,
        "act_order": a.act_order,
        "sequential": a.sequential,
        "damp": a.damp,
        "clip_search": a.clip_search,
        "target_bpw": a.target_bpw,
        "method": a.method,
        "proxy": a.proxy,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if given and spec.build is None and spec.build_model is None:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags}: SPEC {spec.name!r} is not calibrated; these options do not apply")
    from jaxquant.algorithms.mixed_specs import check_options as check_mixed
    from jaxquant.algorithms.specs import check_options

    if not check_mixed(spec.name, given):  # e.g. mixed without a target: fail before loading anything
        check_options(spec.name, given)  # e.g. --act-order with an AWQ SPEC
    if a.mesh is not None and not spec.rules and not (a.stream and spec.name.startswith("gptq-")):
        raise ValueError(f"--mesh: SPEC {spec.name!r}: --mesh applies to static SPECs and to GPTQ with --stream")
    mesh = _mesh(a.mesh)
    if a.stream:
        _stream(a, spec, given, out, mesh)
        return
    loaded = load(a.model, a.text_file)
    options: dict[str, Any] = dict(given)
    if spec.build is not None:
        options["progress"] = not a.no_progress
        options["log"] = lambda line: print(line, file=sys.stderr, flush=True)
    plans: list[Any] = []
    if check_mixed(spec.name, given):
        options["plan_sink"] = plans
    calib = loaded.calib_tokens if (spec.build is not None or spec.build_model is not None) else None
    t0 = time.perf_counter()
    if mesh is not None:
        from jaxquant.models import with_params
        from jaxquant.sharding import quantize_params_sharded

        qparams = quantize_params_sharded(model_params(loaded.model), list(spec.rules), mesh)
        qmodel, rep = with_params(loaded.model, qparams), report(qparams)
    else:
        qmodel, rep = quantize_model(loaded.model, spec, calib, options)
    seconds = time.perf_counter() - t0
    meta = {
        "spec": spec.name,
        "options": given,
        "source_model": str(a.model),
        "quantize_seconds": round(seconds, 3),
        "bits_per_weight": rep.bits_per_weight,
    }
    if plans:  # mixed bit widths: the per-tensor plan, printed and saved with the model
        print(plans[-1].table())
        meta["mixed_plan"] = plans[-1].to_json()
    path = save_model(qmodel, out, tokenizer=loaded.tokenizer, metadata=meta)
    q_mib = report(model_params(qmodel)).total_bytes / 2**20 if spec.build_model is None else float("nan")
    print(
        f"wrote {path}: {spec.name}, {rep.bits_per_weight:.3f} bits/weight on the quantized tensors, "
        f"{q_mib:.1f} MiB of weights, quantized in {seconds:.1f} s\n"
        f"evaluate it with: jaxquant eval --model {path} --scheme fp32"
    )


def _mesh(spec: str | None) -> Any:
    """The :class:`jax.sharding.Mesh` of ``--mesh`` (virtual CPU devices are requested first), or ``None``."""
    if spec is None:
        return None
    import math

    from jaxquant.sharding import ensure_host_devices, make_mesh, parse_mesh

    axes = parse_mesh(spec)
    ensure_host_devices(math.prod(axes.values()))
    return make_mesh(axes)


def _stream(a: argparse.Namespace, spec: Any, given: dict[str, Any], out: Path, mesh: Any) -> None:
    """``--stream``: :func:`jaxquant.io.streaming.stream_quantize` from an HF folder."""
    from jaxquant.eval import assets
    from jaxquant.io.streaming import HFSource, stream_quantize

    path = Path(assets.model_path(a.model))
    if not path.is_dir():
        raise ValueError(f"--stream reads an HF safetensors folder (config.json + *.safetensors); {a.model} is not one")
    if spec.build_model is not None or (spec.build is not None and not spec.name.startswith("gptq-")):
        raise ValueError(f"--stream: SPEC {spec.name!r} cannot be streamed (static SPECs and GPTQ SPECs can)")
    src = HFSource(path)
    calib = None
    if spec.build is not None:
        from jaxquant.eval import text
        from jaxquant.eval.perplexity import encode

        tok = src.tokenizer()
        if tok is None:
            raise ValueError(f"--stream {spec.name}: {path} has no tokenizer.json to tokenize the calibration text")
        calib = encode(text.calib_text(text_file=a.text_file) if a.text_file else text.calib_text(), tok)
    res = stream_quantize(
        src,
        out,
        spec,
        calib_tokens=calib,
        options=given,
        metadata={"source_model": str(a.model), "options": given},
        progress=not a.no_progress,
        mesh=mesh,
    )
    import statistics

    per = statistics.median(res.layer_seconds) if res.layer_seconds else float("nan")
    print(
        f"wrote {res.path}: {spec.name}, {res.n_quantized} tensors quantized, streamed block by block\n"
        f"source {res.source_bytes / 2**30:.3f} GiB -> output {res.output_bytes / 2**30:.3f} GiB "
        f"in {res.seconds:.1f} s ({per:.2f} s per block, median); peak RSS {res.peak_rss_bytes / 2**30:.3f} GiB\n"
        f"evaluate it with: jaxquant eval --model {res.path} --scheme fp32"
    )
