"""Reading text: the tokenizer (a Hugging Face `tokenizers` JSON file), imported lazily."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import LRPError


def load_tokenizer(tokenizer_path: str):
    """A Hugging Face `tokenizers` tokenizer from its tokenizer.json, without truncation or padding
    (sentence-transformers ship files that pad every text to a fixed length)."""
    tokenizer_path = os.fspath(tokenizer_path)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise LRPError("reading text needs the 'tokenizers' package: pip install tokenizers") from None
    if not os.path.isfile(tokenizer_path):
        raise LRPError(f"{tokenizer_path}: no such tokenizer file")
    try:
        tok = Tokenizer.from_file(tokenizer_path)
    except Exception as exc:
        raise LRPError(f"{tokenizer_path}: not a tokenizers JSON file ({exc.__class__.__name__})") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


# -- what a person reads ---------------------------------------------------------------------------
VISIBLE_WHITESPACE = {"\n": "⏎", "\t": "→", "\r": "↵", " ": "·"}


def visible(label: str) -> str:
    """A token's text as a label that is never blank: a token of whitespace only shows it (⏎ newline,
    · space, → tab, ↵ carriage return; other spaces as ·); in other tokens, newlines, tabs and carriage
    returns are shown the same way (they would break a label's line), spaces are kept."""
    if not label:
        return "∅"
    if label.isspace():
        return "".join(VISIBLE_WHITESPACE.get(c, "·") for c in label)
    return "".join(VISIBLE_WHITESPACE[c] if c in "\n\t\r" else c for c in label)


def bytes_to_unicode() -> dict:
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it in a token."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(token: str) -> bytes | None:
    """The bytes a raw token stands for, where the token says so: SentencePiece's byte fallback
    ('<0xE6>'), or a byte-level BPE token (every character in GPT-2's byte alphabet); else None."""
    import re

    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
        return bytes([int(token[3:5], 16)])
    if token and all(c in _BYTE_OF for c in token):
        return bytes(_BYTE_OF[c] for c in token)
    return None


def _bytes_label(token: str) -> str:
    """A token that is part of a character: its bytes, '<0xE6><0x97>' (the raw token where unknown)."""
    data = token_bytes(token)
    return "".join(f"<0x{b:02X}>" for b in data) if data else token


def decoded_pieces(tokenizer, ids, window: int = 8) -> tuple[list[str], list[bool]]:
    """The text each token adds when the tokenizer decodes the sequence (special tokens kept), so that
    the pieces joined are the decoded text: byte-level BPE's 'ĠParis' is ' Paris', WordPiece's '##ing'
    'ing' and a word after another ' word', SentencePiece's '▁Paris' ' Paris'. A token that ends inside
    a multi-byte character adds '' (flagged partial); the token that completes the character adds it.
    Each token is decoded after up to `window` tokens of context (decoders depend only on neighbors)."""
    ids = [int(i) for i in ids]

    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=False) if part else ""

    pieces, partial, pending = [""] * len(ids), [False] * len(ids), []
    for k in range(len(ids)):
        base = pending[0] if pending else k
        low = max(0, base - window)
        before, after = decode(ids[low:base]), decode(ids[low:k + 1])
        if after.endswith("\ufffd") and k + 1 < len(ids):
            pending.append(k)  # an unfinished character: wait for the token that completes it
            continue
        common = 0
        while common < min(len(before), len(after)) and before[common] == after[common]:
            common += 1
        for j in pending:
            partial[j] = True
        pieces[k] = after[common:]
        pending = []
    return pieces, partial


def token_texts(tokenizer, ids, window: int = 8, pieces=None) -> list[str]:
    """What a person reads for each token (see decoded_pieces): ' Paris' for byte-level BPE's 'ĠParis';
    a token that is only part of a multi-byte character shows its bytes, '<0xE6><0x97>'.
    `pieces`: decoded_pieces(tokenizer, ids) when already at hand."""
    pieces, partial = pieces if pieces is not None else decoded_pieces(tokenizer, ids, window)
    texts = []
    for i, piece, part in zip(ids, pieces, partial):
        raw = tokenizer.id_to_token(int(i))
        if raw is not None:
            data = token_bytes(raw)
            if part or ("\ufffd" in piece and data is not None and _invalid_utf8(data)):
                piece = _bytes_label(raw)
            elif not piece:
                piece = raw  # a token that decodes to nothing
        texts.append(piece)
    return texts


