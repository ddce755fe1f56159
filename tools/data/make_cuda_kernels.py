"""Transcription of the CUDAExecutionProvider rows of onnxruntime's docs/OperatorKernels.md for the ops the
project's graphs use; writes tools/data/cuda_kernels.json (type sets spelled out):

    python tools/data/make_cuda_kernels.py    # from the repository root
"""
import json
bf, b, d, f, h = "bfloat16", "bool", "double", "float", "float16"
I = ["int16", "int32", "int64", "int8", "uint16", "uint32", "uint64", "uint8"]
F8 = ["float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz"]
ALL13 = [bf, b, d, f, h] + I
ALL13F8 = [bf, b, d, f, h] + F8 + I
FLT3 = [d, f, h]
BFLT4 = [bf, d, f, h]
NUM12 = [bf, d, f, h] + I
NUM8 = [bf, d, f, h, "int32", "int64", "uint32", "uint64"]
NUM7 = [d, f, h, "int32", "int64", "uint32", "uint64"]
TIND = ["int32", "int64"]
CAST23 = [bf, b, d, f, h, "float4e2m1", "float8e4m3fn", "float8e5m2"] + I
CAST21 = [bf, b, d, f, h, "float8e4m3fn", "float8e5m2"] + I
N = None
K = {
 "Abs": [(13, N, {"T": NUM12}), (6, 12, {"T": FLT3 + I})],
 "Add": [(14, N, {"T": NUM12}), (13, 13, {"T": NUM8}), (7, 12, {"T": NUM7})],
 "And": [(7, N, {"T": [b], "T1": [b]})],
 "ArgMax": [(13, N, {"T": FLT3}), (12, 12, {"T": FLT3}), (1, 11, {"T": FLT3})],
 "Cast": [(23, N, {"T1": CAST23, "T2": CAST23}), (21, 22, {"T1": CAST21, "T2": CAST23}),
          (19, 20, {"T1": CAST21, "T2": CAST23}), (13, 18, {"T1": ALL13, "T2": CAST23}),
          (9, 12, {"T1": [b, d, f, h] + I, "T2": CAST23}), (6, 8, {"T1": [b, d, f, h] + I, "T2": CAST23})],
 "Clip": [(13, N, {"T": [d, f, h, "int64", "int8", "uint64", "uint8"]}),
          (12, 12, {"T": [d, f, h, "int64", "int8", "uint64", "uint8"]}), (11, 11, {"T": [f]}), (6, 10, {"T": [f]})],
 "Concat": [(13, N, {"T": ALL13}), (11, 12, {"T": ALL13}), (4, 10, {"T": ALL13})],
 "ConstantOfShape": [(9, N, {"T1": ["int64"], "T2": ALL13})],
 "Conv": [(22, N, {"T": BFLT4}), (11, 21, {"T": FLT3}), (1, 10, {"T": FLT3})],
 "ConvTranspose": [(11, N, {"T": FLT3}), (1, 10, {"T": FLT3})],
 "Cos": [(7, N, {"T": FLT3})],
 "CumSum": [(14, N, {"T": [d, f, h, "int32", "int64", "uint32", "uint64"], "T2": TIND}),
            (11, 13, {"T": [d, f, "int32", "int64", "uint32", "uint64"], "T2": TIND})],
 "Div": [(14, N, {"T": NUM12}), (13, 13, {"T": NUM8}), (7, 12, {"T": NUM7})],
 "Dropout": [(13, N, {"T": BFLT4, "T1": BFLT4, "T2": [b]}), (12, 12, {"T": FLT3, "T1": FLT3, "T2": [b]})],
 "Einsum": [(12, N, {"T": FLT3})],
 "Equal": [(13, N, {"T": [b, d, f, h, "int32", "int64", "uint32", "uint64"], "T1": [b]}),
           (11, 12, {"T": [b, d, f, h, "int32", "int64", "uint32", "uint64"]}), (7, 10, {"T": [b, "int32", "int64"]})],
 "Erf": [(13, N, {"T": BFLT4}), (9, 12, {"T": FLT3})],
 "Exp": [(13, N, {"T": BFLT4}), (6, 12, {"T": FLT3})],
 "Expand": [(13, N, {"T": ALL13}), (8, 12, {"T": ALL13})],
 "Flatten": [(13, N, {"T": ALL13}), (11, 12, {"T": ALL13}), (9, 10, {"T": ALL13}), (1, 8, {"T": ALL13})],
 "Gather": [(13, N, {"T": ALL13, "Tind": TIND}), (11, 12, {"T": ALL13, "Tind": TIND}), (1, 10, {"T": ALL13, "Tind": TIND})],
 "GatherElements": [(13, N, {"T": ALL13, "Tind": TIND}), (11, 12, {"T": ALL13, "Tind": TIND})],
 "GatherND": [(13, N, {"T": [bf, b, d, f, h, "int64"], "indices": ["int64"]}),
              (12, 12, {"T": [b, d, f, h, "int64"], "indices": ["int64"]}), (11, 11, {"T": [b, d, f, h, "int64"], "indices": ["int64"]})],
 "Gelu": [(20, N, {"T": BFLT4})],
 "Gemm": [(13, N, {"T": BFLT4}), (11, 12, {"T": FLT3}), (9, 10, {"T": FLT3}), (7, 8, {"T": FLT3})],
 "Greater": [(13, N, {"T": NUM7, "T1": [b]}), (9, 12, {"T": NUM7}), (7, 8, {"T": FLT3})],
 "GreaterOrEqual": [(16, N, {"T": NUM7, "T1": [b]}), (12, 15, {"T": NUM7, "T1": [b]})],
 "Identity": [(19, N, {"V": ALL13F8}), (14, 18, {"V": ALL13}), (13, 13, {"T": ALL13}), (1, 12, {"T": ALL13})],
 "If": [(19, N, {"B": [b], "V": ALL13F8 + ["string"]}), (13, 18, {"B": [b], "V": ALL13 + ["string"]}),
        (11, 12, {"B": [b], "V": ALL13}), (1, 10, {"B": [b], "V": ALL13})],
 "IsInf": [(20, N, {"T1": [bf, d, f, h] + F8, "T2": [b]}), (10, 19, {"T1": [d, f], "T2": [b]})],
 "IsNaN": [(20, N, {"T1": [bf, d, f, h] + F8, "T2": [b]}), (13, 19, {"T1": BFLT4, "T2": [b]}), (9, 12, {"T1": FLT3, "T2": [b]})],
 "LayerNormalization": [(17, N, {"T": BFLT4, "U": [f]}), (1, 16, {"T": BFLT4, "U": [d, f], "V": BFLT4})],
 "Less": [(13, N, {"T": NUM7, "T1": [b]}), (9, 12, {"T": NUM7}), (7, 8, {"T": FLT3})],
 "LessOrEqual": [(16, N, {"T": NUM7, "T1": [b]}), (12, 15, {"T": NUM7, "T1": [b]})],
 "Log": [(13, N, {"T": FLT3}), (6, 12, {"T": FLT3})],
 "MatMul": [(13, N, {"T": BFLT4}), (9, 12, {"T": FLT3}), (1, 8, {"T": FLT3})],
 "Max": [(13, N, {"T": NUM8}), (12, 12, {"T": NUM8}), (6, 11, {"T": BFLT4})],
 "Min": [(13, N, {"T": NUM8}), (12, 12, {"T": NUM8}), (6, 11, {"T": BFLT4})],
 "Mod": [(13, N, {"T": NUM8}), (10, 12, {"T": NUM7})],
 "Mul": [(14, N, {"T": NUM12}), (13, 13, {"T": NUM8}), (7, 12, {"T": NUM7})],
 "Neg": [(13, N, {"T": [bf, d, f, h, "int16", "int32", "int64", "int8"]}), (6, 12, {"T": [d, f, h, "int16", "int32", "int64", "int8"]})],
 "NonZero": [(13, N, {"T": [b, f, h, "int32", "int64", "uint8"]}), (9, 12, {"T": [b, f, h, "int32", "int64", "uint8"]})],
 "Not": [(1, N, {"T": [b]})],
 "OneHot": [(11, N, {"T1": TIND, "T2": TIND, "T3": [f, h, "int64"]})],
 "Or": [(7, N, {"T": [b], "T1": [b]})],
 "Pad": [(18, N, {"T": [b, d, f, h]}), (13, 17, {"T": [b, d, f, h]}), (11, 12, {"T": FLT3}), (2, 10, {"T": FLT3})],
 "Pow": [(15, N, {"T": [bf, d, f, h, "int32", "int64"], "T1": [bf, d, f, h, "int32", "int64"]}),
         (13, 14, {"T": [bf, d, f, h, "int32", "int64"], "T1": [d, f, h, "int32", "int64"]}),
         (12, 12, {"T": [d, f, h, "int32", "int64"], "T1": [d, f, h, "int32", "int64"]}), (7, 11, {"T": FLT3})],
 "Range": [(11, N, {"T": [d, f, "int16", "int32", "int64"]})],
 "Reciprocal": [(13, N, {"T": FLT3}), (6, 12, {"T": FLT3})],
 "ReduceMax": [(18, N, {"T": [d, f, h, "int32", "int64"]}), (1, 17, {"T": [d, f, h, "int32", "int64"]})],
 "ReduceMean": [(18, N, {"T": [d, f, h, "int32"]}), (1, 17, {"T": [d, f, h, "int32"]})],
 "ReduceSum": [(13, N, {"T": [bf, d, f, h, "int32", "int64"]}), (1, 12, {"T": [d, f, h, "int32", "int64"]})],
 "Relu": [(14, N, {"T": BFLT4}), (13, 13, {"T": BFLT4}), (6, 12, {"T": FLT3})],
 "Reshape": [(23, N, {"T": ALL13F8, "shape": ["int64"]}), (21, 22, {"T": ALL13F8, "shape": ["int64"]}),
             (19, 20, {"T": ALL13F8, "shape": ["int64"]}), (14, 18, {"T": ALL13, "shape": ["int64"]}),
             (13, 13, {"T": ALL13, "shape": ["int64"]}), (5, 12, {"T": ALL13, "shape": ["int64"]}), (1, 4, {"T": ALL13})],
 "ScatterElements": [(18, N, {"T": ALL13, "Tind": TIND}), (16, 17, {"T": ALL13, "Tind": TIND}),
                     (13, 15, {"T": ALL13, "Tind": TIND}), (11, 12, {"T": ALL13, "Tind": TIND})],
 "ScatterND": [(18, N, {"T": ALL13}), (16, 17, {"T": ALL13}), (13, 15, {"T": ALL13}), (11, 12, {"T": ALL13})],
 "Shape": [(23, N, {"T": ALL13F8, "T1": ["int64"]}), (21, 22, {"T": ALL13F8, "T1": ["int64"]}),
           (19, 20, {"T": ALL13F8, "T1": ["int64"]}), (15, 18, {"T": ALL13, "T1": ["int64"]}),
           (13, 14, {"T": ALL13, "T1": ["int64"]}), (1, 12, {"T": ALL13, "T1": ["int64"]})],
 "Sigmoid": [(13, N, {"T": BFLT4}), (6, 12, {"T": FLT3})],
 "SimplifiedLayerNormalization": [(1, N, {"T": BFLT4, "U": [d, f], "V": BFLT4})],
 "Sin": [(7, N, {"T": FLT3})],
 "Slice": [(13, N, {"T": ALL13, "Tind": TIND}), (11, 12, {"T": ALL13, "Tind": TIND}), (10, 10, {"T": ALL13, "Tind": TIND}),
           (1, 9, {"T": ALL13})],
 "Softmax": [(13, N, {"T": BFLT4}), (11, 12, {"T": FLT3}), (1, 10, {"T": FLT3})],
 "Softplus": [(1, N, {"T": FLT3})],
 "Split": [(18, N, {"T": ALL13}), (13, 17, {"T": ALL13}), (11, 12, {"T": ALL13}), (2, 10, {"T": ALL13})],
 "Sqrt": [(13, N, {"T": BFLT4}), (6, 12, {"T": FLT3})],
 "Squeeze": [(23, N, {"T": ALL13}), (21, 22, {"T": ALL13}), (13, 20, {"T": ALL13}), (11, 12, {"T": ALL13}), (1, 10, {"T": ALL13})],
 "Sub": [(14, N, {"T": NUM12}), (13, 13, {"T": NUM8}), (7, 12, {"T": NUM7})],
 "Sum": [(13, N, {"T": BFLT4}), (8, 12, {"T": BFLT4}), (6, 7, {"T": BFLT4})],
 "Tanh": [(13, N, {"T": BFLT4}), (6, 12, {"T": FLT3})],
 "Tile": [(13, N, {"T": [bf, d, f, h, "int32", "int64"], "T1": ["int64"]}), (6, 12, {"T": [d, f, h, "int32", "int64"], "T1": ["int64"]})],
 "TopK": [(11, N, {"I": ["int64"], "T": [d, f, h, "int32", "int64"]}), (10, 10, {"I": ["int64"], "T": [d, f, h, "int32", "int64"]}),
          (1, 9, {"T": [d, f, h, "int32", "int64"]})],
 "Transpose": [(23, N, {"T": ALL13}), (21, 22, {"T": ALL13}), (13, 20, {"T": ALL13}), (1, 12, {"T": ALL13})],
 "Trilu": [(14, N, {"T": ALL13})],
 "Unsqueeze": [(23, N, {"T": ALL13}), (21, 22, {"T": ALL13}), (13, 20, {"T": ALL13}), (11, 12, {"T": ALL13}), (1, 10, {"T": ALL13})],
 "Where": [(16, N, {"B": [b], "T": [bf, d, f, h, "int32", "int64", "uint8"]}), (9, 15, {"B": [b], "T": [d, f, h, "int32", "int64", "uint8"]})],
}
MS = {
 "BiasGelu": [(1, N, {"T": BFLT4})],
 "Attention": [(1, N, {"T": [bf, f, h]})],
}
out = {
 "source": "onnxruntime docs/OperatorKernels.md, section 'Operators implemented by CUDAExecutionProvider', "
           "github.com/microsoft/onnxruntime at commit 001d12d2623fd411ce0f83d05abb5e82304a3389 (its CUDA Cast row "
           "already lists float4e2m1 and Attention opset 24: onnxruntime >= 1.23; installed here: 1.32.0)",
 "scope": "the rows of the ops that the exported tiny families, SmolLM2 and MiniLM and their converted graphs use "
          "(plus a few neighbours); an op missing here is reported as 'not in the table' -- add its rows from that "
          "file. Sequence types (seq(tensor(...))) are left out. Ops that the CUDA section does not list at all, e.g. "
          "OptionalHasElement, have no CUDA kernel.",
 "no_kernel_needed": {"ai.onnx": ["Constant"]},
 "kernels": {"ai.onnx": {op: [{"since": s, "until": u, "types": t} for s, u, t in rows] for op, rows in sorted(K.items())},
             "com.microsoft": {op: [{"since": s, "until": u, "types": t} for s, u, t in rows] for op, rows in sorted(MS.items())}},
}
open("tools/data/cuda_kernels.json", "w").write(json.dumps(out, indent=1) + "\n")
print(len(K) + len(MS), "ops")
