"""Safe image decoding: bytes in, an RGB :class:`PIL.Image.Image` (or a square uint8 array) out.

Everything that reaches a model goes through :func:`decode_image`, which

* refuses empty files, non-images, truncated or corrupt files, tiny images, images above the
  pixel limit and decompression bombs with an :class:`ImageError` whose ``reason`` is a short
  stable code (see :data:`REASONS`);
* checks the pixel count from the header *before* any pixel is allocated: above ``max_pixels``
  (``data.max_megapixels``, 300 MP by default) an image is ``too_large``; a non-JPEG file that
  declares more than :data:`BOMB_MIN_PIXELS` pixels and more than :data:`BOMB_PIXELS_PER_BYTE`
  pixels per byte of file (a JPEG: :data:`JPEG_PIXELS_PER_BYTE`) is a ``decompression_bomb``
  (see :func:`check_header`);
* keeps memory bounded for large scans: a JPEG above ``decode_pixels`` (16 MP) is decoded at 1/2,
  1/4 or 1/8 scale (Pillow's draft mode: the DCT is scaled, every byte is still entropy-decoded,
  so truncation and corruption are still caught), any other image is reduced by an integer factor
  right after decoding, so what comes out has at most about ``decode_pixels`` pixels;
* applies the EXIF orientation, so that a phone photograph stored sideways comes out upright;
* converts every Pillow mode to 8-bit RGB correctly (CMYK through its ICC profile when it has one,
  16/32-bit greyscale by scaling, alpha and palette transparency composited on white).

No global Pillow state is changed for longer than the header parse of one call, which is done
under a module lock (see :func:`_open_checked`).
"""

from __future__ import annotations

import io
import math
import struct
import threading
import warnings
import zlib

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from porcelain.errors import DataError

__all__ = ["BOMB_MIN_PIXELS", "BOMB_PIXELS_PER_BYTE", "DECODE_PIXELS", "JPEG_PIXELS_PER_BYTE", "MAX_PIXELS",
           "REASONS", "ImageError", "check_header", "decode_image", "encode_png", "to_array", "to_rgb"]

MAX_PIXELS = 300_000_000
"""Default pixel limit (``data.max_megapixels`` × 10⁶): above it an image is ``too_large``."""
DECODE_PIXELS = 16_000_000
"""Images above this many pixels are decoded (JPEG) or reduced (others) to at most about this many."""
BOMB_PIXELS_PER_BYTE = 100
"""Pixels per file byte above which a large non-JPEG image is a decompression bomb.

Measured with Pillow 13: photographs compress to 0.5–2 pixels per byte as PNG and 3–13 as JPEG
(quality 95–75); a flat-colour PNG reaches 280 (RGB), 830 (greyscale) and 3000 (bilevel) pixels
per byte, a crafted one far more.
JPEG has its own limit, :data:`JPEG_PIXELS_PER_BYTE`: draft decoding bounds its memory anyway."""
JPEG_PIXELS_PER_BYTE = 1000
"""A JPEG cannot describe more than ~256 pixels per byte (one 8×8 block of a flat image takes at least
2 bits with optimised Huffman tables; a flat 100 MP JPEG is 85 pixels per byte at standard tables,
256 optimised): a large JPEG above this ratio is a crafted header, refused as a ``decompression_bomb``."""
BOMB_MIN_PIXELS = 16_000_000
"""Below this many pixels an image decodes to at most ~64 MB whatever its compression ratio."""


REASONS: dict[str, str] = {
    "empty_file": "the file has zero bytes",
    "not_an_image": "the bytes are not an image format that Pillow can read",
    "truncated": "the image file ends early (an interrupted copy or download)",
    "corrupt": "the image file is damaged (bad header, checksum or compressed data)",
    "too_small": "the image is smaller than the minimum side",
    "too_large": "the image has more pixels than data.max_megapixels allows",
    "decompression_bomb": "the file declares far more pixels than a photograph of its size can hold "
                          "(pixels per byte of file): a decompression bomb",
    "unsupported_mode": "the image's colour mode cannot be converted to RGB",
}
"""The reason codes an :class:`ImageError` can carry, with a one-line explanation each."""

# File signatures of common image formats: used to tell "not an image at all" from
# "an image whose header is damaged".
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

# Serialises the header parse, during which the DecompressionBombWarning filter (and, only when a
# caller allows more pixels than Pillow's own limit, Image.MAX_IMAGE_PIXELS) is changed.
_OPEN_LOCK = threading.Lock()


