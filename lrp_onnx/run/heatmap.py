"""Heatmaps of relevance: tokens as colored HTML or PNG, images as an overlay PNG.

Colors: red = positive relevance, blue = negative, white = none; each heatmap is normalized by its
largest |relevance| (so the colors compare tokens within one text, not across texts). A token of
whitespace only is drawn visibly: ⏎ newline, · space, → tab. Files are written whole or not at all.
"""
from __future__ import annotations

import html

import numpy as np

from ..errors import LRPError
from ..ir.files import write_atomically


def relevance_color(value: float, peak: float) -> tuple[int, int, int]:
    """RGB for value/peak in [-1, 1]: white at 0, red at +1, blue at -1."""
    x = 0.0 if peak <= 0 else float(np.clip(value / peak, -1.0, 1.0))
    fade = int(round(255 * (1 - abs(x))))
    return (255, fade, fade) if x >= 0 else (fade, fade, 255)


def _peak(values) -> float:
    values = np.asarray(values, np.float64)
    return float(np.abs(values).max()) if values.size else 0.0


def token_pieces(text: str, offsets, tokens) -> list[str]:
    """The text of each token, with the whitespace before it, from the tokenizer's character offsets
    (special tokens, which have empty offsets, show as their token string set apart by a space; a token
    whose characters an earlier token shows already, a byte of a multi-byte character, shows its bytes,
    '<0xA5>')."""
    from .text import _bytes_label

    pieces, end = [], 0
    for (start, stop), token in zip(offsets, tokens):
        if stop <= start:  # a special token: set apart by a space
            pieces.append(f"{token} " if not pieces else f" {token}")
            continue
        if stop <= end:  # its characters are shown already
            pieces.append(_bytes_label(token))
            continue
        start = max(start, end)
        pieces.append(text[end:start] + text[start:stop])
        end = stop
    return pieces


def shown_piece(piece: str) -> str:
    """A piece of flowing text as a heatmap shows it: a piece of whitespace only is made visible
    (⏎ before each newline, which still breaks the line; · a space, → a tab)."""
    if not piece or not piece.isspace():
        return piece
    from .text import visible

    return "".join("⏎\n" if c == "\n" else visible(c) for c in piece)


def tokens_html(rows: list[dict]) -> str:
    """rows: {"pieces": [str], "relevance": [float], "title": str}. One self-contained HTML page."""
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>lrp-onnx relevance</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             ".t{white-space:pre-wrap;border-radius:3px;padding:1px 0}.t[data-whitespace]{color:#777}"
             "p.h{color:#555;font-size:90%;margin-bottom:.2em}p.x{font-size:120%;line-height:1.8;margin-top:0}"
             "</style></head><body>"]
    for row in rows:
        peak = _peak(row["relevance"])
        parts.append(f"<p class='h'>{html.escape(row.get('title', ''))}</p><p class='x'>")
        for piece, value in zip(row["pieces"], row["relevance"]):
            r, g, b = relevance_color(value, peak)
            shown = shown_piece(piece)
            mark = " data-whitespace='1'" if shown != piece else ""
            parts.append(f"<span class='t'{mark} style='background:rgb({r},{g},{b})' "
                         f"title='{value:+.4g}'>{html.escape(shown)}</span>")
        parts.append("</p>")
    parts.append("<p class='h'>red: positive relevance, blue: negative; normalized per text by its "
                 "largest |relevance|; ⏎ newline, · space, → tab</p></body></html>\n")
    return "".join(parts)


def write_tokens_html(rows: list[dict], path: str) -> None:
    write_atomically(path, tokens_html(rows).encode("utf-8"))


