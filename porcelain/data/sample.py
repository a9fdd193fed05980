"""A deterministic, procedurally drawn porcelain-like sample dataset.

Four tasks, each with a visible cue so that a classifier can learn it from pixels:

* ``type``    – vessel silhouette (meiping vase, bowl, jar, plate)
* ``glaze``   – body colour and texture (celadon with crackle, white, blue-and-white painting,
                cobalt with speckle, copper-red)
* ``dynasty`` – painted shoulder band (Song plain, Yuan dark band, Ming iron-red bands, Qing yellow band with dots)
* ``kiln``    – studio backdrop and clay colour at the foot (each kiln's collection photographed apart)

Dynasty and kiln are correlated with glaze (Longquan mostly celadon, Jingdezhen mostly blue-and-white,
Song mostly celadon or white, …) and glaze×type is long-tailed: the rarest combination is ~90× rarer
than the most common one, so that the sample exercises the imbalance machinery.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

TASKS: tuple[str, ...] = ("dynasty", "kiln", "glaze", "type")
CLASSES: dict[str, tuple[str, ...]] = {
    "dynasty": ("song", "yuan", "ming", "qing"),
    "kiln": ("longquan", "jingdezhen", "ding", "jun"),
    "glaze": ("celadon", "white", "blue_and_white", "cobalt", "copper_red"),
    "type": ("vase", "bowl", "jar", "plate"),
}

_GLAZE_RGB = {
    "celadon": (122, 168, 128),
    "white": (238, 234, 222),
    "blue_and_white": (232, 236, 242),
    "cobalt": (38, 62, 150),
    "copper_red": (168, 40, 36),
}
_DYNASTY_BAND = {
    "yuan": (40, 30, 24),      # dark iron-brown
    "ming": (214, 96, 40),     # iron-red
    "qing": (236, 200, 64),    # enamel yellow
}
_KILN_BACKDROP = {
    "longquan": (92, 92, 96),
    "jingdezhen": (196, 170, 120),
    "ding": (120, 150, 190),
    "jun": (150, 110, 150),
}
_KILN_CLAY = {
    "longquan": (150, 80, 50),
    "jingdezhen": (240, 240, 240),
    "ding": (200, 180, 120),
    "jun": (90, 60, 50),
}
# Rank of each glaze×type combination in the long tail (0 = most common).
_COMBO_RANK = [
    ("celadon", "vase"), ("blue_and_white", "jar"), ("white", "bowl"), ("blue_and_white", "vase"),
    ("celadon", "bowl"), ("white", "plate"), ("cobalt", "vase"), ("blue_and_white", "plate"),
    ("copper_red", "vase"), ("celadon", "plate"), ("white", "vase"), ("cobalt", "jar"),
    ("blue_and_white", "bowl"), ("copper_red", "bowl"), ("celadon", "jar"), ("white", "jar"),
    ("cobalt", "bowl"), ("copper_red", "jar"), ("cobalt", "plate"), ("copper_red", "plate"),
]
_KILN_GIVEN_GLAZE = {
    "celadon": {"longquan": 0.7, "jun": 0.15, "ding": 0.1, "jingdezhen": 0.05},
    "white": {"ding": 0.65, "jingdezhen": 0.25, "longquan": 0.05, "jun": 0.05},
    "blue_and_white": {"jingdezhen": 0.8, "ding": 0.1, "longquan": 0.05, "jun": 0.05},
    "cobalt": {"jingdezhen": 0.5, "jun": 0.4, "longquan": 0.05, "ding": 0.05},
    "copper_red": {"jingdezhen": 0.6, "jun": 0.3, "ding": 0.05, "longquan": 0.05},
}
_DYNASTY_GIVEN_GLAZE = {
    "celadon": {"song": 0.65, "yuan": 0.2, "ming": 0.1, "qing": 0.05},
    "white": {"song": 0.5, "ming": 0.25, "yuan": 0.1, "qing": 0.15},
    "blue_and_white": {"ming": 0.5, "yuan": 0.25, "qing": 0.2, "song": 0.05},
    "cobalt": {"qing": 0.5, "ming": 0.3, "yuan": 0.15, "song": 0.05},
    "copper_red": {"ming": 0.45, "qing": 0.4, "yuan": 0.1, "song": 0.05},
}
TAIL_EXPONENT = 1.5
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SampleItem:
    """One sample image's labels (the image itself is drawn by :func:`render`)."""

    index: int
    labels: dict[str, str]
    seed: int


