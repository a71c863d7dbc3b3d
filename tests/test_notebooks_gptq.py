"""notebooks/gptq_awq.ipynb runs top to bottom on a tiny slice (1 block of SmolLM2, 1 window x 64 tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "gptq_awq.ipynb"


@pytest.mark.slow
def test_gptq_awq_notebook_runs(monkeypatch, tmp_path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for k, v in {
        "JAXQUANT_NB_WINDOWS": "1",
        "JAXQUANT_NB_SEQ_LEN": "64",
        "JAXQUANT_NB_LAYERS": "1",
        "JAXQUANT_NB_CALIB": "2",
    }.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "x lower" in out and "best alpha" in out
    assert "|h| at position 0" in out
    for label in ("RTN int4 g128 asym", "GPTQ int4 g128 asym, plain", "first token x20", "AWQ int4 g128 asym"):
        assert label in out
    assert "bpw  4.203" in out  # GPTQ/AWQ results are ordinary int4 g128 QArrays: RTN's storage
