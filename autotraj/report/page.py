"""The page of `autotraj report RUN_DIR`: one self-contained HTML page about a run directory.

What it does: reads whatever stages of `RUN_DIR` have run and writes one HTML file (default
`<run_dir>/report.html`) that loads nothing from elsewhere (inline CSS, inline SVG charts, one
inline script whose hash the page's Content-Security-Policy pins). Sections:
- Results: accuracy, mean model tokens and tool calls per trajectory for every evaluated model
  (`eval/<name>/summary.json`; base, sft, rl first) per benchmark and on average; accuracy per
  stage; model-length histograms of the base model against the last trained one
  (`eval/<name>/results.jsonl`).
- Data engine: candidates per label HQ / AC-LQ / AW, repairs attempted / accepted / rejected per
  label, SFT records and preference pairs; the score S per label; candidate lengths against the
  SFT set's.
- Training: the SFT loss, the reward model's pairwise accuracy (train, and held-out from
  `rm/stats.json`), the RL reward, accuracy and format rate per step (`*/metrics.jsonl`).
- Trajectories: the viewer of report/viewer.py (queries, candidates, scores, tool calls, repair
  diffs; filter by label).
Lengths are what the model wrote (tool results excluded): tokens when every trajectory plotted
together has token ids, else whitespace words; each axis says which.

A stage that has not run shows "not run"; a malformed file raises `DataError` naming the file
(and line, for JSONL). Not here: computing metrics a stage already wrote, reading the eval and
metrics files (report/data.py), SVG drawing (report/plots.py), the viewer's data, script and
the stylesheet (report/viewer.py).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from autotraj.compare import HEADER, Row, row_cells, sft_note
from autotraj.io import DataError
from autotraj.records import LABELS, SftRecord
from autotraj.report.data import (
    EvalRun,
    Length,
    Metrics,
    model_length,
    read_curves,
    read_evals,
    read_json,
    stage_states,
)
from autotraj.report.plots import bar_chart, esc, fmt, histogram, line_chart
from autotraj.report.viewer import STYLE, VIEWER_JS, data_script, viewer_data
from autotraj.run_dir import RunFiles, load_preference_pairs, load_sft_records
from autotraj.show import load_run

log = logging.getLogger(__name__)

MAX_TRAJECTORIES = 5000  # candidates embedded in the viewer (whole queries, in file order)


# ---------------------------------------------------------------------------------------------
# HTML pieces


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def not_run(what: str, needs: str) -> str:
    return f'<p class="not-run">{esc(what)}: not run (needs {esc(needs)})</p>'


def _figure(svg: str, caption: str = "", wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    note = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure{cls}>{svg}{note}</figure>"


def _lengths_figure(title: str, series: dict[str, Sequence[Length]]) -> str:
    """A histogram of model lengths: in tokens when every trajectory has them, else words."""
    tokens = all(tok is not None for lengths in series.values() for tok, _ in lengths)
    values = {
        name: [float(tok if tokens and tok is not None else words) for tok, words in lengths]
        for name, lengths in series.items()
    }
    unit = "model tokens" if tokens else "model words (no token ids)"
    return _figure(histogram(title, values, x_label=f"{unit}, tool results excluded"))


def _cards(items: Sequence[tuple[str, str]]) -> str:
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="value">{esc(v)}</div><div class="name">{esc(k)}</div></div>'
            for k, v in items
        )
        + "</div>"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="numbers"><tr>{head}</tr>{body}</table>'


# ---------------------------------------------------------------------------------------------
# Sections


def _metrics_of(run: EvalRun, group: str | None) -> Metrics | None:
    """A model's metrics on a benchmark, or on average (`group` None)."""
    return run.average if group is None else run.benchmarks.get(group)


