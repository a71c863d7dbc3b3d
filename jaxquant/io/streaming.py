"""Streaming quantization: an HF safetensors checkpoint far larger than RAM in, a quantized model out.

Nothing is ever materialised whole. The source is read block by block through ``safetensors.safe_open``
(memory-mapped; each file is opened for one block's tensors and closed again, so mapped pages do not pile up in
the process's resident set), converted to float32 in the :func:`jaxquant.models.model_params` layout (kernels
transposed to ``(in, out)``, the names of :mod:`jaxquant.models.hf_loader`), quantized, and written at once:

* static SPECs (RTN ``int4-g128``, ``nf4``, ``fp8-e4m3``, any rule list): tensor by tensor (one float32
  tensor in memory at a time, the block's quantized tensors collected until its shard is written) with
  :func:`jaxquant.quantize`, exactly what :func:`jaxquant.quantize_params` computes on the whole model (the
  same jitted function on the same float32 input: bit-identical, tested);
* GPTQ SPECs (``gptq-int4-g128`` ...): block by block with sequential calibration
  (:func:`jaxquant.algorithms.gptq.gptq_blocks`): only the residual stream of the calibration windows and one
  block's weights and activations are in memory; same result as :func:`jaxquant.algorithms.gptq.gptq_model`.

Peak host memory: static SPECs, the largest tensor in float32 (plus its bf16 original while it is converted)
plus one block's quantized output; GPTQ, one block in float32 plus the calibration activations of one block
(on the accelerator when there is one); both, plus the embedding table (read once, written once, float32) and
the JAX runtime. Measured in ``benchmarks/streaming.py`` and ``docs/scaling.md``.

Output folder (format ``jaxquant-stream-1``)::

    OUT/shards/head.safetensors            embedding, final norm, lm_head (as the rules leave them)
    OUT/shards/layer-00000.safetensors     one file per block: every array of every leaf of the block
    OUT/manifest.json                      the leaves (plain array or QArray: scheme, shape, dtype, parts, as in
                                           jaxquant.io.checkpoint), where each array lives, metadata
    OUT/config.json, OUT/tokenizer.json    LlamaConfig (as save_model writes it) and the source's tokenizer

Every array keeps its exact dtype and bits: dtypes safetensors has no code for (fp8, uint32) are stored as
their raw bytes (uint8) and the manifest records dtype and shape. The folder is written in a sibling
temporary folder, each shard as soon as its block is done, the manifest last, then swapped in atomically
(:mod:`jaxquant.io.checkpoint`'s swap): an interrupted run never leaves a half-written ``OUT``.
Read it back with :func:`load_streamed` (``jaxquant eval --model OUT`` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxquant.core.qarray import QArray, Scheme

__all__ = [
    "FORMAT",
    "HFSource",
    "StreamResult",
    "is_streamed",
    "load_streamed",
    "load_streamed_params",
    "peak_rss_bytes",
    "reset_peak_rss",
    "stream_quantize",
    "synthetic_checkpoint",
]

FORMAT = "jaxquant-stream-1"
_NATIVE = {
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
}


# ---------------------------------------------------------------------------------------------------------
# memory measurement
# ---------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux: ``5`` into ``/proc/self/clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or the last :func:`reset_peak_rss`, in bytes.

    Linux: ``VmHWM`` of ``/proc/self/status`` (resettable); elsewhere ``getrusage``'s ``ru_maxrss``.
    """
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    from jaxquant.eval.memory import peak_rss_bytes as ru_peak

    return ru_peak()


# ---------------------------------------------------------------------------------------------------------
# the source: an HF safetensors checkpoint read lazily
# ---------------------------------------------------------------------------------------------------------