def _invalid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# -- words and spans -------------------------------------------------------------------------------
@dataclass
class Words:
    """Relevance per word: `relevance[..., w]` is the sum of the relevance of the tokens `tokens[w]`.

    words: each word as it reads in the text ("Paris." — whitespace-separated by default); a token
    of whitespace only (byte-level BPE's 'Ċ') and a special token ('[CLS]', which has no text) are
    units of their own, so that the units' relevance adds up to the tokens'.
    spans: each unit's character span [start, end) in the text (None for a special token)."""
    words: list
    relevance: np.ndarray
    spans: list
    tokens: list
    special: list

    def __iter__(self):  # words, relevance = word_relevance(...)
        return iter((self.words, self.relevance))

    def to_list(self) -> list[dict]:
        """One dict per unit (a 1-D relevance): word, start, end, tokens, relevance, special."""
        rows = []
        for k, word in enumerate(self.words):
            span = self.spans[k]
            rows.append({"word": word, "start": span[0] if span else None, "end": span[1] if span else None,
                         "tokens": list(self.tokens[k]), "special": bool(self.special[k]),
                         "relevance": float(self.relevance[..., k]) if self.relevance.ndim == 1
                         else [float(v) for v in self.relevance[..., k].ravel()]})
        return rows


def _encoding_parts(encoding, tokenizer=None):
    """(offsets, special flags): the tokens the tokenizer added ([CLS]), and with `tokenizer` the special
    tokens written in the text itself (a chat template's '<|im_start|>')."""
    offsets = [tuple(o) for o in encoding.offsets]
    special = [bool(s) for s in encoding.special_tokens_mask]
    if tokenizer is not None:
        special = [s or (tokenizer.decode([i], skip_special_tokens=True) == "" and
                         tokenizer.decode([i], skip_special_tokens=False) != "")
                   for s, i in zip(special, encoding.ids)]
    return offsets, special


def group_words(text: str, offsets, special, tokens=None, word_ids=None) -> tuple[list, list, list, list]:
    """(words, spans, token indices, special flags) of the units of a tokenized text: tokens are grouped
    by the whitespace-separated word their characters fall in (`word_ids`: by the tokenizer's own words
    instead, its pre-tokenizer's split, where punctuation and digits are words of their own); a token
    of whitespace only, and a special token (its text: `tokens[k]`), is a unit of its own. A token of no
    characters (one byte of a character another token shows) joins the word at its position."""
    import bisect
    import re

    masked = list(text)
    for k, (start, stop) in enumerate(offsets):
        if special[k]:  # a special token written in the text is no part of a word
            masked[start:stop] = " " * max(0, stop - start)
    bounds = [(m.start(), m.end()) for m in re.finditer(r"\S+", "".join(masked))]
    starts = [b[0] for b in bounds]
    unit_of = [None] * len(offsets)  # ("w", first word, last word) | ("t", token index)
    for k, (start, stop) in enumerate(offsets):
        if special[k]:
            unit_of[k] = ("t", k)
            continue
        if word_ids is not None and word_ids[k] is not None:
            unit_of[k] = ("i", word_ids[k])
            continue
        piece = text[start:stop]
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece) - len(piece.rstrip())
        a, b = start + lead, stop - trail
        if a < b:
            first = bisect.bisect_right(starts, a) - 1
            last = bisect.bisect_right(starts, b - 1) - 1
            unit_of[k] = ("w", max(first, 0), max(last, 0))
        elif stop <= start:  # no characters of its own: the word at (or after) its position
            w = bisect.bisect_right(starts, start) - 1
            if w < 0 or bounds[w][1] <= start:
                w += 1
            unit_of[k] = ("w", w, w) if w < len(bounds) else ("t", k)
        else:  # whitespace only
            unit_of[k] = ("t", k)
    # words that one token spans are one unit: link each word to the next where a token crosses
    linked = [False] * len(bounds)
    for u in unit_of:
        if u[0] == "w":
            for w in range(u[1], u[2]):
                linked[w] = True
    group, last_of = list(range(len(bounds))), {}
    for w in range(len(bounds)):
        if w and linked[w - 1]:
            group[w] = group[w - 1]
        last_of[group[w]] = w
    order, members = [], {}
    for k, u in enumerate(unit_of):
        key = ("w", group[u[1]]) if u[0] == "w" else u
        if key not in members:
            members[key] = []
            order.append(key)
        members[key].append(k)
    words, spans, token_lists, flags = [], [], [], []
    for key in order:
        ks = members[key]
        if key[0] == "t" and special[key[1]]:
            start, stop = offsets[key[1]]
            words.append(tokens[key[1]] if tokens is not None else text[start:stop])
            spans.append((start, stop) if stop > start else None)
        elif key[0] == "w":
            span = (bounds[key[1]][0], bounds[last_of[key[1]]][1])
            words.append(text[span[0]:span[1]])
            spans.append(span)
        else:  # whitespace, or the tokenizer's word: its characters, without the whitespace around them
            start = min(offsets[k][0] for k in ks)
            stop = max(offsets[k][1] for k in ks)
            piece = text[start:stop]
            if not piece.isspace():
                start += len(piece) - len(piece.lstrip())
                stop -= len(piece) - len(piece.rstrip())
            words.append(text[start:stop])
            spans.append((start, stop))
        token_lists.append(ks)
        flags.append(key[0] == "t" and special[key[1]])
    return words, spans, token_lists, flags