def _results_table(evals: list[EvalRun], names: list[str]) -> str:
    """Rows: benchmarks then the average; per model: accuracy, tokens, tool calls."""
    top = "".join(f'<th colspan="3" title="{esc(e.model)}">{esc(e.name)}</th>' for e in evals)
    sub = "<th>accuracy %</th><th>tokens</th><th>tool calls</th>" * len(evals)
    rows = []
    for bench in [*names, None]:
        metrics = [_metrics_of(e, bench) for e in evals]
        best = max((m.accuracy for m in metrics if m is not None), default=None)
        n = next((m.n for m in metrics if m is not None and m.n is not None), None)
        count = f' <span class="muted">n={n}</span>' if n is not None else ""
        cells = [f"<td>{esc(bench or 'average')}{count}</td>"]
        for m in metrics:
            if m is None:
                cells.append("<td>-</td>" * 3)
                continue
            best_cls = ' class="best"' if len(evals) > 1 and m.accuracy == best else ""
            cells.append(
                f"<td{best_cls}>{100 * m.accuracy:.1f}</td><td>{m.mean_tokens:.0f}</td>"
                f"<td>{m.tool_calls:.2f}</td>"
            )
        row_cls = ' class="avg"' if bench is None else ""
        rows.append(f"<tr{row_cls}>{''.join(cells)}</tr>")
    return (
        f'<table class="numbers"><tr><th rowspan="2">benchmark</th>{top}</tr><tr>{sub}</tr>'
        f"{''.join(rows)}</table>"
    )


def results_section(evals: list[EvalRun]) -> str:
    if not evals:
        return _section("results", "Results", not_run("evaluation", "eval/<name>/summary.json"))
    names = list(dict.fromkeys(b for e in evals for b in e.benchmarks))
    groups: list[str | None] = [*names, None]
    series = {}
    for e in evals:
        metrics = [_metrics_of(e, g) for g in groups]
        series[e.name] = [None if m is None else 100 * m.accuracy for m in metrics]
    chart = bar_chart(
        "Accuracy per stage",
        [g or "average" for g in groups],
        series,
        y_label="accuracy %",
        y_range=(0, 100),
        width=max(480, 90 * len(groups)),
    )
    charts = [_figure(chart, wide=len(groups) > 5)]
    base = next((e for e in evals if e.name == "base"), None)
    final = next((e for e in reversed(evals) if e.name != "base"), None)
    if base is not None and final is not None and base.lengths and final.lengths:
        title = f"Length: {base.name} vs {final.name} (all benchmarks)"
        charts.append(_lengths_figure(title, {base.name: base.lengths, final.name: final.lengths}))
    else:
        charts.append(not_run("length before / after", "results.jsonl of base and a trained model"))
    body = _results_table(evals, names) + f'<div class="charts">{"".join(charts)}</div>'
    return _section("results", "Results", body)


def ablation_section(run_dir: Path) -> str:
    """The `autotraj ablate` comparison (ablation/comparison.json), "" when there is none."""
    out = run_dir / "ablation"
    if not (out / "comparison.json").is_file():
        return ""
    rows = [Row.from_dict(r) for r in read_json(out / "comparison.json")["rows"]]
    curves = read_json(out / "sft.json") if (out / "sft.json").is_file() else {}
    table = _table(
        [*HEADER, "SFT"],
        [[*row_cells(r), sft_note(curves[r.model]) if r.model in curves else ""] for r in rows],
    )
    note = (
        '<p class="muted">* the paired 95% bootstrap interval of the difference excludes 0. '
        "SFT variants train for the same number of steps; docs/ablation.md.</p>"
    )
    return _section("ablation", "Ablation", table + note)


def _engine_counts(run_dir: Path, files: RunFiles, sft: list[SftRecord] | None) -> str:
    """Cards (queries ... preference pairs) and the table of labels and repair outcomes."""
    scored = (run_dir / "score" / "scores.jsonl").is_file()
    repaired = (run_dir / "repair" / "repairs.jsonl").is_file()
    pairs_path = run_dir / "build" / "preferences.jsonl"
    labels = Counter(row.quality.label for row in files.scores.values())
    label_of = {tid: row.quality.label for tid, row in files.scores.items()}
    originals = {*files.repairs, *(case.original_id for case in files.hard_cases)}
    attempted = Counter(label_of.get(i, "unscored") for i in originals)
    accepted = Counter(r.label for r in files.repairs.values())
    pairs = len(load_preference_pairs(pairs_path)) if pairs_path.is_file() else None
    repairs = f"{sum(accepted.values())} / {sum(attempted.values())}" if repaired else "not run"
    cards = [
        ("queries", str(len(files.queries))),
        ("candidates", str(len(files.trajectories))),
        *((label, str(labels[label]) if scored else "not run") for label in LABELS),
        ("repairs accepted / attempted", repairs),
        ("SFT records", str(len(sft)) if sft is not None else "not run"),
        ("preference pairs", str(pairs) if pairs is not None else "not run"),
    ]
    if not scored:
        return _cards(cards)
    rows = []
    for label in LABELS:
        tried, done = attempted[label], accepted[label]
        outcome = [
            str(tried),
            str(done),
            str(tried - done),
            f"{done / tried:.0%}" if tried else "-",
        ]
        share = f"{labels[label] / max(1, len(files.scores)):.0%}"
        rows.append([label, str(labels[label]), share, *(outcome if repaired else ["-"] * 4)])
    header = ["label", "candidates", "share", "sent to repair", "accepted", "rejected", "rate"]
    return _cards(cards) + _table(header, rows)


