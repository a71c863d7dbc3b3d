"""notebooks/mixed_bits.ipynb runs top to bottom on a tiny slice (1 block of SmolLM2, 1 window x 64 tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "mixed_bits.ipynb"


@pytest.mark.slow
def test_mixed_bits_notebook_runs(monkeypatch, tmp_path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for k, v in {
        "JAXQUANT_NB_WINDOWS": "1",
        "JAXQUANT_NB_SEQ_LEN": "64",
        "JAXQUANT_NB_LAYERS": "1",
        "JAXQUANT_NB_CALIB": "2",
        "JAXQUANT_NB_SETTINGS": "int2-g128-asym,int3-g128-asym,int4-g128-asym,int8-g64-asym",
    }.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "hessian: largest int3-g128 error shares" in out and "fisher: largest" in out
    assert "error share" in out and "bpw (target 4.20" in out
    for label in ("uniform int4 g128 asym", "mixed = int4 g128 size (fisher)", "mixed 4.5 (hessian)"):
        assert label in out