class ImageError(DataError):
    """An image that cannot be used; ``reason`` is a stable code from :data:`REASONS`."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        self.detail = message
        super().__init__(f"{reason}: {message}")


def _sniff(data: bytes) -> str | None:
    """The format that the leading bytes announce, or ``None``."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _is_truncation(exc: BaseException) -> bool:
    """Whether a Pillow decoding error means that the data ended early."""
    if isinstance(exc, EOFError | struct.error):
        return True
    text = str(exc).lower()
    return "truncat" in text or "premature end" in text or "unexpected end" in text


def _classify(exc: BaseException, data: bytes, size: tuple[int, int] | None = None,
              max_pixels: int = MAX_PIXELS) -> ImageError:
    """Turn an exception raised while opening/verifying/loading into an :class:`ImageError`."""
    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, Image.DecompressionBombError):
        # Pillow's own limit, hit past the header parse (a GIF frame larger than its canvas, …).
        if size is not None:
            return _too_large(size, max_pixels)
        return ImageError("too_large", "a part of the image has more pixels than Pillow allows "
                                       f"({2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels)")
    fmt = _sniff(data)
    if isinstance(exc, UnidentifiedImageError):
        if fmt is None:
            return ImageError("not_an_image", f"not a recognised image format ({len(data)} bytes, "
                                              f"starting {data[:8]!r})")
        return ImageError("corrupt", f"starts like a {fmt} file but its header cannot be parsed")
    if _is_truncation(exc):
        return ImageError("truncated", f"{fmt or 'image'} data ends early ({len(data)} bytes): {exc}")
    return ImageError("corrupt", f"{fmt or 'image'} data is damaged: {type(exc).__name__}: {exc}")


def _open_checked(data: bytes) -> Image.Image:
    """``Image.open`` (header only) without Pillow's own pixel limit: :func:`check_header` applies ours.

    Pillow warns above ``MAX_IMAGE_PIXELS`` and raises, with its own wording, above twice that
    (179 MP by default); we lift it for the header parse only, under a lock, and restore it.
    """
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _mp(pixels: float) -> str:
    """Megapixels for a message: ``192``, ``50.0``, ``0.01``."""
    mp = pixels / 1e6
    return f"{mp:,.0f}" if mp >= 100 else f"{mp:.1f}" if mp >= 1 else f"{mp:.2g}"


def _too_large(size: tuple[int, int], max_pixels: int) -> ImageError:
    w, h = size
    return ImageError("too_large", f"{w}×{h} = {_mp(w * h)} megapixels, above the limit of {_mp(max_pixels)} "
                                   "megapixels (raise data.max_megapixels to accept it)")


def check_header(size: tuple[int, int], n_bytes: int, fmt: str | None, *, min_side: int = 8,
                 max_pixels: int = MAX_PIXELS) -> None:
    """Refuse, from the header alone, an image that is too small, too large or a decompression bomb.

    ``too_large``: more than ``max_pixels``. ``decompression_bomb``: above :data:`BOMB_MIN_PIXELS`
    pixels, more than :data:`BOMB_PIXELS_PER_BYTE` pixels per byte of file (:data:`JPEG_PIXELS_PER_BYTE`
    for a JPEG); a photograph has a few, a bomb hundreds to millions. ``too_small``: a side below ``min_side``.
    """
    w, h = size
    pixels = w * h
    if pixels > max_pixels:
        raise _too_large(size, max_pixels)
    per_byte = pixels / max(n_bytes, 1)
    limit = JPEG_PIXELS_PER_BYTE if fmt == "JPEG" else BOMB_PIXELS_PER_BYTE
    if pixels > BOMB_MIN_PIXELS and per_byte > limit:
        raise ImageError("decompression_bomb",
                         f"{w}×{h} = {_mp(pixels)} megapixels in a {n_bytes:,}-byte {fmt or 'image'} file: "
                         f"{per_byte:,.0f} pixels per byte, where photographs have a few and at most "
                         f"{limit} are accepted above {_mp(BOMB_MIN_PIXELS)} megapixels")
    if min(w, h) < min_side:
        raise ImageError("too_small", f"{w}×{h} is smaller than the minimum side of {min_side} pixels")