class HFSource:
    """An HF Llama checkpoint folder read lazily, in the :func:`jaxquant.models.model_params` layout.

    Only the ``config.json`` and the safetensors headers are read on construction (names, shapes, dtypes are
    checked against the config as :func:`jaxquant.models.load_hf` checks them). :meth:`read` returns float32
    numpy arrays (kernels transposed to ``(in, out)``, contiguous) for the requested parameter paths, opening
    each file once per call.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        from safetensors import safe_open

        from jaxquant.models.hf_loader import (
            _IGNORED_RE,
            _LAYER_MAP,
            _LAYER_RE,
            HFCheckpointError,
            _weight_files,
            config_from_hf,
        )
        from jaxquant.models.llama import param_shapes

        folder = os.fspath(folder)
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"HF checkpoint folder not found: {folder}")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{folder}: no config.json")
        try:
            with open(cfg_path) as f:
                self.hf_config = json.load(f)
        except ValueError as e:
            raise HFCheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
        self.folder = folder
        self.config = config_from_hf(self.hf_config, where=cfg_path)
        self.files = _weight_files(folder)
        self.file_bytes = sum(os.path.getsize(p) for p in self.files)
        # our path -> (file, hf name, transpose)
        self._where: dict[str, tuple[str, str, bool]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        unknown = []
        for path in self.files:
            try:
                with safe_open(path, framework="numpy") as f:
                    for name in f.keys():
                        shape = tuple(f.get_slice(name).get_shape())
                        ours, transpose = self._our_name(name, _LAYER_RE, _LAYER_MAP)
                        if ours is None:
                            if not _IGNORED_RE.fullmatch(name) and not (
                                name == "lm_head.weight" and self.config.tie_embeddings
                            ):
                                unknown.append(name)
                            continue
                        self._where[ours] = (path, name, transpose)
                        shapes[ours] = shape[::-1] if transpose else shape
            except HFCheckpointError:
                raise
            except Exception as e:
                raise HFCheckpointError(f"{path}: cannot read safetensors file: {type(e).__name__}: {e}") from None
        if unknown:
            raise HFCheckpointError(f"{folder}: tensors not understood by the llama loader: {unknown[:8]}")
        want = param_shapes(self.config)
        missing = sorted(set(want) - set(shapes))
        extra = sorted(set(shapes) - set(want))
        if missing or extra:
            raise HFCheckpointError(f"{folder}: missing weights {missing[:6]}, unexpected weights {extra[:6]}")
        for k, s in want.items():
            if shapes[k] != s:
                raise HFCheckpointError(f"{folder}: weight {k} has shape {shapes[k]}, config.json implies {s}")
        self.shapes = want

    def _our_name(self, name: str, layer_re: re.Pattern, layer_map: Mapping[str, str]) -> tuple[str | None, bool]:
        if name == "model.embed_tokens.weight":
            return "embed/embedding", False
        if name == "model.norm.weight":
            return "norm/scale", False
        if name == "lm_head.weight":
            return (None, False) if self.config.tie_embeddings else ("lm_head/kernel", True)
        m = layer_re.fullmatch(name)
        if m and m.group(2) in layer_map:
            leaf = layer_map[m.group(2)]
            return f"layers/{int(m.group(1))}/{leaf}", leaf.endswith("kernel")
        return None, False

    @property
    def paths(self) -> list[str]:
        """Every parameter path, non-block ones first, then block by block."""
        return list(self.shapes)

    def read(self, paths: Sequence[str], *, on_device: bool = False) -> dict[str, Any]:
        """``{path: float32 (in, out) array}`` for ``paths`` (each source file opened once, then closed).

        ``on_device``: the stored tensor (e.g. bfloat16) is moved to the default JAX device as it is and
        transposed / converted to float32 there (exact, like the host conversion, and several times faster than
        NumPy's single-threaded bfloat16 conversion; the host holds only the stored bytes). Returns jax arrays.
        """
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for p in paths:
            if p not in self._where:
                raise KeyError(f"{self.folder}: no parameter {p!r}")
            by_file.setdefault(self._where[p][0], []).append(p)
        out: dict[str, np.ndarray] = {}
        for file, ps in by_file.items():
            with safe_open(file, framework="numpy") as f:
                for p in ps:
                    _, name, transpose = self._where[p]
                    w = f.get_tensor(name)
                    if on_device:
                        import jax.numpy as jnp

                        out[p] = _to_f32_t(jnp.asarray(w)) if transpose else _to_f32(jnp.asarray(w))
                    else:
                        out[p] = np.ascontiguousarray(w.T if transpose else w, dtype=np.float32)
                    del w
        return {p: out[p] for p in paths}

    def block(self, li: int, *, on_device: bool = False) -> dict[str, Any]:
        """Block ``li``'s flat float32 parameters (``"attn/q_proj/kernel"``, ``"attn_norm/scale"``, ...)."""
        prefix = f"layers/{li}/"
        got = self.read([p for p in self.shapes if p.startswith(prefix)], on_device=on_device)
        return {p[len(prefix) :]: v for p, v in got.items()}

    def tokenizer(self) -> Any:
        """The folder's :class:`~jaxquant.models.TextTokenizer`, or ``None`` without ``tokenizer.json``."""
        from jaxquant.models.tokenizer import TextTokenizer

        if not os.path.isfile(os.path.join(self.folder, "tokenizer.json")):
            return None
        c = self.hf_config
        return TextTokenizer.from_folder(self.folder, bos_id=c.get("bos_token_id"), eos_id=c.get("eos_token_id"))


def _to_f32_t(x: Any) -> Any:
    return _jitted()[0](x)


def _to_f32(x: Any) -> Any:
    return _jitted()[1](x)


_JIT: list[Any] = []


def _jitted() -> list[Any]:
    if not _JIT:
        import jax
        import jax.numpy as jnp

        _JIT.extend([jax.jit(lambda x: x.T.astype(jnp.float32)), jax.jit(lambda x: x.astype(jnp.float32))])
    return _JIT


# ---------------------------------------------------------------------------------------------------------
# the writer
# ---------------------------------------------------------------------------------------------------------


def _to_storable(a: np.ndarray) -> tuple[np.ndarray, str]:
    dt = str(a.dtype)
    if dt in _NATIVE:
        return np.ascontiguousarray(a), "native"
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8), "raw"