def engine_section(run_dir: Path, files: RunFiles | None, sft: list[SftRecord] | None) -> str:
    if files is None:
        return _section("data", "Data engine", not_run("synthesize", "synthesize/*.jsonl"))
    charts = []
    if files.scores:
        scores = {
            label: [r.quality.score for r in files.scores.values() if r.quality.label == label]
            for label in LABELS
        }
        present = {label: values for label, values in scores.items() if values}
        charts.append(_figure(histogram("Quality score S per label", present, x_label="S")))
    else:
        charts.append(not_run("score", "score/scores.jsonl"))
    if sft:
        candidates = [model_length(t) for t in files.trajectories.values()]
        sft_set = [model_length(r.trajectory) for r in sft]
        title = "Length: synthesized candidates vs SFT set"
        charts.append(_lengths_figure(title, {"candidates": candidates, "SFT set": sft_set}))
    else:
        charts.append(not_run("SFT set lengths", "a non-empty build/sft.jsonl"))
    body = _engine_counts(run_dir, files, sft) + f'<div class="charts">{"".join(charts)}</div>'
    return _section("data", "Data engine", body)


def _sft_figure(run_dir: Path) -> str:
    path = run_dir / "sft" / "metrics.jsonl"
    points = (read_curves(path, ["sft/train/loss"]) if path.is_file() else {}).get("sft/train/loss")
    if not points:
        return not_run("SFT", "sft/metrics.jsonl with a loss")
    caption = f"steps logged: {len(points)}; loss {fmt(points[0][1])} → {fmt(points[-1][1])}"
    chart = line_chart("SFT loss", {"train loss": points}, x_label="step", y_label="loss")
    return _figure(chart, caption)


def _rm_figure(run_dir: Path) -> str:
    path, stats_path = run_dir / "rm" / "metrics.jsonl", run_dir / "rm" / "stats.json"
    keys = ["rm/train/accuracy", "rm/eval/accuracy"]
    curves = read_curves(path, keys) if path.is_file() else {}
    if not curves:
        return not_run("reward model", "rm/metrics.jsonl with an accuracy")
    stats = read_json(stats_path) if stats_path.is_file() else {}
    held = stats.get("pairwise_accuracy")
    references = {}
    caption = "no rm/stats.json yet (training not finished)"
    if isinstance(held, (int, float)) and not isinstance(held, bool):
        references["held-out"] = float(held)
        caption = (
            f"held-out pairwise accuracy {held:.3f} on {stats.get('pairs', '?')} pairs "
            f"({stats.get('source', '?')})"
        )
    chart = line_chart(
        "Reward model pairwise accuracy",
        {key.split("/")[1]: points for key, points in curves.items()},
        x_label="step",
        y_label="accuracy",
        y_range=(0, 1),
        references=references,
    )
    return _figure(chart, caption)


def _rl_figures(run_dir: Path) -> list[str]:
    path = run_dir / "rl" / "metrics.jsonl"
    keys = ["rl/reward/mean", "rl/accuracy", "rl/format_rate"]
    curves = read_curves(path, keys) if path.is_file() else {}
    if not curves:
        return [not_run("RL", "rl/metrics.jsonl")]
    figures = []
    reward = curves.get("rl/reward/mean")
    if reward:
        caption = f"steps: {len(reward)}; reward {fmt(reward[0][1])} → {fmt(reward[-1][1])}"
        chart = line_chart(
            "RL reward per step", {"mean reward": reward}, x_label="step", y_label="reward"
        )
        figures.append(_figure(chart, caption))
    rates = {key.split("/")[-1]: v for key, v in curves.items() if key != "rl/reward/mean"}
    if rates:
        chart = line_chart(
            "RL accuracy and format rate per step",
            rates,
            x_label="step",
            y_label="rate",
            y_range=(0, 1),
        )
        figures.append(_figure(chart))
    return figures


