"""Token ids whose layout changes before the embedding lookup (XLNet transposes input_ids to
[seq, batch]; GPT-2 flattens them): the relevance comes out in the layout of the ids it belongs to,
[batch, seq, hidden], equal to PyTorch autograd's taken at the lookup and laid out like the ids. A lookup
whose indices are sliced, concatenated or repeated ids gets each id's relevance summed over its copies
(an id sliced away gets zero), and below opset 16 (no scatter-add) is refused by default, naming the
node, and explained in its own layout when named with --source."""
import io

import numpy as np
import onnx
import pytest
import torch

import lrp_onnx
from tests.conftest import rel_l2

VOCAB, HIDDEN, BATCH, SEQ = 40, 8, 2, 5


class Model(torch.nn.Module):
    """ids -> (layout change) -> embedding -> mixing over positions -> logits [batch, seq, vocab]."""

    def __init__(self, layout):
        super().__init__()
        torch.manual_seed(0)
        self.layout = layout
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.mix = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def lookup(self, ids):
        if self.layout == "transpose":  # XLNet: [seq, batch]
            return self.embed(ids.transpose(0, 1)), lambda e: e.transpose(0, 1)
        if self.layout == "flatten":  # [batch * seq]
            return self.embed(ids.reshape(-1)), lambda e: e.reshape(ids.shape[0], -1, HIDDEN)
        if self.layout == "transpose-flatten":  # [seq * batch]
            return self.embed(ids.transpose(0, 1).reshape(-1)), \
                lambda e: e.reshape(-1, ids.shape[0], HIDDEN).transpose(0, 1)
        if self.layout == "routed":  # XLNet-like, plus a slice, a concatenation and a repeat of ids
            t = ids.transpose(0, 1)
            routed = torch.cat([t[1:], t[:1], t[-2:]], dim=0)  # [seq + 2, batch]: rotated, last two repeated
            return self.embed(routed), lambda e: e.transpose(0, 1)
        return self.embed(ids[:, 1:]), lambda e: e  # "slice": drops the first token

    def forward(self, ids, keep=None):
        looked_up, to_batch_major = self.lookup(ids)
        if keep is not None:
            keep.append(looked_up)
        x = to_batch_major(looked_up)  # [batch, seq, hidden]
        x = torch.tanh(self.mix(x)).cumsum(1)  # positions interact
        return self.head(x)


def export(model, path):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    torch.onnx.export(model, (ids,), str(path), input_names=["input_ids"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}}, opset_version=17, dynamo=False)
    return path


def autograd_relevance(model, ids, targets, position=-1):
    """G x I at the lookup, in the lookup's layout, for logits[r, position, targets[r]] of each row."""
    keep = []
    logits = model(torch.from_numpy(ids), keep)
    looked_up = keep[0]
    looked_up.retain_grad()
    logits[torch.arange(len(targets)), position, torch.from_numpy(targets)].sum().backward()
    return (looked_up * looked_up.grad).detach().numpy()


IDS = np.array([[3, 17, 5, 29, 11], [8, 2, 33, 14, 6]], dtype=np.int64)
TARGETS = np.array([7, 21], dtype=np.int64)


