"""Property-based test of the engine on random graphs (tools/fuzz.py): the CI share.

Gradient mode against float64 finite differences of the original graph; attnlrp against the
conservation audit's invariants. The long run is `python -m tools.fuzz --n 2000`."""
import numpy as np
import pytest

from tools import fuzz

N_GRAPHS = 200


@pytest.fixture(scope="module")
def results():
    return fuzz.fuzz(N_GRAPHS, seed=0)


def test_random_graphs(results):
    failed = [r for r in results if r.status == "failed"]
    assert not failed, "\n" + fuzz.tally(results)
    checked = [r for r in results if r.status in ("ok", "failed")]
    assert len(checked) >= 0.95 * N_GRAPHS, fuzz.tally(results)
    # the vocabulary is exercised: every step that converts today appears, in both precisions
    steps = {s for r in checked for s in r.graph.steps}
    assert steps == {n for n, why in fuzz.available().items() if not why}, fuzz.tally(results)
    assert {np.float64, np.float32} <= {r.graph.dtype for r in checked}
    for name in ("matmul", "mul", "softmax", "layernorm", "layernorm_written", "rmsnorm_written", "conv",
                 "gather", "slice", "concat", "split", "transpose", "reshape"):
        assert fuzz.available()[name] == "", (name, fuzz.available()[name])
    # the comparison is not vacuous: relevance is non-zero and matched closely
    errors = [r.error for r in checked if r.graph.dtype == np.float64]
    assert max(errors) <= fuzz.TOL[np.float64] and np.median(errors) < 1e-8


def _graphs_with(step, n):
    """The first n plans of seed 0 that contain `step` (and apply it)."""
    found = []
    for i in range(400):
        plan = fuzz.plan_for(0, i)
        if any(name == step for name, _ in plan.steps):
            graph = fuzz.build(plan)
            if graph is not None and step in graph.steps:
                found.append(i)
        if len(found) == n:
            return found
    raise AssertionError(f"no graph with {step}")


def test_fuzz_finds_a_wrong_vjp(monkeypatch):
    """A Tanh VJP off by a factor 1.01 fails the finite-difference check."""
    from lrp_onnx import vjp

    right = vjp.VJPS[("", "Tanh")]
    indices = _graphs_with("tanh", 5)

    def wrong(b, node, gy, wants):
        return [b.scale(g, 1.01) if g is not None else None for g in right(b, node, gy, wants)]

    monkeypatch.setitem(vjp.VJPS, ("", "Tanh"), wrong)
    results = [fuzz.run_one(0, i) for i in indices]
    assert sum(r.status == "failed" and r.kind == "gradient mode" for r in results) >= 4, \
        [(r.status, r.detail) for r in results]


def test_fuzz_finds_a_wrong_rule(monkeypatch):
    """A uniform rule that forgets to divide by N fails the attnlrp audit."""
    from lrp_onnx.lrp import rules

    indices = _graphs_with("matmul", 4)
    monkeypatch.setitem(rules.RULES, "uniform", rules.RULES["gradient"])
    results = [fuzz.run_one(0, i) for i in indices]
    assert all(r.status == "failed" and "attnlrp audit" in r.detail and "uniform" in r.detail for r in results), \
        [(r.status, r.detail) for r in results]


def test_fuzz_finds_an_unknown_rank_refusal(monkeypatch):
    """A graph whose ranks shape inference loses (an If of two ranks, named dims) but the graph determines:
    converted now; without lrp_onnx/ir/ranks.py's pass it is refused, which the fuzz counts as a failure."""
    from lrp_onnx.ir import shapes

    plan = fuzz.Plan((2, 3, 4), [("if_rank", 8), ("mul", 3)], True, symbolic=True)
    assert fuzz.run_one(0, 0, plan).status == "ok"
    monkeypatch.setattr(shapes, "fill_ranks", lambda model, inferred: 0)
    result = fuzz.run_one(0, 0, plan)
    assert result.status == "failed" and result.kind == "unknown rank", result.detail


def test_fuzz_finds_float_indices_accepted(monkeypatch):
    """Each graph with a gather is also converted with its indices declared float: it must be refused;
    with the type check disabled the conversion would accept it, and the fuzz says so."""
    from lrp_onnx import pipeline

    plan = fuzz.Plan((2, 3, 4), [("gather", 8), ("tanh", 3)], True)
    assert fuzz.run_one(0, 0, plan).status == "ok"
    monkeypatch.setattr(pipeline, "check_input_types", lambda *args, **kwargs: None)
    result = fuzz.run_one(0, 0, plan)
    assert result.status == "failed" and "float indices" in result.detail, result.detail
