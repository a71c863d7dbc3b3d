"""``jaxquant quantize --stream`` / ``--mesh`` and ``jaxquant eval --mesh``."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxquant.cli import main
from jaxquant.io.streaming import is_streamed, load_streamed_params, synthetic_checkpoint
from jaxquant.models import LlamaConfig, flat_params

CFG = LlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_stream") / "src"
    synthetic_checkpoint(d, CFG, max_shard_bytes=150_000)
    return d


def _run(*args):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "jaxquant.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_quantize_stream_writes_loadable_shards(src, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(
        ["quantize", "--stream", "--model", str(src), "--scheme", "int4-g128", "--out", str(out), "--no-progress"]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "peak RSS" in printed and "streamed block by block" in printed
    assert is_streamed(out)
    params, meta = load_streamed_params(out)
    assert meta["spec"] == "int4-g128" and meta["source_model"] == str(src)
    assert sum(hasattr(v, "scheme") for v in flat_params(params).values()) == 7 * CFG.n_layers


def test_quantize_stream_errors(src, tmp_path, capsys):
    out = str(tmp_path / "q")
    assert main(["quantize", "--stream", "--model", str(tmp_path / "x.gguf"), "--scheme", "int8", "--out", out]) == 2
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert main(["quantize", "--stream", "--model", str(tmp_path / "x.gguf"), "--scheme", "int8", "--out", out]) == 2
    assert "HF safetensors folder" in capsys.readouterr().err
    assert main(["quantize", "--stream", "--model", str(src), "--scheme", "awq-int4-g128", "--out", out]) == 2
    assert "cannot be streamed" in capsys.readouterr().err
    # GPTQ needs a tokenizer for the calibration text; the synthetic folder has none
    assert main(["quantize", "--stream", "--model", str(src), "--scheme", "gptq-int4-g128", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and err.count("\n") == 1
    assert main(["quantize", "--mesh", "model=0", "--model", str(src), "--scheme", "int8", "--out", out]) == 2
    assert main(["quantize", "--mesh", "model=2", "--model", str(src), "--scheme", "gptq-int4-g128", "--out", out]) == 2
    assert "GPTQ with --stream" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_quantize_stream_on_a_mesh_is_bit_identical(src, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out, extra in ((a, []), (b, ["--mesh", "model=4"])):
        p = _run(
            "quantize", "--stream", "--model", str(src), "--scheme", "nf4", "--out", str(out), "--no-progress", *extra
        )
        assert p.returncode == 0, p.stderr[-3000:]
    pa, pb = flat_params(load_streamed_params(a)[0]), flat_params(load_streamed_params(b)[0])
    assert pa.keys() == pb.keys()
    for k in pa:
        for x, y in zip(jax.tree.leaves(pa[k]), jax.tree.leaves(pb[k])):
            assert np.array_equal(np.asarray(x), np.asarray(y)), k


@pytest.mark.slow
def test_eval_mesh_same_perplexity_on_smollm2():
    args = ["eval", "--scheme", "int4-g128", "--max-windows", "2", "--seq-len", "64", "--json", "--no-progress"]
    ref = _run(*args)
    assert ref.returncode == 0, ref.stderr[-3000:]
    sharded = _run(*args, "--mesh", "model=4")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    r, s = json.loads(ref.stdout.strip().splitlines()[-1]), json.loads(sharded.stdout.strip().splitlines()[-1])
    assert r["tokens"] == s["tokens"] > 0
    # same function, float32 summation order differs across devices
    assert abs(s["ppl"] - r["ppl"]) <= 1e-4 * r["ppl"], (r, s)
