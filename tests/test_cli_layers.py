"""``jaxquant finetune`` end to end on a tiny saved model with its own tokenizer, and ``jaxquant eval`` of the
result; one-line errors for bad SPECs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from jaxquant.cli import main
from jaxquant.io.checkpoint import save_model
from jaxquant.models import Llama, LlamaConfig, TextTokenizer

WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama with a word-level tokenizer, and a text file of simple repeating 'sentences'."""
    import tokenizers

    root = tmp_path_factory.mktemp("tiny")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, tie_embeddings=True)
    save_model(Llama(cfg, rngs=nnx.Rngs(0)), root / "model", tokenizer=TextTokenizer(hf))
    rng = np.random.default_rng(0)
    paras = [" ".join(WORDS[(s + k) % 60] for k in range(12)) for s in rng.integers(0, 60, 400)]
    (root / "text.txt").write_text("\n\n".join(paras))
    return root


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxquant: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_finetune_saves_a_model_that_eval_reads(tiny_dir, tmp_path, capsys) -> None:
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(tiny_dir / "model"), "--text-file", str(tiny_dir / "text.txt")]
    args += ["--steps", "6", "--lr", "3e-3", "--seq-len", "32", "--batch-size", "2", "--lora-rank", "4"]
    args += ["--eval-windows", "4", "--eval-seq-len", "32", "--out", str(out), "--no-progress", "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(res["losses"]) == 6 and res["ppl_after"] > 0 and res["memory"]["adapter_bytes"] > 0
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "finetune.json").read_text())["settings"]["lora_rank"] == 4
    rc = main(["eval", "--model", str(out), "--scheme", "fp32", "--text-file", str(tiny_dir / "text.txt"),
               "--seq-len", "32", "--max-windows", "4", "--json", "--no-progress"])  # fmt: skip
    assert rc == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["scheme"] == "nf4-dq+lora-r4"
    assert 4.1 < d["bits_per_weight"] < 4.3  # NF4 + double quant on the block linears (small tensors: padding)
    assert d["ppl"] == pytest.approx(res["ppl_after"], rel=1e-4)


@pytest.mark.parametrize(
    "scheme,msg", [("llm-int8", "quantizes activations"), ("fp8-e4m3-w8a8", "weight-only SPEC"), ("nope", "unknown")]
)
def test_finetune_rejects_bad_schemes(scheme, msg, capsys) -> None:
    assert main(["finetune", "--scheme", scheme]) == 2
    assert msg in _err(capsys)
