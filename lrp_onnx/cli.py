"""The `lrp-onnx` command: convert, inspect, explain."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .errors import LRPError
from .rules import RULE_SETS, RuleError, check_rule_name


def _rule_overrides(args) -> dict | None:
    """Rule overrides from --rule-map FILE (JSON or YAML mapping) and --override KEY=RULE."""
    mapping = {}
    if getattr(args, "rule_map", None):
        path = args.rule_map
        if not os.path.isfile(path):
            raise LRPError(f"{path}: no such rule-map file")
        text = open(path, encoding="utf-8").read()
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            try:
                import yaml
            except ImportError:
                raise LRPError(f"{path}: not JSON, and PyYAML is not installed to read YAML") from None
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise LRPError(f"{path}: not a JSON or YAML mapping ({exc.__class__.__name__})") from None
        if not isinstance(loaded, dict):
            raise LRPError(f"{path}: must hold a mapping of op type / category / node-name pattern to rule")
        mapping.update({str(k): str(v) for k, v in loaded.items()})
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


def cmd_convert(args) -> int:
    from .pipeline import convert

    convert(args.model, args.o, rules=args.rules, source=args.source, output=args.output,
            latent=args.latent or (), seed_input=args.seed_input, overrides=_rule_overrides(args),
            relevance_only=args.relevance_only)
    print(f"wrote {args.o}")
    return 0


def cmd_inspect(args) -> int:
    from .report import inspect_model

    report = inspect_model(args.model, rules=args.rules, source=args.source, output=args.output,
                           overrides=_rule_overrides(args))
    print(report.format())
    return 0 if report.supported else 1


def _tokenize(tokenizer_path: str, texts: list[str]):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise LRPError("explain --text needs the 'tokenizers' package: pip install tokenizers") from None
    if not os.path.isfile(tokenizer_path):
        raise LRPError(f"{tokenizer_path}: no such tokenizer file")
    try:
        tok = Tokenizer.from_file(tokenizer_path)
    except Exception as exc:
        raise LRPError(f"{tokenizer_path}: not a tokenizers JSON file ({exc.__class__.__name__})") from None
    tok.no_truncation()
    encodings = [tok.encode(t) for t in texts]
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(texts), length), dtype=np.int64)
    mask = np.zeros((len(texts), length), dtype=np.int64)
    for row, e in enumerate(encodings):
        ids[row, :len(e.ids)] = e.ids
        mask[row, :len(e.ids)] = 1
    return tok, encodings, ids, mask


def cmd_explain(args) -> int:
    from .runner import Explainer

    explainer = Explainer(args.model)
    tok, encodings, ids, mask = _tokenize(args.tokenizer, args.text)
    feed = {}
    for name in explainer.input_names:
        if name == "input_ids":
            feed[name] = ids
        elif name == "attention_mask":
            feed[name] = mask
        elif name == "token_type_ids":
            feed[name] = np.zeros_like(ids)
        elif name == "position_ids":
            feed[name] = np.cumsum(mask, axis=1) - 1
    missing = [i.name for i in explainer.session.get_inputs() if i.name not in feed]
    if missing:
        raise LRPError(f"{args.model}: cannot feed input(s) {', '.join(missing)} from text")
    has_position = "lrp_position" in explainer.input_names
    position = (mask.sum(axis=1) - 1) if has_position else None  # the last real token of each row
    target = None
    if args.target_token is not None:
        target = [tok.token_to_id(args.target_token)]
        if target[0] is None:
            raise LRPError(f"--target-token '{args.target_token}' is not in the tokenizer's vocabulary")
    elif args.target is not None:
        target = [args.target]
    result = explainer.run(target=target, position=position, **feed)
    per_token = result.token_relevance()
    report = []
    for row, e in enumerate(encodings):
        tokens = e.tokens
        target_id = int(result.target[row]) if result.target is not None else None
        label = tok.id_to_token(target_id) if has_position and target_id is not None else target_id
        values = per_token[row, :len(tokens)]
        report.append({"text": args.text[row], "target": target_id, "target_label": label,
                       "logit": float(result.logit[row]) if result.logit is not None else None,
                       "relevance_sum": float(values.sum()),
                       "tokens": [{"token": t, "relevance": float(v)} for t, v in zip(tokens, values)]})
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for r in report:
        print(f"text: {r['text']!r}")
        print(f"explained: target {r['target']} ({r['target_label']!r}), logit {r['logit']:.4f}, "
              f"sum of relevance {r['relevance_sum']:.4f}")
        peak = max(abs(t["relevance"]) for t in r["tokens"]) or 1.0
        for t in r["tokens"]:
            bar = ("+" if t["relevance"] >= 0 else "-") * int(round(20 * abs(t["relevance"]) / peak))
            print(f"  {t['token']!r:>20} {t['relevance']:+.4f} {bar}")
    return 0


def cmd_bench(bench_args: list[str]) -> int:
    """Forward to tools/bench.py, which lives in the source checkout (it needs torch, LXT, models/)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "tools", "bench.py")):
        raise LRPError("`lrp-onnx bench` runs from a source checkout (tools/bench.py), with the test "
                       "requirements installed; see README.md")
    sys.path.insert(0, root)
    from tools import bench

    return bench.main(bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrp-onnx", description="AttnLRP attributions inside ONNX graphs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="write a model that also outputs relevance")
    _add_analysis_options(p)
    p.add_argument("-o", required=True, metavar="OUT", help="where to write the converted model")
    p.add_argument("--latent", action="append", help="also output the relevance of this tensor; repeatable")
    p.add_argument("--seed-input", action="store_true",
                   help="replace lrp_target/lrp_position by a float input lrp_seed of the output's shape")
    p.add_argument("--relevance-only", action="store_true",
                   help="drop the original outputs; run the LM head at the explained position only (faster)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("inspect", help="show the rule of every unit on the relevance path")
    _add_analysis_options(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("explain", help="relevance per token of a text, from a converted model")
    p.add_argument("model", help="a model written by `lrp-onnx convert`")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (Hugging Face tokenizers format)")
    p.add_argument("--text", required=True, action="append", help="text to explain; repeat for a batch")
    p.add_argument("--target", type=int, help="class / vocabulary index to explain (default: the argmax)")
    p.add_argument("--target-token", help="vocabulary token to explain, e.g. 'ĠParis'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_explain)
    sub.add_parser("bench", help="time explain vs forward vs LXT (source checkout only; see its --help)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its options are tools/bench.py's own
        try:
            return cmd_bench(argv[1:])
        except LRPError as exc:
            print(f"lrp-onnx: error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `lrp-onnx explain ... | head`
        sys.stderr.close()
        return 0
    except LRPError as exc:
        print(f"lrp-onnx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
