"""A report page: titled sections of paragraphs, tables and plotly figures, rendered to
Markdown (``report.md``) and to one self-contained HTML page (``report.html``).

The HTML page inlines plotly.js once; every figure is a div and a ``Plotly.newPlot``
call with its JSON, so the page opens offline. Every string that comes from a config or
a model answer is escaped: ``html.escape`` in HTML, HTML entities plus ``\\`` and ``|``
in Markdown (a label like ``<script>`` shows as text in both), ``</`` inside inline JSON.
"""

from __future__ import annotations

import html
from typing import Any


def md_text(text: str) -> str:
    """``text`` for Markdown prose: HTML special characters as entities."""
    return html.escape(text, quote=False)


def md_cell(text: str) -> str:
    """``text`` for a Markdown table cell: entities, ``\\`` and ``|`` escaped, one line."""
    return md_text(text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " "))


class Table:
    """A table rendered to both Markdown and HTML (cells escaped in each)."""

    def __init__(self, title: str, header: list[str], note: str = "") -> None:
        self.title, self.header, self.note = title, header, note
        self.rows: list[list[str]] = []

    def add(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"### {md_text(self.title)}", ""]
        if self.note:
            lines += [md_text(self.note), ""]
        lines.append("| " + " | ".join(md_cell(h) for h in self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        note = f"<p class='note'>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3>{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Report:
    """Sections of tables and figures, rendered to Markdown and HTML."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[tuple[str, Any]] = []  # ("h2", text) | ("p", text) | ("table", Table) | ("fig", figure)

    def h2(self, text: str) -> None:
        self.parts.append(("h2", text))

    def p(self, text: str) -> None:
        self.parts.append(("p", text))

    def table(self, t: Table) -> None:
        self.parts.append(("table", t))

    def fig(self, figure: Any) -> None:
        self.parts.append(("fig", figure))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, item in self.parts:
            if kind == "h2":
                out += [f"## {md_text(item)}", ""]
            elif kind == "p":
                out += [md_text(item), ""]
            elif kind == "table":
                out.append(item.markdown())
        out.append("Plots: see report.html in this folder.\n")
        return "\n".join(out)

    def html(self) -> str:
        body, n = [], 0
        for kind, item in self.parts:
            if kind == "h2":
                body.append(f"<h2>{html.escape(item)}</h2>")
            elif kind == "p":
                body.append(f"<p>{html.escape(item)}</p>")
            elif kind == "table":
                body.append(item.html())
            elif kind == "fig":
                n += 1
                body.append(figure_html(item, f"fig{n}"))
        bundle = plotly_js() if n else ""
        return (
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<style>{_CSS}</style>"
            f"<script type='text/javascript'>{bundle}</script></head>"
            f"<body><h1>{html.escape(self.title)}</h1>{''.join(body)}</body></html>\n"
        )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.plot { width: 100%; min-height: 380px; margin-bottom: 1.5em; }
.note { color: #555; font-size: 0.9em; }
"""


def plotly_js() -> str:
    """The plotly.js bundle, safe to inline in a <script> element."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().replace("</script", "<\\/script")


def figure_html(fig: Any, div_id: str) -> str:
    """A div and the script that draws ``fig`` into it."""
    import plotly.io as pio

    spec = pio.to_json(fig, validate=False)
    # Inline JSON inside <script>: "</" and "<!--" would end or confuse the script element.
    spec = spec.replace("</", "<\\/").replace("<!--", "<\\!--")
    return (f"<div id='{div_id}' class='plot'></div><script type='text/javascript'>"
            f"(function(){{var f={spec};Plotly.newPlot('{div_id}',f.data,f.layout,{{responsive:true}});}})();"
            "</script>")
