"""What a person reads: tokens decoded as text (byte-level BPE, WordPiece, SentencePiece), relevance per
word and per character span, whitespace made visible, and the heatmaps as a browser draws them."""
import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

import lrp_onnx
from lrp_onnx.run.text import decoded_pieces, span_relevance, token_texts, unit_pieces, visible, word_relevance
from tests.conftest import CPU, lrp_cli

TEXT = "The capital of France is Paris.\n\nThe answer"
HARD = "日本 naïve 2024 unbelievable don't 🙂x  end"


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_2layers):
    """SmolLM2's byte-level BPE (tokenizer.json of the 2-layer export the session shares)."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(smollm2_2layers["tokenizer"]))


@pytest.fixture(scope="module")
def minilm_tokenizer():
    """all-MiniLM-L6-v2's WordPiece (the packaged tokenizer.json, as models/minilm.py writes it)."""
    from models import minilm
    return minilm.build_tokenizer()


def sentencepiece_tokenizer():
    """A SentencePiece-style tokenizer: Metaspace '▁', a Unigram vocabulary, byte fallback '<0xE6>'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = [("<unk>", 0.0), ("▁The", -1.0), ("▁Paris", -1.0), ("▁", -2.0), (".", -1.0)]
    tok = Tokenizer(models.Unigram(vocab + [(f"<0x{b:02X}>", -5.0) for b in range(256)], unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def test_token_texts_read_as_the_text(smollm2_tokenizer, minilm_tokenizer):
    bpe = smollm2_tokenizer
    e = bpe.encode(TEXT)
    assert e.tokens[5] == "ĠParis" and e.tokens[7] == "Ċ"
    assert token_texts(bpe, e.ids) == ["The", " capital", " of", " France", " is", " Paris", ".", "\n", "\n", "The",
                                       " answer"]
    assert token_texts(bpe, [bpe.token_to_id("ĠParis")]) == [" Paris"]
    # a character split over tokens: the partial token shows its bytes, the completing one the character
    e = bpe.encode(HARD)
    texts, (pieces, partial) = token_texts(bpe, e.ids), decoded_pieces(bpe, e.ids)
    assert e.tokens[:2] == ["æĹ", "¥"] and texts[:3] == ["<0xE6><0x97>", "日", "本"] and partial[:2] == [True, False]
    assert "".join(pieces) == HARD == bpe.decode(e.ids)
    assert not any("Ġ" in t or "\ufffd" in t for t in texts)
    # WordPiece: '##' continuations join the word before, other words are set apart by a space
    e = minilm_tokenizer.encode("unbelievably 2024 tokenization")
    texts = token_texts(minilm_tokenizer, e.ids)
    assert [t for t in e.tokens if t.startswith("##")] and not any("##" in t for t in texts)
    assert "".join(texts) == minilm_tokenizer.decode(e.ids, skip_special_tokens=False)
    assert texts[0] == "[CLS]" and texts[-1] == " [SEP]" and texts[e.tokens.index("##4")] == "4"
    # SentencePiece: '▁' is a space (stripped at the start, as the decoder does); byte fallback
    sp = sentencepiece_tokenizer()
    e = sp.encode("The Paris 日.")
    assert e.tokens == ["▁The", "▁Paris", "▁", "<0xE6>", "<0x97>", "<0xA5>", "."]
    assert token_texts(sp, e.ids) == ["The", " Paris", " ", "<0xE6>", "<0x97>", "日", "."]
    assert "".join(decoded_pieces(sp, e.ids)[0]) == sp.decode(e.ids) == "The Paris 日."


def test_visible_whitespace():
    assert [visible(s) for s in ("\n", " ", "\t", "\n\n", " \n", "", " Paris", ".\n")] == \
        ["⏎", "·", "→", "⏎⏎", "·⏎", "∅", " Paris", ".⏎"]


def check_words(tok, text, relevance, expected=None):
    """Every unit's relevance is the sum of its tokens'; the units cover each token once; the words
    are the text's whitespace-separated words, and the pieces give back the text."""
    e = tok.encode(text)
    words = word_relevance(e, relevance, text)
    assert sorted(k for ks in words.tokens for k in ks) == list(range(len(e.ids)))
    for k, ks in enumerate(words.tokens):
        np.testing.assert_allclose(words.relevance[..., k], relevance[..., ks].sum(axis=-1), rtol=1e-12)
    np.testing.assert_allclose(words.relevance.sum(axis=-1), relevance.sum(axis=-1), rtol=1e-10)
    plain = [w for w, span, special in zip(words.words, words.spans, words.special) if not special and not w.isspace()]
    assert plain == text.split()
    for word, span, special in zip(words.words, words.spans, words.special):
        assert special or text[span[0]:span[1]] == word
    joined = "".join(p for p, special in zip(unit_pieces(text, words), words.special) if not special)
    assert joined == text[:max(span[1] for span in words.spans if span)]
    if expected:
        for word, tokens in expected.items():
            assert [e.tokens[k] for k in words.tokens[words.words.index(word)]] == tokens
    return words


