"""Orbax checkpoints of QArray trees and quantized NNX models: bit-exact round trips, atomic saves, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.io import checkpoint as ck
from jaxquant.io.checkpoint import (
    CheckpointError,
    load_model,
    load_module,
    load_params,
    save_model,
    save_module,
    save_params,
)
from jaxquant.models import Llama, LlamaConfig
from jaxquant.nn import BitLinear, Fp8Linear, Int8OutlierLinear, LoRA, QLinear, quantize_model

SCHEMES = [
    jq.IntScheme(4, 32),
    jq.IntScheme(3, 32, symmetric=False),
    jq.IntScheme(8),
    jq.NF4Scheme(double_quant=True),
    jq.FP8Scheme("e4m3", "channel"),
    jq.FP8Scheme("e5m2"),
    jq.TernaryScheme(packing="base3"),
    jq.LLMInt8Scheme(threshold=5.0, outlier_rows=(2, 9)),
    jq.CastScheme("bfloat16"),
    jq.LLMInt8Scheme(layout="nk"),  # K-major codes: the scheme's layout travels with the manifest
    jq.FP8Scheme("e4m3", "channel", layout="nk"),
    jq.IntScheme(4, 32, symmetric=False, layout="nk"),
]


def _tree() -> dict:
    w = jax.random.normal(jax.random.key(0), (64, 48)) * 0.1
    return {
        "layers": {i: {"kernel": jq.quantize(w + i, s)} for i, s in enumerate(SCHEMES)},
        "norm": {"scale": jnp.arange(8, dtype=jnp.bfloat16), "fp8": jnp.ones(4, ml_dtypes.float8_e4m3fn)},
        "step": jnp.int32(7),
    }


def _leaves(tree) -> list:
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jq.QArray))[0]


def _assert_same(a, b) -> None:
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        if isinstance(x, jq.QArray):
            assert isinstance(y, jq.QArray), p
            assert (x.scheme, x.shape, x.dtype) == (y.scheme, y.shape, y.dtype), p
            assert set(x.aux) == set(y.aux)
            _assert_same(
                {"d": x.data, "s": x.scale, "z": x.zero, "a": x.aux},
                {"d": y.data, "s": y.scale, "z": y.zero, "a": y.aux},
            )
        else:
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape, p
            assert x.tobytes() == y.tobytes(), p  # bit-exact, NaN payloads included


def test_params_round_trip_bit_exact(tmp_path) -> None:
    tree = _tree()
    save_params(tree, tmp_path / "ck", metadata={"who": "test"})
    back, meta = load_params(tmp_path / "ck")
    assert meta == {"who": "test"}
    _assert_same(tree, back)
    for i in range(len(SCHEMES)):  # and they still dequantize identically
        np.testing.assert_array_equal(
            np.asarray(jq.dequantize(back["layers"][i]["kernel"])),
            np.asarray(jq.dequantize(tree["layers"][i]["kernel"])),
        )


CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)


def _mixed_llama() -> Llama:
    model = Llama(CFG, rngs=nnx.Rngs(0))
    rngs = nnx.Rngs(1)
    quantize_model(
        model,
        [
            (
                r"layers/0/attn/q_proj",
                lambda m: LoRA(QLinear.from_linear(m, jq.NF4Scheme(double_quant=True)), rank=4, rngs=rngs),
            ),
            (r"layers/0/attn/\w+", lambda m: Fp8Linear.from_linear(m, act_mode="delayed", history=4)),
            (r"layers/0/mlp/\w+", lambda m: Fp8Linear.from_linear(m, fmt="e5m2", act_mode="static", act_amax=2.0)),
            (r"layers/1/attn/\w+", jq.LLMInt8Scheme()),
            (r"layers/1/mlp/up_proj", lambda m: BitLinear.from_linear(m)),
            (r"layers/1/mlp/\w+", jq.IntScheme(4, 16)),
        ],
        strict=True,
    )
    model.layers[0].attn.q_proj.lora_b[...] = jnp.full((4, 32), 0.01)  # a "trained" adapter
    return model


TOKENS = jnp.asarray(np.arange(24).reshape(2, 12) % 64)


def test_model_with_swapped_layers_round_trip(tmp_path) -> None:
    from jaxquant.models import model_params, with_params

    model = _mixed_llama()
    # rule-quantized kernels (QArrays in the Llama's own Linear params) go through the same path
    model.lm_head.kernel.set_value(jq.quantize(model.lm_head.kernel[...], jq.IntScheme(8)))
    nnx.jit(lambda m, t: m(t))(model, TOKENS)  # fills the delayed amax histories
    save_model(model, tmp_path / "m", metadata={"spec": "mixed"})
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert {m["class"] for m in manifest["modules"]} == {
        "LoRA",
        "Fp8Linear",
        "Int8OutlierLinear",
        "BitLinear",
        "QLinear",
    }
    back, tok, meta = load_model(tmp_path / "m")
    assert tok is None and meta == {"spec": "mixed"}
    assert type(back.layers[0].attn.q_proj) is LoRA and type(back.layers[1].attn.k_proj) is Int8OutlierLinear
    _assert_same(nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(back)))
    hist = np.asarray(back.layers[0].attn.k_proj.amax_history[...])
    assert np.count_nonzero(hist) == 1
    fwd = nnx.jit(lambda m, t: m(t))
    np.testing.assert_array_equal(np.asarray(fwd(back, TOKENS)), np.asarray(fwd(model, TOKENS)))

    # a plain rule-quantized Llama (no swapped layers) still saves/loads as before
    plain = with_params(Llama(CFG, rngs=nnx.Rngs(0)), jq.quantize_params(model_params(Llama(CFG, rngs=nnx.Rngs(0))),
                        [(r".*_proj/kernel", jq.NF4Scheme())]))  # fmt: skip
    save_model(plain, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["modules"] == []
    back2, _, _ = load_model(tmp_path / "p")
    _assert_same(model_params(plain), model_params(back2))


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(16, 32, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.fc2 = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def test_user_module_round_trip_into_an_abstract_skeleton(tmp_path) -> None:
    model = quantize_model(MLP(nnx.Rngs(0)), [("fc1", jq.NF4Scheme()), ("fc2", lambda m: BitLinear.from_linear(m))])
    save_module(model, tmp_path / "u", metadata={"n": 1})
    skeleton = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))
    back, meta = load_module(tmp_path / "u", skeleton)
    assert meta == {"n": 1} and isinstance(back.fc1, QLinear) and isinstance(back.fc2, BitLinear)
    x = jnp.ones((2, 16))
    np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(model(x)))

    # a skeleton of another shape is refused, naming the path
    class Wider(MLP):
        def __init__(self, rngs):
            super().__init__(rngs)
            self.fc0 = nnx.Linear(4, 4, rngs=rngs)

    with pytest.raises(CheckpointError, match=r"does not fit the model: missing \[\"\['fc0'\]"):
        load_module(tmp_path / "u", nnx.eval_shape(lambda: Wider(nnx.Rngs(0))))


# ------------------------------------------------------------------------------------------------- atomicity
def _small(v: float) -> dict:
    return {"w": jq.quantize(jnp.full((32, 16), v) + jnp.arange(16.0), jq.IntScheme(8)), "b": jnp.full(3, v)}


def _b(path: Path) -> float:
    return float(load_params(path)[0]["b"][0])


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_failure_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    dest = tmp_path / "ck"
    save_params(_small(1.0), dest)
    save_params(_small(2.0), dest)  # replacing works (atomic exchange or rename pair) and leaves no debris
    assert _b(dest) == 2.0 and _siblings(dest) == []

    import orbax.checkpoint as ocp

    real_save = ocp.StandardCheckpointer.save

    def half_then_fail(self, directory, state, *a, **kw):
        real_save(self, directory, {k: v for i, (k, v) in enumerate(state.items()) if i == 0}, *a, **kw)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        save_params(_small(3.0), dest)
    monkeypatch.undo()
    assert _b(dest) == 2.0 and _siblings(dest) == []  # previous intact, temporary folder removed


def test_crash_between_renames_falls_back_to_previous(tmp_path, monkeypatch) -> None:
    """Where RENAME_EXCHANGE is unavailable the swap is two renames; a crash between them loses nothing."""
    dest = tmp_path / "ck"
    save_params(_small(1.0), dest)
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def crash_on_second(src, dst):
        if Path(src).name.startswith(".ck.tmp-"):
            raise OSError("killed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError, match="killed"):
        save_params(_small(2.0), dest)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not dest.exists()
    with pytest.warns(UserWarning, match="interrupted save"):
        assert _b(dest) == 1.0
    save_params(_small(3.0), dest)  # the next save works
    assert _b(dest) == 3.0


def test_hard_kill_during_save_keeps_previous_and_next_save_cleans_up(tmp_path) -> None:
    dest = tmp_path / "ck"
    save_params(_small(1.0), dest)
    script = textwrap.dedent(
        f"""
        import os
        import jax.numpy as jnp
        import jaxquant as jq
        from jaxquant.io import checkpoint as ck
        ck._fsync_tree = lambda root: os._exit(9)  # killed after writing everything, before the swap
        ck.save_params({{"w": jq.quantize(jnp.ones((32, 16)), jq.IntScheme(8)), "b": jnp.full(3, 2.0)}}, {str(dest)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert any(".tmp-" in n for n in _siblings(dest))  # the dead writer's temporary folder
    assert _b(dest) == 1.0
    save_params(_small(4.0), dest)
    assert _b(dest) == 4.0 and _siblings(dest) == []


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_params(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a jaxquant checkpoint"):
        load_params(tmp_path / "empty")
    save_params(_small(1.0), tmp_path / "ck")
    (tmp_path / "ck" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt manifest"):
        load_params(tmp_path / "ck")
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_params(tmp_path / "ck")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a jaxquant checkpoint; refusing"):
        save_params(_small(1.0), tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    save_params(_small(1.0), tmp_path / "x")  # a params checkpoint is not a model
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(tmp_path / "x")
