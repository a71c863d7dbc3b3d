"""notebooks/bitnet_qat.ipynb runs top to bottom on a tiny setting (0.1M-parameter model, 3 steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "bitnet_qat.ipynb"


@pytest.mark.slow
def test_bitnet_qat_notebook_runs(monkeypatch, tmp_path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for k, v in {
        "JAXQUANT_NB_STEPS": "3",
        "JAXQUANT_NB_SIZE": "0.1M",
        "JAXQUANT_NB_SEQ_LEN": "32",
        "JAXQUANT_NB_BATCH": "4",
        "JAXQUANT_NB_WINDOWS": "2",
    }.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert out.count("forward == dequantize(quantize(w)): True") == 4
    for label in ("| float |", "| BitNet b1.58 (QAT) |", "| ternary PTQ of float (W-only) |", "bits/weight"):
        assert label in out
    assert "same argmax on" in out and "fp8" in out and "g_amax_history" in out
