"""Checking Pallas Triton kernels without a GPU: CUDA lowering, Triton IR extraction, cubin compilation.

Three checks run on a CPU-only machine (see ``docs``/``PALLAS_NOTES``):

1. :func:`export_cuda` lowers a jitted function for ``platforms=["cuda"]`` with :mod:`jax.export`; a Pallas
   kernel with Triton compiler params becomes a ``__gpu$xla.gpu.triton`` custom call whose backend config
   carries the kernel's Triton IR as MLIR bytecode.
2. :func:`triton_calls` pulls every such kernel out of the lowered module (name, IR, ``num_warps``,
   ``num_stages``, grid); :func:`ir_text` turns the bytecode into textual Triton IR with jaxlib's own Triton
   dialect (the bytecode of jaxlib's MLIR is not readable by PyPI Triton's MLIR, the text is).
3. :func:`compile_cubin` compiles that text for an NVIDIA architecture (``sm_90``, ``sm_80``) with PyPI
   ``triton`` (which bundles ``ptxas``) in a subprocess, since an LLVM error aborts the whole process. It reports
   registers, spills, shared memory and whether tensor-core instructions (``mma``/``wgmma``) were emitted.
4. :func:`sass` disassembles that cubin with the ``nvdisasm`` Triton bundles, and :func:`loop_profile` counts the
   instructions of the kernel's K loop by opcode: a static measure of the work per weight (e.g. int-to-float
   conversions, shared-memory traffic) that can be compared between kernel variants without a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax

__all__ = [
    "TRITON_CUSTOM_CALL",
    "CubinReport",
    "LoopProfile",
    "TritonCall",
    "compile_cubin",
    "export_cuda",
    "ir_text",
    "loop_profile",
    "sass",
    "triton_available",
    "triton_calls",
]

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class TritonCall:
    """One Triton kernel found in a lowered module."""

    name: str
    ir: bytes  # MLIR bytecode of the Triton module, as XLA receives it
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class CubinReport:
    """Outcome of compiling one kernel for one architecture."""

    ok: bool
    arch: int
    message: str = ""
    n_regs: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    tensor_core: str | None = None  # "wgmma", "mma" or None
    cubin_bytes: int = 0


#: per-SM limits by architecture: (32-bit registers, threads, resident blocks, shared memory bytes usable by blocks);
#: the CUDA C++ Programming Guide's table of compute-capability limits (sm_80 / sm_90: 64 K registers, 2048 threads,
#: 32 blocks, 164 / 228 KB; sm_86 / sm_89: 1536 threads, 16 / 24 blocks, 100 KB)
SM_LIMITS = {
    80: (65536, 2048, 32, 164 * 1024),
    86: (65536, 1536, 16, 100 * 1024),
    89: (65536, 1536, 24, 100 * 1024),
    90: (65536, 2048, 32, 228 * 1024),
}


def occupancy(n_regs: int, shared_bytes: int, num_warps: int, arch: int = 90) -> tuple[int, str]:
    """Resident blocks per SM for a kernel of ``n_regs`` registers per thread, ``shared_bytes`` of shared memory
    per block and ``num_warps`` warps on ``sm_<arch>``, and the limit that binds (``"registers"``, ``"shared
    memory"``, ``"threads"`` or ``"blocks"``).

    Registers are allocated per warp in units of 256 (per thread: ``n_regs`` rounded up to 8); the driver reserves
    1 KiB of shared memory per block. A static estimate (what the CUDA occupancy calculator computes), not a
    measurement: 0 means the block does not fit at all.
    """
    if arch not in SM_LIMITS:
        raise ValueError(f"occupancy: no SM limits for sm_{arch} (known: {sorted(SM_LIMITS)})")
    if n_regs < 1 or shared_bytes < 0 or num_warps < 1:
        raise ValueError(f"occupancy: bad kernel resources ({n_regs} registers, {shared_bytes} B, {num_warps} warps)")
    regs, threads, blocks, smem = SM_LIMITS[arch]
    fits = {
        "registers": regs // (-(-n_regs // 8) * 8 * 32 * num_warps),
        "shared memory": smem // (shared_bytes + 1024),
        "threads": threads // (32 * num_warps),
        "blocks": blocks,
    }
    bind = min(fits, key=fits.get)
    return fits[bind], bind


def export_cuda(fn: Callable, *args: Any) -> str:
    """Lower ``jax.jit(fn)(*args)`` for CUDA without a GPU and return the StableHLO module text.

    Raises whatever the Pallas Triton lowering raises for unsupported operations.
    """
    from jax import export

    exp = export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)],
    )(*args)
    return exp.mlir_module()


def _read_mlir_string(text: str, start: int) -> tuple[bytes, int]:
    """Decode the MLIR string literal whose opening quote is at ``start``; return (bytes, index after it)."""
    assert text[start] == '"'
    out = bytearray()
    k = start + 1
    while text[k] != '"':
        c = text[k]
        if c == "\\":
            nxt = text[k + 1]
            if nxt == "\\":
                out.append(0x5C)
                k += 2
            elif nxt == '"':
                out.append(0x22)
                k += 2
            elif nxt == "n":
                out.append(0x0A)
                k += 2
            elif nxt == "t":
                out.append(0x09)
                k += 2
            else:
                out.append(int(text[k + 1 : k + 3], 16))
                k += 3
        else:
            out += c.encode("utf-8")
            k += 1
    return bytes(out), k + 1


def triton_calls(module_text: str) -> list[TritonCall]:
    """Every Triton custom call in a lowered StableHLO module (in program order)."""
    calls = []
    pos = 0
    needle = f"@{TRITON_CUSTOM_CALL}("
    while True:
        i = module_text.find(needle, pos)
        if i < 0:
            break
        j = module_text.find('ir = "', i)
        ir, after = _read_mlir_string(module_text, j + 5)
        head = module_text[i:j]
        tail = module_text[after : module_text.find("}", after)]

        def _int(key: str, src: str) -> int:
            m = re.search(rf"{key} = (\d+) : i32", src)
            return int(m.group(1)) if m else 1

        name_m = re.search(r'name = "([^"]*)"', tail)
        calls.append(
            TritonCall(
                name=name_m.group(1) if name_m else "kernel",
                ir=ir,
                num_warps=_int("num_warps", tail),
                num_stages=_int("num_stages", tail),
                grid=(_int("grid_x", head), _int("grid_y", head), _int("grid_z", head)),
            )
        )
        pos = after
    return calls


def ir_text(ir: bytes) -> str:
    """Textual Triton IR of a kernel's bytecode, printed with jaxlib's own MLIR and Triton dialect."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir as mlir_ir
    from jax._src.lib.triton import dialect as tt_dialect

    ctx = jax_mlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    with ctx:
        module = mlir_ir.Module.parse(ir)
        return module.operation.get_asm(enable_debug_info=False)


def triton_available() -> bool:
    """Whether PyPI ``triton`` (the ``dev`` extra) is importable, needed by :func:`compile_cubin`."""
    return importlib.util.find_spec("triton") is not None


_WORKER = r"""
import json, os, re, sys, io, contextlib
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import warnings
warnings.simplefilter("ignore")
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget, Language
from triton.compiler.compiler import make_backend
path, arch, num_warps, num_stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cubin_out = sys.argv[5] if len(sys.argv) > 5 else ""
target = GPUTarget("cuda", arch, 32)
backend = make_backend(target)
ctx = ir.context(); ir.load_dialects(ctx); backend.load_dialects(ctx)
mod = ir.parse_mlir_module(path, ctx)
mod.context = ctx
opts = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
stages = {}
backend.add_stages(stages, opts, Language.TRITON)
md = {"hash": "0", "target": target, **opts.__dict__}
cur = mod
log = io.StringIO()
ptx = ""
with contextlib.redirect_stdout(log):
    for ext, fn in stages.items():
        cur = fn(cur, md)
        if ext == "ptx":
            ptx = cur
text = log.getvalue()
if cubin_out:
    with open(cubin_out, "wb") as f:
        f.write(cur)
regs = re.findall(r"Used (\d+) registers", text)
spill = re.findall(r"(\d+) bytes spill stores", text)
tc = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else None)
print("@@RESULT@@" + json.dumps({"n_regs": int(regs[0]) if regs else None,
    "spill_bytes": int(spill[0]) if spill else None, "shared_bytes": md.get("shared"),
    "tensor_core": tc, "cubin_bytes": len(cur)}))
"""


def compile_cubin(
    ttir: str,
    arch: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
    timeout: float = 120.0,
    cubin_path: str | None = None,
) -> CubinReport:
    """Compile textual Triton IR to a cubin for ``sm_<arch>`` with PyPI ``triton``, in a subprocess.

    Runs Triton's own pipeline (TTIR passes, TTGIR, LLVM IR, PTX, ``ptxas``) as XLA's Triton backend does.
    Returns a :class:`CubinReport` (``ok=False`` with the error tail on failure); never raises for a
    compile failure. Raises ``RuntimeError`` when ``triton`` is not installed. With ``cubin_path``, the cubin
    is also written there (for :func:`sass`).
    """
    if not triton_available():
        raise RuntimeError("compile_cubin needs PyPI triton (pip install 'jaxquant[dev]')")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _WORKER, path, str(arch), str(num_warps), str(num_stages), cubin_path or ""],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return CubinReport(ok=False, arch=arch, message=f"timed out after {timeout:.0f} s")
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not marker:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [ln for ln in lines if "error" in ln.lower() and "Traceback" not in ln]
        return CubinReport(ok=False, arch=arch, message="\n".join(errors[:10] + lines[-8:]))
    res = json.loads(marker[-1][len("@@RESULT@@") :])
    return CubinReport(ok=True, arch=arch, **res)


