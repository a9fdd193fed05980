"""What a run publishes to the Prefect UI beside the report: the quarantine as a table artifact."""

from __future__ import annotations

import json

from porcelain.config import StorageConfig
from porcelain.report.publish import MAX_QUARANTINE_ROWS, quarantine_rows
from porcelain.storage import Store
from tests.flowkit import flow_run_record


def _store_with_a_report(tmp_path, quarantined: int) -> tuple[Store, dict]:
    store = Store(str(tmp_path))
    store.write_bytes("reports/k/report.md", b"# report\n")
    store.write_json("reports/k/table.json", {"rows": [{"arm": "100:0", "task": "glaze", "macro_f1": 0.9}]})
    lines = ["row,image,reason,detail"] + [f"{i + 2},img{i}.png,not_an_image,cannot identify image file"
                                            for i in range(quarantined)]
    store.write_bytes("datasets/d/quarantine.csv", ("\n".join(lines) + "\n").encode())
    return store, {"key": "reports/k", "report": "reports/k/report.md", "uri": store.uri("reports/k/report.md")}


def test_quarantine_rows_read_back_capped(tmp_path):
    store, _ = _store_with_a_report(tmp_path, MAX_QUARANTINE_ROWS + 3)
    rows = quarantine_rows(store, "datasets/d/quarantine.csv")
    assert len(rows) == MAX_QUARANTINE_ROWS and rows[0] == {"row": "2", "image": "img0.png", "reason": "not_an_image",
                                                           "detail": "cannot identify image file"}
    assert quarantine_rows(store, None) == [] and quarantine_rows(store, "datasets/none/quarantine.csv") == []


def test_a_run_publishes_its_quarantine_beside_the_report(prefect_harness, tmp_path):
    from prefect import flow
    from prefect.runtime import flow_run

    from tasks.stages import publish_report

    store, written = _store_with_a_report(tmp_path, 2)
    storage = StorageConfig(url=str(tmp_path))

    @flow
    def publish(with_quarantine: bool) -> str:
        publish_report(written, "Q test", storage, "datasets/d/quarantine.csv" if with_quarantine else None)
        return str(flow_run.id)

    _, arts = flow_run_record(publish(True))
    by_key = {a.key: a for a in arts}
    assert {"q-test-report", "q-test-results", "q-test-quarantine"} <= set(by_key)
    table = by_key["q-test-quarantine"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["image"] for r in rows] == ["img0.png", "img1.png"] and {r["reason"] for r in rows} == {"not_an_image"}
    _, arts = flow_run_record(publish(False))  # nothing set aside: no quarantine table
    assert "q-test-quarantine" not in {a.key for a in arts} and "q-test-report" in {a.key for a in arts}
