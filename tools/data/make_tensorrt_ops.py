"""Transcribes the operator support matrix of onnx-tensorrt's docs/operators.md (TensorRT's ONNX parser)
into tools/data/tensorrt_ops.json, the table tools/tensorrt_ops.py checks graphs against:

    git -C ONNX_TENSORRT_CLONE show COMMIT:docs/operators.md > operators.md
    python tools/data/make_tensorrt_ops.py operators.md COMMIT     # from the repository root

Each row becomes {"supported": bool, "types": [onnx type names], "restrictions": text}. Type spellings
are mapped to ONNX's (FP32 -> float, ...); the page's typo INF64 (ConstantOfShape) is read as INT64.
"""
import json
import re
import sys
from pathlib import Path

TYPES = {"FP32": "float", "FP16": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
         "INF64": "int64", "BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT4": "int4", "FP8": "float8e4m3fn",
         "DOUBLE": "double"}


def parse(text: str) -> dict:
    header = re.search(r"TensorRT ([\d.]+) supports operators in the inclusive range of opset (\d+) to opset (\d+)", text)
    ops = {}
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|--") or line.startswith("| Operator"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name, supported = cells[0], cells[1] if len(cells) > 1 else ""
        if supported not in ("Y", "N"):
            continue
        types = [TYPES[t.strip()] for t in (cells[2] if len(cells) > 2 else "").split(",") if t.strip()]
        ops[name] = {"supported": supported == "Y", "types": types,
                     "restrictions": cells[3] if len(cells) > 3 else ""}
    return {"tensorrt_version": header.group(1), "opset_min": int(header.group(2)),
            "opset_max": int(header.group(3)), "ops": ops}


def main(argv=None):
    path, commit = (argv or sys.argv[1:])[:2]
    data = parse(Path(path).read_text())
    out = {
        "source": (f"onnx-tensorrt docs/operators.md ('Operator Support Matrix'), github.com/onnx/onnx-tensorrt at "
                   f"commit {commit} (branch 10.1-GA, 'ONNX-TensorRT 10.1 GA release'); SPDX-License-Identifier: "
                   f"Apache-2.0"),
        "scope": ("TensorRT's ONNX parser, domain ai.onnx only: an op missing from the matrix (every com.microsoft "
                  "op, e.g. onnxruntime's fused forms) is not supported by the parser (onnxruntime's TensorRT "
                  "execution provider then runs that node on its next provider). 'types' lists the element types "
                  "of the op's type-parameter inputs; 'restrictions' is the page's text."),
        **data,
    }
    target = Path(__file__).resolve().parent / "tensorrt_ops.json"
    head = json.dumps({k: v for k, v in out.items() if k != "ops"}, indent=1)[:-2]
    rows = ",\n".join(f"  {json.dumps(name)}: {json.dumps(row)}" for name, row in out["ops"].items())
    target.write_text(f'{head},\n "ops": {{\n{rows}\n }}\n}}\n')
    print(f"wrote {target}: {len(data['ops'])} ops, TensorRT {data['tensorrt_version']}, opset "
          f"{data['opset_min']}..{data['opset_max']}")


if __name__ == "__main__":
    main()
