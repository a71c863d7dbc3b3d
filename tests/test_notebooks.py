"""The notebooks run top to bottom (small slice: 1 window x 64 tokens, the first 2 blocks of SmolLM2)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.slow
def test_llm_int8_fp8_nf4_notebook_runs(monkeypatch, tmp_path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for k, v in {
        "JAXQUANT_NB_WINDOWS": "1",
        "JAXQUANT_NB_SEQ_LEN": "64",
        "JAXQUANT_NB_LAYERS": "2",
        "JAXQUANT_NB_QLORA_STEPS": "2",
    }.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOKS / "llm_int8_fp8_nf4.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for spec in ("llm-int8", "int8-absmax-w8a8", "fp8-e4m3-w8a8-static", "fp8-e4m3-w8a8-delayed", "nf4-dq"):
        assert spec in outputs
    assert "| nf4-dq | 4.127 |" in outputs
    assert "train loss per step" in outputs