def _font(size: int):
    """DejaVu Sans where it is installed (it has ⏎ and →), else Pillow's own font."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _glyph(font, char: str):
    try:
        mask = font.getmask(char)
        return mask.size, bytes(mask)
    except Exception:  # noqa: BLE001 (a font that cannot say: draw as it comes)
        return None


def drawable(font, label: str) -> str:
    """`label` with the marks the font has no glyph for written in ASCII (⏎ as \\n, → as \\t, ↵ as \\r)."""
    missing = _glyph(font, "\ue000")  # a private-use character: no font draws it
    for mark, ascii_ in (("⏎", "\\n"), ("→", "\\t"), ("↵", "\\r"), ("∅", "{}")):
        if mark in label and missing is not None and _glyph(font, mark) == missing:
            label = label.replace(mark, ascii_)
    return label


def write_tokens_png(rows: list[dict], path: str, width: int = 900, size: int = 18) -> None:
    """The same heatmap as tokens_html, as a PNG (tokens wrapped into lines, newlines kept)."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise LRPError("PNG heatmaps need Pillow: pip install pillow") from None
    font, small = _font(size), _font(int(size * 0.75))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h, margin = int(size * 1.6), 12
    layout, y = [], margin
    for row in rows:
        layout.append(("title", margin, y, row.get("title", ""), None))
        y += int(size * 1.2)
        x = margin
        peak = _peak(row["relevance"])
        for piece, value in zip(row["pieces"], row["relevance"]):
            for n, part in enumerate(drawable(font, shown_piece(piece)).split("\n")):
                if n:  # a newline of the text
                    x, y = margin, y + line_h
                    if not part:
                        continue
                w = probe.textlength(part, font=font)
                if x + w > width - margin and x > margin:
                    x, y = margin, y + line_h
                    part = part.lstrip()
                    w = probe.textlength(part, font=font)
                layout.append(("token", x, y, part, relevance_color(value, peak), w))
                x += w
        y += line_h + int(size * 0.6)
    image = Image.new("RGB", (width, y + margin), "white")
    draw = ImageDraw.Draw(image)
    for item in layout:
        if item[0] == "title":
            draw.text((item[1], item[2]), item[3], fill=(90, 90, 90), font=small)
        else:
            _, x, yy, piece, color, w = item
            draw.rectangle([x, yy, x + w, yy + int(size * 1.3)], fill=color)
            draw.text((x, yy + 2), piece, fill="black", font=font)
    _save_png(image, path)


def _save_png(image, path: str) -> None:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomically(path, buffer.getvalue())


def write_image_overlay_png(pixels: np.ndarray, relevance: np.ndarray, path: str, alpha: float = 0.6) -> None:
    """An image ([C, H, W] or [H, W, C], any range) in gray with the relevance summed over channels
    on top (red positive, blue negative), side by side with the heatmap alone."""
    try:
        from PIL import Image
    except ImportError:
        raise LRPError("PNG heatmaps need Pillow: pip install pillow") from None
    pixels, relevance = np.asarray(pixels, np.float64), np.asarray(relevance, np.float64)
    if pixels.ndim != 3 or relevance.shape != pixels.shape:
        raise LRPError(f"image overlay needs an image [C, H, W] and relevance of the same shape; got "
                       f"{pixels.shape} and {relevance.shape}")
    channels_first = pixels.shape[0] in (1, 3, 4) and pixels.shape[2] not in (1, 3, 4)
    if channels_first:
        pixels, relevance = pixels.transpose(1, 2, 0), relevance.transpose(1, 2, 0)
    gray = pixels.mean(axis=2)
    span = gray.max() - gray.min()
    gray = (gray - gray.min()) / span if span > 0 else np.zeros_like(gray)
    heat = relevance.sum(axis=2)
    peak = _peak(heat)
    x = np.clip(heat / peak, -1, 1) if peak > 0 else np.zeros_like(heat)
    colors = np.stack([1 - np.clip(-x, 0, 1), 1 - np.abs(x), 1 - np.clip(x, 0, 1)], axis=2)  # bwr
    base = np.repeat(gray[:, :, None], 3, axis=2)
    overlay = (1 - alpha) * base + alpha * colors
    both = np.concatenate([overlay, np.ones((gray.shape[0], 2, 3)), colors], axis=1)
    image = Image.fromarray((np.clip(both, 0, 1) * 255).astype(np.uint8))
    scale = max(1, 256 // max(gray.shape))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    _save_png(image, path)