def test_word_relevance_byte_level_bpe(smollm2_tokenizer, rng):
    tok = smollm2_tokenizer
    for text in (TEXT, HARD):
        n = len(tok.encode(text).ids)
        check_words(tok, text, rng.normal(size=n))
        check_words(tok, text, rng.normal(size=(3, n)))  # a generation matrix: columns summed by word
    words = check_words(tok, HARD, rng.normal(size=len(tok.encode(HARD).ids)),
                        {"日本": ["æĹ", "¥", "æľ¬"], "2024": ["2", "0", "2", "4"], "don't": ["Ġdon", "'t"],
                         "unbelievable": ["Ġunbelie", "vable"]})
    assert words.words.count(" ") == 2  # the tokens of whitespace only ('Ġ' before the digits, and the double space)
    words = check_words(tok, TEXT, rng.normal(size=11), {"Paris.": ["ĠParis", "."]})
    assert words.words[6:8] == ["\n", "\n"] and words.spans[5] == (25, 31)
    chat = "<|im_start|>user\nHi there<|im_end|>"  # special tokens written in the text: units of their own
    e = tok.encode(chat)
    words = word_relevance(e, np.arange(len(e.ids), dtype=float), chat, tokenizer=tok)
    assert words.words == ["<|im_start|>", "user", "\n", "Hi", "there", "<|im_end|>"]
    assert words.special == [True, False, False, False, False, True] and words.spans[-1] == (len(chat) - 10, len(chat))
    assert "".join(unit_pieces(chat, words)) == chat
    by_tokenizer = word_relevance(tok.encode(TEXT), np.arange(11.0), TEXT, by="tokenizer")
    assert by_tokenizer.words[5:7] == ["Paris", "."]  # its pre-tokenizer's words: punctuation apart


def test_word_and_span_relevance_wordpiece(minilm_tokenizer, rng):
    tok = minilm_tokenizer
    for text in (TEXT, HARD):
        n = len(tok.encode(text).ids)
        words = check_words(tok, text, rng.normal(size=n))
        assert words.words[0] == "[CLS]" and words.words[-1] == "[SEP]" and words.special[0] and words.spans[0] is None
    text = "The first man on the moon. He said it."
    e = tok.encode(text)
    relevance = rng.normal(size=len(e.ids))
    check_words(tok, text, relevance, {"moon.": ["moon", "."], "said": ["said"]})
    cut = text.index(" He")
    spans = span_relevance(e, relevance, [(0, cut), (cut, len(text)), (4, 9)])
    inside = [[k for k, (a, b) in enumerate(e.offsets) if b > a and a < end and b > start]
              for start, end in [(0, cut), (cut, len(text)), (4, 9)]]
    np.testing.assert_allclose(spans, [relevance[ks].sum() for ks in inside], rtol=1e-12)
    assert [e.tokens[k] for k in inside[2]] == ["first"]
    np.testing.assert_allclose(spans[0] + spans[1], relevance[1:-1].sum(), rtol=1e-10)  # all but [CLS], [SEP]
    with pytest.raises(lrp_onnx.LRPError, match="start <= end"):
        span_relevance(e, relevance, [(5, 2)])


