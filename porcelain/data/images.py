"""Safe image decoding: bytes in, an RGB :class:`PIL.Image.Image` (or a square uint8 array) out.

Everything that reaches a model goes through :func:`decode_image`, which

* refuses empty files, non-images, truncated or corrupt files, tiny images and decompression
  bombs with an :class:`ImageError` whose ``reason`` is a short stable code (see :data:`REASONS`);
* checks the pixel count from the header *before* any pixel is allocated;
* applies the EXIF orientation, so that a phone photograph stored sideways comes out upright;
* converts every Pillow mode to 8-bit RGB correctly (CMYK through its ICC profile when it has one,
  16/32-bit greyscale by scaling, alpha and palette transparency composited on white).

No global Pillow state is changed for longer than the header parse of one call, which is done
under a module lock (see :func:`_open_checked`).
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from porcelain.errors import DataError

__all__ = ["REASONS", "ImageError", "decode_image", "encode_png", "to_array", "to_rgb"]

REASONS: dict[str, str] = {
    "empty_file": "the file has zero bytes",
    "not_an_image": "the bytes are not an image format that Pillow can read",
    "truncated": "the image file ends early (an interrupted copy or download)",
    "corrupt": "the image file is damaged (bad header, checksum or compressed data)",
    "too_small": "the image is smaller than the minimum side",
    "too_large": "the image declares more pixels than allowed (possible decompression bomb)",
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


def _classify(exc: BaseException, data: bytes) -> ImageError:
    """Turn an exception raised while opening/verifying/loading into an :class:`ImageError`."""
    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError("too_large", str(exc))
    fmt = _sniff(data)
    if isinstance(exc, UnidentifiedImageError):
        if fmt is None:
            return ImageError("not_an_image", f"not a recognised image format ({len(data)} bytes, "
                                              f"starting {data[:8]!r})")
        return ImageError("corrupt", f"starts like a {fmt} file but its header cannot be parsed")
    if _is_truncation(exc):
        return ImageError("truncated", f"{fmt or 'image'} data ends early ({len(data)} bytes): {exc}")
    return ImageError("corrupt", f"{fmt or 'image'} data is damaged: {type(exc).__name__}: {exc}")


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """``Image.open`` (header only) with Pillow's bomb warning silenced: we apply ``max_pixels``."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        # Pillow raises on its own above 2 × MAX_IMAGE_PIXELS; lift that only if the caller allows more.
        lift = saved is not None and max_pixels > 2 * saved
        if lift:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            return Image.open(io.BytesIO(data))
        finally:
            if lift:
                Image.MAX_IMAGE_PIXELS = saved


def _check_size(size: tuple[int, int], *, min_side: int, max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageError("too_large", f"{w}×{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                                      "(possible decompression bomb)")
    if min(w, h) < min_side:
        raise ImageError("too_small", f"{w}×{h} is smaller than the minimum side of {min_side} pixels")


def decode_image(data: bytes, *, min_side: int = 8, max_pixels: int = 64_000_000) -> Image.Image:
    """Verify, fully decode, orient and convert image bytes to an RGB image.

    Raises :class:`ImageError` (a :class:`~porcelain.errors.DataError`) with ``reason`` in
    :data:`REASONS`. The pixel count is checked from the header, before decoding.
    """
    if not data:
        raise ImageError("empty_file", "the file is empty (0 bytes)")
    try:
        # 1. Header only: size check before any pixel buffer exists.
        im = _open_checked(data, max_pixels)
        _check_size(im.size, min_side=min_side, max_pixels=max_pixels)
        fmt = im.format
        # 2. Structural verification (PNG: every chunk CRC up to IEND). It invalidates the object.
        im.verify()
        # 3. Reopen and decode fully, first frame only for animations.
        im = _open_checked(data, max_pixels)
        if ImageFile.LOAD_TRUNCATED_IMAGES and fmt == "JPEG" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            # Another module turned on Pillow's global leniency; keep refusing cut-off JPEGs.
            raise ImageError("truncated", "JPEG data has no end-of-image marker")
        im.load()
        _check_size(im.size, min_side=min_side, max_pixels=max_pixels)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError,
            TypeError, Image.DecompressionBombError) as exc:
        raise _classify(exc, data) from exc
    try:
        oriented = ImageOps.exif_transpose(im)
        if oriented is not None:
            im = oriented
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose a good image
        pass
    rgb = to_rgb(im)
    _check_size(rgb.size, min_side=min_side, max_pixels=max_pixels)
    return rgb


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
