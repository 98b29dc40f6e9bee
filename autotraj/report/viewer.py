"""The trajectory viewer of the HTML report: its data (one JSON blob), its script and the page's
stylesheet.

`viewer_data(files, max_trajectories)` turns a run's queries, candidates, scores, repairs and hard
cases into plain JSON: per candidate its segments cut into tag spans (markup.tag_spans; a tool
result segment is one "result" span), its tool calls, its label, score and score components, and
for every repair (accepted or rejected) the original beside the repair as aligned line rows whose
changed lines carry flagged word pieces (markup.diff_rows, markup.word_diff). Texts longer than
`MAX_TEXT` characters (`MAX_DIFF_TEXT` for a diff side) are cut, with a note of what was left out.

`data_script(data)` embeds the blob in a `<script type="application/json">` element in which no
text can close the element (`<`, `>`, `&` are written as JSON escapes; NaN and infinities, which
JSON lacks, become null). `VIEWER_JS` renders it
lazily: one page of the query list at a time, and only the selected query's candidates; every
piece of run text goes into the page through `textContent`, never as markup. The page's URL may
preset the filter and the search: `report.html?label=AW&q=gsm8k`.

Not here: reading the run (run_dir.read_run_files), the rest of the page (report/page.py).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

from autotraj.markup import diff_rows, tag_spans, word_diff
from autotraj.records import Repair, ScoreRow, Trajectory
from autotraj.report.plots import clean
from autotraj.run_dir import RunFiles

MAX_TEXT = 4000  # characters of one segment, tool input or tool output
MAX_DIFF_TEXT = 12000  # characters of each side of a repair diff


def cap(text: str, limit: int = MAX_TEXT) -> str:
    """`text`, cut after `limit` characters with a note of how many were left out.

    >>> cap("abcdef", 4)
    'abcd\\n[… 2 more characters not shown]'
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[… {len(text) - limit} more characters not shown]"


def viewer_data(files: RunFiles, max_trajectories: int) -> dict[str, Any]:
    """{"queries": [...], "trajectories": [...], "total": candidates in the run}; whole queries
    in trajectory file order until `max_trajectories` candidates are in."""
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for t in files.trajectories.values():
        groups[t.query_id].append(t)
    hard: dict[str, list[Repair]] = defaultdict(list)
    for case in files.hard_cases:
        hard[case.original_id].append(case)
    queries: list[dict[str, Any]] = []
    trajectories: list[dict[str, Any]] = []
    for query_id, group in groups.items():
        if trajectories and len(trajectories) + len(group) > max_trajectories:
            break
        query = files.queries.get(query_id)
        queries.append(
            {
                "id": query_id,
                "question": cap(query.question) if query else "(not in synthesize/queries.jsonl)",
                "gold": list(query.answers) if query else [],
                "t": list(range(len(trajectories), len(trajectories) + len(group))),
            }
        )
        for t in group:
            entry = _trajectory(t, files.scores.get(t.id))
            entry["repairs"] = _repairs(t, files.repairs.get(t.id), hard[t.id])
            trajectories.append(entry)
    return {"queries": queries, "trajectories": trajectories, "total": len(files.trajectories)}


def _trajectory(t: Trajectory, row: ScoreRow | None) -> dict[str, Any]:
    q = row.quality if row else None
    return {
        "id": t.id,
        "label": q.label if q else None,
        "score": q.score if q else None,
        "correct": q.correct if q else None,
        "components": dict(q.components) if q else None,
        "extracted": row.extracted if row else None,
        "finish": t.finish_reason,
        "error": t.error,
        "segments": [_segment(s.text.strip("\n"), s.trainable) for s in t.segments],
        "calls": [
            [c.tool, c.status, c.latency_s, cap(c.input), cap(c.output)] for c in t.tool_calls
        ],
    }


def _segment(text: str, trainable: bool) -> list[Any]:
    """[trainable, spans]: model text cut into tag spans, a tool result as one "result" span."""
    return [trainable, tag_spans(cap(text)) if trainable else [["result", cap(text)]]]


