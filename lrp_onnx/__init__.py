"""lrp-onnx: turn an exported transformer ONNX graph into one that also computes AttnLRP relevance.

    import lrp_onnx
    lrp_onnx.convert("model.onnx", "model.lrp.onnx", rules="attnlrp")
    out = lrp_onnx.Explainer("model.lrp.onnx").run(input_ids=ids, attention_mask=mask)
    out.relevance  # at the word-embedding output, [batch, seq, hidden]
    lrp_onnx.evaluate("model.onnx", "tokenizer.json", "texts.txt").write("eval/")  # MoRF/LeRF, ABPC
    lrp_onnx.explain_dataset("model.lrp.onnx", "tokenizer.json", "data.jsonl", "out.parquet")  # every row

Inference needs numpy, onnx and onnxruntime only; PyTorch is never imported.
"""
from ._version import __version__
from .check.conservation import audit  # noqa: E402
from .run.dataset import explain_dataset  # noqa: E402
from .errors import LRPError, UnsupportedOpsError  # noqa: E402
from .check.faithfulness import evaluate  # noqa: E402
from .pipeline import convert  # noqa: E402
from .check.report import inspect_model  # noqa: E402
from .lrp.rules import RULE_SETS  # noqa: E402
from .run.runner import Explainer, Explanation  # noqa: E402

__all__ = ["convert", "audit", "explain_dataset", "inspect_model", "evaluate", "Explainer", "Explanation", "RULE_SETS", "LRPError",
           "UnsupportedOpsError", "__version__"]
