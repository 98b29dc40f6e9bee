"""`autotraj report RUN_DIR`: one self-contained HTML page about a run directory
(docs/report.md).

    report/page.py     the sections and the page: `write_report`, `render_report`
    report/data.py     what the page reads: eval summaries and results, metrics curves, states
    report/plots.py    hand-drawn SVG line, bar and histogram charts; `esc` / `clean`
    report/viewer.py   the trajectory viewer: its JSON data, its script, the page's stylesheet

Tag spans and line/word diffs come from markup.py, which `autotraj show` shares.
"""

from autotraj.report.page import render_report, write_report

__all__ = ["render_report", "write_report"]