def combination_counts(n: int) -> dict[tuple[str, str], int]:
    """Exact glaze×type counts for ``n`` images: a Zipf-like tail, every combination present."""
    weights = np.array([(k + 1) ** -TAIL_EXPONENT for k in range(len(_COMBO_RANK))])
    raw = weights / weights.sum() * n
    counts = np.maximum(np.floor(raw).astype(int), 1)
    # Largest-remainder rounding so that the counts add up to n exactly.
    order = np.argsort(-(raw - np.floor(raw)))
    i = 0
    while counts.sum() < n:
        counts[order[i % len(order)]] += 1
        i += 1
    while counts.sum() > n:
        j = int(np.argmax(counts))
        counts[j] -= 1
    return {combo: int(c) for combo, c in zip(_COMBO_RANK, counts)}


def plan_sample(n: int = 1600, seed: int = 0) -> list[SampleItem]:
    """Labels for ``n`` images, deterministic in ``(n, seed)``."""
    if n < len(_COMBO_RANK):
        raise ValueError(f"the sample needs at least {len(_COMBO_RANK)} images, got n={n}")
    rng = np.random.default_rng(seed)
    items: list[SampleItem] = []
    for (glaze, vtype), count in combination_counts(n).items():
        for _ in range(count):
            kiln = _draw(rng, _KILN_GIVEN_GLAZE[glaze])
            dynasty = _draw(rng, _DYNASTY_GIVEN_GLAZE[glaze])
            labels = {"dynasty": dynasty, "kiln": kiln, "glaze": glaze, "type": vtype}
            items.append(SampleItem(index=0, labels=labels, seed=int(rng.integers(2**31 - 1))))
    order = rng.permutation(len(items))
    return [SampleItem(index=i, labels=items[j].labels, seed=items[j].seed) for i, j in enumerate(order)]


