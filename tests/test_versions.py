"""Stage versions stand in for the whole library's code in cache keys: each code change to a stage must
come with a decision about its version (tests/stage_versions.json records the decisions)."""

from __future__ import annotations

import json
from pathlib import Path

from porcelain import versions

RECORD = Path(__file__).with_name("stage_versions.json")


def test_every_stage_code_change_comes_with_a_decision_about_its_version():
    problems = versions.check(json.loads(RECORD.read_text()))
    assert not problems, (
        "\n".join(problems) + "\n\nIf equal inputs now give different outputs, bump the stage's version "
        "(porcelain/versions.py, or the synthesizer's `version`); then, either way, record the decision:\n"
        "  .venv/bin/python -m porcelain.versions record tests/stage_versions.json")


def test_the_digest_follows_the_code_a_stage_imports_and_ignores_documentation():
    closure = versions.module_closure(("porcelain.report.build",))
    assert "porcelain.report.csvsafe" in closure and "porcelain.evaluate.stats" in closure
    assert all(len(d) == 64 for d in closure.values())
    assert "porcelain.synthesizers.closed_set" not in closure
    import ast
    a = versions._normalised(ast.parse('def f(x):\n    """doc"""\n    return x + 1  # note\n'))
    b = versions._normalised(ast.parse('def f(x):\n    """other words"""\n\n    return x + 1\n'))
    c = versions._normalised(ast.parse('def f(x):\n    return x + 2\n'))
    assert a == b != c


def test_a_changed_stage_without_a_new_version_is_caught():
    now = versions.current()
    stale = {**now, "report": {**now["report"], "digest": "0" * 16}}
    assert any(p.startswith("report: its code changed") for p in versions.check(stale))
    bumped = {**now, "report": {"version": "0", "digest": "0" * 16}}
    assert any(p.startswith("report: version 0") for p in versions.check(bumped))
    assert versions.check(now) == []
