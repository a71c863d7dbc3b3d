"""``jaxquant export`` / ``jaxquant inspect`` end to end on a tiny GGUF model, and their one-line errors."""

from __future__ import annotations

import json
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.cli import main
from jaxquant.formats.gguf_writer import write_gguf
from jaxquant.formats.hf_gptq import load_gptq_checkpoint
from jaxquant.models import Llama, forward, load_gguf_model


@pytest.fixture(scope="module")
def tiny_gguf(tiny_config, tiny_params, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny-f32.gguf"
    write_gguf(path, tiny_config, tiny_params, name="tiny")
    return path


def test_export_gguf_and_inspect(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "tiny-q4_k_m.gguf"
    assert main(["export", "--format", "gguf", "--scheme", "q4_k_m", "--out", str(out), "--model", str(tiny_gguf)]) == 0
    assert "wrote" in capsys.readouterr().out
    r = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q4_K"
    assert r.fields["general.name"].contents() == "tiny"  # copied from the source GGUF
    m, _ = load_gguf_model(out)
    assert np.isfinite(np.asarray(forward(m, jnp.array([[1, 2, 3]])))).all()

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "blk.1.ffn_down.weight" in text and "Q6_K" in text and "general.file_type = 15" in text
    assert "20 tensors" in text
    assert main(["inspect", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    row = next(t for t in rep["tensors"] if t["name"] == "blk.0.attn_q.weight")
    assert row["type"] == "Q4_K" and row["shape"] == [256, 256] and row["bpw"] == 4.5
    assert rep["total_bytes"] == sum(t["bytes"] for t in rep["tensors"])


def test_export_gptq_awq(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "gptq"
    rc = main(["export", "--format", "gptq", "--scheme", "int4-g64-asym", "--out", str(out), "--model", str(tiny_gguf)])
    assert rc == 0
    config, params, _ = load_gptq_checkpoint(out)
    m = Llama.from_params(config, params)
    assert np.isfinite(np.asarray(forward(m, jnp.array([[1, 2, 3]])))).all()
    assert main(["inspect", str(out)]) == 0
    assert "GPTQ int4" in capsys.readouterr().out
    out2 = tmp_path / "awq"
    assert (
        main(["export", "--format", "awq", "--scheme", "int4-g128", "--out", str(out2), "--model", str(tiny_gguf)]) == 0
    )
    assert os.path.isfile(out2 / "model.safetensors")


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["export", "--format", "gguf", "--scheme", "nope", "--out", "x.gguf"], "unknown scheme SPEC"),
        (["export", "--format", "gptq", "--scheme", "q4_k_m", "--out", "x"], "use --format gguf"),
        (["inspect", "/definitely/missing.gguf"], "no such file"),
    ],
)
def test_errors_are_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxquant: error:") and msg in err and "\n" not in err


def test_export_errors(tiny_gguf, tmp_path, capsys):
    rc = main(
        ["export", "--format", "gguf", "--scheme", "nf4", "--out", str(tmp_path / "n.gguf"), "--model", str(tiny_gguf)]
    )
    assert rc == 2 and "has no GGUF encoding" in capsys.readouterr().err
    assert not (tmp_path / "n.gguf").exists()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    assert main(["inspect", str(bad)]) == 2
    assert "cannot fit" in capsys.readouterr().err
    other = tmp_path / "x.bin"
    other.write_bytes(b"hello world")
    assert main(["inspect", str(other)]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