def _from_stored(a: np.ndarray, info: Mapping[str, Any]) -> np.ndarray:
    if info["stored"] == "native":
        return a
    dt = np.dtype(getattr(ml_dtypes, info["dtype"], None) or info["dtype"])
    return a.view(dt).reshape(tuple(info["shape"]))


class _Writer:
    """Writes ``shards/*.safetensors`` one at a time into a temporary sibling folder; :meth:`finish` swaps it in."""

    def __init__(self, dest: str | os.PathLike[str]):
        from jaxquant.io.checkpoint import _clean_leftovers

        self.dest = Path(dest).absolute()
        if self.dest.exists() and not self.dest.is_dir():
            raise ValueError(f"{self.dest} is a file; the output is a folder")
        if self.dest.is_dir() and any(self.dest.iterdir()) and not (is_streamed(self.dest) or _is_ckpt(self.dest)):
            raise ValueError(
                f"{self.dest} is a non-empty folder that is not a jaxquant checkpoint; refusing to replace it"
            )
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(self.dest)
        self.tmp = Path(tempfile.mkdtemp(dir=self.dest.parent, prefix=f".{self.dest.name}.tmp-{os.getpid()}-"))
        (self.tmp / "shards").mkdir()
        self.leaves: dict[str, Any] = {}
        self.arrays: dict[str, Any] = {}
        self.bytes_written = 0

    def write(self, shard: str, flat: Mapping[str, Any]) -> None:
        """Write the leaves ``{path: array or QArray}`` as ``shards/<shard>.safetensors`` (fsynced, renamed)."""
        from safetensors.numpy import save_file

        from jaxquant.io.checkpoint import _flatten
        from jaxquant.models.llama import unflatten_params

        arrays, manifest = _flatten(unflatten_params(dict(flat)))
        fname = f"shards/{shard}.safetensors"
        tensors = {}
        for name, a in arrays.items():
            a = np.asarray(a)
            stored, how = _to_storable(a)
            tensors[name] = stored
            self.arrays[name] = {"file": fname, "dtype": str(a.dtype), "shape": list(a.shape), "stored": how}
        part = self.tmp / f"{fname}.part"
        save_file(tensors, str(part))
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, self.tmp / fname)
        self.bytes_written += os.path.getsize(self.tmp / fname)
        self.leaves.update(manifest)

    def finish(self, config: Any, tokenizer: Any, metadata: Mapping[str, Any]) -> Path:
        from jaxquant.io.checkpoint import _fsync_tree, _swap_in, _write_json

        _write_json(self.tmp / "config.json", {"jaxquant_llama_config": dataclasses.asdict(config)})
        if tokenizer is not None:
            tokenizer.save(self.tmp)
        manifest = {"format": FORMAT, "leaves": self.leaves, "arrays": self.arrays, "metadata": dict(metadata)}
        _write_json(self.tmp / "manifest.json", manifest)  # last: a folder without it is not a checkpoint
        _fsync_tree(self.tmp)
        _swap_in(self.tmp, self.dest)
        return self.dest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _is_ckpt(p: Path) -> bool:
    from jaxquant.io.checkpoint import is_checkpoint

    return is_checkpoint(p)


