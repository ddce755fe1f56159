"""tools/faithfulness.py, the script behind the faithfulness table of docs/faithfulness.md, end to end on the real
weights of SmolLM2-135M and all-MiniLM-L6-v2 (their first 2 layers, the session's exports, given to the
script as its export cache) with a few texts each: it writes the table and plot, and its LXT side
(PyTorch, fresh process) gives the same relevance and ABPC as lrp-onnx's attnlrp graphs in onnxruntime.
(The whole models' table is the script's own run, docs/faithfulness.md.)"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import rel_l2

REPO = Path(__file__).resolve().parent.parent


RELEVANCE_BOUND = 5e-5  # token relevance, relative L2, per text (README: within 4e-5 on every text)
CURVE_RTOL = 1e-4  # every point of the MoRF and LeRF curves (the same removal order on both sides)
ABPC_BOUND = 1e-4  # |ABPC(lrp-onnx) - ABPC(LXT)| per text (README: median 6e-6 on SmolLM2, 3e-8 on MiniLM)


def test_faithfulness_script_matches_lxt(tmp_path, smollm2_2layers, minilm_2layers):
    out, cache = tmp_path / "faithfulness", tmp_path / "models"
    cache.mkdir()
    for recipe, export in (("smollm2", smollm2_2layers), ("minilm", minilm_2layers)):  # model.onnx, tokenizer.json, hf/
        (cache / recipe).symlink_to(export["out_dir"], target_is_directory=True)
    done = subprocess.run([sys.executable, "-m", "tools.faithfulness", "--out", str(out), "--cache", str(cache),
                           "--smollm2-limit", "2", "--minilm-limit", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "| SmolLM2-135M (next-token, 2) |" in table and "| all-MiniLM-L6-v2 (similarity, 2) |" in table  # 1 pair, both ways
    assert (out / "faithfulness.png").read_bytes()[:4] == b"\x89PNG"
    for recipe, texts in (("smollm2", 2), ("minilm", 2)):
        ours = json.loads((out / recipe / "results.json").read_text())
        lxt = json.loads((out / recipe / "lxt.json").read_text())
        assert len(ours["examples"]) == len(lxt["examples"]) == texts
        differences = []
        for mine, theirs in zip(ours["examples"], lxt["examples"]):
            relevance = np.asarray(mine["relevance"]["attnlrp"])
            reference = np.asarray(theirs["relevance"])
            assert relevance.shape == reference.shape == (len(mine["input_ids"]),)
            assert rel_l2(relevance, reference) <= RELEVANCE_BOUND  # README: within 4e-5 on every text
            assert len(mine["morf"]["attnlrp"]) == len(theirs["morf"]) == len(mine["removable"]) + 1
            np.testing.assert_allclose(mine["morf"]["attnlrp"], theirs["morf"], rtol=CURVE_RTOL, atol=CURVE_RTOL)
            np.testing.assert_allclose(mine["lerf"]["attnlrp"], theirs["lerf"], rtol=CURVE_RTOL, atol=CURVE_RTOL)
            differences.append(abs(mine["abpc"]["attnlrp"] - theirs["abpc"]))
        print(recipe, "ABPC differences", differences)
        assert max(differences) <= ABPC_BOUND
        assert (out / f"heatmap_{recipe}.png").exists() and (out / f"heatmap_{recipe}.html").exists()