def training_section(run_dir: Path) -> str:
    charts = [_sft_figure(run_dir), _rm_figure(run_dir), *_rl_figures(run_dir)]
    return _section("training", "Training", f'<div class="charts">{"".join(charts)}</div>')


def viewer_section(files: RunFiles | None, max_trajectories: int) -> tuple[str, str]:
    """(the section, the data script element; "" when synthesize has not run)."""
    if files is None:
        return _section("viewer", "Trajectories", not_run("synthesize", "synthesize/*.jsonl")), ""
    data = viewer_data(files, max_trajectories)
    shown = len(data["trajectories"])
    note = (
        f"first {shown} of {data['total']} candidates (whole queries)"
        if shown < data["total"]
        else f"{shown} candidates"
    )
    options = [
        ("all", "all labels"),
        *((lab, lab) for lab in LABELS),
        ("unscored", "unscored"),
        ("repaired", "with an accepted repair"),
        ("hard", "with a rejected repair"),
    ]
    select = "".join(f'<option value="{v}">{esc(t)}</option>' for v, t in options)
    legend = "".join(
        f'<span class="k-{k}">{k}</span>' for k in ("think", "code", "search", "result", "answer")
    )
    body = (
        f'<div class="controls"><select id="viewer-label">{select}</select>'
        '<input id="viewer-search" type="search" placeholder="search query id, question, trajectory id">'
        f'<span id="viewer-count" class="muted"></span><span class="muted">· {esc(note)}</span>'
        f'<span class="legend-row">{legend}</span></div>'
        '<div class="viewer"><div><ul id="viewer-list"></ul>'
        '<button id="viewer-more" hidden></button></div><div id="viewer-detail"></div></div>'
    )
    return _section("viewer", "Trajectories", body), data_script(data)


# ---------------------------------------------------------------------------------------------
# The page


def render_report(run_dir: str | Path, max_trajectories: int | None = None) -> str:
    """The whole HTML page for `run_dir`; the viewer holds up to `max_trajectories` candidates
    (None: MAX_TRAJECTORIES)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"{run}: no such run directory")
    synthesized = all(
        (run / "synthesize" / n).is_file() for n in ("queries.jsonl", "trajectories.jsonl")
    )
    files = load_run(run) if synthesized else None
    sft_path = run / "build" / "sft.jsonl"
    sft = load_sft_records(sft_path) if sft_path.is_file() else None
    cap = MAX_TRAJECTORIES if max_trajectories is None else max_trajectories
    viewer, data = viewer_section(files, cap)
    ablation = ablation_section(run)
    sections = [
        ablation,
        results_section(read_evals(run)),
        engine_section(run, files, sft),
        training_section(run),
        viewer,
    ]
    chips = "".join(
        f'<span class="chip {state}" title="{state}">{esc(stage)}</span>'
        for stage, state in stage_states(run)
    )
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in (
            *((("ablation", "Ablation"),) if ablation else ()),
            ("results", "Results"),
            ("data", "Data engine"),
            ("training", "Training"),
            ("viewer", "Trajectories"),
        )
    )
    digest = base64.b64encode(hashlib.sha256(VIEWER_JS.encode()).digest()).decode()
    policy = (
        f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        f"script-src 'sha256-{digest}'"
    )
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>autotraj report: {esc(run.resolve().name)}</title><style>{STYLE}</style></head>"
        '<body><div id="js-error" hidden></div>'
        f"<header><h1>autotraj report: {esc(run.resolve().name)}</h1>"
        f'<div class="muted">{esc(run.resolve())} · generated {when}</div>'
        f'<div class="stages">{chips}</div><nav>{nav}</nav></header>'
        f"<main>{''.join(sections)}</main>{data}<script>{VIEWER_JS}</script></body></html>\n"
    )


def write_report(
    run_dir: str | Path, out: str | Path | None = None, max_trajectories: int | None = None
) -> Path:
    """Write the report (default `<run_dir>/report.html`) and return its path."""
    page = render_report(run_dir, max_trajectories)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    log.info("wrote %s (%.1f MB)", path, len(page.encode()) / 1e6)
    return path
