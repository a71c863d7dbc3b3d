"""Mixed bit widths: the budgeted allocator (exact vs brute force, never over budget, deterministic), the RTN
sensitivities (real nbytes, tr(E^T H E)) and the plan's JSON round trip."""

from __future__ import annotations

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant.algorithms.mixed_bits import (
    DEFAULT_SETTINGS,
    MixedPlan,
    Setting,
    TensorCosts,
    allocate,
    budget_bytes,
    rtn_costs,
    solve,
)


def _brute(c, e, budget):
    best, arg = np.inf, None
    for pick in itertools.product(*[range(c.shape[1])] * c.shape[0]):
        cost = sum(c[t, j] for t, j in enumerate(pick))
        err = sum(e[t, j] for t, j in enumerate(pick))
        if cost <= budget and err < best - 1e-12:
            best, arg = err, pick
    return best, arg


def _err(c, e, pick):
    return float(sum(e[t, j] for t, j in enumerate(pick))), int(sum(c[t, j] for t, j in enumerate(pick)))


@given(st.integers(0, 10_000))
def test_solve_is_optimal_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    T, C = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    c = rng.integers(0, 40, (T, C))
    e = rng.exponential(1.0, (T, C)).round(3)  # rounded: exact ties happen too
    lo, hi = int(c.min(1).sum()), int(c.max(1).sum())
    budget = int(rng.integers(lo, hi + 2))
    pick = solve(c, e, budget)
    err, cost = _err(c, e, pick)
    best, _ = _brute(c, e, budget)
    assert cost <= budget
    assert err == pytest.approx(best, abs=1e-9)
    assert np.array_equal(pick, solve(c.copy(), e.copy(), budget))  # deterministic


@given(st.integers(0, 10_000), st.integers(1, 50))
def test_coarse_resolution_never_exceeds_and_is_near_optimal(seed, resolution):
    rng = np.random.default_rng(seed)
    T, C = 5, 3
    c = rng.integers(100, 5000, (T, C))
    e = rng.exponential(1.0, (T, C))
    budget = int(rng.integers(int(c.min(1).sum()), int(c.max(1).sum()) + 1))
    pick = solve(c, e, budget, resolution=resolution)
    err, cost = _err(c, e, pick)
    assert cost <= budget
    best, _ = _brute(c, e, budget)
    assert err >= best - 1e-9
    # the fix-up leaves no single-tensor change that fits and lowers the error
    for t in range(T):
        for j in range(C):
            if cost - c[t, pick[t]] + c[t, j] <= budget:
                assert e[t, j] >= e[t, pick[t]]


def test_hand_checkable_case():
    c = np.array([[2, 4, 6], [2, 4, 6]])
    e = np.array([[9.0, 3.0, 1.0], [5.0, 2.0, 0.5]])
    assert solve(c, e, 10).tolist() == [2, 1]
    assert solve(c, e, 12).tolist() == [2, 2]
    assert solve(c, e, 4).tolist() == [0, 0]
    assert solve(c, e, 5).tolist() == [0, 0]
    assert solve(c, e, 6).tolist() == [1, 0]  # 3 + 5 = 8 < 9 + 2 = 11
    with pytest.raises(ValueError, match="below the cheapest"):
        solve(c, e, 3)


def test_ties_go_to_the_lowest_index():
    c = np.array([[1, 1, 1], [3, 3, 3]])
    e = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    assert solve(c, e, 4).tolist() == [0, 0]


def test_bad_inputs():
    with pytest.raises(ValueError):
        solve(np.array([[1.5]]), np.array([[1.0]]), 3)
    with pytest.raises(ValueError):
        solve(np.array([[1]]), np.array([[np.nan]]), 3)
    with pytest.raises(ValueError):
        solve(np.array([[-1]]), np.array([[1.0]]), 3)
    with pytest.raises(ValueError):
        solve(np.array([1]), np.array([1.0]), 3)
    with pytest.raises(ValueError):
        budget_bytes(0, 10)
    with pytest.raises(ValueError):
        budget_bytes(float("inf"), 10)


def test_budget_bytes_is_exact():
    assert budget_bytes(4.5, 8) == 4
    assert budget_bytes(4.1, 10) == 5  # 4.1 * 10 / 8 = 5.125 (no 5.1249999 from float arithmetic)
    assert budget_bytes(3, 7) == 2


