"""Tests of porcelain.data.images: every bad-input class gets its reason code, every mode becomes RGB."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from porcelain.data.images import REASONS, ImageError, check_header, decode_image, encode_png, to_array, to_rgb
from porcelain.errors import DataError


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A ~100-byte PNG whose IHDR declares ``width×height`` (CRC fixed, so the header is valid)."""
    data = bytearray(_encode(Image.new("1", (8, 8)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(data, **kw)
    assert isinstance(info.value, DataError)
    assert info.value.reason in REASONS
    return info.value.reason


# ---------------------------------------------------------------------------------------------- refusals


def test_empty_file():
    assert _reason(b"") == "empty_file"


def test_text_named_jpg_is_not_an_image():
    assert _reason(b"image,dynasty\nthis is a CSV, not a JPEG\n") == "not_an_image"


def test_truncated_png_and_jpeg():
    png = _encode(_noise(), "PNG")
    jpg = _encode(_noise(), "JPEG", quality=90)
    assert _reason(png[: len(png) // 2]) == "truncated"
    assert _reason(png[:-12]) == "truncated"  # only the IEND chunk missing: caught by verify()
    assert _reason(jpg[: int(len(jpg) * 0.6)]) == "truncated"
    assert _reason(jpg[:-2]) == "truncated"  # no end-of-image marker


def test_png_with_bad_crc_is_corrupt():
    png = bytearray(_encode(_noise(), "PNG"))
    png[60] ^= 0xFF  # inside the first IDAT chunk's data
    assert _reason(bytes(png)) == "corrupt"


def test_one_pixel_is_too_small():
    assert _reason(_encode(Image.new("RGB", (1, 1)), "PNG")) == "too_small"
    assert _reason(_encode(Image.new("RGB", (200, 4)), "PNG")) == "too_small"
    decode_image(_encode(Image.new("RGB", (200, 4)), "PNG"), min_side=4)  # the threshold is a parameter


def test_decompression_bomb_refused_from_header_without_global_changes():
    limit_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    bomb = png_bomb(30_000, 30_000)
    assert len(bomb) < 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        # Refused from the header: had the pixels been decoded, the tiny IDAT would read as "truncated".
        assert _reason(bomb) == "too_large"  # 900 MP: above the 300 MP limit
        # Below the limit, but 81 MP in ~100 bytes: a bomb, told apart by its pixels per byte.
        assert _reason(png_bomb(9_000, 9_000)) == "decompression_bomb"
        assert _reason(png_bomb(400, 400), max_pixels=100_000) == "too_large"
    assert Image.MAX_IMAGE_PIXELS == limit_before
    assert warnings.filters == filters_before


def flat_png(width: int, height: int, grey: int = 200) -> bytes:
    """A genuine flat greyscale PNG, written row by row (no width×height buffer is ever allocated)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" + bytes([grey]) * width
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header (SOF0) declaring ``width×height``."""
    data = bytearray(jpeg)
    i = data.index(b"\xff\xc0")
    data[i + 5: i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture(scope="module")
def big_flat_jpeg() -> bytes:
    """A real 10000×10000 (100 MP) flat greyscale JPEG: 1.2 MB, 85 pixels per byte (0.3 s to encode)."""
    return _encode(Image.new("L", (10_000, 10_000), 180), "JPEG", quality=90)


def test_large_jpeg_is_a_photograph_decoded_at_reduced_size(big_flat_jpeg):
    assert 50 < 100_000_000 / len(big_flat_jpeg) < 100  # far below a bomb's ratio
    img = decode_image(big_flat_jpeg)  # 100 MP < the 300 MP default: accepted
    assert img.mode == "RGB" and img.size == (2_500, 2_500)  # drafted at 1/4: ≤ 16 MP in memory
    assert np.asarray(img)[::500, ::500, 0].tolist() == [[180] * 5] * 5
    assert _reason(big_flat_jpeg[: len(big_flat_jpeg) // 2]) == "truncated"  # draft still reads every byte


def test_too_large_messages_are_ours_and_consistent(big_flat_jpeg):
    small = _encode(Image.new("RGB", (16, 16), (200, 100, 50)), "JPEG")
    details = {}
    for w, h, data in [(10_000, 10_000, big_flat_jpeg), (16_000, 12_000, _with_jpeg_size(small, 16_000, 12_000)),
                       (20_000, 20_000, png_bomb(20_000, 20_000))]:
        with pytest.raises(ImageError) as info:
            decode_image(data, max_pixels=50_000_000)
        assert info.value.reason == "too_large"
        details[(w, h)] = info.value.detail
    assert details[(10_000, 10_000)] == ("10000×10000 = 100 megapixels, above the limit of 50.0 megapixels "
                                         "(raise data.max_megapixels to accept it)")
    assert details[(16_000, 12_000)] == ("16000×12000 = 192 megapixels, above the limit of 50.0 megapixels "
                                         "(raise data.max_megapixels to accept it)")
    assert details[(20_000, 20_000)].startswith("20000×20000 = 400 megapixels, above the limit of 50.0")
    # 192 MP is above Pillow's own limit (179 MP): still our wording, never Pillow's
    with pytest.raises(ImageError) as info:
        decode_image(_with_jpeg_size(small, 16_000, 12_000), max_pixels=100_000_000)
    assert info.value.detail.startswith("16000×12000 = 192 megapixels, above the limit of 100 megapixels")
    assert "DOS" not in info.value.detail and "Pillow" not in info.value.detail


def test_bomb_told_from_photograph_by_pixels_per_byte():
    # a 192 MP JPEG header on a 600-byte file: no JPEG can be that small
    tiny = _with_jpeg_size(_encode(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG"), 16_000, 12_000)
    with pytest.raises(ImageError) as info:
        decode_image(tiny)
    assert info.value.reason == "decompression_bomb"
    assert "pixels per byte" in info.value.detail and "16000×12000 = 192 megapixels" in info.value.detail
    # a genuine flat PNG of 25 MP: tens of kilobytes, ~800 pixels per byte
    bomb = flat_png(5_000, 5_000)
    assert len(bomb) < 100_000
    assert _reason(bomb) == "decompression_bomb"
    # the same ratio rule from the header alone: a 24 MP PNG photograph has ~1 pixel per byte
    check_header((6_000, 4_000), 30_000_000, "PNG")
    check_header((6_000, 4_000), 3_000_000, "JPEG")
    with pytest.raises(ImageError, match="decompression_bomb"):
        check_header((6_000, 4_000), 100_000, "PNG")
    check_header((3_000, 3_000), 1_000, "PNG")  # 9 MP: small enough to decode whatever its ratio


def test_large_images_come_out_reduced():
    png = decode_image(_encode(_noise(400, 300), "PNG"), decode_pixels=10_000)
    assert png.size == (100, 75) and png.mode == "RGB"  # reduced by 4 after decoding
    jpg = decode_image(_encode(_noise(800, 800), "JPEG"), decode_pixels=50_000)
    assert jpg.size == (200, 200)  # decoded at 1/4 scale
    bilevel = decode_image(_encode(Image.new("1", (300, 300), 1), "PNG"), decode_pixels=10_000)
    assert bilevel.size == (100, 100) and np.asarray(bilevel).min() == 255  # reduced by 3
    assert decode_image(_encode(_noise(64, 48), "PNG")).size == (64, 48)  # small: untouched


# ---------------------------------------------------------------------------------------------- modes


def test_cmyk_jpeg_becomes_rgb_with_right_colour():
    red_cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    img = decode_image(_encode(red_cmyk, "JPEG", quality=95))
    assert img.mode == "RGB"
    r, g, b = np.asarray(img)[8, 8]
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped():
    arr = np.zeros((16, 16), dtype=np.uint16)
    arr[:, :8] = 65535
    arr[:, 8:] = 128 * 257
    src = Image.fromarray(arr)
    assert src.mode.startswith("I;16")
    img = decode_image(_encode(src, "PNG"))
    out = np.asarray(img)
    assert img.mode == "RGB"
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 12]) == (128, 128, 128)


def test_32bit_integer_and_float_modes():
    i32 = Image.fromarray((np.arange(256, dtype=np.int32).reshape(16, 16) * 257))
    assert i32.mode == "I"
    out = np.asarray(to_rgb(i32))
    assert out[0, 0, 0] == 0 and out[15, 15, 0] == 255
    f = Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32))
    assert np.asarray(to_rgb(f))[0, 0, 0] in (127, 128)


def test_palette_png_with_transparency_is_composited_on_white():
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    pal.paste(1, (8, 0, 16, 16))
    img = decode_image(_encode(pal, "PNG", transparency=0))
    out = np.asarray(img)
    assert img.mode == "RGB"
    assert tuple(out[0, 0]) == (255, 255, 255)  # transparent black → white
    assert tuple(out[0, 12]) == (255, 0, 0)


def test_la_and_rgba_are_composited_on_white():
    la = Image.new("LA", (16, 16), (0, 0))
    la.paste((0, 255), (8, 0, 16, 16))
    out = np.asarray(decode_image(_encode(la, "PNG")))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 12]) == (0, 0, 0)
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 128))
    b = np.asarray(decode_image(_encode(rgba, "PNG")))[0, 0]
    assert b[2] == 255 and 120 <= b[0] <= 135  # half-transparent blue over white


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "YCbCr", "HSV", "RGBX", "La", "PA", "RGBa"])
def test_every_mode_converts_to_rgb(mode):
    out = to_rgb(Image.new(mode, (9, 9)))
    assert out.mode == "RGB" and out.size == (9, 9)


