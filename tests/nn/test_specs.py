"""The layer SPECs (jaxquant.nn.specs) through the harness: build_model, report, evaluate."""

from __future__ import annotations

import numpy as np
import pytest

from jaxquant.eval.harness import LoadedModel, evaluate, quantize_model
from jaxquant.models.llama import Linear
from jaxquant.nn import BitLinear, Fp8Linear, calibration_batches, observe_inputs
from jaxquant.nn.specs import BLOCK_MODULES, SPECS
from jaxquant.specs import list_specs, parse_spec

OPTS = {"calib_windows": 4, "calib_seq_len": 32, "calib_batch_size": 2}
REQUIRED = [
    "llm-int8",
    "int8-absmax-w8a8",
    "int8-vectorwise-w8a8",
    "fp8-e4m3-w8a8",
    "fp8-e5m2-w8a8",
    "fp8-e4m3-w8a8-static",
    "fp8-e4m3-w8a8-delayed",
    "fp8-e5m2-w8a8-static",
    "fp8-e5m2-w8a8-delayed",
    "fp8-e4m3-w8a8-token",
    "nf4",
    "nf4-dq",
    "ternary-ptq",
]


def test_every_required_spec_is_listed_and_parses() -> None:
    names = list_specs()
    for name in REQUIRED:
        assert name in names, name
        assert parse_spec(name).description
    for name in SPECS:
        assert parse_spec(name.upper()) is SPECS[name]
        assert not parse_spec(name).is_float


def _layers(model):
    return [model.layers[i].attn.q_proj for i in range(2)] + [model.layers[i].mlp.down_proj for i in range(2)]


@pytest.mark.parametrize(
    "name,cls,bpw",
    [
        ("fp8-e4m3-w8a8", Fp8Linear, (8.0, 9.1)),
        ("fp8-e5m2-w8a8-token", Fp8Linear, (8.0, 9.1)),
        ("ternary-ptq", BitLinear, (2.0, 2.1)),
    ],
)
def test_uncalibrated_swaps(tiny_llama, tokens, name, cls, bpw) -> None:
    qmodel, rep = quantize_model(tiny_llama, parse_spec(name), None)
    assert all(isinstance(m, cls) for m in _layers(qmodel))
    assert type(tiny_llama.layers[0].attn.q_proj) is Linear  # the float model is untouched
    assert bpw[0] <= rep.bits_per_weight <= bpw[1]
    assert sum(r.quantized for r in rep.rows) == 2 * 7
    with pytest.raises(ValueError, match="takes no options"):
        quantize_model(tiny_llama, parse_spec(name), None, {"calib_windows": 3})


def test_static_fp8_uses_calibrated_amax_per_layer(tiny_llama, tokens) -> None:
    spec = parse_spec("fp8-e4m3-w8a8-static")
    with pytest.raises(ValueError, match="needs calibration tokens"):
        quantize_model(tiny_llama, spec, None)
    with pytest.raises(ValueError, match="unknown option"):
        quantize_model(tiny_llama, spec, tokens, {"calib_window": 3})
    qmodel, _ = quantize_model(tiny_llama, spec, tokens, OPTS)
    stats = observe_inputs(
        tiny_llama, calibration_batches(tokens, n_windows=4, seq_len=32, batch_size=2), paths=BLOCK_MODULES
    )
    for path, st in stats.items():
        i, kind, proj = path.split("/")[1:]
        layer = getattr(getattr(qmodel.layers[int(i)], kind), proj)
        assert layer.act_mode == "static"
        assert float(layer.act_amax[...]) == np.float32(st.amax)


def test_delayed_fp8_history_is_warmed_on_calibration(tiny_llama, tokens) -> None:
    qmodel, _ = quantize_model(tiny_llama, parse_spec("fp8-e4m3-w8a8-delayed"), tokens, OPTS)
    for layer in _layers(qmodel):
        hist = np.asarray(layer.amax_history[...])
        assert np.count_nonzero(hist) == 2  # 4 calibration windows in batches of 2


def test_evaluate_layer_specs_end_to_end(tiny_llama, tokens) -> None:
    loaded = LoadedModel("tiny", tiny_llama, None, tokens[:2048], 0.0, _calib_tokens=tokens[2048:])
    kw = {"seq_len": 64, "max_windows": 4, "batch_size": 2, "progress": False}
    base = evaluate(loaded, "fp32", **kw)
    assert base.bits_per_weight == 32.0
    names = ("fp8-e4m3-w8a8-static", "fp8-e4m3-w8a8-delayed", "ternary-ptq")
    res = {n: evaluate(loaded, n, options=None if n == "ternary-ptq" else OPTS, **kw) for n in names}
    for name, r in res.items():
        assert r.scheme == name and np.isfinite(r.ppl)
        assert r.weight_bytes < base.weight_bytes
    # fp8 W8A8 stays close to float on this random model
    for name in names[:2]:
        assert abs(res[name].ppl / base.ppl - 1) < 0.05, (name, res[name].ppl, base.ppl)