def _repairs(
    original: Trajectory, accepted: Repair | None, rejected: list[Repair]
) -> list[dict[str, Any]]:
    out = []
    if accepted is not None:
        out.append(
            {
                "id": accepted.trajectory.id,
                "accepted": True,
                "how": accepted.how,
                "before": accepted.original_score,
                "after": accepted.repair_score,
                "rows": diff(original.text, accepted.trajectory.text),
            }
        )
    for case in rejected:
        out.append(
            {
                "id": case.trajectory.id,
                "accepted": False,
                "reason": case.reason,
                "rows": diff(original.text, case.trajectory.text),
            }
        )
    return out


def diff(a: str, b: str) -> list[list[Any]]:
    """[tag, left, right] rows (markup.diff_rows); a changed row's sides are [differs, text]
    pieces, other sides the line itself or None; an unchanged row is [" ", line].

    >>> diff("x\\ny 1", "x\\ny 2")
    [[' ', 'x'], ['|', [[False, 'y '], [True, '1']], [[False, 'y '], [True, '2']]]]
    """
    rows: list[list[Any]] = []
    for tag, left, right in diff_rows(cap(a, MAX_DIFF_TEXT), cap(b, MAX_DIFF_TEXT)):
        if tag == "|":
            old, new = word_diff(left or "", right or "")
            rows.append([tag, [list(p) for p in old], [list(p) for p in new]])
        elif tag == " ":
            rows.append([tag, left])
        else:
            rows.append([tag, left, right])
    return rows


