"""report.html: the Markdown report as one self-contained page, checked by converter unit tests and
in a real headless Chromium (Debian package ``chromium``), driven over the DevTools protocol on a pipe.

The browser test loads the page exactly as written (no script added to it) and asks the browser
whether every figure decoded at its true size, whether anything was fetched from anywhere, and
whether the verdict table is there. A control page with one corrupt figure proves the check fails
when an image is broken.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from porcelain.config import config_from_dict
from porcelain.report.build import build_report
from porcelain.report.html import inline_figures, render_html
from porcelain.storage import Store
from tests.flowkit import write_split

INSTALL = ("headless Chromium is needed for this test: install the distribution's package "
           "(Debian/Ubuntu: `apt-get update && apt-get install -y chromium`; .ci/run does this when it is "
           "missing), or point PORCELAIN_CHROMIUM at a Chromium/Chrome binary")


def _png(w: int = 3, h: int = 2, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def _srcs(page: str) -> list[str]:
    return re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]+)""", page, flags=re.I)


def _elements(page: str) -> list[tuple[str, dict[str, str]]]:
    """Every start tag with its attributes, as an HTML parser reads the page."""
    from html.parser import HTMLParser

    found: list[tuple[str, dict[str, str]]] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, dict(attrs)))

    Collect(convert_charrefs=True).feed(page)
    return found


# ---------------------------------------------------------------- converter, on constructed Markdown

def test_labels_are_escaped_and_no_markup_gets_through():
    evil = "<script>alert('x')</script>"
    md = "\n".join([
        f"# porcelain report — {evil}", "",
        "## Verdict", "",
        f"- **Classifier did not learn `{evil}`**: no verdict",
        f'- label <img src=x onerror="alert(1)"> and a "quote" & an ampersand', "",
        "| task | verdict |", "|---|---|",
        f"| {evil} | better |", "",
        f"![{evil}](x.png)",
    ])
    page = render_html(md, {"x.png": _png()}, title=evil)
    assert "<script" not in page.lower()
    assert "onerror=" not in page.replace("onerror=&quot;", "")  # only as escaped text
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<title>&lt;script&gt;" in page
    assert "<td>&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;</td>" in page
    assert "<strong>Classifier did not learn <code>&lt;script&gt;" in page  # bold spans a code span
    assert "&quot;quote&quot; &amp; an ampersand" in page
    # the one <img> is the embedded figure, its alt text escaped inside the attribute
    assert page.count("<img ") == 1 and 'alt="&lt;script&gt;' in page
    # as a parser reads it: no script element, no event handler, the only image is the data: figure
    elements = _elements(page)
    assert not [t for t, _ in elements if t in ("script", "iframe", "object", "embed", "link", "base")]
    assert not [(t, a) for t, a in elements for k in a if k.startswith("on")]
    assert [a["src"][:22] for t, a in elements if t == "img"] == ["data:image/png;base64,"]
    assert [a["alt"] for t, a in elements if t == "img"] == [evil]


def test_pipe_tables_become_html_tables():
    md = "\n".join([
        "## Does synthetic data help?", "",
        "| synthesizer and ratio | task | Δ macro-F1 | verdict |",
        "|---|---|---|---|",
        "| closed_set 90:10 | glaze | +0.300 [+0.2, +0.4] | better |",
        "| closed_set 90:10 | a \\| b | -0.010 [-0.1, +0.1] | no clear difference |",
        "", "after the table",
    ])
    page = render_html(md, {}, "t")
    table = page.split("<table>")[1].split("</table>")[0]
    assert re.findall(r"<th>(.*?)</th>", table) == ["synthesizer and ratio", "task", "Δ macro-F1", "verdict"]
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])
    assert [re.findall(r"<td>(.*?)</td>", r) for r in rows] == [
        ["closed_set 90:10", "glaze", "+0.300 [+0.2, +0.4]", "better"],
        ["closed_set 90:10", "a | b", "-0.010 [-0.1, +0.1]", "no clear difference"]]
    assert "|---" not in page and "<p>after the table</p>" in page
    assert "<h2>Does synthetic data help?</h2>" in page


