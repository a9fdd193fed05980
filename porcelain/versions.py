"""Stage versions: what enters a cache key instead of a hash of the whole library.

Every stage has a version, a constant bumped when equal inputs would give different outputs, and the
libraries that compute it. A cache key holds the stage's version and those libraries' versions
(:func:`stage_identity`), so a one-line change to the report leaves trained generators, shards and
classifiers cached. The full code version (:func:`porcelain.hashing.code_version`) stays in
provenance.

A version is only as good as the discipline of bumping it. :func:`stage_digest` hashes the code a
stage runs (its modules and every porcelain module they import, docstrings and comments left out),
and ``tests/test_versions.py`` compares it with ``tests/stage_versions.json``: a stage whose code
changed while its version did not fails the test, until someone decides — bump the version if the
outputs change, or record the new digest if they do not::

    .venv/bin/python -m porcelain.versions record tests/stage_versions.json
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stage:
    version: str
    modules: tuple[str, ...]
    libs: tuple[str, ...] = ()


ML_LIBS = ("torch", "timm", "numpy")
# Stages by name (the names are also those of ``--refresh``). Synthesizer kinds add theirs:
# ``synthesizer:<kind>`` with the kind's class attribute ``version``.
STAGES: dict[str, Stage] = {
    "builtin-data": Stage("1", ("porcelain.data.source",), ("numpy", "pillow", "scikit-learn")),
    "ingest": Stage("2", ("porcelain.data.ingest",), ("numpy", "pillow")),  # 2: packs keyed by their images
    "pack": Stage("2", ("porcelain.data.ingest",), ("numpy", "pillow")),  # 2: images only, content-addressed
    "plan": Stage("2", ("porcelain.generate.targeting",)),  # 2: one seed per combination
    "reference": Stage("1", ("porcelain.evaluate.reference",), ML_LIBS),
    "shards": Stage("2", ("porcelain.generate.shards",), ("numpy", "pillow")),  # 2: shards grow in place
    "drift": Stage("1", ("porcelain.synthesizers.drift",), ML_LIBS),
    # 2: one chain (run_chain), texture and CLIP-score steps, pass counts and per-image scores stored
    "filters": Stage("2", ("porcelain.filter.stage",), ML_LIBS + ("open_clip_torch",)),
    # 4: GLCM texture of generated vs real test images per class (3: FID/KID per value with a real floor)
    "faithfulness": Stage("4", ("porcelain.evaluate.judging", "porcelain.evaluate.fid"), ML_LIBS + ("scipy",)),
    "sweep": Stage("2", ("porcelain.train.sweep", "porcelain.train.classifier"), ML_LIBS),  # 2: val predictions stored; per-task synthetic loss weights
    "adaptive": Stage("1", ("porcelain.evaluate.adaptive",), ("numpy",)),
    "report": Stage("4", ("porcelain.report.build", "porcelain.report.html", "porcelain.evaluate.equivalence",
                              "porcelain.watch"),
                    ("numpy", "matplotlib", "scipy")),  # 3: report.html, table.json, equivalence scale; 4: filter, texture, best-on-val sections
}


def _synthesizer_stage(kind: str) -> Stage:
    from porcelain import synthesizers

    cls = type(synthesizers.get(kind))
    return Stage(str(cls.version), (cls.__module__,), tuple(getattr(cls, "libs", ML_LIBS)))


def get_stage(name: str) -> Stage:
    if name.startswith("synthesizer:"):
        return _synthesizer_stage(name.split(":", 1)[1])
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(all_stage_names())}") from None


def all_stage_names() -> list[str]:
    from porcelain import synthesizers

    return [*STAGES, *(f"synthesizer:{k}" for k in synthesizers.builtin_kinds())]


@functools.lru_cache(maxsize=None)
def lib_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def stage_identity(name: str) -> dict[str, Any]:
    """What a stage's cache keys hold about its code: its version and its libraries' versions."""
    st = get_stage(name)
    return {"stage": name, "version": st.version, "libs": {d: lib_version(d) for d in st.libs}}


# --- digests: the code a stage runs -------------------------------------------------------------

def _source_of(module: str) -> tuple[Path, str] | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    p = Path(spec.origin)
    return p, p.read_text(encoding="utf-8")


def _internal_imports(module: str, tree: ast.AST) -> set[str]:
    out = set()
    pkg = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "porcelain"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
                base = ".".join([*parts, base]) if base else ".".join(parts)
            if base.split(".")[0] != "porcelain":
                continue
            out.add(base)
            for a in node.names:  # `from porcelain.x import y` may name a module y
                if importlib.util.find_spec(f"{base}.{a.name}") if _is_package(base) else False:
                    out.add(f"{base}.{a.name}")
    return out - {pkg} if pkg == module else out


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return bool(spec and spec.submodule_search_locations)


def _normalised(tree: ast.AST) -> str:
    """The module's code without docstrings (comments are not in the AST): edits to text only do not count."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.Call):  # pydantic Field(description=...) is documentation too
            node.keywords = [k for k in node.keywords if k.arg != "description"]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


@functools.lru_cache(maxsize=None)
def _module_digest(module: str) -> tuple[str, frozenset[str]]:
    """sha256 of a module's normalised code, and the porcelain modules it imports (memoised per process)."""
    src = _source_of(module)
    if src is None:
        return "", frozenset()
    tree = ast.parse(src[1])
    deps = frozenset(_internal_imports(module, tree))
    return hashlib.sha256(_normalised(tree).encode()).hexdigest(), deps


def module_closure(modules: tuple[str, ...]) -> dict[str, str]:
    """Every porcelain module the given modules import (transitively), with the digest of its code."""
    seen: dict[str, str] = {}
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen[m], deps = _module_digest(m)
        todo += sorted(deps - set(seen))
    return dict(sorted(seen.items()))


def stage_digest(name: str) -> str:
    st = get_stage(name)
    h = hashlib.sha256()
    for m, digest in module_closure(st.modules).items():
        h.update(f"{m}\0{digest}\0".encode())
    return h.hexdigest()[:16]


def current() -> dict[str, dict[str, str]]:
    """Version and digest of every stage."""
    return {n: {"version": get_stage(n).version, "digest": stage_digest(n)} for n in all_stage_names()}


def check(recorded: dict[str, dict[str, str]]) -> list[str]:
    """Stages whose code changed without a decision about their version (empty: all in order)."""
    problems = []
    for name, now in current().items():
        was = recorded.get(name)
        if was is None:
            problems.append(f"{name}: new stage, not recorded")
        elif now["digest"] != was["digest"] and now["version"] == was["version"]:
            problems.append(f"{name}: its code changed but its version is still {now['version']}: bump the version "
                            "if equal inputs now give different outputs (its caches are then recomputed), else record "
                            "the new digest")
        elif now["digest"] != was["digest"] or now["version"] != was["version"]:
            problems.append(f"{name}: version {was['version']} → {now['version']} is not recorded")
    problems += [f"{n}: recorded but no longer a stage" for n in recorded if n not in all_stage_names()]
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("record", "check"):
        print("usage: python -m porcelain.versions record|check PATH.json", file=sys.stderr)
        return 2
    path = Path(argv[1])
    if argv[0] == "record":
        path.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(current())} stages in {path}")
        return 0
    problems = check(json.loads(path.read_text()))
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