def _sum_units(relevance, token_lists, n_tokens: int) -> np.ndarray:
    relevance = np.asarray(relevance)
    if relevance.shape[-1] < n_tokens:
        raise LRPError(f"relevance has {relevance.shape[-1]} tokens on its last axis; the encoding has {n_tokens}")
    relevance = relevance[..., :n_tokens]
    return np.stack([relevance[..., ks].sum(axis=-1) for ks in token_lists], axis=-1) if token_lists \
        else np.zeros(relevance.shape[:-1] + (0,), relevance.dtype)


def word_relevance(encoding, relevance, text: str, by: str = "whitespace", tokenizer=None) -> Words:
    """Relevance per word of `text`, tokenized as `encoding` (a tokenizers Encoding of that text):
    `relevance` [..., T] (a token relevance, or a generation matrix [N, T]; a padded row: its first
    len(encoding) columns) summed over each word's tokens -> Words with relevance [..., W].
    by="whitespace": words are whitespace-separated ("Paris." is one word); by="tokenizer": the
    tokenizer's words (encoding.word_ids: its pre-tokenizer's split, "Paris" and "." apart).
    `tokenizer`: also set apart the special tokens written in the text (a chat template's markers),
    which the encoding alone does not mark."""
    if by not in ("whitespace", "tokenizer"):
        raise LRPError(f"by={by!r}: 'whitespace' or 'tokenizer' expected")
    offsets, special = _encoding_parts(encoding, tokenizer)
    if offsets and max(stop for _, stop in offsets) > len(text):
        raise LRPError("the encoding's offsets reach past the text: give the text that was encoded")
    words, spans, token_lists, flags = group_words(text, offsets, special, encoding.tokens,
                                                   encoding.word_ids if by == "tokenizer" else None)
    return Words(words, _sum_units(relevance, token_lists, len(offsets)), spans, token_lists, flags)


def span_relevance(encoding, relevance, spans, tokenizer=None) -> np.ndarray:
    """Relevance summed over the tokens whose characters overlap each character span [start, end) of
    the encoded text (an in-context example, a sentence...): [..., len(spans)]. A token that straddles
    a span's edge counts whole; special tokens count in none (with `tokenizer`: also those written in
    the text)."""
    offsets, special = _encoding_parts(encoding, tokenizer)
    relevance = np.asarray(relevance)[..., :len(offsets)]
    columns = []
    for start, end in spans:
        if not (isinstance(start, (int, np.integer)) and isinstance(end, (int, np.integer)) and 0 <= start <= end):
            raise LRPError(f"span ({start}, {end}): character offsets 0 <= start <= end expected")
        ks = [k for k, (a, b) in enumerate(offsets) if not special[k] and a < end and b > start]
        columns.append(relevance[..., ks].sum(axis=-1))
    return np.stack(columns, axis=-1) if columns else np.zeros(relevance.shape[:-1] + (0,), relevance.dtype)


def unit_pieces(text: str, words: Words) -> list[str]:
    """Each unit as it appears in the text with the whitespace before it, for a heatmap: the pieces
    joined give the text (special tokens: their token, set apart by a space)."""
    pieces, end = [], 0
    for word, span in zip(words.words, words.spans):
        if span is None:  # a special token the tokenizer added
            pieces.append(f"{word} " if not pieces else f" {word}")
            continue
        start, stop = span
        pieces.append((text[end:start] if start >= end else "") + text[start:stop])
        end = max(end, stop)
    return pieces
