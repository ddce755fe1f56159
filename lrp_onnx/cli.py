"""The `lrp-onnx` command: convert, inspect, audit, explain, explain-dataset, evaluate (the benchmark is
`python -m tools.bench` from a source checkout: it needs torch, LXT and models/, which the package
does not ship)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .errors import first_line, LRPError
from .lrp.rules import RULE_SETS, RuleError, check_rule_name
from .run.text import load_tokenizer  # noqa: F401 (lrp_onnx.cli.load_tokenizer, as before)


RULE_MAP_MAX_BYTES = 1 << 20  # a rule map is a handful of lines; refuse anything near this size
RULE_MAP_MAX_ENTRIES = 10000


def read_text_file(path, what: str, max_bytes: int | None = None) -> str:
    """A UTF-8 text file, refused with one line naming it when missing, too big or not UTF-8."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LRPError(f"{path}: no such {what} file")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1 if max_bytes else -1)
    if max_bytes and len(data) > max_bytes:
        raise LRPError(f"{path}: the {what} file is larger than {max_bytes} bytes; refused")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LRPError(f"{path}: the {what} file is not UTF-8 text (byte {exc.start})") from None


def _load_yaml(text: str, path: str):
    try:
        import yaml
    except ImportError:
        raise LRPError(f"{path}: not JSON, and PyYAML is not installed to read YAML") from None

    class NoAliasLoader(yaml.SafeLoader):
        """yaml's safe loader without aliases (*name): a few KB of nested aliases expand to gigabytes."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.events.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "aliases are not allowed in a rule map",
                                                  event.start_mark)
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        detail = "YAML aliases (*name) are not allowed" if "aliases" in str(exc) else exc.__class__.__name__
        raise LRPError(f"{path}: not a JSON or YAML mapping ({detail})") from None


def _rule_overrides(args) -> dict | None:
    """Rule overrides from --rule-map FILE (JSON or YAML mapping) and --override KEY=RULE."""
    mapping = {}
    if getattr(args, "rule_map", None):
        path = args.rule_map
        text = read_text_file(path, "rule-map", RULE_MAP_MAX_BYTES)
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            loaded = _load_yaml(text, path)
        except RecursionError:
            raise LRPError(f"{path}: nested too deeply") from None
        if not isinstance(loaded, dict):
            raise LRPError(f"{path}: must hold a mapping of op type / category / node-name pattern to rule")
        if len(loaded) > RULE_MAP_MAX_ENTRIES:
            raise LRPError(f"{path}: more than {RULE_MAP_MAX_ENTRIES} entries; refused")
        for k, v in loaded.items():
            if not isinstance(k, (str, int, float)) or not isinstance(v, str):
                raise LRPError(f"{path}: entry {str(k)[:60]!r}: expected 'KEY: RULE' with a rule name, "
                               f"got {type(v).__name__}")
        mapping.update({str(k): v for k, v in loaded.items()})
    for item in getattr(args, "override", None) or []:
        if "=" not in item:
            raise LRPError(f"--override '{item}': expected KEY=RULE, e.g. Softmax=constant")
        key, value = item.split("=", 1)
        mapping[key] = value
    for key, value in mapping.items():
        try:
            check_rule_name(value, f"override '{key}={value}'")
        except RuleError as exc:
            raise LRPError(str(exc)) from None
    return mapping or None


def _add_analysis_options(p):
    p.add_argument("model", help="the exported ONNX model")
    p.add_argument("--rules", default="attnlrp", choices=sorted(RULE_SETS), help="rule set (default attnlrp)")
    p.add_argument("--source", action="append", help="tensor whose relevance is computed (default: the "
                   "word-embedding lookup output, or the float inputs); repeatable")
    p.add_argument("--output", help="graph output to explain (default: the first)")
    p.add_argument("--rule-map", help="JSON/YAML file mapping op type, category or node-name pattern to a rule")
    p.add_argument("--override", action="append", metavar="KEY=RULE", help="one rule override; repeatable")
    p.add_argument("--strict", action="store_true",
                   help="refuse overrides that match no op type, category or node (default: a warning)")


def _add_conversion_options(p):
    p.add_argument("--latent", action="append", help="also output the relevance of this tensor; repeatable")
    p.add_argument("--seed-input", action="store_true",
                   help="replace lrp_target/lrp_position by a float input lrp_seed of the output's shape")
    p.add_argument("--relevance-only", action="store_true",
                   help="drop the original outputs; run the LM head at the explained position only (faster)")
    p.add_argument("--multi-target", action="store_true",
                   help="several targets per row in one forward pass: lrp_target/lrp_position take [batch, K] "
                        "and relevance gets a target axis [batch, K, ...] (explain --generate uses it)")


def cmd_convert(args) -> int:
    from .ir.files import check_output_file
    from .pipeline import convert

    check_output_file(args.o, inputs=[args.model])  # before any work (the weight files: in convert)
    convert(args.model, args.o, rules=args.rules, source=args.source, output=args.output,
            latent=args.latent or (), seed_input=args.seed_input, overrides=_rule_overrides(args),
            relevance_only=args.relevance_only, multi_target=args.multi_target, memory=args.memory,
            inputs=args.inputs, forward=args.forward)
    print(f"wrote {args.o}")
    return 0


def cmd_inspect(args) -> int:
    from .check.report import inspect_model

    report = inspect_model(args.model, rules=args.rules, source=args.source, output=args.output,
                           overrides=_rule_overrides(args), latent=args.latent or (), seed_input=args.seed_input,
                           relevance_only=args.relevance_only, multi_target=args.multi_target)
    print(report.format())
    return 0 if report.supported else 1


def cmd_audit(args) -> int:
    from .check.conservation import audit, parse_feed_args

    dims = {}
    for item in args.dim or []:
        name, _, size = item.partition("=")
        if not size.isdigit() or int(size) < 1:
            raise LRPError(f"--dim '{item}': expected NAME=SIZE with a positive integer size")
        dims[name] = int(size)
    report = audit(args.model, rules=args.rules, feeds=parse_feed_args(args.feed), overrides=_rule_overrides(args),
                   source=args.source, output=args.output, seed=args.seed, rtol=args.rtol, dims=dims)
    print(report.to_json() if args.json else report.format())
    return 1 if report.flagged else 0


def _tokenize(tokenizer_path: str, texts: list[str]):
    tok = load_tokenizer(tokenizer_path)
    encodings = []
    for k, text in enumerate(texts):
        what = "--text" if len(texts) == 1 else f"--text #{k + 1}"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes on the command line arrive as lone surrogates
            raise LRPError(f"{what} is not valid UTF-8 text") from None
        if not text.strip():
            raise LRPError(f"{what} is empty: nothing to explain")
        e = tok.encode(text)
        if not e.ids or not any(e.attention_mask):
            raise LRPError(f"{what} {text[:40]!r} gives no tokens")
        encodings.append(e)
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(texts), length), dtype=np.int64)
    mask = np.zeros((len(texts), length), dtype=np.int64)
    for row, e in enumerate(encodings):
        ids[row, :len(e.ids)] = e.ids
        mask[row, :len(e.ids)] = e.attention_mask  # the encoding's own mask: 0 on any pad it still holds
    return tok, encodings, ids, mask


def _image_feed(explainer, args):
    """pixel_values [1, C, H, W] from an image file: RGB, resized to the model's input size, scaled to
    0..1 and normalized by --mean/--std."""
    try:
        from PIL import Image
    except ImportError:
        raise LRPError("explain --image needs Pillow: pip install pillow") from None
    floats = [i for i in explainer.session.get_inputs() if i.type in ("tensor(float)", "tensor(float16)")
              and not i.name.startswith("lrp_")]
    if len(floats) != 1 or len(floats[0].shape) != 4:
        raise LRPError(f"{args.model}: --image needs a model with one float input [batch, channels, height, "
                       f"width]; its inputs are {', '.join(i.name for i in explainer.session.get_inputs())}")
    pixel_input = floats[0]
    _, channels, height, width = pixel_input.shape
    if args.image_size:
        height = width = args.image_size
    if not all(isinstance(d, int) for d in (channels, height, width)):
        raise LRPError(f"{args.model}: input '{pixel_input.name}' has dynamic size; give --image-size")
    if not os.path.isfile(args.image):
        raise LRPError(f"{args.image}: no such image file")
    try:
        image = Image.open(args.image).convert("RGB" if channels == 3 else "L").resize((width, height))
    except Exception as exc:
        raise LRPError(f"{args.image}: not a readable image ({exc.__class__.__name__})") from None
    pixels = np.asarray(image, np.float32).reshape(height, width, channels).transpose(2, 0, 1) / 255.0
    mean = np.asarray([float(v) for v in args.mean.split(",")], np.float32).reshape(-1, 1, 1)
    std = np.asarray([float(v) for v in args.std.split(",")], np.float32).reshape(-1, 1, 1)
    dtype = np.float16 if pixel_input.type == "tensor(float16)" else np.float32
    return {pixel_input.name: ((pixels - mean) / std)[None].astype(dtype)}


def _is_vocabulary(explainer, result, tok) -> bool:
    """Whether the explained output's last axis is a vocabulary (its size is the tokenizer's, or the
    embedding table's), so that a target is a token: not for a hidden state or an embedding."""
    meta = explainer.meta
    scores = result.outputs.get(meta.get("explained_output"))
    if scores is None:
        scores = result.outputs.get("lrp_logits_at_position")
    if scores is None:
        return False
    size = np.shape(scores)[-1]
    rows = ((meta.get("input_limits") or {}).get("inputs") or {}).get("input_ids")
    return size in (tok.get_vocab_size(with_added_tokens=True), tok.get_vocab_size(with_added_tokens=False), rows)