def test_exif_orientation_is_applied():
    # Stored 40 wide × 20 high, left half red, right half blue; Orientation 6 = rotate 90° clockwise.
    src = Image.new("RGB", (40, 20), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img = decode_image(_encode(src, "JPEG", quality=95, exif=exif.tobytes()))
    assert img.size == (20, 40)
    out = np.asarray(img).astype(int)
    top, bottom = out[5, 10], out[35, 10]
    assert top[0] > 200 and top[2] < 60  # the stored left (red) side is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_decoded_image_is_fully_loaded_and_independent_of_input():
    data = _encode(_noise(), "PNG")
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(_noise()))


# ---------------------------------------------------------------------------------------------- arrays


def test_to_array_center_crops_then_resizes():
    src = Image.new("RGB", (40, 20), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 10, 20))
    src.paste((0, 255, 0), (10, 0, 30, 20))  # the centre 20×20 square is green
    arr = to_array(src, 8)
    assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8
    assert (arr[..., 1] > 200).all() and (arr[..., 0] < 40).all() and (arr[..., 2] < 40).all()
    big = to_array(_noise(300, 200), 16)
    assert big.shape == (16, 16, 3)
    assert to_array(Image.new("L", (10, 10), 7), 10).shape == (10, 10, 3)


def test_encode_png_round_trip():
    arr = np.asarray(_noise(20, 10))
    back = np.asarray(decode_image(encode_png(arr)))
    np.testing.assert_array_equal(arr, back)
    with pytest.raises(ValueError):
        encode_png(arr.astype(np.float32))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 2), dtype=np.uint8))
