"""The synthesizer seam: what every way of making synthetic images provides.

A *synthesizer kind* (``closed_set``, ``sd_lora``, …) is one module with one config class and one
:class:`Synthesizer` subclass, registered with :func:`porcelain.synthesizers.register`. The pipeline
knows only this protocol:

``prepare(store, data, cfg, runtime) -> ModelRef``
    Train or load what the kind needs (cached in the store by the kind's identity) and return a
    reference to the stored model: small, JSON-able, with the sha256 of every file it points to.
``plan(store, data, cfg, need, shard_size, seed) -> list[ShardSpec]``
    Which images to make: combination, start index, count and seed per shard (and, for
    image-conditioned kinds, the ids of the real train images each shard starts from).
``generate(store, ref, spec, cfg, runtime) -> Generated``
    The pixels of one shard and one provenance record per image. Pure: the generic shard writer
    (:mod:`porcelain.generate.shards`) stores the images, the manifest, the keys and the locks.
    Image ``spec.start + i`` must depend only on ``(spec.seed, spec.start + i)`` (and the model and
    settings), never on ``spec.count`` or the batch: the writer grows a shard by asking for its tail.

Nothing else in the flow, the tasks, the shard writer or the report branches on the kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from porcelain.generate.plan import Combo, ShardSpec, plan_shards
from porcelain.results import ModelRef


class SynthesizerConfig(BaseModel):
    """The settings of one synthesizer in ``synthesizers:``. Subclasses add their own keys and fix
    ``kind`` to a literal; a key of another kind is an unknown key, hence an error naming it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    name: str | None = Field(None, description="How the report names this synthesizer (default: its kind). "
                             "Distinct per run, so that two settings of one kind can be compared.")

    filters: dict[str, Any] | None = Field(
        None, description="This synthesizer's own filter chain (the keys of the run's `filters:`), in place of "
        "the run's: e.g. the same generator twice, once unfiltered and once with `filters: {faithfulness: 0.9}`, "
        "compares the filter's effect in one run (the unfiltered images are generated once and shared).")

    @property
    def label(self) -> str:
        return self.name or self.kind

    def identity(self) -> dict[str, Any]:
        """What the images depend on: every setting except the display name and the filters (which
        choose among the images, and are keyed by the filter stage)."""
        return self.model_dump(mode="json", exclude={"name", "filters"})

    def prepare_identity(self) -> dict[str, Any]:
        """What :meth:`Synthesizer.prepare` depends on (default: everything); kinds narrow it so that
        changing a sampling setting does not retrain."""
        return self.identity()

    def image_sizes(self) -> list[int]:
        """Image sizes (px) the kind reads real images at; the flow packs them beforehand."""
        return []


@dataclass
class Generated:
    """One shard's output: ``images`` (uint8 HWC) and one provenance dict per image (JSON-able)."""

    images: list[np.ndarray]
    provenance: list[dict[str, Any]] = field(default_factory=list)
    shard: dict[str, Any] = field(default_factory=dict)  # provenance shared by the shard's images


class Synthesizer(ABC):
    """One kind. Subclasses set ``kind``, ``config`` and ``version`` and implement the three stages.

    ``version`` is the kind's stage version: bump it when equal inputs would give different images
    (it is in every cache key of the kind; tests/test_versions.py checks that code changes come with
    a decision about it).
    """

    kind: ClassVar[str]
    config: ClassVar[type[SynthesizerConfig]]
    version: ClassVar[str]
    image_conditioned: ClassVar[bool] = False
    #: results of other stages the kind's prepare needs, passed as ``context`` (e.g. {"reference"}: the
    #: stored reference classifier's card, for saliency); only these enter its prepare task's key
    needs: ClassVar[frozenset[str]] = frozenset()

    def needs_for(self, cfg: SynthesizerConfig) -> frozenset[str]:
        """:attr:`needs` for these settings (a kind may need the reference only for some of them)."""
        return self.needs

    @abstractmethod
    def prepare(self, store: Any, data: dict[str, Any], cfg: SynthesizerConfig, runtime: Any,
                context: dict[str, Any] | None = None) -> ModelRef:
        ...

    def plan(self, store: Any, data: dict[str, Any], cfg: SynthesizerConfig, need: dict[Combo, int],
             shard_size: int, seed: int) -> list[ShardSpec]:
        """Default: fixed-size shards per combination, boundaries at multiples of ``shard_size``."""
        return plan_shards([need], shard_size, seed)

    @abstractmethod
    def generate(self, store: Any, ref: ModelRef, spec: ShardSpec, cfg: SynthesizerConfig, runtime: Any) -> Generated:
        ...

    def augment(self, store: Any, ref: ModelRef, cfg: SynthesizerConfig, src: np.ndarray, *, seed: int,
                first_index: int, strength: float, runtime: Any) -> tuple[np.ndarray, list[dict[str, Any]],
                                                                           dict[str, np.ndarray]]:
        """Image-conditioned kinds: the images made from the real train images at rows ``src`` at
        ``strength``, their provenance, and named intermediate images (source, mask, mix, …) for the
        audit grid. Used by the semantic-drift stage (:mod:`porcelain.synthesizers.drift`)."""
        raise NotImplementedError(f"{self.kind} does not start from real images")

    def describe(self, ref: ModelRef, cfg: SynthesizerConfig) -> list[str]:
        """Report lines about the prepared model (Markdown bullets)."""
        return [f"- model `{ref.key}`"]