def _draft_scale(pixels: int, decode_pixels: int) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8) that brings ``pixels`` to at most ``decode_pixels`` if it can."""
    for s in (1, 2, 4, 8):
        if pixels / (s * s) <= decode_pixels:
            return s
    return 8


def _reduce(im: Image.Image, decode_pixels: int) -> Image.Image:
    """Reduce a decoded image by the integer factor that brings it to at most ``decode_pixels``."""
    w, h = im.size
    if w * h <= decode_pixels:
        return im
    factor = math.ceil(math.sqrt(w * h / decode_pixels))
    if im.mode in ("1", "P") or im.mode.startswith("I;16"):  # modes Image.reduce cannot handle
        im = to_rgb(im) if im.mode != "1" else im.convert("L")
    return im.reduce(factor)


def decode_image(data: bytes, *, min_side: int = 8, max_pixels: int = MAX_PIXELS,
                 decode_pixels: int = DECODE_PIXELS) -> Image.Image:
    """Verify, fully decode, orient and convert image bytes to an RGB image.

    Raises :class:`ImageError` (a :class:`~porcelain.errors.DataError`) with ``reason`` in
    :data:`REASONS`. The size is checked from the header, before decoding (:func:`check_header`).
    An image above ``decode_pixels`` comes out reduced (JPEG: decoded at 1/2, 1/4 or 1/8 scale;
    others: reduced by an integer factor), to at most about ``decode_pixels`` pixels.
    """
    if not data:
        raise ImageError("empty_file", "the file is empty (0 bytes)")
    size: tuple[int, int] | None = None
    try:
        # 1. Header only: size check before any pixel buffer exists.
        im = _open_checked(data)
        size = im.size
        fmt = im.format
        check_header(size, len(data), fmt, min_side=min_side, max_pixels=max_pixels)
        # 2. Structural verification (PNG: every chunk CRC up to IEND). It invalidates the object.
        im.verify()
        # 3. Reopen and decode fully, first frame only for animations; large JPEGs at reduced scale.
        im = _open_checked(data)
        if ImageFile.LOAD_TRUNCATED_IMAGES and fmt == "JPEG" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            # Another module turned on Pillow's global leniency; keep refusing cut-off JPEGs.
            raise ImageError("truncated", "JPEG data has no end-of-image marker")
        scale = _draft_scale(size[0] * size[1], decode_pixels) if fmt == "JPEG" else 1
        if scale > 1:
            im.draft(im.mode, (size[0] // scale, size[1] // scale))
        im.load()
        if im.size[0] * im.size[1] > max_pixels:
            raise _too_large(im.size, max_pixels)
        im = _reduce(im, decode_pixels)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError,
            TypeError, Image.DecompressionBombError) as exc:
        raise _classify(exc, data, size, max_pixels) from exc
    try:
        oriented = ImageOps.exif_transpose(im)
        if oriented is not None:
            im = oriented
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose a good image
        pass
    return to_rgb(im)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale → 8-bit ``L`` by scaling (not clipping)."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = (arr.astype(np.float64) / 257.0).round()
    elif im.mode == "F":
        a = arr.astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            out = (a * 255.0).round()
        else:
            out = (a - lo) / max(hi - lo, 1e-12) * 255.0
    else:  # "I": 32-bit signed; in practice 16-bit greyscale from PNG/TIFF
        a = arr.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0 and hi <= 255:
            out = a
        elif lo >= 0 and hi <= 65535:
            out = (a / 257.0).round()
        else:
            out = (a - lo) / max(hi - lo, 1.0) * 255.0
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "L")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except Exception:  # noqa: BLE001 - broken or unsupported profile: fall back to Pillow's formula
            pass
    return im.convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit ``RGB``; transparency is composited on white."""
    mode = im.mode
    try:
        if mode == "RGB":
            return im
        if mode == "CMYK":
            return _cmyk_to_rgb(im)
        if mode.startswith("I") or mode == "F":
            # A 16-bit tRNS colour key has no exact 8-bit equivalent after scaling: it is ignored.
            return _high_depth_to_l(im).convert("RGB")
        if mode == "La":  # premultiplied: Pillow only un-premultiplies it to LA
            im = im.convert("LA")
        if im.mode in ("LA", "PA", "RGBA", "RGBa") or "transparency" in im.info:
            return _composite_on_white(im.convert("RGBA"))
        return im.convert("RGB")  # 1, L, P, RGBX, YCbCr, HSV, …
    except (ValueError, OSError) as exc:
        raise ImageError("unsupported_mode", f"cannot convert mode {mode!r} to RGB: {exc}") from exc


def to_array(img: Image.Image, size: int) -> np.ndarray:
    """A ``size×size×3`` uint8 array: centre-crop to a square, then resize with Lanczos.

    Downscaling uses Pillow's ``reducing_gap`` (a fast box reduction down to twice the target
    followed by Lanczos), which is both quick and alias-free for large photographs.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    img = to_rgb(img)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = img.crop((left, top, left + side, top + side))
    if side != size:
        square = square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0 if side > 2 * size else None)
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8))


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless PNG bytes of an ``H×W×3`` (or ``H×W``) uint8 array."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 3:
        img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    elif arr.ndim == 2:
        img = Image.fromarray(np.ascontiguousarray(arr), "L")
    else:
        raise ValueError(f"encode_png expects H×W×3 or H×W, got shape {arr.shape}")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