@pytest.fixture(scope="module")
def smollm2_converted(smollm2_2layers):
    out = smollm2_2layers["out_dir"]
    single, multi = out / "text.attnlrp.onnx", out / "text.attnlrp.multi.onnx"
    lrp_onnx.convert(smollm2_2layers["onnx"], single, rules="attnlrp")
    lrp_onnx.convert(smollm2_2layers["onnx"], multi, rules="attnlrp", relevance_only=True, multi_target=True)
    return {**smollm2_2layers, "single": single, "multi": multi}


def test_explain_prints_readable_tokens_and_words(smollm2_converted, smollm2_tokenizer, tmp_path):
    model, tokenizer = smollm2_converted["single"], smollm2_converted["tokenizer"]
    text = "The capital of France is"
    done = lrp_cli("explain", model, "--tokenizer", tokenizer, "--text", text, "--json", "--words",
                   "--html", tmp_path / "w.html", "--png", tmp_path / "w.png")
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)
    tok = smollm2_tokenizer
    assert report["target_label"] == tok.id_to_token(report["target"])  # the raw token is kept
    assert report["target_text"] == tok.decode([report["target"]])
    assert [t["token"] for t in report["tokens"]] == tok.encode(text).tokens
    assert [t["text"] for t in report["tokens"]] == ["The", " capital", " of", " France", " is"]
    api = lrp_onnx.Explainer(model, providers=CPU)
    e = tok.encode(text)
    ids = np.array([e.ids])
    words = api.run(input_ids=ids, attention_mask=np.ones_like(ids), position=[len(e.ids) - 1]).word_relevance(e, text)
    assert [w["word"] for w in report["words"]] == words.words == text.split()
    relevance = [t["relevance"] for t in report["tokens"]]
    for w, value in zip(report["words"], words.relevance):
        assert w["relevance"] == pytest.approx(sum(relevance[k] for k in w["tokens"]), rel=1e-6, abs=1e-9)
        assert w["relevance"] == pytest.approx(float(value), rel=1e-4, abs=1e-6)
    page = (tmp_path / "w.html").read_text()
    assert page.count("<span class='t") == len(text.split())
    assert html.escape(f"explained: {report['target_text']!r}") in page
    paris = tok.token_to_id("ĠParis")  # --target-token as it reads (' Paris'), not as the vocabulary writes it
    table = lrp_cli("explain", model, "--tokenizer", tokenizer, "--text", text, "--target-token", " Paris")
    assert table.returncode == 0 and "Ġ" not in table.stdout, table.stdout
    assert f"explained: target {paris} (' Paris')" in table.stdout and "' capital'" in table.stdout
    done = lrp_cli("explain", model, "--tokenizer", tokenizer, "--text", text, "--target-token", " Paris France")
    assert done.returncode == 2 and "nor a text that it encodes as one token" in done.stderr


def test_explain_generate_words(smollm2_converted, smollm2_tokenizer, tmp_path):
    model, tokenizer = smollm2_converted["multi"], smollm2_converted["tokenizer"]
    done = lrp_cli("explain", model, "--tokenizer", tokenizer, "--text", "The capital of France is", "--generate", "4",
                   "--words", "--json", "--html", tmp_path / "g.html", "--png", tmp_path / "g.png")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    tok = smollm2_tokenizer
    ids = report["prompt_ids"] + report["generated_ids"]
    assert report["raw_tokens"] == [tok.id_to_token(i) for i in ids]
    assert report["tokens"] == token_texts(tok, ids)
    matrix = np.array(report["relevance"])
    words = report["words"]
    assert sorted(k for ks in words["tokens"] for k in ks) == list(range(matrix.shape[1]))
    for k, ks in enumerate(words["tokens"]):
        np.testing.assert_allclose(np.array(words["relevance"])[:, k], matrix[:, ks].sum(axis=1), rtol=1e-6, atol=1e-9)
    shown = tok.decode(ids[:matrix.shape[1]])  # the prompt and what was generated before the last token
    assert [w for w, special in zip(words["words"], words["special"]) if not special and not w.isspace()] == \
        shown.split()
    assert words["words"][:4] == ["The", "capital", "of", "France"]
    page = (tmp_path / "g.html").read_text()
    assert page.count("<th class='c'>") == len(words["words"]) + 1  # the words, then "logit"


