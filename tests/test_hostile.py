"""Hostile and broken inputs (issue 10): every case exits with its code and exactly one stderr line,
no traceback, nothing written outside the output path, the input unchanged.

A tiny hand-built text LM (vocabulary 12, position table 6 rows) and a word-level tokenizer are made
once; the CLI runs in-process (cli.main), and in a subprocess where signals are involved."""
import filecmp
import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx
from lrp_onnx import cli
from lrp_onnx.ir import files

V, P, H = 12, 6, 8  # vocabulary, positions, hidden
WORDS = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]


def tiny_lm(head_rows=V, nan_head=False, position_table=True):
    """input_ids, attention_mask [B, S] -> logits [B, S, head_rows]: embedding (+ position table),
    mask, MatMul, Tanh, head MatMul."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((V, H)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((H, H)).astype(np.float32), "w1")]
    head = rng.standard_normal((H, head_rows)).astype(np.float32)
    if nan_head:
        head[:, :] = np.nan
    inits.append(numpy_helper.from_array(head, "head"))
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["tok"], name="embed")]
    x = "tok"
    if position_table:
        inits += [numpy_helper.from_array(rng.standard_normal((P, H)).astype(np.float32), "pos_table"),
                  numpy_helper.from_array(np.array(0, np.int64), "zero"),
                  numpy_helper.from_array(np.array(1, np.int64), "one"),
                  numpy_helper.from_array(np.array([1], np.int64), "one_vec")]
        nodes += [helper.make_node("Shape", ["input_ids"], ["shape"], start=1, end=2, name="len"),
                  helper.make_node("Squeeze", ["shape"], ["length"], name="len_scalar"),
                  helper.make_node("Range", ["zero", "length", "one"], ["positions"], name="arange"),
                  helper.make_node("Gather", ["pos_table", "positions"], ["pos"], name="pos_embed"),
                  helper.make_node("Add", ["tok", "pos"], ["x0"], name="add_pos")]
        x = "x0"
    nodes += [helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT, name="mask_cast"),
              helper.make_node("Unsqueeze", ["maskf", "minus_one"], ["mask3"], name="mask_col"),
              helper.make_node("Mul", [x, "mask3"], ["x"], name="masked"),
              helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj"),
              helper.make_node("Tanh", ["h"], ["a"], name="act"),
              helper.make_node("MatMul", ["a", "head"], ["logits"], name="lm_head")]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "minus_one"))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
                        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", head_rows])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def write_tokenizer(path, pad_to=None, extra_words=()):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: k for k, w in enumerate(WORDS + list(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if pad_to:
        tok.enable_padding(length=pad_to, pad_id=0, pad_token="[PAD]")
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """model.onnx, its conversion model.lrp.onnx and tokenizer.json in one folder."""
    d = tmp_path_factory.mktemp("hostile_lm")
    onnx.save(tiny_lm(), d / "model.onnx")
    lrp_onnx.convert(d / "model.onnx", d / "model.lrp.onnx", rules="attnlrp")
    write_tokenizer(d / "tokenizer.json")
    return d


def tree(root):
    """Every path under root (symlinks not followed) with its content digest or link target."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            p = os.path.join(folder, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isfile(p):
                out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def run(capfd, *args):
    rc = cli.main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


def assert_fails(capfd, root, *args, code=2, words=(), allowed=()):
    """Run the CLI; exit `code`, one stderr line holding `words`, no traceback, nothing new under root
    but the `allowed` paths, every file there unchanged."""
    before = tree(root)
    rc, out, err = run(capfd, *args)
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    after = tree(root)
    assert {k: v for k, v in after.items() if k not in allowed} == before, (before, after)
    return lines[0]