def test_setting_names_round_trip():
    for s in (*DEFAULT_SETTINGS, Setting(4, 128, True), Setting(8, None, False)):
        assert Setting.from_name(s.name) == s
    assert Setting(4, 128).scheme == jq.IntScheme(4, 128, symmetric=False)
    with pytest.raises(ValueError):
        Setting(9, 128)
    with pytest.raises(ValueError):
        Setting.from_name("nf4")


def _problem(seed=0, k=128, n=48):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    x = rng.standard_normal((400, k)).astype(np.float32) * np.exp(rng.standard_normal(k))
    return w, (x.T @ x / len(x)).astype(np.float32)


def test_rtn_costs_match_real_qarrays_and_trace_formula():
    w, h = _problem()
    sets = (Setting(2, 32), Setting(3, 128), Setting(4, 64), Setting(6, None), Setting(8, 128, True))
    tc = rtn_costs("t", w, h, sets)
    for s, nb, err in zip(sets, tc.nbytes, tc.errors):
        q = jq.quantize(jnp.asarray(w), s.scheme)
        assert nb == q.nbytes
        e = (w - np.asarray(jq.dequantize(q))).astype(np.float64)
        assert err == pytest.approx(float(np.trace(e.T @ h.astype(np.float64) @ e)), rel=1e-4)
    assert tc.errors[0] > tc.errors[1] > tc.errors[2] > tc.errors[4] > 0
    assert tc.ref == pytest.approx(float(np.trace(w.T.astype(np.float64) @ h @ w)), rel=1e-4)
    with pytest.raises(ValueError):
        rtn_costs("t", w, h[:5, :5], sets)


def _costs(seed=0, tensors=6):
    out = []
    for i in range(tensors):
        w, h = _problem(seed + i, k=64 * (1 + i % 2), n=32)
        out.append(rtn_costs(f"layers/{i}/mlp/down_proj/kernel", w * (1 + i), h, DEFAULT_SETTINGS))
    return out


@pytest.fixture(scope="module")
def costs():
    return _costs()


@pytest.mark.parametrize("target", [2.3, 3.0, 3.5, 4.2, 4.5, 5.0, 6.0, 9.0])
def test_allocate_meets_the_budget_and_beats_uniform(costs, target):
    plan = allocate(costs, target)
    assert plan.total_bytes <= plan.budget_bytes == budget_bytes(target, plan.numel)
    assert plan.bits_per_weight <= target
    # every uniform setting that fits the budget is a feasible plan: the allocator is at least as good
    for j in range(len(DEFAULT_SETTINGS)):
        if sum(t.nbytes[j] for t in costs) <= plan.budget_bytes:
            assert plan.total_error <= sum(t.errors[j] for t in costs) * (1 + 1e-12)
    assert allocate(costs, target) == plan  # deterministic


def test_allocate_below_the_cheapest_plan(costs):
    with pytest.raises(ValueError, match="below the cheapest plan"):
        allocate(costs, 2.0)


def test_plan_json_round_trip(costs):
    plan = allocate(costs, 4.5)
    d = json.loads(json.dumps(plan.to_json()))
    assert MixedPlan.from_json(d) == plan
    assert "error share" in plan.table() and "bpw (target 4.5)" in plan.table()
    with pytest.raises(ValueError):
        MixedPlan.from_json({"format": "other"})


def test_plan_round_trips_through_a_checkpoint(tmp_path, costs):
    from jaxquant.io.checkpoint import load_params, save_params

    plan = allocate(costs, 3.5)
    params = {"w": jnp.ones((4, 4))}
    save_params(params, tmp_path / "ck", metadata={"mixed_plan": plan.to_json()})
    _, meta = load_params(tmp_path / "ck")
    assert MixedPlan.from_json(meta["mixed_plan"]) == plan


def test_tensor_costs_validation():
    with pytest.raises(ValueError):
        TensorCosts("t", 4, (Setting(4, 32),), (1, 2), (0.1,))
    with pytest.raises(ValueError):
        TensorCosts("t", 4, (Setting(4, 32),), (1,), (-0.1,))