def cmd_explain(args) -> int:
    from .ir.files import check_output_file
    from .run.runner import Explainer, text_inputs
    from .run.text import token_texts, unit_pieces, word_relevance
    from .run.session import unfed_inputs

    if (args.image is None) == (args.text is None):
        raise LRPError("explain needs either --text (with --tokenizer) or --image")
    if args.text is not None and args.tokenizer is None:
        raise LRPError("explain --text needs --tokenizer tokenizer.json")
    for path in (args.html, args.png):
        if path:
            check_output_file(path, inputs=[args.model, args.tokenizer])
    if args.words and args.text is None:
        raise LRPError("--words sums relevance over the words of a --text")
    if args.generate is not None and (args.image is not None or len(args.text) != 1):
        raise LRPError("--generate explains one prompt: give one --text")
    if args.decoder is not None and args.generate is None:
        raise LRPError("--decoder decodes for --generate: give --generate N")
    if args.decoder is not None and not os.path.isfile(args.decoder):
        raise LRPError(f"--decoder {args.decoder}: no such file")
    if args.generate is not None and (args.target is not None or args.target_token is not None):
        raise LRPError("--generate explains the generated tokens: --target/--target-token do not apply")
    explainer = Explainer(args.model)
    if args.image is not None:
        return _explain_image(explainer, args)
    if args.generate is not None:
        return _explain_generation(explainer, args)
    tok, encodings, ids, mask = _tokenize(args.tokenizer, args.text)
    feed = text_inputs(explainer.input_names, ids, mask)
    missing = unfed_inputs(explainer.session, feed)
    if missing:
        raise LRPError(f"{args.model}: cannot feed input(s) {', '.join(missing)} from text")
    has_position = "lrp_position" in explainer.input_names
    position = (mask.sum(axis=1) - 1) if has_position else None  # the last real token of each row
    target = None
    if args.target_token is not None:
        target = [tok.token_to_id(args.target_token)]
        if target[0] is None:  # the text a person reads, ' Paris', where it is one token
            ids_of_text = tok.encode(args.target_token, add_special_tokens=False).ids
            target = [ids_of_text[0] if len(ids_of_text) == 1 else None]
        if target[0] is None:
            raise LRPError(f"--target-token {args.target_token!r} is neither a token of the tokenizer's vocabulary "
                           f"nor a text that it encodes as one token")
    elif args.target is not None:
        target = [args.target]
    result = explainer.run(target=target, position=position, **feed)
    vocabulary = has_position and _is_vocabulary(explainer, result, tok)  # else a class or a dimension
    if args.target_token is not None and not vocabulary:
        raise LRPError(f"--target-token: the explained output '{explainer.meta.get('explained_output')}' is "
                       f"not a vocabulary; give --target N")
    per_token = result.token_relevance()
    report, units = [], []
    for row, e in enumerate(encodings):
        n = int(mask[row].sum())
        target_id = int(result.target[row]) if result.target is not None else None
        values = per_token[row, :n]
        texts = token_texts(tok, e.ids[:n])
        entry = {"text": args.text[row], "target": target_id,
                 "target_label": tok.id_to_token(target_id) if vocabulary and target_id is not None else target_id,
                 "target_text": token_texts(tok, [target_id])[0] if vocabulary and target_id is not None else None,
                 "logit": float(result.logit[row]) if result.logit is not None else None,
                 "relevance_sum": float(values.sum()),
                 "tokens": [{"token": t, "text": x, "relevance": float(v)}
                            for t, x, v in zip(e.tokens[:n], texts, values)]}
        if args.words:
            units.append(word_relevance(e, values, args.text[row], tokenizer=tok))
            entry["words"] = units[-1].to_list()
        report.append(entry)
    if args.html or args.png:
        from .run.heatmap import token_pieces, write_tokens_html, write_tokens_png

        def label(r):  # a vocabulary token as a person reads it (' Paris'), else the class index
            return repr(r["target_text"]) if r["target_text"] is not None else r["target"]

        rows = [{"pieces": unit_pieces(text, units[k]) if args.words else token_pieces(text, e.offsets, e.tokens),
                 "relevance": units[k].relevance if args.words else per_token[k, :len(e.tokens)],
                 "title": f"explained: {label(r)} (logit {r['logit']:.3f}), "
                          f"sum of relevance {r['relevance_sum']:.3f}" + (", per word" if args.words else "")}
                for k, (text, e, r) in enumerate(zip(args.text, encodings, report))]
        if args.html:
            write_tokens_html(rows, args.html)
        if args.png:
            write_tokens_png(rows, args.png)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for r in report:
        print(f"text: {r['text']!r}")
        logit = f"{r['logit']:.4f}" if r["logit"] is not None else "n/a"
        shown = f"{r['target']} ({r['target_text']!r})" if r["target_text"] is not None else f"{r['target']}"
        print(f"explained: target {shown}, logit {logit}, sum of relevance {r['relevance_sum']:.4f}")
        items = [(w["word"], w["relevance"]) for w in r["words"]] if args.words else \
            [(t["text"], t["relevance"]) for t in r["tokens"]]
        peak = max(abs(v) for _, v in items) or 1.0
        for text, value in items:
            bar = ("+" if value >= 0 else "-") * int(round(20 * abs(value) / peak))
            print(f"  {text!r:>20} {value:+.4f} {bar}")
    return 0