# -- 1-2: external data and output paths -------------------------------------------------------------
def external_model(folder, location="weights.bin"):
    """tiny_lm saved with its weights in an external file at `location` (relative to folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(tiny_lm(), folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=256)  # small constants inline
    if location != "weights.bin":
        model = onnx.load(folder / "model.onnx", load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save(model, folder / "model.onnx")
    return folder / "model.onnx"


@pytest.mark.parametrize("location", ["../secret/evil.desktop", "ABSOLUTE", "sub/../../secret/evil.desktop"])
def test_external_location_outside_the_model_folder_is_refused(location, tmp_path, capfd):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "evil.desktop").write_bytes(b"not weights")
    if location == "ABSOLUTE":
        location = str(secret / "evil.desktop")
    model = external_model(tmp_path / "m", location)
    out_dir = tmp_path / "out" / "deep"
    out_dir.mkdir(parents=True)
    line = assert_fails(capfd, tmp_path, "convert", model, "-o", out_dir / "m.lrp.onnx",
                        words=["model.onnx", location, "outside"])
    assert "lrp-onnx: error:" in line


def test_symlinked_weights_leading_out_of_the_folder_are_refused(tmp_path, capfd):
    model = external_model(tmp_path / "m")
    elsewhere = tmp_path / "elsewhere.bin"
    os.rename(tmp_path / "m" / "weights.bin", elsewhere)
    os.symlink(elsewhere, tmp_path / "m" / "weights.bin")
    out = tmp_path / "out"
    out.mkdir()
    assert_fails(capfd, tmp_path, "convert", model, "-o", out / "m.lrp.onnx", words=["weights.bin", "outside"])
    # a symlink that stays inside the folder is fine: the real file is linked, not the symlink
    os.rename(elsewhere, tmp_path / "m" / "real.bin")
    os.unlink(tmp_path / "m" / "weights.bin")
    os.symlink("real.bin", tmp_path / "m" / "weights.bin")
    rc, _, err = run(capfd, "convert", model, "-o", out / "m.lrp.onnx")
    assert rc == 0, err
    assert not os.path.islink(out / "weights.bin") and filecmp.cmp(out / "weights.bin", tmp_path / "m" / "real.bin")
    assert os.stat(tmp_path / "m" / "real.bin").st_nlink == 1  # a copy, never a hard link


def test_weights_in_a_subfolder_are_placed_inside_the_output_folder(tmp_path, capfd):
    model = external_model(tmp_path / "m", "w/weights.bin")
    os.makedirs(tmp_path / "m" / "w")
    os.rename(tmp_path / "m" / "weights.bin", tmp_path / "m" / "w" / "weights.bin")
    out = tmp_path / "out"
    out.mkdir()
    before = tree(tmp_path / "m")
    rc, _, err = run(capfd, "convert", model, "-o", out / "m.lrp.onnx")
    assert rc == 0, err
    assert sorted(tree(out)) == ["m.lrp.onnx", "w", "w/weights.bin"] and tree(tmp_path / "m") == before
    explainer = lrp_onnx.Explainer(out / "m.lrp.onnx", providers=["CPUExecutionProvider"])
    result = explainer.run(input_ids=np.array([[2, 3, 4]]), attention_mask=np.ones((1, 3), np.int64))
    assert np.isfinite(result.relevance).all() and result.relevance.shape == (1, 3, H)


def test_output_that_is_the_input_is_refused(lm, tmp_path, capfd):
    model = tmp_path / "model.onnx"
    model.write_bytes((lm / "model.onnx").read_bytes())
    os.symlink(tmp_path, tmp_path / "link")
    assert_fails(capfd, tmp_path, "convert", model, "-o", model, words=["input file"])
    assert_fails(capfd, tmp_path, "convert", model, "-o", tmp_path / "link" / "model.onnx", words=["input file"])
    os.link(model, tmp_path / "hard.onnx")
    assert_fails(capfd, tmp_path, "convert", model, "-o", tmp_path / "hard.onnx", words=["input file"])


def test_output_that_is_a_weight_file_of_the_input_is_refused(tmp_path, capfd):
    model = external_model(tmp_path / "m")
    assert_fails(capfd, tmp_path, "convert", model, "-o", tmp_path / "m" / "weights.bin",
                 words=["weights.bin", "input file"])


def test_output_that_is_a_directory_or_in_a_missing_folder(lm, tmp_path, capfd):
    (tmp_path / "d").mkdir()
    assert_fails(capfd, tmp_path, "convert", lm / "model.onnx", "-o", tmp_path / "d", words=["directory"])
    assert_fails(capfd, tmp_path, "convert", lm / "model.onnx", "-o", tmp_path / "no" / "x.onnx",
                 words=["does not exist"])


def test_failed_write_leaves_no_linked_weights_and_no_temporary(tmp_path, capfd, monkeypatch):
    """A write that fails at the end (e.g. a read-only folder) leaves nothing in the output folder."""
    model = external_model(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()

    publish = files._Temporary.publish

    def refuse(self, path):  # the weights are placed, then the model's own write fails
        if path.endswith(".onnx"):
            raise PermissionError(13, "Permission denied", path)
        publish(self, path)

    monkeypatch.setattr(files._Temporary, "publish", refuse)
    assert_fails(capfd, tmp_path, "convert", model, "-o", out / "m.lrp.onnx", words=["m.lrp.onnx", "Permission"])
    assert os.listdir(out) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_honour_the_umask(lm, tmp_path, umask):
    old = os.umask(umask)
    try:
        lrp_onnx.convert(lm / "model.onnx", tmp_path / "m.lrp.onnx")
        files.write_atomically(tmp_path / "f.txt", b"x")
    finally:
        os.umask(old)
    for name in ("m.lrp.onnx", "f.txt"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("named", [False, True])
def test_sigterm_and_ctrl_c_remove_temporaries(lm, tmp_path, named):
    """The process is signalled while the output's temporary exists: one line, no temporary left
    (unnamed files where the file system has them; named ones, the fallback, are removed)."""
    code = f"""