def test_headings_lists_emphasis_and_paragraphs():
    md = "# Title\n\nline one\nline two\n\n- first *item*\n- second `code`\n\n### Sub\n\n**bold** text"
    page = render_html(md, {}, "t")
    assert "<h1>Title</h1>" in page and "<h3>Sub</h3>" in page
    assert "<p>line one line two</p>" in page
    assert "<ul>\n<li>first <em>item</em></li>\n<li>second <code>code</code></li>\n</ul>" in page
    assert "<p><strong>bold</strong> text</p>" in page
    assert "**" not in page.split("<main>")[1] and "`" not in page.split("<main>")[1]


def test_figures_become_data_uris_and_nothing_is_fetched():
    png = _png(5, 4)
    md = "## Figures\n\n![macro_f1.png](macro_f1.png)\n![lost.png](lost.png)\n![r](http://example.com/r.png)\n"
    page = render_html(md, {"macro_f1.png": png}, "t")
    srcs = _srcs(page)
    assert srcs == ["data:image/png;base64," + base64.b64encode(png).decode()]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|[\w./-]+\.png)""", page)
    assert "[figure not embedded: lost.png]" in page and "[figure not embedded: http://example.com/r.png]" in page
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "img-src data:" in page and "default-src 'none'" in page  # the page's own CSP forbids the rest


def test_inline_figures_embeds_only_known_names():
    png = _png()
    md = "text\n![macro_f1.png](macro_f1.png)\n![other.png](other.png)\n`macro_f1.png`"
    out = inline_figures(md, {"macro_f1.png": png})
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert f"![macro_f1.png]({uri})" in out
    assert "![other.png](other.png)" in out and out.endswith("`macro_f1.png`")
    assert out.replace(f"({uri})", "(macro_f1.png)") == md


def test_a_figure_that_is_not_an_image_is_an_error():
    with pytest.raises(ValueError, match="bad.png"):
        render_html("![bad.png](bad.png)", {"bad.png": b"<svg onload=alert(1)>"}, "t")


# ---------------------------------------------------------------- a real report, in a real browser

EVIL_TASK = "<script>document.title='pwned'</script>"
TASKS = ["glaze", EVIL_TASK]
CLASSES = ["a", '<b onmouseover="alert(1)">b</b>']
N_TEST = 120


def _report(store: Store) -> tuple[str, dict[str, bytes], dict]:
    """A real report (build_report on stored predictions, as tests/test_report.py builds it) with
    hostile task and class names; its Markdown and figures as the report stage wrote them."""
    ratios, seeds, acc = ("100:0", "90:10"), (0, 1), (0.6, 0.9)
    cfg = config_from_dict({"sweep": {"ratios": list(ratios), "seeds": list(seeds), "bootstrap": 200},
                            "name": "html <check>", "classifier": {"image_size": 8}})
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(N_TEST, len(TASKS))).astype(np.int64)
    write_split(store, "e" * 16, TASKS, {t: CLASSES for t in TASKS}, y, 8)
    runs = []
    for i, r in enumerate(ratios):
        for s in seeds:
            key = f"run-{i}-{s}"
            preds = {}
            for t, task in enumerate(TASKS):
                p = y[:, t].copy()
                k = int(acc[i] * N_TEST) + s
                p[k:] = 1 - p[k:]
                preds[task] = p.tolist()
            store.write_json(f"runs/{key}/predictions.json", {"tasks": TASKS, "test": preds})
            metrics = {"per_task": {t: {"accuracy": acc[i], "macro_f1": acc[i], "minority_macro_f1": acc[i],
                                        "per_class_f1": [acc[i], acc[i]], "support": [60, 60],
                                        "train_counts": [9, 3]} for t in TASKS}}
            runs.append({"key": key, "ratio": r, "arm": r if r == "100:0" else f"closed_set {r}",
                         "synthesizer": None if r == "100:0" else "closed_set", "seed": s, "metrics": metrics,
                         "predictions": f"runs/{key}/predictions.json", "n_real": 12,
                         "n_synthetic": 0 if r == "100:0" else 2, "steps": 50, "selected_step": 40,
                         "best_val_macro_f1": 0.5, "model": "small_cnn", "model_reason": "small images",
                         "seconds": 1.0})
    summary = {
        "config": cfg.model_dump(mode="json"),
        "data": {"data_hash": "e" * 16, "tasks": TASKS, "classes": {t: CLASSES for t in TASKS},
                 "counts": {"train": 12, "val": 2, "test": N_TEST}, "n_quarantined": 0,
                 "quarantine_reasons": {}, "quarantine_key": "datasets/x/quarantine.csv",
                 "n_shards": 1, "train_counts": [[9, 3], [9, 3]]},
        "plan": {"real_train": 12, "imbalance_before": {t: 3.0 for t in TASKS}, "targeted_without_test": [],
                 "ratios": {r: {"synthetic": 0 if r == "100:0" else 2, "imbalance": {t: 2.0 for t in TASKS}}
                            for r in ratios}},
        "models": {}, "shards": {}, "faithfulness": {}, "runs": runs,
    }
    out = build_report(store, summary)
    md = store.read_bytes(out["report"]).decode()
    names = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", md)
    figures = {n: store.read_bytes(f"{out['key']}/{n}") for n in names}
    return md, figures, out


def _chromium() -> str:
    exe = os.environ.get("PORCELAIN_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")) if p),
        None)
    if exe is None:
        pytest.fail(INSTALL, pytrace=False)
    return exe


class Browser:
    """Headless Chromium speaking the DevTools protocol over ``--remote-debugging-pipe`` (fds 3 and
    4 in the browser, NUL-separated JSON messages): the standard library is enough, no port opens."""

    def __init__(self, exe: str, profile: Path) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        # the browser reads fd 3 and writes fd 4; move our ends above 9 so the remap cannot collide
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_r, from_w)]
        for fd in (to_r, from_w):
            os.close(fd)
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-dev-shm-usage", "--remote-debugging-pipe",
                f"--user-data-dir={profile}", "about:blank"]
        trampoline = ("import os, sys; a, b = int(sys.argv[1]), int(sys.argv[2]); os.dup2(a, 3); os.dup2(b, 4); "
                      "os.close(a); os.close(b); os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen([sys.executable, "-c", trampoline, str(hi[0]), str(hi[1]), *args],
                                     pass_fds=tuple(hi), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=(profile / "stderr.log").open("wb"))
        for fd in hi:
            os.close(fd)
        self.w, self.r, self.buf, self.next_id, self.events = to_w, from_r, b"", 0, []
        self.stderr = profile / "stderr.log"

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            ready, _, _ = select.select([self.r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("Chromium did not answer in time; its stderr:\n" + self.stderr.read_text()[-3000:])
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe; its stderr:\n" + self.stderr.read_text()[-3000:])
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._recv(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, session: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for i, m in enumerate(self.events):
            if m.get("method") == method and m.get("sessionId") == session:
                return self.events.pop(i)
        while True:
            m = self._recv(deadline)
            if m.get("method") == method and m.get("sessionId") == session:
                return m
            self.events.append(m)

    def open(self, url: str) -> str:
        """Open ``url`` in a new tab and wait for its load event; returns the tab's session id."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=s)
        self.call("Page.navigate", {"url": url}, session=s)
        self.wait_event("Page.loadEventFired", s)
        return s

    def evaluate(self, session: str, expression: str):
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True}, session=session)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def requested(self, session: str) -> list[str]:
        return [m["params"]["request"]["url"] for m in self.events
                if m.get("method") == "Network.requestWillBeSent" and m.get("sessionId") == session]

    def console(self, session: str) -> list[str]:
        out = []
        for m in self.events:
            if m.get("sessionId") != session:
                continue
            if m.get("method") == "Log.entryAdded":
                out.append(m["params"]["entry"].get("text", ""))
            elif m.get("method") in ("Runtime.exceptionThrown", "Runtime.consoleAPICalled"):
                out.append(json.dumps(m["params"])[:500])
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.w)
        os.close(self.r)