@pytest.mark.parametrize("layout", ["transpose", "flatten", "transpose-flatten"])
def test_relevance_comes_out_in_the_layout_of_the_ids(layout, tmp_path):
    model = Model(layout)
    path = export(model, tmp_path / "m.onnx")
    assert any(n.op_type in ("Transpose", "Reshape") for n in onnx.load(path).graph.node)
    reference = autograd_relevance(model, IDS, TARGETS)
    reference = {"transpose": lambda r: r.transpose(1, 0, 2), "flatten": lambda r: r.reshape(BATCH, SEQ, HIDDEN),
                 "transpose-flatten": lambda r: r.reshape(SEQ, BATCH, HIDDEN).transpose(1, 0, 2)}[layout](reference)
    for multi in (False, True):
        converted = lrp_onnx.convert(path, rules="gradient", multi_target=multi)
        meta = lrp_onnx.Explainer.from_model(converted, providers=["CPUExecutionProvider"])
        result = meta.run(input_ids=IDS, target=TARGETS[:, None] if multi else TARGETS)
        relevance = result.relevance[:, 0] if multi else result.relevance
        assert relevance.shape == (BATCH, SEQ, HIDDEN)
        assert rel_l2(relevance, reference) < 1e-5
        if not multi:
            assert result.token_relevance("input_ids").shape == (BATCH, SEQ)
            np.testing.assert_allclose(result.token_relevance()[0], reference[0].sum(-1), rtol=1e-4, atol=1e-6)
    # attnlrp: the same unit rules as the lookup-layout relevance, only laid out like the ids
    explained = lrp_onnx.Explainer.from_model(lrp_onnx.convert(path), providers=["CPUExecutionProvider"])
    assert explained.run(input_ids=IDS, target=TARGETS).relevance.shape == (BATCH, SEQ, HIDDEN)


def test_routed_ids_get_the_relevance_of_their_copies(tmp_path):
    """ids rotated and two repeated before the lookup: each id's relevance is the sum over the looked-up
    rows it was copied to (autograd's relevance at the lookup, routed back by hand)."""
    model = Model("routed")
    path = export(model, tmp_path / "m.onnx")
    assert {"Concat", "Slice"} <= {n.op_type for n in onnx.load(path).graph.node}
    at_lookup = autograd_relevance(model, IDS, TARGETS)  # [seq + 2, batch, hidden]
    reference = np.zeros((BATCH, SEQ, HIDDEN))
    for row, position in enumerate(list(range(1, SEQ)) + [0, SEQ - 2, SEQ - 1]):
        reference[:, position] += at_lookup[row]
    for multi in (False, True):
        converted = lrp_onnx.convert(path, rules="gradient", multi_target=multi)
        result = lrp_onnx.Explainer.from_model(converted, providers=["CPUExecutionProvider"]).run(
            input_ids=IDS, target=TARGETS[:, None] if multi else TARGETS)
        relevance = result.relevance[:, 0] if multi else result.relevance
        assert relevance.shape == (BATCH, SEQ, HIDDEN)
        assert rel_l2(relevance, reference) < 1e-5
        assert result.source_inputs == {"lrp_relevance": "input_ids"}


def test_sliced_ids_below_opset_16_are_refused_by_default_and_explained_when_named(tmp_path):
    model = Model("slice")
    path = export(model, tmp_path / "m.onnx")
    sliced = onnx.load(path)
    np.testing.assert_allclose(  # opset 16 and later: the sliced-away first token gets zero
        lrp_onnx.Explainer.from_model(lrp_onnx.convert(sliced, rules="gradient"), providers=["CPUExecutionProvider"])
        .run(input_ids=IDS, target=TARGETS).relevance[:, 0], 0)
    sliced.opset_import[0].version = 15
    with pytest.raises(lrp_onnx.LRPError, match=r"layout of input 'input_ids'.*Slice.*opset >= 16.*--source"):
        lrp_onnx.convert(sliced, rules="gradient")
    lookup = next(n.output[0] for n in sliced.graph.node if n.op_type == "Gather")
    converted = lrp_onnx.convert(sliced, rules="gradient", source=lookup)
    result = lrp_onnx.Explainer.from_model(converted, providers=["CPUExecutionProvider"]).run(
        input_ids=IDS, target=TARGETS)
    assert result.source_inputs == {"lrp_relevance": None}  # not mapped to input_ids: another layout
    with pytest.raises(lrp_onnx.LRPError, match="input_ids"):
        result.relevance_of("input_ids")
    assert rel_l2(result.relevance, autograd_relevance(model, IDS, TARGETS)) < 1e-5
