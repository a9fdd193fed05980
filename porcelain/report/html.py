"""The report as one self-contained HTML page, and as Markdown with its figures embedded.

``report.md`` links its figures by relative path (``![macro_f1.png](macro_f1.png)``), which shows
nothing where the Markdown is read away from its folder (the Prefect UI's artifact view). Both
functions here embed the figures as ``data:`` URIs instead.

:func:`render_html` converts the Markdown subset that :mod:`porcelain.report.build` writes —
headings, paragraphs, ``- `` bullet lists, pipe tables, ``**bold**``, ``*emphasis*``, `` `code` ``
and images — into a page with no external resource at all and no script. Labels in the report come
from user manifests, so every piece of text is HTML-escaped: a label such as ``<script>`` shows as
text. Raw HTML in the Markdown is never passed through, and an image whose figure is not given is
shown as a note, never as a relative or remote ``src``.
"""

from __future__ import annotations

import base64
import html
import re

__all__ = ["data_uri", "inline_figures", "render_html"]

_IMAGE = re.compile(r"!\[([^\]\n]*)\]\(([^)\s]+)\)")
_SPAN = re.compile(r"`(?P<code>[^`\n]+)`|!\[(?P<alt>[^\]\n]*)\]\((?P<src>[^)\s]+)\)")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_EM = re.compile(r"(?<![\*\w])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\*\w])")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s{0,3}[-*+]\s+(.*)$")
_SEPARATOR = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 72rem; margin: 2rem auto; padding: 0 1.5rem; }
h1 { font-size: 1.7rem; border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { font-size: 1.3rem; margin-top: 2rem; border-bottom: 1px solid #e5e5e5; padding-bottom: .2rem; }
h3 { font-size: 1.1rem; } h4 { font-size: 1rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .88rem; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d0d0; padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
code { font: .85em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f2f2f2;
       padding: .05rem .25rem; border-radius: 3px; }
figure { margin: 1rem 0; } figcaption { font-size: .85rem; color: #555; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.missing-figure { color: #a00; font-style: italic; }
""".strip()

# No script may run and nothing may load from anywhere: images only from data: URIs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _mime(name: str, blob: bytes) -> str:
    for magic, mime in _MAGIC:
        if blob.startswith(magic):
            return mime
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError(f"figure {name!r} is not a PNG, JPEG, GIF or WebP image")


def data_uri(name: str, blob: bytes) -> str:
    """``blob`` (PNG, JPEG, GIF or WebP, told by its first bytes) as a ``data:`` URI."""
    return f"data:{_mime(name, blob)};base64,{base64.b64encode(blob).decode('ascii')}"


def inline_figures(markdown: str, figures: dict[str, bytes]) -> str:
    """``markdown`` with every image link ``![alt](name)`` whose ``name`` is a key of ``figures``
    pointing at the figure's ``data:`` URI; other text, and links to other names, are unchanged."""
    uris: dict[str, str] = {}

    def sub(m: re.Match[str]) -> str:
        name = m.group(2)
        if name not in figures:
            return m.group(0)
        if name not in uris:
            uris[name] = data_uri(name, figures[name])
        return f"![{m.group(1)}]({uris[name]})"

    return _IMAGE.sub(sub, markdown)


def _inline(text: str, figures: dict[str, bytes]) -> str:
    """One line of Markdown text as escaped HTML with code spans, images, bold and emphasis.

    Code spans and images become placeholders first, so bold may span a code span
    (``**did not learn `task`**``) and nothing inside code is read as markup."""
    text = text.replace("\x00", "").replace("\\|", "|")
    parts: list[str] = []

    def hold(m: re.Match[str]) -> str:
        if m.group("code") is not None:
            parts.append(f"<code>{html.escape(m.group('code'))}</code>")
        else:
            parts.append(_image(m.group("alt"), m.group("src"), figures))
        return f"\x00{len(parts) - 1}\x00"

    escaped = html.escape(_SPAN.sub(hold, text))  # quote=True: no attribute can be broken out of
    escaped = _BOLD.sub(r"<strong>\1</strong>", escaped)
    escaped = _EM.sub(r"<em>\1</em>", escaped)
    return re.sub("\x00(\\d+)\x00", lambda m: parts[int(m.group(1))], escaped)


def _image(alt: str, name: str, figures: dict[str, bytes]) -> str:
    if name not in figures:
        return f'<span class="missing-figure">[figure not embedded: {html.escape(name)}]</span>'
    return f'<img src="{data_uri(name, figures[name])}" alt="{html.escape(alt)}">'


def _figure(alt: str, name: str, figures: dict[str, bytes]) -> str:
    return f"<figure>{_image(alt, name, figures)}<figcaption>{html.escape(alt)}</figcaption></figure>"


def _cells(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", s)]


def _table(lines: list[str], figures: dict[str, bytes]) -> list[str]:
    head, body = _cells(lines[0]), [_cells(x) for x in lines[2:]]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{_inline(c, figures)}</th>" for c in head) + "</tr></thead>",
           "<tbody>"]
    for row in body:
        row = (row + [""] * len(head))[:max(len(head), len(row))]
        out.append("<tr>" + "".join(f"<td>{_inline(c, figures)}</td>" for c in row) + "</tr>")
    return out + ["</tbody>", "</table>"]


def _body(markdown: str, figures: dict[str, bytes]) -> list[str]:
    lines = markdown.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(x.strip() for x in para), figures)}</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush()
            i += 1
            continue
        h = _HEADING.match(line)
        if h:
            flush()
            n = len(h.group(1))
            out.append(f"<h{n}>{_inline(h.group(2), figures)}</h{n}>")
            i += 1
            continue
        if line.lstrip().startswith("|") and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1]):
            flush()
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out += _table(lines[i:j], figures)
            i = j
            continue
        if _BULLET.match(line):
            flush()
            out.append("<ul>")
            while i < len(lines) and (b := _BULLET.match(lines[i])):
                item = [b.group(1)]
                i += 1
                while i < len(lines) and lines[i].startswith("  ") and lines[i].strip() and not _BULLET.match(lines[i]):
                    item.append(lines[i].strip())  # a continuation line of the item
                    i += 1
                out.append(f"<li>{_inline(' '.join(item), figures)}</li>")
            out.append("</ul>")
            continue
        if _IMAGE.fullmatch(line.strip()):
            flush()
            m = _IMAGE.fullmatch(line.strip())
            out.append(_figure(m.group(1), m.group(2), figures))
            i += 1
            continue
        para.append(line)
        i += 1
    flush()
    return out


def render_html(markdown: str, figures: dict[str, bytes], title: str) -> str:
    """A self-contained HTML page of the report: figures embedded, no script, no external resource."""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{html.escape(title)}</title>",
        f"<style>\n{CSS}\n</style>",
        "</head>",
        "<body>",
        "<main>",
        *_body(markdown, figures),
        "</main>",
        "</body>",
        "</html>",
        "",
    ])
