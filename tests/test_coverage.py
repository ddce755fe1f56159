"""Coverage as `lrp-onnx inspect` reports it: every unit on the relevance path of every tiny family,
in its exports (tests/conftest.py: exports) and every rule set that applies, has a rule (and its backward can be emitted).
The relevance of each is checked against its reference in test_parity / test_families / test_moe /
test_t5 / test_vit; this file is the one place that lists them all."""
import pytest

import lrp_onnx
from tests.conftest import exports, lrp_cli

TEXT_FAMILIES = ["bert", "gpt2", "llama", "qwen2", "qwen3", "gemma3", "mixtral", "qwen3_moe", "qwen2_moe", "t5"]
CASES = [(f, e, r) for f, e in exports(TEXT_FAMILIES) for r in ("gradient", "attnlrp", "cp-lrp")]
CASES += [("vit", e, r) for _, e in exports(["vit"]) for r in ("gradient", "attnlrp", "cp-lrp", "vit-gamma")]


@pytest.mark.parametrize("family, exporter, rules", CASES)
def test_every_unit_on_the_path_has_a_rule(family, exporter, rules, tiny_model):
    _, path = tiny_model(family, exporter)
    report = lrp_onnx.inspect_model(path, rules=rules)
    assert report.supported, report.problems
    assert len(report.rows) > 20  # the path runs through the whole network
    assert all(rule for _, _, rule in report.rows)


def test_cli_inspect_reports_full_coverage(tiny_model):
    _, path = tiny_model("mixtral")
    done = lrp_cli("inspect", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("coverage: every unit on the relevance path has a rule")