def _cleaned(value: Any) -> Any:
    """`value` with every string in it cleaned (report/plots.clean) and every NaN or infinity
    made None (JSON has neither)."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_cleaned(v) for v in value]
    if isinstance(value, dict):
        return {clean(str(k)): _cleaned(v) for k, v in value.items()}
    return value


def data_script(data: dict[str, Any]) -> str:
    """The blob, every string cleaned, as an inert `<script type="application/json">` element."""
    text = json.dumps(_cleaned(data), ensure_ascii=False, separators=(",", ":"))
    # Outside JSON strings none of these occur; inside one each escape decodes to itself.
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(char, escape)
    return f'<script id="viewer-data" type="application/json">{text}</script>'


VIEWER_JS = r"""
"use strict";
window.addEventListener("error", (event) => {
  const box = document.getElementById("js-error");
  box.hidden = false;
  box.textContent = "viewer error: " + event.message;
  document.body.dataset.jsError = "1";
});
(() => {
  const blob = document.getElementById("viewer-data");
  if (!blob) return;
  const data = JSON.parse(blob.textContent);
  data.queries.forEach((q, i) => { q.index = String(i); });
  const $ = (id) => document.getElementById(id);
  const list = $("viewer-list"), detail = $("viewer-detail"), more = $("viewer-more");
  const filter = $("viewer-label"), search = $("viewer-search"), count = $("viewer-count");
  const PAGE = 100;
  const LABEL_CLASS = { HQ: "hq", "AC-LQ": "aclq", AW: "aw" };
  const ROW_CLASS = { " ": "same", "|": "changed", "<": "removed", ">": "added" };
  let matches = [], shown = 0, selected = null;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function add(parent, ...children) {
    for (const child of children) parent.appendChild(child);
    return parent;
  }
  const badge = (label) => el("span", "badge " + (LABEL_CLASS[label] || "none"), label || "unscored");
  const trajectoriesOf = (q) => q.t.map((i) => data.trajectories[i]);
  const num = (value, digits) => (value === null ? "n/a" : value.toFixed(digits));  // null: NaN, inf

  function passes(t) {
    const f = filter.value;
    if (f === "all") return true;
    if (f === "repaired") return t.repairs.some((r) => r.accepted);
    if (f === "hard") return t.repairs.some((r) => !r.accepted);
    if (f === "unscored") return t.label === null;
    return t.label === f;
  }
  function found(q, needle) {
    if (!needle) return true;
    const hit = (s) => s.toLowerCase().includes(needle);
    return hit(q.id) || hit(q.question) || trajectoriesOf(q).some((t) => hit(t.id));
  }

  function refresh() {
    const needle = search.value.trim().toLowerCase();
    matches = data.queries.filter((q) => found(q, needle) && trajectoriesOf(q).some(passes));
    list.replaceChildren();
    shown = 0;
    showMore();
    count.textContent = `${matches.length} of ${data.queries.length} queries`;
    list.dataset.count = String(matches.length);
    if (!matches.length) {
      detail.replaceChildren(el("p", "muted", "No query matches."));
    } else {
      select(matches.includes(selected) ? selected : matches[0]);
    }
  }
  function showMore() {
    for (const q of matches.slice(shown, shown + PAGE)) list.appendChild(listItem(q));
    shown = Math.min(matches.length, shown + PAGE);
    more.hidden = shown >= matches.length;
    more.textContent = `show ${Math.min(PAGE, matches.length - shown)} more`;
  }
  function listItem(q) {
    const li = el("li", "q-item");
    li.tabIndex = 0;
    li.dataset.index = q.index;
    const badges = el("span", "badges");
    for (const t of trajectoriesOf(q)) badges.appendChild(badge(t.label));
    add(li, el("span", "q-id", q.id), badges, el("span", "q-text", q.question));
    li.addEventListener("click", () => select(q));
    li.addEventListener("keydown", (e) => e.key === "Enter" && select(q));
    return li;
  }
  function select(q) {
    selected = q;
    for (const li of list.children) li.classList.toggle("selected", li.dataset.index === q.index);
    const visible = trajectoriesOf(q).filter(passes);
    const head = add(el("div", "q-head"), el("h3", null, `query ${q.id}`),
      el("p", "question", q.question), el("p", "gold", `gold: ${q.gold.join(" | ")}`));
    if (visible.length < q.t.length) {
      head.appendChild(el("p", "muted", `${q.t.length - visible.length} of ${q.t.length} candidates hidden by the filter`));
    }
    detail.replaceChildren(head, ...visible.map(card));
  }

  function card(t) {
    const box = el("article", "traj");
    const head = add(el("div", "traj-head"), el("span", "t-id", t.id), badge(t.label));
    if (t.score !== null) head.appendChild(el("span", "stat", `S ${num(t.score, 3)}`));
    if (t.correct !== null) head.appendChild(el("span", t.correct ? "stat ok" : "stat bad", t.correct ? "correct" : "wrong"));
    if (t.extracted !== null) head.appendChild(el("span", "stat", `extracted ${t.extracted}`));
    head.appendChild(el("span", "stat", `finish ${t.finish}`));
    box.appendChild(head);
    if (t.error) box.appendChild(el("p", "bad", t.error));
    if (t.components) box.appendChild(components(t.components));
    for (const [trainable, spans] of t.segments) {
      const pre = el("pre", trainable ? "seg" : "seg seg-result");
      for (const [kind, text] of spans) pre.appendChild(el("span", "k-" + kind, text));
      box.appendChild(pre);
    }
    if (t.calls.length) box.appendChild(calls(t.calls));
    for (const r of t.repairs) box.appendChild(repair(t, r));
    return box;
  }
  function components(values) {
    const box = el("div", "components");
    for (const [name, value] of Object.entries(values)) {
      const fill = el("span", "fill");
      fill.style.width = `${Math.max(0, Math.min(1, value)) * 100}%`;
      const chip = add(el("span", "comp"), el("span", null, name), add(el("span", "bar"), fill),
        el("span", "num", num(value, 2)));
      chip.title = `${name} = ${value}`;
      box.appendChild(chip);
    }
    return box;
  }
  function row(cells, tag) {
    return add(el("tr"), ...cells.map((c) => (c instanceof Node ? add(el(tag), c) : el(tag, null, c))));
  }
  function calls(items) {
    const table = add(el("table", "calls"), row(["#", "tool", "status", "latency", "input", "output"], "th"));
    items.forEach(([tool, status, latency, input, output], i) => {
      const tr = row([i + 1, tool, status, `${num(latency, 2)} s`, el("pre", "k-" + (tool === "search" ? "search" : "code"), input), el("pre", "k-result", output)], "td");
      tr.children[2].className = "st-" + status;
      table.appendChild(tr);
    });
    return table;
  }
  function side(value, mark) {
    const td = el("td", value === null ? "empty" : null);
    if (value === null) return td;
    const pre = el("pre");
    if (typeof value === "string") pre.textContent = value;
    else for (const [differs, text] of value) pre.appendChild(differs ? el(mark, null, text) : document.createTextNode(text));
    return add(td, pre);
  }
  function repair(t, r) {
    const box = el("details", r.accepted ? "repair accepted" : "repair rejected");
    box.open = true;
    const title = r.accepted
      ? `accepted repair ${r.id} (${r.how}): S ${num(r.before, 3)} → ${num(r.after, 3)}`
      : `rejected repair ${r.id}: ${r.reason}`;
    box.appendChild(el("summary", null, title));
    const changed = r.rows.filter((x) => x[0] !== " ").length;
    box.appendChild(el("p", "muted", `${changed} of ${r.rows.length} lines differ`));
    const table = add(el("table", "diff"), row([`original ${t.id}`, `repair ${r.id}`], "th"));
    for (const [tag, a, b] of r.rows) {
      table.appendChild(add(el("tr", ROW_CLASS[tag]), side(a, "del"), side(tag === " " ? a : b, "ins")));
    }
    return add(box, table);
  }

  const params = new URLSearchParams(location.search);  // e.g. report.html?label=AW&q=gsm8k
  if ([...filter.options].some((o) => o.value === params.get("label"))) filter.value = params.get("label");
  search.value = params.get("q") || "";
  filter.addEventListener("change", refresh);
  search.addEventListener("input", refresh);
  more.addEventListener("click", showMore);
  refresh();
  document.body.dataset.viewerReady = "1";
})();
"""

STYLE = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --bg2: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: #fff; }
header { padding: 18px 28px 12px; border-bottom: 1px solid var(--line); background: var(--bg2); }
header h1 { margin: 0 0 4px; font-size: 22px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
main { padding: 0 28px 40px; max-width: 1500px; }
section { margin-top: 26px; }
h2 { font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
.muted { color: var(--muted); }
.not-run { color: var(--muted); font-style: italic; padding: 8px 12px; background: var(--bg2);
  border-left: 3px solid var(--line); }
.stages { display: flex; flex-wrap: wrap; gap: 6px; margin: 8px 0; }
.chip { padding: 1px 9px; border-radius: 10px; font-size: 12px; border: 1px solid var(--line); }
.chip.done { background: #dafbe1; border-color: #4ac26b; }
.chip.partial { background: #fff8c5; border-color: #d4a72c; }
.chip.missing { color: var(--muted); }
table.numbers { border-collapse: collapse; margin: 6px 0 12px; }
table.numbers th, table.numbers td { border: 1px solid var(--line); padding: 4px 10px; }
table.numbers td { text-align: right; font-variant-numeric: tabular-nums; }
table.numbers td:first-child, table.numbers th:first-child { text-align: left; }
table.numbers th { background: var(--bg2); }
table.numbers tr.avg td { font-weight: 600; background: #fbfbfc; }
td.best { font-weight: 700; color: #1a7f37; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0 14px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card .value { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .name { color: var(--muted); font-size: 12px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 14px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
figure.wide { grid-column: 1 / -1; }
figcaption { color: var(--muted); font-size: 12px; padding: 2px 6px; }
svg.chart { width: 100%; height: auto; display: block; }
svg .grid { stroke: #eaeef2; } svg .axis { stroke: #8c959f; }
svg text { font: 11px system-ui, sans-serif; fill: #3d444d; }
svg .chart-title { font-weight: 600; font-size: 12.5px; fill: var(--fg); }
svg .axis-label { fill: var(--muted); }
.viewer { display: grid; grid-template-columns: 340px 1fr; gap: 14px; align-items: start; }
.controls { display: flex; gap: 8px; align-items: center; margin: 8px 0; flex-wrap: wrap; }
.controls input { padding: 4px 8px; width: 260px; }
#viewer-list { list-style: none; margin: 0; padding: 0; max-height: 80vh; overflow-y: auto;
  border: 1px solid var(--line); border-radius: 6px; }
.q-item { padding: 6px 10px; border-bottom: 1px solid #eaeef2; cursor: pointer; }
.q-item:hover { background: var(--bg2); } .q-item.selected { background: #ddf4ff; }
.q-id { font-family: ui-monospace, monospace; font-size: 12px; margin-right: 6px; }
.q-text { display: block; color: var(--muted); font-size: 12px; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.badge { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 8px; margin-right: 3px;
  font-weight: 600; }
.badge.hq { background: #dafbe1; color: #1a7f37; } .badge.aclq { background: #fff8c5; color: #9a6700; }
.badge.aw { background: #ffebe9; color: #cf222e; } .badge.none { background: #eaeef2; color: var(--muted); }
.q-head .question { font-size: 15px; margin: 4px 0; white-space: pre-wrap; }
.gold { color: #1a7f37; margin: 0 0 8px; }
.traj { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.traj-head { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin-bottom: 6px; }
.t-id { font-family: ui-monospace, monospace; font-weight: 600; }
.stat { color: var(--muted); font-size: 12.5px; } .ok { color: #1a7f37; } .bad { color: #cf222e; }
.components { display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 6px; font-size: 12px; }
.comp { display: inline-flex; gap: 5px; align-items: center; }
.bar { display: inline-block; width: 46px; height: 7px; background: #eaeef2; border-radius: 3px; }
.fill { display: block; height: 100%; background: #4c78a8; border-radius: 3px; }
pre { margin: 0; white-space: pre-wrap; word-break: break-word;
  font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; }
pre.seg { padding: 4px 8px; border-left: 3px solid #8c959f; margin: 3px 0; }
pre.seg-result { border-left-color: #1b7c83; background: #f0f7f7; }
.k-think { color: #6e5494; font-style: italic; } .k-code { background: #fff5d6; }
.k-search { background: #ddf4ff; } .k-result { color: #1b6b70; }
.k-answer { background: #dafbe1; font-weight: 600; }
.legend-row span { margin-right: 10px; padding: 0 5px; }
table.calls td:nth-child(-n+4) { width: 1%; white-space: nowrap; }
table.calls td pre { min-width: 12em; }
.charts > .not-run { margin: 0; align-self: start; }
table.calls, table.diff { border-collapse: collapse; width: 100%; margin: 6px 0; font-size: 12.5px; }
table.calls th, table.calls td, table.diff th, table.diff td { border: 1px solid #eaeef2;
  padding: 2px 6px; vertical-align: top; text-align: left; }
table.calls th, table.diff th { background: var(--bg2); font-weight: 600; }
table.diff td { width: 50%; } table.diff td.empty { background: #f6f8fa; }
tr.changed td:first-child, tr.removed td:first-child { background: #fff0ee; }
tr.changed td:last-child, tr.added td:last-child { background: #eafbee; }
del { background: #ffcecb; text-decoration: line-through; } ins { background: #aceebb; text-decoration: none; }
.st-ok { color: #1a7f37; } .st-error { color: #cf222e; } .st-timeout, .st-rejected { color: #9a6700; }
details.repair { margin: 8px 0; } details.repair summary { cursor: pointer; font-weight: 600; }
details.accepted summary { color: #1a7f37; } details.rejected summary { color: #9a6700; }
#js-error { background: #ffebe9; color: #cf222e; padding: 8px 12px; }
"""
