"""tools/flops.py: matrix FLOPs from onnxruntime's profile (the explain/forward floor the benchmark
reports), checked on shapes whose contracted size is known and on a profiled two-layer graph."""
import numpy as np
import onnx
from onnx import TensorProto, helper

from tools.flops import matmul_flops_of_node, profiled_flops


def test_contracted_size_from_shapes():
    assert matmul_flops_of_node([[2, 3, 4], [4, 5]], [2, 3, 5]) == 2 * 2 * 3 * 5 * 4  # broadcast weight
    assert matmul_flops_of_node([[1, 12, 512, 32], [1, 12, 32, 512]], [1, 12, 512, 512]) == 2 * 12 * 512 * 512 * 32
    assert matmul_flops_of_node([[1, 12, 32, 512], [1, 12, 32, 512]], [1, 12, 512, 512]) == 2 * 12 * 512 * 512 * 32
    assert matmul_flops_of_node([[512, 1536], [384, 1536]], [512, 384]) == 2 * 512 * 384 * 1536  # Gemm transB
    assert matmul_flops_of_node([[1536, 512], [1536, 384]], [512, 384]) == 2 * 512 * 384 * 1536  # Gemm transA
    assert matmul_flops_of_node([[7, 64], [2, 64, 16]], [2, 7, 16]) == 2 * 2 * 7 * 16 * 64  # broadcast input


def test_profiled_run_counts_every_product(tmp_path):
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [8, 16], np.ones(128, np.float32))
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [16, 4], np.ones(64, np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5, 4])], [w1, w2])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    got = profiled_flops(path, {"x": np.ones((3, 5, 8), np.float32)})
    assert got == {"matmul_flops": 2 * 15 * 16 * 8 + 2 * 15 * 4 * 16, "nodes": 2}