# Evaluated in the page by the browser (the page itself carries no script): every <img>, decoded.
IMAGES_JS = """(async () => Promise.all([...document.images].map(async (img) => {
  let decoded = true, error = null;
  try { await img.decode(); } catch (e) { decoded = false; error = String(e); }
  const box = img.getBoundingClientRect();
  return {alt: img.alt, scheme: img.currentSrc.split(':')[0], complete: img.complete, decoded, error,
          width: img.naturalWidth, height: img.naturalHeight, shown: box.width > 0 && box.height > 0};
})))()"""

PAGE_JS = """(() => {
  const heading = (text) => [...document.querySelectorAll('h2')].find(h => h.textContent.trim() === text);
  const after = (h, tag) => { let e = h && h.nextElementSibling;
    while (e && e.tagName !== tag && e.tagName !== 'H2') e = e.nextElementSibling;
    return e && e.tagName === tag ? e : null; };
  const table = after(heading('Does synthetic data help?'), 'TABLE');
  const verdict = after(heading('Verdict'), 'UL');
  return {
    title: document.title,
    h1: document.querySelector('h1') && document.querySelector('h1').textContent,
    scripts: document.scripts.length,
    handlers: [...document.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
    verdict_items: verdict ? [...verdict.querySelectorAll('li')].map(li => li.textContent) : null,
    header: table ? [...table.querySelectorAll('thead th')].map(th => th.textContent) : null,
    rows: table ? [...table.querySelectorAll('tbody tr')].map(tr => [...tr.cells].map(td => td.textContent)) : null,
    cells: [...document.querySelectorAll('td')].map(td => td.textContent),
  };
})()"""


