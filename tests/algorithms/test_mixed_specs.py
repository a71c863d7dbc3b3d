"""``jaxquant quantize --scheme mixed``: one-line option errors before any work, and quantize -> plan table ->
save (plan in the metadata) -> ``eval --model DIR`` on a tiny model (the real tokenizer, random weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxquant as jq
from jaxquant.algorithms.mixed_bits import MixedPlan
from jaxquant.cli import main


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxquant: error: ") and "Traceback" not in err
    assert len(err.splitlines()) == 1
    return err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--scheme", "mixed"], "needs a target"),
        (["--scheme", "mixed-4.5", "--target-bpw", "3.5"], "contradicts"),
        (["--scheme", "mixed-4.5-gptq", "--method", "rtn"], "contradicts"),
        (["--scheme", "mixed-4.5", "--damp", "0.1"], "--damp"),
        (["--scheme", "mixed", "--target-bpw", "1"], "[2, 16]"),
        (["--scheme", "int4-g128", "--target-bpw", "4"], "not calibrated"),
        (["--scheme", "gptq-int4-g128", "--method", "gptq"], "--method"),
    ],
)
def test_option_errors_before_loading(capsys, tmp_path, args, needle):
    assert main(["quantize", *args, "--out", str(tmp_path / "out"), "--model", str(tmp_path / "nope.gguf")]) == 2
    assert needle in _err(capsys)


def test_bad_target_number(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--scheme", "mixed", "--target-bpw", "x", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--target-bpw" in capsys.readouterr().err


def test_listed_in_schemes(capsys):
    assert main(["schemes"]) == 0
    out = capsys.readouterr().out
    assert "\nmixed-4.5 " in out and "\nmixed-3.5 " in out


@pytest.mark.slow
def test_quantize_mixed_save_and_eval(capsys, tiny_model_dir):
    model, txt, out = tiny_model_dir / "model", tiny_model_dir / "text.txt", tiny_model_dir / "mixed"
    common = ["--model", str(model), "--text-file", str(txt), "--no-progress"]
    rc = main(["quantize", "--scheme", "mixed", "--target-bpw", "3.5", "--out", str(out),
               "--calib-samples", "2", "--calib-seq-len", "32", *common])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    cap = capsys.readouterr()
    assert "error share" in cap.out and "bpw (target 3.5)" in cap.out and "wrote" in cap.out
    assert "mixed rtn to 3.5 bpw" in cap.err
    from jaxquant.io.checkpoint import load_model
    from jaxquant.models import flat_params, model_params

    qm, _, meta = load_model(out)
    assert meta["spec"] == "mixed" and meta["options"] == {
        "target_bpw": 3.5,
        "calib_samples": 2,
        "calib_seq_len": 32,
    }
    plan = MixedPlan.from_json(meta["mixed_plan"])
    flat = flat_params(model_params(qm))
    assert len(plan.entries) == 14
    for e in plan.entries:  # the saved model is exactly the plan
        assert isinstance(flat[e.path], jq.QArray) and flat[e.path].scheme == e.setting.scheme
        assert flat[e.path].nbytes == e.nbytes
    assert plan.bits_per_weight <= 3.5 and meta["bits_per_weight"] == pytest.approx(plan.bits_per_weight)
    rc = main(["eval", "--scheme", "fp32", "--max-windows", "1", "--seq-len", "32", "--json",
               "--model", str(out), "--text-file", str(txt), "--no-progress"])  # fmt: skip
    assert rc == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["scheme"] == "mixed" and d["bits_per_weight"] == pytest.approx(plan.bits_per_weight)
    assert np.isfinite(d["ppl"])
