"""The notebooks run top to bottom on small slices (set through their ``JAXQUANT_NB_*`` environment knobs)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _run_notebook(name: str, env: dict[str, str], monkeypatch, tmp_path) -> str:
    """Execute ``notebooks/<name>`` with ``env`` set; returns the concatenated text outputs of its code cells."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_llm_int8_fp8_nf4_notebook_runs(monkeypatch, tmp_path) -> None:
    """1 window x 64 tokens, the first 2 blocks of SmolLM2."""
    env = {
        "JAXQUANT_NB_WINDOWS": "1",
        "JAXQUANT_NB_SEQ_LEN": "64",
        "JAXQUANT_NB_LAYERS": "2",
        "JAXQUANT_NB_QLORA_STEPS": "2",
    }
    outputs = _run_notebook("llm_int8_fp8_nf4.ipynb", env, monkeypatch, tmp_path)
    for spec in ("llm-int8", "int8-absmax-w8a8", "fp8-e4m3-w8a8-static", "fp8-e4m3-w8a8-delayed", "nf4-dq"):
        assert spec in outputs
    assert "| nf4-dq | 4.127 |" in outputs
    assert "train loss per step" in outputs


@pytest.mark.slow
def test_gptq_awq_notebook_runs(monkeypatch, tmp_path) -> None:
    """1 block of SmolLM2, 1 window x 64 tokens."""
    env = {"JAXQUANT_NB_WINDOWS": "1", "JAXQUANT_NB_SEQ_LEN": "64", "JAXQUANT_NB_LAYERS": "1", "JAXQUANT_NB_CALIB": "2"}
    out = _run_notebook("gptq_awq.ipynb", env, monkeypatch, tmp_path)
    assert "x lower" in out and "best alpha" in out
    assert "|h| at position 0" in out
    for label in ("RTN int4 g128 asym", "GPTQ int4 g128 asym, plain", "first token x20", "AWQ int4 g128 asym"):
        assert label in out
    assert "bpw  4.203" in out  # GPTQ/AWQ results are ordinary int4 g128 QArrays: RTN's storage


@pytest.mark.slow
def test_bitnet_qat_notebook_runs(monkeypatch, tmp_path) -> None:
    """0.1M-parameter model, 3 steps."""
    env = {
        "JAXQUANT_NB_STEPS": "3",
        "JAXQUANT_NB_SIZE": "0.1M",
        "JAXQUANT_NB_SEQ_LEN": "32",
        "JAXQUANT_NB_BATCH": "4",
        "JAXQUANT_NB_WINDOWS": "2",
    }
    out = _run_notebook("bitnet_qat.ipynb", env, monkeypatch, tmp_path)
    assert out.count("forward == dequantize(quantize(w)): True") == 4
    for label in ("| float |", "| BitNet b1.58 (QAT) |", "| ternary PTQ of float (W-only) |", "bits/weight"):
        assert label in out
    assert "same argmax on" in out and "fp8" in out and "g_amax_history" in out


@pytest.mark.slow
def test_mixed_bits_notebook_runs(monkeypatch, tmp_path) -> None:
    """1 block of SmolLM2, 1 window x 64 tokens, four candidate settings."""
    env = {
        "JAXQUANT_NB_WINDOWS": "1",
        "JAXQUANT_NB_SEQ_LEN": "64",
        "JAXQUANT_NB_LAYERS": "1",
        "JAXQUANT_NB_CALIB": "2",
        "JAXQUANT_NB_SETTINGS": "int2-g128-asym,int3-g128-asym,int4-g128-asym,int8-g64-asym",
    }
    out = _run_notebook("mixed_bits.ipynb", env, monkeypatch, tmp_path)
    assert "hessian: largest int3-g128 error shares" in out and "fisher: largest" in out
    assert "error share" in out and "bpw (target 4.20" in out
    for label in ("uniform int4 g128 asym", "mixed = int4 g128 size (fisher)", "mixed 4.5 (hessian)"):
        assert label in out