def _png_size(blob: bytes) -> tuple[int, int]:
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and blob[12:16] == b"IHDR"
    return struct.unpack(">II", blob[16:24])


def test_report_html_opens_in_headless_chromium_with_every_figure_and_the_verdict_table(tmp_path):
    exe = _chromium()
    md, figures, _ = _report(Store(str(tmp_path / "store")))
    assert len(figures) >= 3, f"the report should have figures, found {sorted(figures)}"
    page = tmp_path / "report.html"
    page.write_text(render_html(md, figures, title="porcelain report"), encoding="utf-8")
    # control: the same page with one figure cut short (its PNG signature intact, its data not)
    broken_name = sorted(figures)[0]
    control = tmp_path / "control.html"
    control.write_text(render_html(md, {**figures, broken_name: figures[broken_name][:60]}, title="control"),
                       encoding="utf-8")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()

    browser = Browser(exe, profile)
    try:
        s = browser.open(page.as_uri())
        images, dom = browser.evaluate(s, IMAGES_JS), browser.evaluate(s, PAGE_JS)
        fetched, console = browser.requested(s), browser.console(s)
        c = browser.open(control.as_uri())
        control_images = browser.evaluate(c, IMAGES_JS)
    finally:
        browser.close()

    # every figure decoded at the size of the PNG the report stage wrote, and is laid out on the page
    assert sorted(i["alt"] for i in images) == sorted(figures)
    for img in images:
        assert img["scheme"] == "data" and img["complete"] and img["decoded"], img
        assert (img["width"], img["height"]) == _png_size(figures[img["alt"]]), img
        assert img["shown"], img
    # nothing was fetched but the page itself (data: URIs are not fetched from anywhere)
    assert all(u == page.as_uri() or u.startswith("data:") for u in fetched), fetched
    assert not [m for m in console if "Refused" in m or "Content Security Policy" in m], console
    # the verdict and its table are there, one row per synthesizer-ratio and task, each with a verdict
    assert dom["verdict_items"] and any("Synthetic images helped" in x for x in dom["verdict_items"])
    assert dom["header"] == ["synthesizer and ratio", "task", "Δ macro-F1", "Δ minority macro-F1", "detectable",
                             "verdict", "rare classes"]
    assert [r[:2] for r in dom["rows"]] == [["closed_set 90:10", t] for t in TASKS]
    assert all(r[5] and r[6] for r in dom["rows"]) and dom["rows"][0][5] == "better"
    # hostile labels are text on the page, never markup
    assert dom["scripts"] == 0 and dom["handlers"] == 0 and dom["title"] == "porcelain report"
    assert dom["h1"] == "porcelain report — html <check>"
    assert EVIL_TASK in dom["cells"] and CLASSES[1] in dom["cells"]
    # and the check above does fail on a broken figure
    bad = [i for i in control_images if not (i["decoded"] and i["width"] > 0)]
    assert [i["alt"] for i in bad] == [broken_name], control_images