# ---------------------------------------------------------------------------------------------------------
# reading the output back
# ---------------------------------------------------------------------------------------------------------


def is_streamed(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a folder written by :func:`stream_quantize`."""
    m = Path(path) / "manifest.json"
    if not m.is_file() or not (Path(path) / "shards").is_dir():
        return False
    try:
        return json.loads(m.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_streamed_params(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params, metadata)``: the nested params dict (QArrays, jax arrays) of a :func:`stream_quantize` folder."""
    from safetensors import safe_open

    from jaxquant.io.checkpoint import CheckpointError, _unflatten

    folder = Path(path)
    if not is_streamed(folder):
        raise CheckpointError(f"{folder}: not a streamed jaxquant checkpoint (no {FORMAT} manifest.json + shards/)")
    m = json.loads((folder / "manifest.json").read_text())
    by_file: dict[str, list[str]] = {}
    for name, info in m["arrays"].items():
        by_file.setdefault(info["file"], []).append(name)
    arrays: dict[str, Any] = {}
    for fname, names in by_file.items():
        try:
            with safe_open(str(folder / fname), framework="numpy") as f:
                for name in names:
                    arrays[name] = _from_stored(f.get_tensor(name), m["arrays"][name])
        except Exception as e:
            raise CheckpointError(f"{folder / fname}: cannot read ({type(e).__name__}: {e})") from None
    try:
        return _unflatten(arrays, m["leaves"]), m.get("metadata", {})
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None


def load_streamed(path: str | os.PathLike[str]) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer or None, metadata)`` from a folder written by :func:`stream_quantize`."""
    from jaxquant.io.checkpoint import CheckpointError, _restore_into
    from jaxquant.models import Llama, LlamaConfig, TextTokenizer

    folder = Path(path)
    params, meta = load_streamed_params(folder)
    try:
        config = LlamaConfig(**json.loads((folder / "config.json").read_text())["jaxquant_llama_config"])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: missing or corrupt config.json ({e})") from None
    model = _restore_into(Llama.abstract(config), params, [], folder)
    tok = TextTokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
    return model, tok, meta


# ---------------------------------------------------------------------------------------------------------
# stream_quantize
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamResult:
    """What :func:`stream_quantize` did.

    Attributes:
      path: the output folder.
      method: ``"rules"`` (tensor by tensor) or ``"gptq"`` (block by block, calibrated).
      seconds: wall time, reading and writing included.
      peak_rss_bytes: peak resident set size of the process during the run (reset at the start where the OS
        allows it, see :func:`reset_peak_rss`; otherwise the process's peak so far).
      source_bytes: bytes of the source's safetensors files.
      output_bytes: bytes of the written shards.
      n_quantized: number of tensors quantized.
      n_layers: blocks.
      layer_seconds: wall time of each block (read + quantize + write).
    """

    path: Path
    method: str
    seconds: float
    peak_rss_bytes: int
    source_bytes: int
    output_bytes: int
    n_quantized: int
    n_layers: int
    layer_seconds: tuple[float, ...]

    def summary(self) -> str:
        gib = 2**30
        return (
            f"streamed {self.source_bytes / gib:.2f} GiB -> {self.output_bytes / gib:.2f} GiB ({self.method}, "
            f"{self.n_quantized} tensors quantized, {self.n_layers} blocks) in {self.seconds:.1f} s; "
            f"peak RSS {self.peak_rss_bytes / gib:.2f} GiB"
        )


def _quantize_flat(
    flat: Mapping[str, Any], compiled: list[tuple[re.Pattern, Scheme | None]], used: list[bool], mesh: Any = None
) -> tuple[dict[str, Any], int]:
    """:func:`jaxquant.quantize_params`' per-leaf rule on a flat ``{full path: array}`` dict (on ``mesh``:
    :func:`jaxquant.sharding.quantize_sharded`, same bits)."""
    from jaxquant.core.api import quantize
    from jaxquant.sharding import param_dims, quantize_sharded

    out: dict[str, Any] = {}
    n = 0
    for p, leaf in flat.items():
        out[p] = leaf
        if not np.issubdtype(np.dtype(leaf.dtype), np.floating):
            continue
        for i, (rx, scheme) in enumerate(compiled):
            if rx.fullmatch(p):
                used[i] = True
                if scheme is not None:
                    try:
                        if mesh is None:
                            q = quantize(leaf, scheme)
                        else:
                            q = quantize_sharded(leaf, scheme, mesh, dim=param_dims(p))
                    except (ValueError, TypeError) as e:
                        raise type(e)(f"{p}: {e}") from None
                    out[p] = _to_host(q)
                    n += 1
                break
    return out, n


def _to_host(q: QArray) -> QArray:
    """The QArray with numpy fields (device buffers freed as soon as the caller drops the jax arrays)."""
    import jax

    return jax.tree.map(np.asarray, q)


def _block_names(cfg: Any) -> list[str]:
    return ["embed/embedding", "norm/scale"] + ([] if cfg.tie_embeddings else ["lm_head/kernel"])


def _gptq_config(spec_name: str, options: Mapping[str, Any]) -> Any:
    from jaxquant.algorithms.gptq import GPTQConfig
    from jaxquant.algorithms.specs import _RE, GPTQ_DEFAULTS, _options, _window_opts
    from jaxquant.schemes.rtn import IntScheme

    m = _RE.fullmatch(spec_name)
    if m is None or m["method"] != "gptq":
        raise ValueError(
            f"SPEC {spec_name!r} cannot be streamed: streaming supports static SPECs (RTN, NF4, fp8 ...) and GPTQ"
        )
    options = dict(options)
    batch_size = options.pop("batch_size", None)
    opts = _options("gptq", options)
    kw = {**GPTQ_DEFAULTS, **_window_opts(opts, GPTQ_DEFAULTS)}
    for k in ("act_order", "sequential", "damp", "clip_search"):
        if k in opts and k in GPTQ_DEFAULTS:
            kw[k] = type(GPTQ_DEFAULTS[k])(opts[k])
    if batch_size is not None:
        kw["batch_size"] = batch_size  # GPTQConfig validates it
    scheme = IntScheme(bits=int(m["bits"]), group_size=int(m["g"]) if m["g"] else None, symmetric=not m["asym"])
    return GPTQConfig(scheme=scheme, **kw)


@contextlib.contextmanager
def _bar(total: int, desc: str, progress: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="block", desc=desc, disable=not progress, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def stream_quantize(
    source: str | os.PathLike[str] | HFSource,
    dest: str | os.PathLike[str],
    spec: Any,
    *,
    calib_tokens: Any = None,
    options: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    mesh: Any = None,
) -> StreamResult:
    """Quantize an HF safetensors checkpoint into ``dest`` without ever holding the whole model.

    Args:
      source: an HF Llama checkpoint folder (sharded or not) or an :class:`HFSource`.
      dest: output folder (format in the module docstring; replaced atomically if it is a jaxquant checkpoint).
      spec: a SPEC name or :class:`~jaxquant.specs.Spec` (static SPECs and GPTQ SPECs), or a rule list
        ``[(path_regex, scheme_or_None), ...]`` as for :func:`jaxquant.quantize_params`.
      calib_tokens: 1-D calibration token ids (or ready ``(n, seq_len)`` windows); GPTQ only.
      options: GPTQ options as for the GPTQ SPECs (``calib_samples``, ``calib_seq_len``, ``act_order``,
        ``sequential``, ``damp``, ``clip_search``) plus ``batch_size`` (windows per compiled call).
      metadata: extra JSON metadata stored in the manifest (``spec``, ``stream_seconds`` ... are added).
      progress: tqdm bar on stderr.
      log: receives one summary line at the end.
      mesh: a :class:`jax.sharding.Mesh`. Static SPECs: each kernel is quantized split over the ``model`` axis
        (:func:`jaxquant.sharding.quantize_sharded`; bit-identical result). GPTQ: the calibration batches are
        split over the ``data`` axis (:func:`jaxquant.calibrate.walk_blocks`; Hessians equal up to float32
        summation order, so codes may differ from a one-device run) and each GPTQ call's columns over the
        ``model`` axis (bit-identical for a given Hessian).

    Returns:
      a :class:`StreamResult` (time, peak RSS, sizes).

    Raises:
      ValueError: a SPEC that cannot be streamed (AWQ, SmoothQuant, layer-swapping SPECs), bad options, a rule
        that matched nothing, or an unreadable source.
    """
    from jaxquant.specs import Spec, parse_spec
    from jaxquant.transform import _compile_rules

    t0 = time.perf_counter()
    reset = reset_peak_rss()
    src = source if isinstance(source, HFSource) else HFSource(source)
    cfg = src.config
    options = dict(options or {})
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if isinstance(spec, Spec):
        spec_name = spec.name
        if spec.build_model is not None:
            raise ValueError(f"SPEC {spec.name!r} swaps layers and cannot be streamed")
        rules = list(spec.rules) if spec.rules else None
        if spec.build is None and not spec.rules:
            raise ValueError(f"SPEC {spec.name!r} quantizes nothing")
    else:
        spec_name, rules = "rules", list(spec)
    gptq_cfg = None
    if rules is None:
        gptq_cfg = _gptq_config(spec_name, options)
        if calib_tokens is None:
            raise ValueError(f"SPEC {spec_name!r} is calibrated and needs calibration tokens")
    elif options:
        raise ValueError(f"options {sorted(options)} do not apply to the static SPEC {spec_name!r}")
    if gptq_cfg is not None and mesh is not None and not ({"data", "model"} & set(mesh.shape)):
        raise ValueError("streaming GPTQ on a mesh uses its 'data' and/or 'model' axes; the mesh has neither")

    writer = _Writer(dest)
    layer_seconds: list[float] = []
    n_q = 0
    try:
        if gptq_cfg is None:
            compiled = [(rx, sch) for rx, sch, _ in _compile_rules(rules)]
            used = [False] * len(compiled)
            head, n = _quantize_flat(src.read(_block_names(cfg), on_device=True), compiled, used, mesh)
            writer.write("head", head)
            n_q += n
            del head
            with _bar(cfg.n_layers, "stream", progress) as bar:
                for li in range(cfg.n_layers):
                    t1 = time.perf_counter()
                    prefix = f"layers/{li}/"
                    q = {}
                    for p in [p for p in src.paths if p.startswith(prefix)]:  # tensor by tensor
                        one, n = _quantize_flat(src.read([p], on_device=True), compiled, used, mesh)
                        q.update(one)
                        n_q += n
                        del one
                    writer.write(f"layer-{li:05d}", q)
                    del q
                    layer_seconds.append(time.perf_counter() - t1)
                    bar.update(1)
            unused = [pat for (_, _, pat), u in zip(_compile_rules(rules), used) if not u]
            if unused:
                raise ValueError(f"stream_quantize: rule(s) matched no floating leaf: {unused}")
            method = "rules"
        else:
            from jaxquant.algorithms.gptq import gptq_blocks

            head = src.read(_block_names(cfg))
            writer.write("head", head)
            emb = head["embed/embedding"]
            del head
            t_last = [time.perf_counter()]

            def on_block(li: int, block: dict[str, Any]) -> None:
                prefix = f"layers/{li}/"
                out = {prefix + k: (_to_host(v) if isinstance(v, QArray) else np.asarray(v)) for k, v in block.items()}
                writer.write(f"layer-{li:05d}", out)
                now = time.perf_counter()
                layer_seconds.append(now - t_last[0])
                t_last[0] = now

            records = gptq_blocks(
                cfg,
                emb,
                lambda li: src.block(li, on_device=True),
                calib_tokens,
                gptq_cfg,
                on_block,
                progress=progress,
                mesh=mesh,
            )
            n_q = sum(len(r.linears) for r in records)
            method = "gptq"
        seconds = time.perf_counter() - t0
        peak = peak_rss_bytes()
        meta = {
            **dict(metadata or {}),
            "spec": spec_name,
            "streamed": True,
            "stream_seconds": round(seconds, 3),
            "peak_rss_bytes": peak,
            "peak_rss_reset": reset,
            "source_bytes": src.file_bytes,
        }
        out_bytes = writer.bytes_written
        path = writer.finish(cfg, src.tokenizer(), meta)
    except BaseException:
        writer.abort()
        raise
    res = StreamResult(path, method, seconds, peak, src.file_bytes, out_bytes, n_q, cfg.n_layers, tuple(layer_seconds))
    if log is not None:
        log(res.summary())
    return res


# ---------------------------------------------------------------------------------------------------------
# synthetic checkpoints
# ---------------------------------------------------------------------------------------------------------


def synthetic_checkpoint(
    folder: str | os.PathLike[str],
    config: Any,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 1 << 30,
    seed: int = 0,
    tokenizer_from: str | os.PathLike[str] | None = None,
) -> int:
    """Write a random HF Llama checkpoint (sharded safetensors + index + config.json) for ``config``.

    Generated and written one block at a time (never more than one shard of tensors in memory), so
    checkpoints larger than RAM can be made. Weights are ``N(0, 0.02)`` (norm scales 1), in ``dtype``.
    ``tokenizer_from`` copies ``tokenizer.json`` (+ bos/eos ids) from another HF folder or a GGUF file (its
    vocabulary should match ``config.vocab_size``). Returns the bytes of the weight files.
    """
    from safetensors.numpy import save_file

    from jaxquant.models.hf_loader import _DTYPES, _INDEX, _LAYER_MAP, config_to_hf

    dt = _DTYPES[dtype]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    c = config
    hd = c.head_dim
    inverse = {v: k for k, v in _LAYER_MAP.items()}
    per = {  # HF (out, in) shapes
        "attn_norm/scale": (c.dim,),
        "attn/q_proj/kernel": (c.n_heads * hd, c.dim),
        "attn/k_proj/kernel": (c.n_kv_heads * hd, c.dim),
        "attn/v_proj/kernel": (c.n_kv_heads * hd, c.dim),
        "attn/o_proj/kernel": (c.dim, c.n_heads * hd),
        "mlp_norm/scale": (c.dim,),
        "mlp/gate_proj/kernel": (c.hidden_dim, c.dim),
        "mlp/up_proj/kernel": (c.hidden_dim, c.dim),
        "mlp/down_proj/kernel": (c.dim, c.hidden_dim),
    }

    def tensors() -> Iterator[tuple[str, tuple[int, ...]]]:
        yield "model.embed_tokens.weight", (c.vocab_size, c.dim)
        for li in range(c.n_layers):
            for leaf, shape in per.items():
                yield f"model.layers.{li}.{inverse[leaf]}.weight", shape
        yield "model.norm.weight", (c.dim,)
        if not c.tie_embeddings:
            yield "lm_head.weight", (c.vocab_size, c.dim)

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.endswith("norm.weight"):
            return np.ones(shape, dt)
        out = np.empty(shape, dt)
        rows = max(1, (64 << 20) // (4 * shape[-1]))
        for a in range(0, shape[0], rows):  # in slices: no full float32 copy
            out[a : a + rows] = (rng.standard_normal((min(rows, shape[0] - a), shape[-1]), np.float32) * 0.02).astype(
                dt
            )
        return out

    itemsize = np.dtype(dt).itemsize
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors():
        nb = int(np.prod(shape)) * itemsize
        if plan[-1] and size + nb > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, shape))
        size += nb
    n = len(plan)
    weight_map: dict[str, str] = {}
    total = 0
    for k, items in enumerate(plan, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        shard = {name: make(name, shape) for name, shape in items}
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        total += sum(v.nbytes for v in shard.values())
        weight_map.update(dict.fromkeys(shard, fname))
        del shard
    with open(folder / _INDEX, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    extra: dict[str, Any] = {}
    if tokenizer_from is not None:
        src = Path(tokenizer_from)
        if src.is_dir():
            shutil.copy(src / "tokenizer.json", folder / "tokenizer.json")
            cfg_src = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
            extra = {k: cfg_src[k] for k in ("bos_token_id", "eos_token_id") if k in cfg_src}
        else:
            from jaxquant.models.tokenizer import tokenizer_from_gguf

            tok = tokenizer_from_gguf(src)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tok.save(folder)
            extra = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    with open(folder / "config.json", "w") as f:
        json.dump(config_to_hf(config, torch_dtype=dtype, **extra), f, indent=1)
    return sum(os.path.getsize(folder / fn) for fn in set(weight_map.values()))
