"""The trainer: loss goes down in every mode, checkpoint resume is bit-identical, exports compute what training
saw, fp8 training tracks float training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.models import Llama, LlamaConfig, forward
from jaxquant.nn import BitLinear
from jaxquant.qat.fp8 import Fp8Meta
from jaxquant.train import ByteTokenizer, TrainConfig, Trainer, non_embedding_params, tiny_config

_WORDS = "the cat sat on a mat and the dog ran to the old red barn while birds sang in tall green trees".split()


def _text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    # a tiny Markov-ish language: learnable structure (word order bigrams), cheap to fit
    out, i = [], 0
    for _ in range(n_words):
        i = (i + int(rng.integers(1, 3))) % len(_WORDS)
        out.append(_WORDS[i])
    return " ".join(out)


TOK = ByteTokenizer()
TRAIN = TOK.encode(_text(3000, 0))
EVAL = TOK.encode(_text(600, 1))
# one block keeps compilation (most of these tests' time) short
MODEL = LlamaConfig(256, 32, 1, 2, 1, 64, tie_embeddings=True, max_seq_len=32)


def _cfg(mode: str = "float", **kw) -> TrainConfig:
    base = dict(steps=12, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, eval_windows=8)
    base.update(kw)
    return TrainConfig(MODEL, mode=mode, **base)


def test_byte_tokenizer_round_trips():
    s = "Zürich – 1.58 bits"
    ids = TOK.encode(s)
    assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(s.encode())
    assert TOK.decode(ids) == s
    assert non_embedding_params(tiny_config("8M")) > 7_000_000
    assert 400_000 < non_embedding_params(tiny_config("0.5M")) < 600_000


@pytest.mark.parametrize(
    "mode,kw",
    [
        ("float", {}),
        ("bitnet", {"lr": 5e-3}),
        ("fp8", {}),
        ("qat", {"qat_scheme": jq.IntScheme(4, 32), "lsq": True}),
    ],
)
def test_a_few_steps_reduce_the_loss(mode, kw):
    tr = Trainer(_cfg(mode, steps=10, **kw), TRAIN, EVAL)
    before = tr.evaluate()["nll"]
    tr.run(progress=False)
    losses = [v for _, v in tr.history]
    assert len(losses) == 10 and tr.step == 10
    assert np.mean(losses[-3:]) < losses[0] - 0.5
    after = tr.evaluate()
    assert after["nll"] < before - 0.5
    assert after["ppl"] == pytest.approx(np.exp(after["nll"]))


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.mark.parametrize("mode,kw", [("fp8", {}), ("qat", {"qat_scheme": jq.IntScheme(4, 32), "lsq": True})])
def test_checkpoint_resume_is_bit_identical(mode, kw, tmp_path):
    cfg = _cfg(mode, steps=6, **kw)
    straight = Trainer(cfg, TRAIN)
    straight.run(progress=False)
    first = Trainer(cfg, TRAIN)
    first.run(3, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert (tmp_path / "step_3" / "trainer.json").is_file()
    resumed = Trainer(cfg, TRAIN)
    assert resumed.restore_latest(tmp_path) == 3
    resumed.run(progress=False)
    assert resumed.step == 6
    assert [v for _, v in resumed.history] == [v for _, v in straight.history[3:]]
    for a, b in zip(_leaves(resumed.state), _leaves(straight.state), strict=True):
        np.testing.assert_array_equal(a, b)
    # the checkpoint is the state at step 3, not at 6
    assert not np.array_equal(_leaves(first.state)[0], _leaves(straight.state)[0])
    # a checkpoint of another mode is refused
    other = Trainer(_cfg("float"), TRAIN)
    if mode != "float":
        with pytest.raises(ValueError, match="another run"):
            other.restore(tmp_path / "step_3")
    with pytest.raises(ValueError, match="not a trainer checkpoint"):
        other.restore(tmp_path)


def test_exports_compute_what_training_saw():
    toks = jnp.asarray(EVAL[:64].reshape(2, 32))
    q = Trainer(_cfg("qat", qat_scheme=jq.IntScheme(4, 32), lsq=True, steps=3), TRAIN)
    q.run(progress=False)
    qm = q.export()
    kern = nnx.to_pure_dict(nnx.state(qm, nnx.Param))["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kern, jq.QArray) and kern.bits_per_weight < 4.6
    np.testing.assert_array_equal(np.asarray(forward(qm, toks)), np.asarray(forward(q.model(), toks)))

    b = Trainer(_cfg("bitnet", steps=3), TRAIN)
    b.run(progress=False)
    bm = b.export()
    assert isinstance(bm.layers[0].attn.q_proj, BitLinear)
    y_qat, y_exp = np.asarray(forward(b.model(), toks)), np.asarray(forward(bm, toks))
    np.testing.assert_allclose(y_exp, y_qat, rtol=1e-4, atol=1e-4 * np.abs(y_qat).max())


def test_fp8_training_tracks_float_training_and_updates_histories():
    f = Trainer(_cfg("float", steps=20), TRAIN, EVAL)
    f.run(progress=False)
    e = Trainer(_cfg("fp8", steps=20, fp8_history=4), TRAIN, EVAL)
    e.run(progress=False)
    lf, le = f.evaluate()["nll"], e.evaluate()["nll"]
    assert abs(le - lf) / lf < 0.03
    hist = jax.tree.leaves(nnx.state(e.model(), Fp8Meta))
    assert len(hist) == 3 * 7 * MODEL.n_layers
    # every history filled (length 4 < 20 steps) with positive amaxes, the gradient ones included
    assert all(bool((np.asarray(h) > 0).all()) for h in hist)


def test_config_errors():
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(MODEL, mode="int4")
    with pytest.raises(ValueError, match="qat_scheme"):
        TrainConfig(MODEL, mode="qat")
    with pytest.raises(ValueError, match="lsq"):
        TrainConfig(MODEL, lsq=True)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(MODEL, steps=0)
    with pytest.raises(ValueError, match="vocabulary"):
        Trainer(TrainConfig(tiny_config("0.1M", vocab_size=100), seq_len=8), np.arange(200))
    with pytest.raises(ValueError, match="unknown size"):
        tiny_config("3B")


def test_start_from_a_given_model():
    cfg = _cfg("float", steps=2)
    given = Trainer(cfg, TRAIN, model=Llama(MODEL, rngs=nnx.Rngs(cfg.seed)))
    fresh = Trainer(cfg, TRAIN)
    for a, b in zip(_leaves(given.state), _leaves(fresh.state), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="config"):
        Trainer(cfg, TRAIN, model=Llama(tiny_config("0.5M"), rngs=nnx.Rngs(0)))
