"""``jaxquant quantize``: one-line errors before any work, and quantize -> save -> ``eval --model DIR`` on a tiny
model (the real tokenizer, random weights, 2 blocks)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxquant as jq
from jaxquant.cli import main


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxquant: error: ") and "Traceback" not in err
    assert len(err.splitlines()) == 1
    return err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--scheme", "gptq-int9-g128"], "gptq-int9-g128"),
        (["--scheme", "fp32"], "quantizes nothing"),
        (["--scheme", "int4-g128", "--damp", "0.1"], "not calibrated"),
        (["--scheme", "awq-int4-g128-asym", "--act-order"], "--act-order"),
        (["--scheme", "smoothquant-int8-w8a8", "--damp", "0.1"], "--damp"),
        (["--scheme", "awq-int4-g128-asym", "--no-clip-search"], "--clip-search"),
    ],
)
def test_option_errors_before_loading(capsys, tmp_path, args, needle):
    assert main(["quantize", *args, "--out", str(tmp_path / "out"), "--model", str(tmp_path / "nope.gguf")]) == 2
    assert needle in _err(capsys)


def test_refuses_to_replace_a_foreign_folder(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["quantize", "--scheme", "int4-g128", "--out", str(out)]) == 2
    assert "not a jaxquant checkpoint" in _err(capsys)
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_numbers(capsys, tmp_path):
    for flag, val in (("--calib-samples", "0"), ("--damp", "-1"), ("--calib-seq-len", "x")):
        with pytest.raises(SystemExit) as e:
            main(["quantize", "--scheme", "gptq-int4-g128", "--out", str(tmp_path), flag, val])
        assert e.value.code == 2
        assert flag in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_save_and_eval(capsys, tiny_model_dir):
    model, txt, out = tiny_model_dir / "model", tiny_model_dir / "text.txt", tiny_model_dir / "gptq"
    common = ["--model", str(model), "--text-file", str(txt), "--no-progress"]
    rc = main(["quantize", "--scheme", "gptq-int4-g128-asym", "--out", str(out), "--calib-samples", "2",
               "--calib-seq-len", "32", "--damp", "0.02", *common])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    cap = capsys.readouterr()
    assert "wrote" in cap.out and "jaxquant eval --model" in cap.out
    assert "calibration error vs RTN" in cap.err
    from jaxquant.io.checkpoint import load_model
    from jaxquant.models import flat_params, model_params

    qm, _, meta = load_model(out)
    assert meta["spec"] == "gptq-int4-g128-asym" and meta["options"]["damp"] == 0.02
    q = flat_params(model_params(qm))["layers/1/mlp/down_proj/kernel"]
    assert isinstance(q, jq.QArray) and q.scheme == jq.IntScheme(4, 128, symmetric=False)
    rc = main(["eval", "--scheme", "fp32", "--max-windows", "1", "--seq-len", "32", "--json", *common[:2],
               "--model", str(out), "--text-file", str(txt), "--no-progress"])  # fmt: skip
    assert rc == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["scheme"] == "gptq-int4-g128-asym" and 4.0 < d["bits_per_weight"] < 5.0 and np.isfinite(d["ppl"])
    # saving again over our own checkpoint is allowed (atomic replace)
    rc = main(["quantize", "--scheme", "int4-g128", "--out", str(out), *common])
    assert rc == 0
    assert load_model(out)[2]["spec"] == "int4-g128"
