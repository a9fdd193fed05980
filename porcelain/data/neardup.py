"""Near-duplicates: a perceptual hash per image, and the pairs of images that look alike across splits.

Exact duplicates are found by sha256 (:mod:`porcelain.data.validation`); several photographs or
re-encodings of one object are not. Each image gets a **256-bit pHash**: the signs, against their
median, of the 16×16 lowest-frequency DCT coefficients of a 64×64 greyscale thumbnail, plus its mean
**chromaticity** (r, g over r+g+b). Two images are near-duplicates when their hashes differ in at most
:data:`NEAR_DUPLICATE_BITS` bits *and* their chromaticities differ by at most
:data:`CHROMA_TOLERANCE` (a white bowl on blue and a green bowl on grey have the same grey structure).

The threshold, measured with ``python -m porcelain.data.neardup`` (1797 digit scans at 32 px with
their default few-shot split; the 1600-image procedural sample at 64 px with its stratified split):

* distinct digit scans: no pair across splits within 24 bits; at 16 bits, 0 of 1797 images flagged;
* the procedural sample (renders of the same few shapes, near-alike by construction): at 16 bits,
  34 pairs across splits (3.5% of images) at 64 px, none at 32 px (the demo's size); at 12 bits,
  10 pairs (1.1%) at 64 px;
* copies caught at 16 bits (sample images): JPEG quality 70 94%, half-size and back 100%,
  brightness +15% 92%, contrast −20% 97%; on 427×640 photographs all four stay within 8 bits.
  Geometric changes are not caught (a 5% crop moves ~100 bits, a 3° rotation 34–48): a second
  photograph of an object from another angle is not a near-duplicate to this hash.

Near-flat pictures (nothing but the lowest frequencies: a smooth gradient) are a weak spot: their
high-frequency coefficients are close to the median, so those bits are noise and a re-encoded copy
can land beyond 16 bits (a bicubic-upscaled 4×4 random picture: 34–68 bits). Photographs, the sample
and the digit scans have edges and texture; on them the figures above hold.

A 64-bit pHash (8×8 of 32×32) tolerates small rotations better but cannot tell distinct digits or
sample images apart: at 4 bits it flagged 3.3% of the digit scans and 52% of the sample images.

Pairs are only *flagged* (in the quarantine report and ``ValidatedDataset.near_duplicates``), never
dropped: which copy to keep, or whether they are the same object at all, is the curator's call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["CHROMA_TOLERANCE", "NEAR_DUPLICATE_BITS", "PerceptualHash", "near_duplicate_pairs",
           "perceptual_hash"]

NEAR_DUPLICATE_BITS = 16
"""Default: at most this many of the 256 hash bits differ between near-duplicates."""
CHROMA_TOLERANCE = 0.02
"""Largest difference of mean chromaticity (r or g over r+g+b) between near-duplicates."""

_THUMB = 64
_KEEP = 16


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(_THUMB)


@dataclass(frozen=True)
class PerceptualHash:
    """``bits``: 32 bytes (256 bits); ``chroma``: mean (r, g) / (r + g + b) of the thumbnail."""

    bits: bytes
    chroma: tuple[float, float]


def perceptual_hash(img: Image.Image) -> PerceptualHash:
    """The 256-bit pHash and mean chromaticity of an image (any mode, any size)."""
    thumb = img.convert("RGB").resize((_THUMB, _THUMB), Image.Resampling.LANCZOS, reducing_gap=3.0)
    rgb = np.asarray(thumb, dtype=np.float64)
    grey = np.asarray(thumb.convert("L"), dtype=np.float64)
    coeffs = (_DCT @ grey @ _DCT.T)[:_KEEP, :_KEEP].ravel()
    bits = np.packbits(coeffs > np.median(coeffs[1:])).tobytes()
    mean = rgb.reshape(-1, 3).mean(axis=0)
    total = float(mean.sum())
    chroma = (1 / 3, 1 / 3) if total <= 1e-9 else (float(mean[0]) / total, float(mean[1]) / total)
    return PerceptualHash(bits, (round(chroma[0], 6), round(chroma[1], 6)))


def _words(hashes: Sequence[PerceptualHash]) -> np.ndarray:
    return np.frombuffer(b"".join(h.bits for h in hashes), dtype=np.uint64).reshape(len(hashes), -1)


def near_duplicate_pairs(hashes: Sequence[PerceptualHash], groups: Sequence[str] | None = None, *,
                         max_bits: int = NEAR_DUPLICATE_BITS, chroma_tolerance: float = CHROMA_TOLERANCE,
                         block: int = 1 << 21) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` with ``i < j`` for every pair of near-duplicate hashes, sorted.

    With ``groups`` (one label per hash, e.g. the split), only pairs in *different* groups. Exact
    (every pair is compared, in blocks of about ``block`` pairs): ~1 s for 10 000 images.
    """
    n = len(hashes)
    if groups is not None and len(groups) != n:
        raise ValueError("hashes and groups must have the same length")
    if n < 2 or max_bits < 0:
        return []
    words = _words(hashes)
    chroma = np.asarray([h.chroma for h in hashes], dtype=np.float64)
    group_ids = None
    if groups is not None:
        _, group_ids = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    rows = max(1, block // n)
    out: list[tuple[int, int, int]] = []
    for start in range(0, n - 1, rows):
        stop = min(n - 1, start + rows)
        dist = np.zeros((stop - start, n), dtype=np.int32)
        for w in range(words.shape[1]):
            dist += np.bitwise_count(words[start:stop, w, None] ^ words[None, :, w])
        ok = dist <= max_bits
        ok &= np.arange(n)[None, :] > np.arange(start, stop)[:, None]
        if group_ids is not None:
            ok &= group_ids[None, :] != group_ids[start:stop, None]
        ii, jj = np.nonzero(ok)
        if len(ii) == 0:
            continue
        ii = ii + start
        close = np.abs(chroma[ii] - chroma[jj]).max(axis=1) <= chroma_tolerance
        out.extend((int(i), int(j), int(dist[i - start, j])) for i, j in zip(ii[close], jj[close]))
    return sorted(out)


def _measure() -> None:  # pragma: no cover - the figures of the module docstring
    """Print the near-duplicate rates of the built-in datasets at several thresholds."""
    import time

    from porcelain.data.digits import SPLITS, load_digits_data
    from porcelain.data.sample import plan_sample, render
    from porcelain.data.splits import stratified_split

    t0 = time.perf_counter()
    dig = load_digits_data(size=32)
    d_imgs = [im for s in SPLITS for im in dig.splits[s][0]]
    d_split = [s for s in SPLITS for _ in range(len(dig.splits[s][0]))]
    plan = plan_sample(1600, 0)
    s_imgs = [render(it.labels, 64, it.seed) for it in plan]
    s32 = [render(it.labels, 32, it.seed) for it in plan]
    s_split = stratified_split([tuple(it.labels.values()) for it in plan], [str(it.index) for it in plan])
    for name, imgs, split in (("digits 32 px", d_imgs, d_split), ("sample 64 px", s_imgs, s_split),
                              ("sample 32 px", s32, s_split)):
        t = time.perf_counter()
        hashes = [perceptual_hash(Image.fromarray(a)) for a in imgs]
        t_hash = time.perf_counter() - t
        for bits in (8, 12, 16, 20, 24):
            t = time.perf_counter()
            pairs = near_duplicate_pairs(hashes, split, max_bits=bits)
            flagged = {i for i, _, _ in pairs} | {j for _, j, _ in pairs}
            print(f"{name}: ≤{bits:2d} bits: {len(pairs):5d} pairs across splits, {len(flagged):4d} of "
                  f"{len(imgs)} images flagged ({len(flagged) / len(imgs):.2%}); "
                  f"hashing {t_hash:.1f} s, pairs {time.perf_counter() - t:.2f} s")
    # Copies: the distance from an image to an edited copy of itself (150 sample images at 64 px).
    import io

    from PIL import ImageEnhance

    def edits(im: Image.Image) -> dict[str, Image.Image]:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=70)
        w, h = im.size
        return {"jpeg q70": Image.open(buf), "half size and back": im.resize((w // 2, h // 2)).resize((w, h)),
                "brightness +15%": ImageEnhance.Brightness(im).enhance(1.15),
                "contrast -20%": ImageEnhance.Contrast(im).enhance(0.8),
                "crop 5%": im.crop((w // 20, h // 20, w - w // 20, h - h // 20)).resize((w, h)),
                "rotate 3°": im.rotate(3, resample=Image.Resampling.BILINEAR, fillcolor=im.getpixel((0, 0)))}

    caught: dict[str, list[bool]] = {}
    for a in s_imgs[:150]:
        im = Image.fromarray(a)
        h0 = perceptual_hash(im)
        for edit, copy in edits(im).items():
            caught.setdefault(edit, []).append(bool(near_duplicate_pairs([h0, perceptual_hash(copy)])))
    print(f"copies caught at ≤{NEAR_DUPLICATE_BITS} bits: "
          + ", ".join(f"{k} {np.mean(v):.0%}" for k, v in caught.items()))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":  # pragma: no cover
    _measure()
