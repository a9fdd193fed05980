"""A synthesizer kind written the way a user would add one: this module only, nothing else edited.

``solid`` paints every image of a label combination in one colour derived from the combination.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np

from porcelain.hashing import stable_hash
from porcelain.results import ModelRef
from porcelain.synthesizers import Generated, Synthesizer, SynthesizerConfig, register


class SolidConfig(SynthesizerConfig):
    kind: Literal["solid"] = "solid"
    size: int = 32


@register
class Solid(Synthesizer):
    kind: ClassVar[str] = "solid"
    config: ClassVar[type[SynthesizerConfig]] = SolidConfig
    version: ClassVar[str] = "1"
    libs: ClassVar[tuple[str, ...]] = ("numpy",)
    prepared: ClassVar[list[str]] = []

    def prepare(self, store: Any, data: dict[str, Any], cfg: SolidConfig, runtime: Any) -> ModelRef:
        self.prepared.append(data["data_hash"])
        return ModelRef(kind=self.kind, key=stable_hash({"data": data["data_hash"], **cfg.identity()}),
                        meta={"tasks": data["tasks"], "classes": data["classes"]})

    def generate(self, store: Any, ref: ModelRef, spec: Any, cfg: SolidConfig, runtime: Any) -> Generated:
        rgb = np.array([(37 * (i + 1) * (v + 1)) % 256 for i, v in enumerate((list(spec.combo) + [0, 0, 0])[:3])],
                       dtype=np.uint8)
        images = []
        for i in range(spec.start, spec.start + spec.count):  # image i depends on (seed, i) only
            img = np.broadcast_to(rgb, (cfg.size, cfg.size, 3)).copy()
            img[0, 0] = (spec.seed + i) % 256
            images.append(img)
        return Generated(images=images,
                         provenance=[{"colour": rgb.tolist(), "index": i} for i in range(spec.start, spec.start + spec.count)])