# -- in a browser -------------------------------------------------------------------------------------
GEOMETRY = """<script>
const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
const rows = [...document.querySelectorAll('tr')].slice(1);
document.body.setAttribute('data-geometry', JSON.stringify({
  header: [...document.querySelectorAll('th.c')].map(e => [e.textContent, box(e)]),
  rows: rows.map(r => [r.querySelector('th.r').textContent, box(r.querySelector('th.r')),
                       box(r.querySelector('td.l')), r.querySelectorAll('td').length]),
  spans: [...document.querySelectorAll('span.t')].map(e => [e.textContent, box(e)]),
}));
</script>"""


def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("these tests need Chromium: run tools/install_browser.sh")
    return found


def render(page, tmp_path, name):
    """Chromium's geometry of `page` (with GEOMETRY run in it), and a screenshot as a numpy image."""
    from PIL import Image

    path = tmp_path / f"{name}.html"
    path.write_text(page.replace("</body>", GEOMETRY + "</body>"), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium(), *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"data-geometry=\"([^\"]*)\"", dom.stdout)
    assert found, dom.stderr[-2000:]
    shot = tmp_path / f"{name}.png"
    subprocess.run([chromium(), *flags, f"--screenshot={shot}", "--window-size=900,600", path.as_uri()],
                   capture_output=True, timeout=120)
    return json.loads(html.unescape(found.group(1))), np.asarray(Image.open(shot).convert("RGB"))


def test_generation_heatmap_in_chromium(smollm2_tokenizer, tmp_path, rng):
    """SmolLM2's " Paris.\\n\\nThe answer" after "The capital of France is": in Chromium, every row and
    column label is drawn non-blank (the newlines as ⏎), every row's logit sits in the logit column,
    and the screenshot shows the colors."""
    from lrp_onnx.run.generation import GenerationExplanation, generation_html, token_info
    from lrp_onnx.run.heatmap import token_pieces, tokens_html

    tok = smollm2_tokenizer
    prompt = np.array(tok.encode("The capital of France is").ids)
    generated = np.array(tok.encode(" Paris.\n\nThe answer").ids)
    p, n = len(prompt), len(generated)
    relevance = np.tril(rng.uniform(-0.9, 0.9, size=(n, p + n - 1)), k=p - 1)  # zero from each row's own position on
    relevance[:, 0] = 1.0  # red: the row's largest |relevance|
    texts, raw, pieces, special = token_info(tok, np.concatenate([prompt, generated]))
    g = GenerationExplanation(prompt, generated, relevance, rng.normal(size=n), np.arange(p - 1, p - 1 + n), False,
                              texts, tok.decode(generated.tolist()), None, raw, pieces, special)
    for words in (False, True):
        geometry, image = render(generation_html(g, "test", words=words), tmp_path, f"words{words}")
        header, rows = geometry["header"], geometry["rows"]
        columns = g.word_relevance().words if words else texts[:p + n - 1]
        assert [h[0] for h in header] == [visible(c) for c in columns] + ["logit"]
        assert [r[0] for r in rows] == [visible(t) for t in texts[p:]]
        assert "⏎" in [h[0] for h in header] and [r[0] for r in rows].count("⏎") == 2
        for label, (_, _, width, height) in [(h[0], h[1]) for h in header] + [(r[0], r[1]) for r in rows]:
            assert label.strip() and width > 2 and height > 2, (label, width, height)
        logit_x = header[-1][1][0]
        assert all(abs(r[2][0] - logit_x) < 1.0 for r in rows), ([r[2][0] for r in rows], logit_x)
        assert {r[3] for r in rows} == {len(columns) + 1}  # every row: a cell per column, then its logit
        red = (image[..., 0] > 240) & (image[..., 1] < 20) & (image[..., 2] < 20)
        assert red.sum() >= n * 100  # a red cell (about 20 x 18 pixels) per row
    e = tok.encode(TEXT)
    page = tokens_html([{"pieces": token_pieces(TEXT, e.offsets, e.tokens), "relevance": np.ones(len(e.ids)),
                         "title": "text"}])
    geometry, _ = render(page, tmp_path, "text")
    spans = geometry["spans"]
    assert [s[0] for s in spans][6:9] == [".", "⏎\n", "⏎\n"]
    assert all(s[1][2] > 2 for s in spans), spans  # every token, the newlines too, has a visible box
