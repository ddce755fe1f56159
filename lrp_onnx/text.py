"""Reading text: the tokenizer (a Hugging Face `tokenizers` JSON file), imported lazily."""
from __future__ import annotations

import os

from .errors import LRPError


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