import os, signal, sys, time
from lrp_onnx import cli
from lrp_onnx.ir import files
files._UNNAMED_FILES = {named} is False and files._UNNAMED_FILES
def stop(self, path):
    assert (self.path is None) == (not {named}) and (self.path is None or os.path.exists(self.path))
    if sys.argv[1] == "TERM":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    raise KeyboardInterrupt
files._Temporary.publish = stop
sys.exit(cli.main(["convert", {str(lm / 'model.onnx')!r}, "-o", {str(tmp_path / 'm.lrp.onnx')!r}]))
"""
    for which, expected in (("TERM", 143), ("INT", 130)):
        done = subprocess.run([sys.executable, "-c", code, which], capture_output=True, text=True, timeout=120,
                              cwd=os.path.dirname(os.path.dirname(__file__)))
        assert done.returncode == expected, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
        assert os.listdir(tmp_path) == []


def test_sigkill_leaves_no_temporary_or_the_next_run_sweeps_it(lm, tmp_path):
    """SIGKILL runs no handler. An unnamed temporary (O_TMPFILE) vanishes with the process; a named one
    (file systems without them) is removed by the next conversion into the same folder."""
    code = f"""
import os, signal, sys
from lrp_onnx import cli
from lrp_onnx.ir import files
files._UNNAMED_FILES = sys.argv[1] == "unnamed" and files._UNNAMED_FILES
write = files._Temporary.write
def killed(self, data):
    write(self, data)
    os.kill(os.getpid(), signal.SIGKILL)
files._Temporary.write = killed
cli.main(["convert", {str(lm / 'model.onnx')!r}, "-o", {str(tmp_path / 'm.lrp.onnx')!r}])
"""
    for kind in ("unnamed", "named"):
        child = subprocess.Popen([sys.executable, "-c", code, kind], stderr=subprocess.PIPE, text=True,
                                 cwd=os.path.dirname(os.path.dirname(__file__)))
        _, err = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL, err
        left = os.listdir(tmp_path)
        if kind == "unnamed" and files._UNNAMED_FILES:
            assert left == []
        else:
            assert len(left) == 1 and left[0].startswith(f".lrp-{child.pid}-") and left[0].endswith(".onnx"), left
    assert cli.main(["convert", str(lm / "model.onnx"), "-o", str(tmp_path / "m.lrp.onnx")]) == 0
    assert os.listdir(tmp_path) == ["m.lrp.onnx"]


def test_a_hard_link_left_by_an_earlier_version_is_replaced_by_a_copy(tmp_path, capfd):
    """Earlier versions hard-linked the weights beside the output; onnx.load refuses both files then. A
    new conversion into that folder gives the output its own copy, which mends the original too."""
    model = external_model(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    os.link(tmp_path / "m" / "weights.bin", out / "weights.bin")
    with pytest.raises(Exception, match="hard link"):
        onnx.load(model)
    rc, _, err = run(capfd, "convert", model, "-o", out / "m.lrp.onnx")
    assert rc == 0, err
    assert os.stat(out / "weights.bin").st_nlink == os.stat(tmp_path / "m" / "weights.bin").st_nlink == 1
    assert filecmp.cmp(out / "weights.bin", tmp_path / "m" / "weights.bin", shallow=False)
    onnx.load(model)
    onnx.load(out / "m.lrp.onnx")


def _float_indices(model):
    """input_ids declared float: the word-embedding Gather's indices are then float (invalid ONNX)."""
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    return "node 'embed' (ai.onnx::Gather): input 'input_ids' (indices) is tensor(float)"