def _explain_generation(explainer, args) -> int:
    """explain --generate N: decode N tokens greedily from the --text prompt and explain each of them."""
    from .run.generation import write_generation_html, write_generation_png

    if args.generate < 1:
        raise LRPError(f"--generate {args.generate}: give a positive number of tokens")
    tok, encodings, ids, mask = _tokenize(args.tokenizer, args.text)
    g = explainer.explain_generation(ids[0], max_new_tokens=args.generate, tokenizer=tok, decoder=args.decoder)
    title = f"prompt: {args.text[0]!r}; generated: {g.text!r}"
    if args.html:
        write_generation_html(g, args.html, title, words=args.words)
    if args.png:
        write_generation_png(g, args.png, words=args.words)
    words = g.word_relevance() if args.words else None
    if args.json:
        extra = {"words": {"words": words.words, "spans": words.spans, "tokens": words.tokens, "special": words.special,
                           "relevance": [[float(v) for v in row] for row in words.relevance]}} if words else {}
        print(json.dumps({"prompt": args.text[0], **g.to_dict(), **extra}, indent=1))
        return 0
    print(f"prompt: {args.text[0]!r}")
    print(f"generated: {g.text!r}" + (" (stopped at an end token)" if g.stopped else ""))
    p = len(g.prompt_ids)
    for i, token in enumerate(g.generated_ids):
        if words:  # the words before this token (a word it ends sums the tokens generated so far)
            count = sum(1 for ks in words.tokens if ks[0] < p + i)
            labels, row = words.words[:count], words.relevance[i, :count]
        else:
            labels, row = g.tokens[:p + i], g.relevance[i, :p + i]
        top = np.argsort(-np.abs(row))[:3]
        best = ", ".join(f"{labels[j]!r} {row[j]:+.3f}" for j in top)
        print(f"  {g.tokens[p + i]!r:>16} logit {g.logits[i]:8.3f}  sum {row.sum():+.3f}  top: {best}")
    return 0