def check_kernels(
    fn: Callable, args: Sequence[Any], archs: Sequence[int] = (90,), timeout: float = 120.0
) -> list[tuple[TritonCall, list[CubinReport]]]:
    """Lower ``fn(*args)`` for CUDA, then compile every Triton kernel in it for each of ``archs``."""
    calls = triton_calls(export_cuda(fn, *args))
    out = []
    for call in calls:
        text = ir_text(call.ir)
        out.append((call, [compile_cubin(text, a, call.num_warps, call.num_stages, timeout=timeout) for a in archs]))
    return out


def _nvdisasm() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def sass(ttir: str, arch: int = 90, num_warps: int = 4, num_stages: int = 3, timeout: float = 120.0) -> str:
    """The SASS (machine code) of textual Triton IR compiled for ``sm_<arch>``, as printed by ``nvdisasm``.

    Raises ``RuntimeError`` when the kernel does not compile or ``triton`` (which bundles ``nvdisasm``) is
    not installed.
    """
    return sass_and_report(ttir, arch, num_warps, num_stages, timeout)[0]


def sass_and_report(
    ttir: str, arch: int = 90, num_warps: int = 4, num_stages: int = 3, timeout: float = 120.0
) -> tuple[str, CubinReport]:
    """:func:`sass` and the compilation's :class:`CubinReport` (registers, spills, shared memory) from one compile."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        rep = compile_cubin(ttir, arch, num_warps, num_stages, timeout=timeout, cubin_path=path)
        if not rep.ok:
            raise RuntimeError(f"sass: the kernel does not compile for sm_{arch}: {rep.message}")
        proc = subprocess.run([_nvdisasm(), "-c", path], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"sass: nvdisasm failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout, rep


_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


@dataclasses.dataclass(frozen=True)
class LoopProfile:
    """Static instruction mix of a kernel's main loop (its longest backward-branch loop), per warp per trip.

    Attributes:
      instructions: SASS instructions in one trip of the loop (each executed once per warp).
      counts: instructions per opcode, full name with modifiers (``"I2F.BF16"``, ``"HMMA.16816.F32.BF16"``).
      exposed_loads: global loads into registers (``LDG``; not the ``LDGSTS`` copies into shared memory that
        Triton's software pipeline issues stages ahead) whose value is read later in the *same* trip. Each makes
        every trip wait for the L2/DRAM latency (hundreds of cycles), which no instruction count shows. An
        ``LDG`` read only before it in the loop body is a prefetch for the next trip and is not counted.
    """

    instructions: int
    counts: dict[str, int]
    exposed_loads: int = 0
    #: the K loop was fully unrolled: the numbers are the whole kernel's divided by the trip count
    #: (:func:`k_loop_profile`), prologue and epilogue included
    unrolled: bool = False

    def count(self, prefix: str) -> int:
        """Instructions whose opcode starts with ``prefix`` (``"I2F"`` counts every int-to-float conversion)."""
        return sum(v for k, v in self.counts.items() if k == prefix or k.startswith(prefix + "."))

    @property
    def barriers(self) -> int:
        """Block-wide barriers (``BAR.SYNC``) per trip: the pipeline needs about two; more mean layout conversions
        through shared memory (store, barrier, load) inside the loop."""
        return self.count("BAR")


def loop_profile(sass_text: str) -> LoopProfile:
    """Opcode counts of the longest loop in ``sass_text`` (from a label to a later branch back to it).

    The K loop of a matmul kernel is its only long loop, so this is the per-trip cost of the steady state.
    Raises ``ValueError`` when the code has no backward branch.
    """
    lines = sass_text.splitlines()
    loops = _loops(lines)
    if not loops:
        raise ValueError("loop_profile: no backward branch (loop) in this code")
    first, last = max(loops, key=lambda ab: ab[1] - ab[0])  # the first of equally long ones
    return _profile(lines[first : last + 1])


#: tensor-core instructions (a dot's K loop holds nearly all of a matmul kernel's)
MMA_OPCODES = ("HMMA", "IMMA", "HGMMA", "QGMMA", "IGMMA")


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """``(first, last)`` line of every loop: a label and a later branch back to it."""
    labels: dict[str, int] = {}
    out = []
    for i, ln in enumerate(lines):
        m = _SASS_LABEL.match(ln.strip())
        if m:
            labels[m.group(1)] = i
            continue
        b = _SASS_BRANCH.search(ln)
        if b and b.group(1) in labels:
            out.append((labels[b.group(1)], i))
    return out


def k_loop_profile(sass_text: str, trips: int, mma: tuple[str, ...] = MMA_OPCODES) -> LoopProfile:
    """The per-trip profile of a matmul kernel's K loop (``trips`` trips per program), whose dot issues the
    tensor-core opcodes ``mma`` (e.g. ``("IMMA", "IGMMA")`` for an int8 dot).

    The longest loop holding one of those opcodes (other loops, e.g. LLM.int8's outlier loop with its float32
    dot, are passed over); the longest loop of all when the kernel has none (a GEMV). When Triton unrolled the K
    loop completely (a short K loop of a split-K program can be), no loop holds them: then the whole kernel's
    counts divided by ``trips`` (rounded half up; prologue, epilogue and one body of any other loop included, so
    an upper bound), with ``unrolled=True``. Raises ``ValueError`` for ``trips < 1`` or code without loop or tensor-core
    instruction.
    """
    if trips < 1:
        raise ValueError(f"k_loop_profile: trips must be >= 1, got {trips}")
    lines = sass_text.splitlines()
    whole = _profile(lines)
    if not any(whole.count(op) for op in mma):
        return loop_profile(sass_text)
    loops = [_profile(lines[a : b + 1]) for a, b in _loops(lines)]
    dots = [p for p in loops if any(p.count(op) for op in mma)]
    if dots:
        return max(dots, key=lambda p: p.instructions)

    def per_trip(c: int) -> int:  # rounded half up
        return (c + trips // 2) // trips

    return LoopProfile(
        instructions=per_trip(whole.instructions),
        counts={op: per_trip(c) for op, c in whole.counts.items() if per_trip(c)},
        exposed_loads=per_trip(whole.exposed_loads),
        unrolled=True,
    )


def _profile(lines: list[str]) -> LoopProfile:
    counts: dict[str, int] = {}
    body: list[tuple[str, list[str], bool]] = []  # (opcode with modifiers, operands, predicated) per instruction
    for ln in lines:
        m = _SASS_LINE.search(ln)
        if m:
            op = m.group(1) + m.group(2)
            counts[op] = counts.get(op, 0) + 1
            operands = [o.strip() for o in ln[m.end() :].split(";")[0].split(",") if o.strip()]
            body.append((op, operands, "@" in ln[: m.start(1)]))
    exposed = sum(_read_later(body, i) for i, (op, _, _) in enumerate(body) if op == "LDG" or op.startswith("LDG."))
    return LoopProfile(
        instructions=sum(counts.values()),
        counts=dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        exposed_loads=exposed,
    )


_SASS_REG = re.compile(r"(?<![A-Z0-9_])R(\d+)((?:\.64)?)")
_NO_DEST = ("ST", "RED", "BAR", "BRA", "EXIT", "DEPBAR", "LDGSTS", "LDGDEPBAR", "WARPSYNC", "NOP", "MEMBAR")


def _width(op: str) -> int:
    return 4 if ".128" in op else (2 if ".64" in op else 1)


def _regs(operand: str, width: int = 1) -> set[int]:
    out: set[int] = set()
    for m in _SASS_REG.finditer(operand):
        w = 2 if m.group(2) else width
        out.update(range(int(m.group(1)), int(m.group(1)) + w))
    return out


def _read_later(body: list[tuple[str, list[str], bool]], i: int) -> bool:
    """Whether the registers loaded by instruction ``i`` are read by a later instruction of the same trip (a
    predicated write does not end their life: it may not happen)."""
    op, operands, _ = body[i]
    live = _regs(operands[0], _width(op)) if operands else set()
    for op2, ops2, predicated in body[i + 1 :]:
        if not live:
            return False
        stores = op2.startswith(_NO_DEST)
        srcs = ops2 if stores else ops2[1:]
        for j, o in enumerate(srcs):
            last = stores and j == len(srcs) - 1  # a store's data operand has the store's width
            if live & _regs(o, _width(op2) if last else 1):
                return True
        if not stores and ops2 and not predicated:
            live -= _regs(ops2[0], _width(op2))
    return False
