"""The jaxquant command: one-line errors with exit code 2, and a small real evaluation."""

import json

import gguf
import numpy as np
import pytest

from jaxquant.cli import main
from jaxquant.eval import assets


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxquant: error: ")
    assert "Traceback" not in err
    return err


def test_unknown_spec(capsys):
    assert main(["eval", "--scheme", "int9-g128"]) == 2
    err = _err(capsys)
    assert "int9-g128" in err and len(err.splitlines()) == 1


def test_missing_model(capsys, tmp_path):
    assert main(["eval", "--scheme", "int8", "--model", str(tmp_path / "nope.gguf")]) == 2
    assert "nope.gguf" in _err(capsys)


@pytest.mark.slow
def test_truncated_gguf(capsys, tmp_path):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(assets.model_path().read_bytes()[:5000])
    assert main(["eval", "--scheme", "int8", "--model", str(bad)]) == 2
    err = _err(capsys)
    assert "trunc.gguf" in err and len(err.splitlines()) == 1


def test_garbage_file(capsys, tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    assert main(["eval", "--scheme", "int8", "--model", str(bad)]) == 2
    assert "garbage.gguf" in _err(capsys)


def test_non_llama_gguf(capsys, tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["eval", "--scheme", "int8", "--model", str(path)]) == 2
    err = _err(capsys)
    assert "gpt2" in err and "llama" in err


@pytest.mark.slow
def test_text_too_short(capsys, tmp_path):
    txt = tmp_path / "short.txt"
    txt.write_text("Only a few words.\n\nAnd a second paragraph.")
    assert main(["eval", "--scheme", "fp32", "--text-file", str(txt), "--no-progress"]) == 2
    err = _err(capsys)
    assert "seq_len" in err and len(err.splitlines()) == 1


def test_bad_numbers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--scheme", "int8", "--seq-len", "0"])
    assert e.value.code == 2
    assert "--seq-len" in capsys.readouterr().err


def test_schemes_lists_every_spec(capsys):
    assert main(["schemes"]) == 0
    out = capsys.readouterr().out
    for name in ("fp32", "int4-g128", "int3-g128-asym", "nf4", "fp8-e4m3", "llm-int8", "ternary"):
        assert f"\n{name} " in out


@pytest.mark.slow
def test_eval_json_on_real_model(capsys):
    rc = main(["eval", "--scheme", "int8", "--max-windows", "1", "--seq-len", "64", "--json", "--no-progress"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(d) == {"scheme", "model", "ppl", "bits_per_weight", "weight_bytes", "tokens", "seconds"}
    assert d["scheme"] == "int8" and d["tokens"] == 63
    assert 8.0 < d["bits_per_weight"] < 8.1
    assert 5 < d["ppl"] < 200  # a working model on prose; a broken RoPE/permutation gives hundreds or more


@pytest.mark.slow
def test_demo_writes_table_and_plot(capsys, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--schemes", "fp32,int4-g32-minmax,int3-g128", "--max-windows", "1", "--seq-len", "64"]
    rc = main([*args, "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert [r["scheme"] for r in res] == ["fp32", "int4-g32-minmax", "int3-g128"]
    # int4 g32 minmax is llama.cpp's Q4_1 grid, which the float baseline was dequantized from: lossless
    assert res[1]["ppl"] == pytest.approx(res[0]["ppl"], rel=1e-4)
    assert res[2]["ppl"] > res[0]["ppl"]
    assert (out / "quantization_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