def _draw(rng: np.random.Generator, probs: dict[str, float]) -> str:
    keys = list(probs)
    p = np.array([probs[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _outline(vtype: str, s: float, rng: np.random.Generator) -> tuple[list[tuple[float, float]], float]:
    """The vessel's polygon on an ``s`` px canvas and its centre x, from the image's first three draws."""
    cx = s / 2 + rng.uniform(-0.04, 0.04) * s
    cy = s / 2 + rng.uniform(-0.03, 0.03) * s
    return _silhouette(vtype, s, cx, cy, rng.uniform(0.9, 1.08)), cx


def vessel_mask(labels: dict[str, str], size: int = 32, seed: int = 0) -> np.ndarray:
    """Where :func:`render` draws the vessel for these ``(labels, size, seed)``: bool ``size×size``,
    the pixels its silhouette covers at least half (a known foreground, e.g. to score saliency masks)."""
    s = size * _SUPERSAMPLE
    mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(mask).polygon(_outline(labels["type"], s, np.random.default_rng(seed))[0], fill=255)
    return np.asarray(mask.resize((size, size), Image.BOX)) >= 128


def _silhouette(vtype: str, s: float, cx: float, cy: float, scale: float) -> list[tuple[float, float]]:
    """Right half-profile of a vessel as (dx, y) points, mirrored into a closed polygon."""
    u = s * scale
    profiles = {
        # (half-width, height from centre) pairs from the top (mouth) to the bottom (foot)
        "vase": [(0.07, -0.42), (0.07, -0.34), (0.22, -0.24), (0.25, -0.14), (0.20, 0.10), (0.12, 0.32), (0.13, 0.40)],
        "bowl": [(0.42, -0.14), (0.38, 0.02), (0.28, 0.16), (0.14, 0.22), (0.14, 0.28)],
        "jar": [(0.12, -0.36), (0.12, -0.28), (0.30, -0.16), (0.34, 0.02), (0.28, 0.22), (0.18, 0.32), (0.18, 0.36)],
        "plate": [(0.46, -0.08), (0.44, 0.06), (0.30, 0.16), (0.16, 0.20), (0.16, 0.24)],
    }
    right = [(cx + dx * u, cy + dy * u) for dx, dy in profiles[vtype]]
    left = [(cx - dx * u, cy + dy * u) for dx, dy in reversed(profiles[vtype])]
    return right + left


def render(labels: dict[str, str], size: int = 32, seed: int = 0) -> np.ndarray:
    """Draw one image (H×W×3 uint8) for the given labels; deterministic in ``(labels, size, seed)``."""
    rng = np.random.default_rng(seed)
    s = size * _SUPERSAMPLE
    backdrop = np.array(_KILN_BACKDROP[labels["kiln"]], dtype=float)
    # A soft vertical gradient on the backdrop, as in studio photographs.
    grad = np.linspace(1.08, 0.92, s)[:, None, None]
    canvas = np.clip(backdrop[None, None, :] * grad * np.ones((s, s, 1)), 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas, "RGB")

    poly, cx = _outline(labels["type"], s, rng)
    mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(mask).polygon(poly, fill=255)
    top = min(p[1] for p in poly)
    bottom = max(p[1] for p in poly)
    height = bottom - top

    body = np.array(_GLAZE_RGB[labels["glaze"]], dtype=float) * rng.uniform(0.92, 1.06)
    # Light from the left: the body is brighter on its left side.
    shade = np.linspace(1.12, 0.78, s)[None, :, None]
    body_img = np.clip(body[None, None, :] * shade * np.ones((s, 1, 1)), 0, 255).astype(np.uint8)
    layer = Image.fromarray(body_img, "RGB")
    draw = ImageDraw.Draw(layer)

    glaze = labels["glaze"]
    if glaze == "celadon":  # crackle: thin dark random lines
        for _ in range(10):
            x0, y0 = rng.uniform(cx - 0.3 * s, cx + 0.3 * s), rng.uniform(top, bottom)
            draw.line([(x0, y0), (x0 + rng.uniform(-12, 12), y0 + rng.uniform(-12, 12))], fill=(70, 100, 75), width=2)
    elif glaze == "cobalt":  # speckle: small pale dots
        for _ in range(30):
            x0, y0 = rng.uniform(cx - 0.3 * s, cx + 0.3 * s), rng.uniform(top, bottom)
            draw.ellipse([x0, y0, x0 + 3, y0 + 3], fill=(120, 140, 210))
    elif glaze == "blue_and_white":  # painted cobalt scrolls on white
        for _ in range(5):
            x0, y0 = rng.uniform(cx - 0.25 * s, cx + 0.2 * s), rng.uniform(top + 0.25 * height, bottom - 0.2 * height)
            r = rng.uniform(5, 10)
            draw.arc([x0, y0, x0 + 2 * r, y0 + 2 * r], 0, 300, fill=(30, 60, 160), width=5)

    # Dynasty: a painted shoulder band whose colour and pattern mark the period (Song left plain).
    dyn = labels["dynasty"]
    if dyn != "song":
        colour = _DYNASTY_BAND[dyn]
        y = top + 0.2 * height
        band = 0.16 * height
        draw.rectangle([0, y, s, y + band], fill=colour)
        if dyn == "ming":  # a second, thin band lower down
            y2 = top + 0.62 * height
            draw.rectangle([0, y2, s, y2 + 0.06 * height], fill=colour)
        elif dyn == "qing":  # a row of dots under the band
            for x in np.arange(cx - 0.45 * s, cx + 0.45 * s, s / 10):
                draw.ellipse([x, y + band + 2, x + s / 22, y + band + 2 + s / 22], fill=colour)

    img.paste(layer, (0, 0), mask)
    # Unglazed foot: the kiln's clay colour.
    foot = Image.new("L", (s, s), 0)
    ImageDraw.Draw(foot).rectangle([0, bottom - 0.06 * height, s, bottom], fill=255)
    foot = Image.fromarray((np.asarray(foot) & np.asarray(mask)).astype(np.uint8))
    img.paste(Image.new("RGB", (s, s), _KILN_CLAY[labels["kiln"]]), (0, 0), foot)

    img = img.filter(ImageFilter.GaussianBlur(radius=_SUPERSAMPLE * 0.3)).resize((size, size), Image.LANCZOS)
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0.0, 3.0, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_sample(out_dir: str | Path, n: int = 1600, size: int = 32, seed: int = 0) -> Path:
    """Write ``manifest.csv`` and ``images/*.png`` under ``out_dir``; return the manifest path.

    The manifest has no ``split`` column: the pipeline's seeded stratified split is used.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for item in plan_sample(n, seed):
        name = f"images/{item.index:05d}.png"
        (out / name).write_bytes(png_bytes(render(item.labels, size, item.seed)))
        rows.append({"image": name, **item.labels})
    manifest = out / "manifest.csv"
    tmp = manifest.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", *TASKS])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(manifest)
    return manifest