def cmd_evaluate(args) -> int:
    from .check.faithfulness import METHODS, evaluate, evaluate_images

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(METHODS)
    # before any work: where the results go, what writing them needs, and the texts
    out = os.path.abspath(args.out)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise LRPError(f"{args.out}: --out exists and is not a directory")
    parent = out if os.path.isdir(out) else os.path.dirname(out)
    if not os.path.isdir(parent):
        raise LRPError(f"{args.out}: the folder above --out does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LRPError(f"{args.out}: not writable")
    try:
        import matplotlib  # noqa: F401 (curves.png)
    except ImportError:
        raise LRPError("evaluate writes curves.png and needs matplotlib: pip install matplotlib "
                       "(or pip install lrp-onnx[eval]); nothing was written") from None
    if args.images is not None:
        if args.texts is not None or args.tokenizer is not None:
            raise LRPError("--images evaluates an image classifier: give --images or --texts/--tokenizer, not both")
        result = evaluate_images(args.model, args.images, methods=methods, workdir=args.workdir, output=args.output,
                                 patch=args.patch, image_size=args.image_size, mean=_floats(args.mean, "--mean"),
                                 std=_floats(args.std, "--std"), limit=args.limit, ig_steps=args.ig_steps,
                                 batch_size=args.batch_size, progress=not args.quiet, score=args.score)
    else:
        if args.texts is None or args.tokenizer is None:
            raise LRPError("evaluate needs --texts and --tokenizer (or --images for an image classifier)")
        if not isinstance(args.texts, list):
            read_text_file(args.texts, "text")
        result = evaluate(args.model, args.tokenizer, args.texts, task=args.task, methods=methods,
                          workdir=args.workdir, output=args.output, source=args.source, limit=args.limit,
                          ig_steps=args.ig_steps, batch_size=args.batch_size, progress=not args.quiet,
                          both_ways=args.both_ways, score=args.score, target_column=args.target_column,
                          labels=[v.strip() for v in args.labels.split(",")] if args.labels else None)
    written = result.write(args.out, title=args.title)
    print(f"{'method':<10} {'ABPC':>9} {'std':>8} {'sem':>8}   n={len(result.examples)} ({result.task})")
    for m, r in result.methods.items():
        s = r.summary()
        print(f"{m:<10} {s['abpc_mean']:>9.4f} {s['abpc_std']:>8.4f} {s['abpc_sem']:>8.4f}")
    print("wrote " + ", ".join(written))
    return 0


def cmd_explain_dataset(args) -> int:
    from .run.dataset import explain_dataset

    from .ir.files import Terminated

    try:
        result = explain_dataset(args.model, args.tokenizer, args.input, args.out, text_column=args.text_column,
                                 id_column=args.id_column, target_column=args.target_column,
                                 position_column=args.position_column, batch_size=args.batch_size,
                                 max_length=args.max_length, limit=args.limit, full=args.full,
                                 shard_rows=args.shard_rows, workers=args.workers, threads=args.threads, ray=args.ray,
                                 restart=args.restart, progress=not args.quiet, generate=args.generate)
    except (KeyboardInterrupt, Terminated):
        if os.path.isdir(args.out + ".shards"):
            print(f"lrp-onnx: the finished shards are kept in {args.out}.shards/; rerun the same command to resume",
                  file=sys.stderr)
        raise
    resumed = f", {result.resumed_shards} of {result.shards} shards resumed" if result.resumed_shards else ""
    print(f"wrote {result.path}: {result.rows} rows, {result.errors} with an error (see its 'error' column)"
          f"{resumed}; {result.rows_per_second:.1f} rows/s")
    return 0


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise LRPError(f"{what} takes comma-separated numbers, not {text!r}") from None


def _explain_image(explainer, args) -> int:
    feed = _image_feed(explainer, args)
    result = explainer.run(target=[args.target] if args.target is not None else None, **feed)
    pixels = next(iter(feed.values()))[0]
    relevance = result.relevance[0]
    if args.png:
        from .run.heatmap import write_image_overlay_png

        write_image_overlay_png(pixels, relevance, args.png)
    summary = {"image": args.image, "target": int(result.target[0]) if result.target is not None else None,
               "logit": float(result.logit[0]) if result.logit is not None else None,
               "relevance_sum": float(relevance.sum())}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"image: {args.image}\nexplained: target {summary['target']}, logit {summary['logit']:.4f}, "
              f"sum of relevance {summary['relevance_sum']:.4f}" + (f"\nwrote {args.png}" if args.png else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrp-onnx", description="AttnLRP attributions inside ONNX graphs",
                                     epilog="--debug (anywhere): show the traceback of an internal error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="write a model that also outputs relevance")
    _add_analysis_options(p)
    p.add_argument("-o", required=True, metavar="OUT", help="where to write the converted model")
    _add_conversion_options(p)
    p.add_argument("--memory", choices=["fast", "lean"], default="fast",
                   help="lean: the backward recomputes each attention's scores and probabilities from Q and K "
                        "instead of keeping every layer's [heads, L, L] tensors (less memory at long inputs)")
    p.add_argument("--inputs", choices=["plain", "optional"], default="plain",
                   help="lrp_target/lrp_position as plain int64 inputs, fed -1 for the default (default; every "
                        "runtime: onnxruntime, OpenVINO, TensorRT), or optional(tensor(int64)) inputs that "
                        "onnxruntime's core may omit (not OpenVINO)")
    p.add_argument("--forward", choices=["fused", "written"], default="fused",
                   help="fused (default): the forward keeps onnxruntime's fused attention kernels, so the original "
                        "outputs are the original model's bit for bit; written: standard ops only (the backward "
                        "always differentiates the written-out form)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("inspect", help="show the rule of every unit on the relevance path; exits non-zero "
                       "exactly when `convert` with the same options would refuse")
    _add_analysis_options(p)
    _add_conversion_options(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("audit", help="run the model and check, unit by unit, that the rules conserve relevance "
                       "where they should (exit 1 when a unit is flagged)")
    _add_analysis_options(p)
    p.add_argument("--feed", action="append", metavar="NAME=FILE.npy",
                   help="an input's value (default: random ids in the embedding table, masks of ones, N(0,1) floats)")
    p.add_argument("--dim", action="append", metavar="NAME=SIZE",
                   help="size of a symbolic input dimension for the random feeds (default 2 on axis 0, else 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random feeds (default 0)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="tolerance relative to the unit's relevance mass sum(|R_in|)+sum(|R_out|) (default 1e-4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("explain", help="relevance per token of a text, from a converted model")
    p.add_argument("model", help="a model written by `lrp-onnx convert`")
    p.add_argument("--tokenizer", help="tokenizer.json (Hugging Face tokenizers format), for --text")
    p.add_argument("--text", action="append", help="text to explain; repeat for a batch")
    p.add_argument("--image", help="image file to explain (a model with a pixel input [1, C, H, W])")
    p.add_argument("--image-size", type=int, help="resize the image to this square size (default: the "
                   "model's input size)")
    p.add_argument("--mean", default="0.5,0.5,0.5", help="per-channel mean for --image (default 0.5,0.5,0.5)")
    p.add_argument("--std", default="0.5,0.5,0.5", help="per-channel std for --image (default 0.5,0.5,0.5)")
    p.add_argument("--html", metavar="FILE", help="write a token heatmap as HTML (red +, blue -)")
    p.add_argument("--png", metavar="FILE", help="write the heatmap as PNG (tokens, or an image overlay)")
    p.add_argument("--target", type=int, help="class / vocabulary index to explain (default: the argmax)")
    p.add_argument("--target-token", help="token to explain: as the vocabulary writes it ('ĠParis', '▁Paris') "
                   "or as it reads (' Paris'), where that is one token")
    p.add_argument("--generate", type=int, metavar="N",
                   help="generate N tokens greedily from the --text prompt (stopping at an end token) and "
                        "explain each; --html/--png draw the matrix (rows: generated tokens). One run of a "
                        "model converted with --multi-target")
    p.add_argument("--decoder", metavar="MODEL",
                   help="with --generate: decode with this ONNX model (the original export; a KV-cache export "
                        "decodes with its cache, one token a step) instead of the converted model's forward")
    p.add_argument("--words", action="store_true",
                   help="relevance per word (whitespace-separated, summed over its tokens) in the table, "
                        "--html/--png and --json (which keeps the tokens too); with --generate the columns")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("evaluate", help="faithfulness: MoRF/LeRF perturbation curves and ABPC per method")
    p.add_argument("model", help="the exported ONNX model (not converted: each method is converted here)")
    p.add_argument("--tokenizer", help="tokenizer.json (Hugging Face tokenizers format); text models")
    p.add_argument("--texts", help="text file: one text per line, or text<TAB>reference (similarity), or "
                   "TAB-separated columns (classification with --target-column)")
    p.add_argument("--task", choices=["next-token", "similarity", "classification"], default="next-token",
                   help="next-token: the LM's argmax next token after the text minus its last word; "
                        "similarity: the embedding's dot product with the reference's; classification: "
                        "the [batch, classes] logit of the predicted class (default next-token)")
    p.add_argument("--target-column", type=int, metavar="N",
                   help="classification: explain the label in column N (>= 2) of each --texts line, a class "
                        "index or a --labels name (default: the predicted class)")
    p.add_argument("--labels", help="classification: the class names in index order, comma-separated")
    p.add_argument("--images", metavar="DIR", help="evaluate an image classifier on the image files of DIR: "
                   "patches removed (set to 0, the normalised mean) by their summed relevance")
    p.add_argument("--patch", type=int, default=16, help="--images: patch side in pixels (default 16)")
    p.add_argument("--image-size", type=int, help="--images: resize to this square size (default: the "
                   "model's input size)")
    p.add_argument("--mean", default="0.5,0.5,0.5", help="--images: per-channel mean (default 0.5,0.5,0.5)")
    p.add_argument("--std", default="0.5,0.5,0.5", help="--images: per-channel std (default 0.5,0.5,0.5)")
    p.add_argument("--methods", help="comma-separated subset of attnlrp,cp-lrp,gradient,ig,random (default all)")
    p.add_argument("--limit", type=int, help="use the first N texts")
    p.add_argument("--score", choices=["logit", "logprob", "dot"],
                   help="what the curves track: the explained logit (default) or its logprob "
                        "(next-token, classification, images); similarity: dot")
    p.add_argument("--both-ways", action="store_true",
                   help="similarity: explain each text<TAB>reference line both ways round")
    p.add_argument("--ig-steps", type=int, default=16, help="Integrated Gradients steps (default 16)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per perturbed forward run (default 64)")
    p.add_argument("--output", help="graph output to explain (default: the first)")
    p.add_argument("--source", help="tensor whose tokens are removed (default: the word-embedding lookup)")
    p.add_argument("--workdir", help="keep the generated graphs here (default: a temporary directory)")
    p.add_argument("--out", required=True, help="directory for results.json, abpc.csv, curves.csv, curves.png")
    p.add_argument("--title", help="title of the plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("explain-dataset", help="relevance per token of every row of a JSONL/CSV/Parquet file, "
                       "written to Parquet in shards (resumable); locally or on a Ray cluster (--ray)")
    p.add_argument("model", help="a model written by `lrp-onnx convert`")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (Hugging Face tokenizers format)")
    p.add_argument("--input", required=True, help="the dataset: .jsonl, .csv, .tsv or .parquet")
    p.add_argument("--out", required=True, help="the Parquet file to write (shards go to OUT.shards/ meanwhile)")
    p.add_argument("--text-column", default="text", help="column holding the text (default 'text')")
    p.add_argument("--id-column", help="column copied to the output to identify rows (default 'id' when present)")
    p.add_argument("--target-column", help="column with the class / vocabulary index (or token) to explain per "
                   "row (null: the argmax)")
    p.add_argument("--position-column", help="column with the explained position per row (LMs; null: the last "
                   "token)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per run, of similar length (default 32)")
    p.add_argument("--max-length", type=int, help="rows with more tokens get an error instead of relevance")
    p.add_argument("--limit", type=int, help="explain the first N rows")
    p.add_argument("--full", action="store_true", help="also write the relevance per token and hidden unit "
                   "(relevance_full, float16)")
    p.add_argument("--shard-rows", type=int, default=1024, help="rows per shard, the unit of resumption "
                   "(default 1024)")
    p.add_argument("--workers", type=int, help="local worker processes (default 1: one session on all cores), or "
                   "Ray actors with --ray (default: one per CPU, or per GPU)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads per session")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on a Ray cluster: ADDRESS (auto, host:6379, ray://host:10001), or without one "
                        "RAY_ADDRESS or a new local cluster")
    p.add_argument("--restart", action="store_true", help="discard the shards of an earlier, different job")
    p.add_argument("--generate", type=int, metavar="N",
                   help="LMs: generate up to N tokens greedily from each row's text (stopping at an end token) and "
                        "explain each, as explain --generate does: relevance becomes a matrix per row [generated "
                        "tokens, tokens before the last] (list<list<float32>>), with generated_ids/tokens/text and "
                        "per-token target, logit and position lists. Rows run one at a time; fastest with a model "
                        "converted with --multi-target")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_explain_dataset)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] if text else type(exc).__name__


def _expected_error(exc: BaseException) -> str | None:
    """The one line for an error the user can act on, or None for a bug."""
    if isinstance(exc, LRPError):
        return first_line(exc)
    if isinstance(exc, UnicodeError):
        return f"not valid UTF-8 text ({exc.__class__.__name__}: {_one_line(exc)})"
    if isinstance(exc, OSError):
        name = exc.filename if exc.filename is not None else ""
        other = f" -> {exc.filename2}" if getattr(exc, "filename2", None) else ""
        reason = exc.strerror or _one_line(exc)
        return f"{name}{other}: {reason}" if name else reason
    if isinstance(exc, MemoryError):
        return "out of memory"
    module = type(exc).__module__ or ""
    if module.startswith("onnxruntime") or module.startswith("onnx.") or module.startswith("google.protobuf"):
        return f"{'onnxruntime' if module.startswith('onnxruntime') else 'onnx'}: {_one_line(exc)}"
    return None


def main(argv=None) -> int:
    """Every expected failure: one line on stderr, exit 2. A bug: exit 1, its traceback with --debug.
    Ctrl-C / SIGTERM: one line, exit 130 / 143; temporaries are removed."""
    import warnings

    from .ir.files import Terminated, install_signal_cleanup, restore_signal_handler
    from .lrp.rules import UnmatchedOverride

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    if debug:
        argv = [a for a in argv if a != "--debug"]
    previous_handler = install_signal_cleanup()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"lrp-onnx: warning: {message}", file=sys.stderr)

    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            if getattr(args, "strict", False):
                warnings.simplefilter("error", UnmatchedOverride)
            return args.func(args)
    except BrokenPipeError:  # e.g. `lrp-onnx explain ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("lrp-onnx: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("lrp-onnx: terminated; nothing was written", file=sys.stderr)
        return 143
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 (the boundary)
        line = _expected_error(exc)
        if line is not None:
            if debug:
                import traceback
                traceback.print_exc()
            print(f"lrp-onnx: error: {line}", file=sys.stderr)
            return 2
        if debug:
            raise
        print(f"lrp-onnx: internal error: {type(exc).__name__}: {_one_line(exc)[:300]} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        restore_signal_handler(previous_handler)


if __name__ == "__main__":
    sys.exit(main())