def _huge_input(model):
    for d, v in zip(model.graph.input[0].type.tensor_type.shape.dim, (10 ** 12, 10 ** 12)):
        d.Clear()
        d.dim_value = v
    return "graph input 'input_ids' has shape [1000000000000, 1000000000000]"


def _huge_value_info(model):
    model.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [10 ** 12, 10 ** 12, H]))
    return "value_info 'h' has shape [1000000000000, 1000000000000"


def _initializer_without_data(model):
    w = next(t for t in model.graph.initializer if t.name == "w1")
    w.ClearField("raw_data")
    del w.dims[:]
    w.dims.extend([16, 10 ** 12])
    return "initializer 'w1' declares shape [16, 1000000000000] (16000000000000 elements) but holds 0"


def _external_data_too_short(model, folder):
    w = next(t for t in model.graph.initializer if t.name == "w1")
    data = w.raw_data
    (folder / "w1.bin").write_bytes(data[: len(data) // 2])
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="w1.bin")
    return f"initializer 'w1' declares [{H}, {H}] ({len(data)} bytes from offset 0) but its file w1.bin holds"


@pytest.mark.parametrize("damage", [_float_indices, _huge_input, _huge_value_info, _initializer_without_data,
                                    _external_data_too_short])
def test_models_onnxruntime_refuses_are_refused_with_the_reason(damage, tmp_path, capfd):
    """onnxruntime refuses these at load time (a type its schema forbids, shapes whose element count
    overflows int64 in the converted graph's shape computations, initializers without their data): refused
    here too, one line naming the tensor, exit 2, nothing written."""
    model = tiny_lm()
    (tmp_path / "m").mkdir()
    expected = damage(model, tmp_path / "m") if damage is _external_data_too_short else damage(model)
    onnx.save(model, tmp_path / "m" / "model.onnx")
    line = assert_fails(capfd, tmp_path, "convert", tmp_path / "m" / "model.onnx", "-o", tmp_path / "m" / "o.onnx")
    assert expected in line, line
    assert_fails(capfd, tmp_path, "inspect", tmp_path / "m" / "model.onnx", code=2, words=[expected])


# -- 3: explain and Explainer.run -------------------------------------------------------------------
@pytest.mark.parametrize("texts,words", [
    ([""], ["--text", "empty"]),
    (["the cat", "  "], ["--text #2", "empty"]),
    (["the cat \udcff"], ["--text", "UTF-8"]),
    (["the cat sat on a mat the dog"], ["input_ids", "8 tokens", "6 positions"]),
])
def test_explain_bad_texts(texts, words, lm, capfd):
    args = ["explain", lm / "model.lrp.onnx", "--tokenizer", lm / "tokenizer.json"]
    for t in texts:
        args += ["--text", t]
    assert_fails(capfd, lm, *args, words=words)


def test_explain_target_and_token_ids_out_of_range(lm, tmp_path, capfd):
    args = ["explain", lm / "model.lrp.onnx", "--tokenizer", lm / "tokenizer.json", "--text", "the cat sat"]
    assert_fails(capfd, lm, *args, "--target", "12", words=["target 12", "12 classes"])
    big = write_tokenizer(tmp_path / "big.json", extra_words=["zebra"])  # id 12: not in the model's table
    assert_fails(capfd, lm, "explain", lm / "model.lrp.onnx", "--tokenizer", big, "--text", "the zebra",
                 words=["input_ids", "id 12", "12 rows"])
    rc, out, err = run(capfd, *args, "--target", "11", "--json")
    assert rc == 0 and json.loads(out)[0]["target"] == 11, err


def test_position_out_of_range_is_refused_not_wrapped(lm):
    explainer = lrp_onnx.Explainer(lm / "model.lrp.onnx", providers=["CPUExecutionProvider"])
    ids = np.array([[2, 3, 4, 5, 6], [7, 8, 9, 10, 11]])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    good = explainer.run(position=[-5, 4], target=[3, 3], **feed)
    for position in ([-6, 4], [5, 4], [-11, 4]):
        with pytest.raises(lrp_onnx.LRPError, match=rf"position {position[0]} \(row 0\) is out of range \[-5, 4\]"):
            explainer.run(position=position, target=[3, 3], **feed)
        # fed directly (the C++ consumer): the row is flagged, nothing wrapped; the other row is unchanged
        raw = dict(zip(explainer.output_names, explainer.session.run(None, {
            **feed, "lrp_position": np.array(position), "lrp_target": np.array([3, 3])})))
        assert raw["lrp_selected_target"].tolist() == [-1, 3]
        assert np.isnan(raw["lrp_selected_logit"][0]) and np.isnan(raw["lrp_relevance"][0]).all()
        np.testing.assert_array_equal(raw["lrp_relevance"][1], good.relevance[1])
    raw = dict(zip(explainer.output_names, explainer.session.run(None, {
        **feed, "lrp_position": np.array([0, 0]), "lrp_target": np.array([3, 12])})))
    assert raw["lrp_selected_target"].tolist() == [3, -1] and np.isnan(raw["lrp_relevance"][1]).all()
    with pytest.raises(lrp_onnx.LRPError, match="input 'input_ids': id -1"):
        explainer.run(input_ids=np.array([[2, -1]]), attention_mask=np.ones((1, 2), np.int64))


def test_non_finite_outputs_are_not_explained(tmp_path, capfd):
    onnx.save(tiny_lm(nan_head=True), tmp_path / "nan.onnx")
    lrp_onnx.convert(tmp_path / "nan.onnx", tmp_path / "nan.lrp.onnx")
    write_tokenizer(tmp_path / "tok.json")
    assert_fails(capfd, tmp_path, "explain", tmp_path / "nan.lrp.onnx", "--tokenizer", tmp_path / "tok.json",
                 "--text", "the cat", words=["logits", "not finite"])


def test_padding_tokenizer_explains_the_last_real_token(lm, tmp_path, capfd):
    padded = write_tokenizer(tmp_path / "padded.json", pad_to=6)
    common = ["explain", lm / "model.lrp.onnx", "--text", "the cat sat", "--json"]
    rc, out, err = run(capfd, *common, "--tokenizer", padded)
    assert rc == 0, err
    rc, plain_out, err = run(capfd, *common, "--tokenizer", lm / "tokenizer.json")
    assert rc == 0, err
    got, want = json.loads(out)[0], json.loads(plain_out)[0]
    assert [t["token"] for t in got["tokens"]] == ["the", "cat", "sat"]
    assert got == want
    explainer = lrp_onnx.Explainer(lm / "model.lrp.onnx", providers=["CPUExecutionProvider"])
    ids = np.array([[2, 3, 4]])
    direct = explainer.run(input_ids=ids, attention_mask=np.ones_like(ids))  # last token, argmax
    assert got["target"] == int(direct.target[0])
    np.testing.assert_allclose([t["relevance"] for t in got["tokens"]], direct.token_relevance()[0], rtol=1e-6)


def test_target_of_a_hidden_state_is_not_decoded_as_a_token(tmp_path, capfd):
    onnx.save(tiny_lm(head_rows=5), tmp_path / "h.onnx")  # 5 output dims: not the 12-word vocabulary
    lrp_onnx.convert(tmp_path / "h.onnx", tmp_path / "h.lrp.onnx")
    write_tokenizer(tmp_path / "tok.json")
    rc, out, err = run(capfd, "explain", tmp_path / "h.lrp.onnx", "--tokenizer", tmp_path / "tok.json",
                       "--text", "the cat", "--target", "3", "--json")
    assert rc == 0, err
    assert json.loads(out)[0]["target_label"] == 3  # the index, not WORDS[3]
    rc, out, err = run(capfd, "explain", lm_path := tmp_path / "h.lrp.onnx", "--tokenizer", tmp_path / "tok.json",
                       "--text", "the cat", "--target-token", "cat")
    assert rc == 2 and "not a vocabulary" in err and lm_path.exists()


# -- 4: overrides and rule maps ---------------------------------------------------------------------
def test_override_that_cannot_apply_is_refused(lm, tmp_path, capfd):
    assert_fails(capfd, tmp_path, "convert", lm / "model.onnx", "-o", tmp_path / "o.onnx",
                 "--override", "proj=identity", words=["'proj'", "MatMul", "identity"])


@pytest.mark.parametrize("key", ["Sofmax", "no_such_node*"])
def test_override_matching_nothing_warns_or_with_strict_fails(key, lm, tmp_path, capfd):
    out = tmp_path / "o.onnx"
    rc, _, err = run(capfd, "convert", lm / "model.onnx", "-o", out, "--override", f"{key}=constant")
    assert rc == 0 and err.strip().splitlines() == [err.strip()] and "warning" in err and key in err, err
    out.unlink()
    assert_fails(capfd, tmp_path, "convert", lm / "model.onnx", "-o", out, "--override", f"{key}=constant",
                 "--strict", words=[key, "matches no"])
    rc, _, err = run(capfd, "convert", lm / "model.onnx", "-o", out, "--override", "Tanh=gradient", "--strict")
    assert rc == 0 and err == "", err


@pytest.mark.parametrize("content,words", [
    (b"Softmax: constant\n\xff\xfe\n", ["rules.yaml", "not UTF-8"]),
    (b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
     ["rules.yaml", "aliases"]),
    (b"Softmax: constant\n" + b"#" * (2 << 20), ["rules.yaml", "larger"]),
    (b"Softmax: {rule: constant}\n", ["rules.yaml", "Softmax"]),
])
def test_bad_rule_maps(content, words, lm, tmp_path, capfd):
    rules = tmp_path / "rules.yaml"
    rules.write_bytes(content)
    assert_fails(capfd, tmp_path, "inspect", lm / "model.onnx", "--rule-map", rules, words=words)


# -- 5, 7: broken graphs, evaluate, the error boundary ----------------------------------------------
def _broken(kind):
    model = tiny_lm(position_table=False)
    g = model.graph
    if kind == "no outputs":
        del g.output[:]
    elif kind == "dangling":
        g.node[-1].input[0] = "nowhere"
    elif kind == "duplicate":
        g.node[-2].output[0] = "logits"
    elif kind == "cycle":
        g.node[-3].input[0] = "a"  # proj reads act's output, act reads proj's
    return model


@pytest.mark.parametrize("kind,words", [("no outputs", ["no outputs"]), ("dangling", ["'lm_head'", "nowhere", "dangling"]),
                                        ("duplicate", ["'logits'", "produced twice"]),
                                        ("cycle", ["cycle", "'proj'", "'act'"])])
def test_broken_graphs_are_named(kind, words, tmp_path, capfd):
    onnx.save(_broken(kind), tmp_path / "broken.onnx")
    for command in (["convert", tmp_path / "broken.onnx", "-o", tmp_path / "o.onnx"],
                    ["inspect", tmp_path / "broken.onnx"]):
        assert_fails(capfd, tmp_path, *command, words=["broken.onnx"] + words)


def test_evaluate_refuses_before_any_work(lm, tmp_path, capfd, monkeypatch):
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat\n")
    common = ["evaluate", lm / "model.onnx", "--tokenizer", lm / "tokenizer.json", "--quiet"]
    (tmp_path / "file").write_text("x")
    assert_fails(capfd, tmp_path, *common, "--texts", texts, "--out", tmp_path / "file", words=["--out", "not a directory"])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"the cat \xff\n")
    assert_fails(capfd, tmp_path, *common, "--texts", bad, "--out", tmp_path / "res", words=["bad.txt", "UTF-8"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert_fails(capfd, tmp_path, *common, "--texts", texts, "--out", tmp_path / "res", words=["matplotlib"])


def test_unexpected_errors_exit_1_with_the_traceback_only_under_debug(lm, tmp_path, capfd, monkeypatch):
    import lrp_onnx.pipeline

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(lrp_onnx.pipeline, "convert", boom)
    args = ["convert", lm / "model.onnx", "-o", tmp_path / "o.onnx"]
    assert_fails(capfd, tmp_path, *args, code=1, words=["internal error", "ZeroDivisionError", "--debug"])
    with pytest.raises(ZeroDivisionError):
        cli.main([str(a) for a in args] + ["--debug"])


def test_a_node_the_opset_does_not_define_is_refused_before_writing():
    """The check converted graphs pass before they are written (validate.check_emitted): a node written by
    the conversion with an attribute its opset lacks (ScatterElements' reduction before opset 16) is an
    error naming it; the input model's own nodes are not re-judged."""
    import onnx
    from onnx import TensorProto, helper

    from lrp_onnx.ir.validate import check_emitted

    node = helper.make_node("ScatterElements", ["a", "i", "u"], ["y"], name="lrp/scatter", reduction="add")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, [2]) for k in "aiu"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    for opset, refused in ((13, True), (16, False)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        if refused:
            with pytest.raises(lrp_onnx.LRPError, match="not valid ONNX at 'lrp/scatter' .*Unrecognized attribute: reduction"):
                check_emitted(model, set())
            check_emitted(model, {"lrp/scatter"})  # a node of the input model: onnxruntime's to judge
        else:
            check_emitted(model, set())
