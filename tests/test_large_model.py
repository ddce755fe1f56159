"""A > 2 GB model with external weights converts without loading its weights and runs.

The weight file is sparse (only the rows the test looks up hold data), so the test writes little to
disk; the graph is an embedding table of 2.2 GB, a projection and a mean over the sequence."""
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

VOCAB, HIDDEN, CLASSES = 540_000, 1024, 4
IDS = np.array([[3, 77, 123_456, 539_999]], dtype=np.int64)


def build(tmp_path):
    rng = np.random.default_rng(0)
    rows = {int(i): rng.normal(size=HIDDEN).astype(np.float32) for i in IDS.ravel()}
    proj = rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32)
    table_bytes = VOCAB * HIDDEN * 4
    with open(tmp_path / "weights.bin", "wb") as f:
        f.truncate(table_bytes)
        for i, row in rows.items():
            f.seek(i * HIDDEN * 4)
            f.write(row.tobytes())
        f.seek(table_bytes)
        f.write(proj.tobytes())

    def external(name, dims, offset, length):
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
        for k, v in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        return t

    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["embeds"], name="embed"),
             helper.make_node("MatMul", ["embeds", "proj"], ["scores"], name="project"),
             helper.make_node("ReduceMean", ["scores", "axes"], ["logits"], keepdims=0, name="pool")]
    graph = helper.make_graph(
        nodes, "large", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[external("table", [VOCAB, HIDDEN], 0, table_bytes),
                     external("proj", [HIDDEN, CLASSES], table_bytes, proj.nbytes),
                     onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "model.onnx")
    return rows, proj


def test_large_external_data_model(tmp_path):
    rows, proj = build(tmp_path)
    assert os.path.getsize(tmp_path / "weights.bin") > 2 * 1024 ** 3
    # convert in a fresh process and read its peak memory: the 2.2 GB of weights are never loaded
    code = ("import lrp_onnx, sys; lrp_onnx.convert(sys.argv[1], sys.argv[2]);"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    out = tmp_path / "model.lrp.onnx"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.onnx"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 600 * 1024  # KiB: far below the weights' 2.2 GB
    assert os.path.getsize(out) < 64 * 1024
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {"input_ids": IDS, "lrp_target": np.array([2])})))
    embeds = np.stack([rows[int(i)] for i in IDS[0]])[None]
    expected = embeds * (proj[:, 2] / IDS.shape[1])  # gradient of mean_s(embeds @ proj)[2] times input
    np.testing.assert_allclose(values["lrp_relevance"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(values["lrp_relevance"].sum(), values["logits"][0, 2], rtol=1e-4)
