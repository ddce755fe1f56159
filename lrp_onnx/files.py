"""Small file helpers."""
from __future__ import annotations

import os

from .errors import LRPError


def write_atomically(path: str, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (a temporary file in the same directory, then a rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise LRPError(f"{path}: the output directory does not exist")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
