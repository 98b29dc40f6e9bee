"""`autotraj report`: the HTML page on hand-made run directories, escaping, partial and malformed
runs, and the viewer executed by a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PROV, write_jsonl
from test_build import product_traj, write_run  # the build tests' hand-made run

from autotraj.build import BuildConfig, run_build
from autotraj.cli import main
from autotraj.io import DataError
from autotraj.markup import tag_spans
from autotraj.records import Segment, ToolCall, Trajectory
from autotraj.report import plots as report_plots
from autotraj.report import render_report, write_report
from autotraj.report import viewer as report_viewer
from autotraj.report.data import read_curves
from autotraj.report.plots import clean
from autotraj.report.viewer import viewer_data
from autotraj.show import load_run

PAYLOAD = '</script><script>alert(1)</script><script>document.body.dataset.pwned="1"</script>'
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
ACCURACY = {"base": (0.125, 0.25), "sft": (0.5, 0.25), "rl": (0.625, 0.375)}  # gsm8k, hotpotqa


def evil_trajectory() -> Trajectory:
    """A q1 candidate whose text tries to end the script element and holds control characters
    an HTML page cannot hold (a lone surrogate cannot reach a run file: io.read_jsonl refuses it,
    so `clean` is tested on one directly)."""
    return Trajectory(
        id="q1/evil",
        query_id="q1",
        segments=(
            Segment(f"<think>{PAYLOAD}</think>\n<code>\nprint('<b>hi</b>')\n</code>", True),
            Segment("\n<result>\n<img src=x onerror=alert(2)>\x00\x0b\n</result>\n", False),
            Segment("<answer>\\boxed{6}</answer>", True),
        ),
        tool_calls=(ToolCall("python", "print('<b>hi</b>')", "<img src=x>", "error", 0.1),),
        finish_reason="answer",
        provenance=PROV,
    )


def eval_row(benchmark: str, i: int, tokens: int) -> dict:
    t = Trajectory(
        id=f"{benchmark}/{i}/s0",
        query_id=str(i),
        segments=(
            Segment("<think>go</think>\n<answer>\\boxed{1}</answer>", True, tuple(range(tokens))),
            Segment("\n<result>\n1\n</result>\n", False, (1, 2, 3)),
        ),
        tool_calls=(),
        finish_reason="answer",
        provenance=PROV,
    )
    return {"benchmark": benchmark, "correct": i % 2 == 0, "trajectory": t.to_dict()}


def write_eval(root: Path, name: str, model: str = "embedded:tiny") -> None:
    gsm8k, hotpotqa = ACCURACY[name]
    tokens = 240.4 if name == "base" else 120.0

    def metrics(accuracy: float, n: int) -> dict:
        return {
            "n": n,
            "accuracy": accuracy,
            "em": None,
            "f1": None,
            "mean_tokens": tokens,
            "mean_words": 50.0,
            "tool_calls_per_trajectory": 0.5,
            "tool_error_rate": 0.0,
            "format_valid_rate": 1.0,
            "file_sha256": None,
        }

    summary = {
        "name": name,
        "model": model,
        "seeds": [0],
        "benchmarks": {"gsm8k": metrics(gsm8k, 8), "hotpotqa": metrics(hotpotqa, 8)},
        "average": metrics((gsm8k + hotpotqa) / 2, 16),
    }
    folder = root / "eval" / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    size = 240 if name == "base" else 120
    rows = [eval_row(b, i, size + i) for b in ("gsm8k", "hotpotqa") for i in range(8)]
    write_jsonl(folder / "results.jsonl", rows)


def write_training(root: Path) -> None:
    sft = [{"step": s, "sft/train/loss": 2.0 / s} for s in range(1, 5)]
    write_jsonl(root / "sft/metrics.jsonl", [*sft, {"step": 4, "sft/train/train_loss": 1.1}])
    write_jsonl(
        root / "rm/metrics.jsonl", [{"step": s, "rm/train/accuracy": s / 5} for s in range(1, 5)]
    )
    (root / "rm/stats.json").write_text(
        json.dumps({"pairwise_accuracy": 0.75, "pairs": 4, "source": "heldout"})
    )
    rl = [
        {"step": s, "rl/reward/mean": -1 + s / 5, "rl/accuracy": s / 10, "rl/format_rate": 0.5}
        for s in range(1, 6)
    ]
    rl.insert(2, {"step": 3, "rl/reward/mean": 9.0, "rl/accuracy": 0.9})  # replaced on resume
    write_jsonl(root / "rl/metrics.jsonl", rl)
    for stage in ("sft", "rm", "rl"):
        (root / stage / "manifest.json").write_text("{}")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """Every stage: synthesize ... build (the build tests' run), sft, rm, rl, eval base/sft/rl."""
    root = write_run(tmp_path / "run")
    run_build(BuildConfig(run_dir=str(root), save_hf=False))
    with (root / "synthesize/trajectories.jsonl").open("a") as f:
        f.write(json.dumps(evil_trajectory().to_dict()) + "\n")
    write_training(root)
    write_eval(root, "base", model='tiny"><script>alert(3)</script>')
    write_eval(root, "sft")
    write_eval(root, "rl")
    return root


def blob(page: str) -> dict:
    """The viewer's JSON data, parsed as the browser parses it."""
    start = page.index('<script id="viewer-data" type="application/json">')
    text = page[page.index(">", start) + 1 : page.index("</script>", start)]
    return json.loads(text)


# ---------------------------------------------------------------------------------------------
# Content


def test_results_table_holds_the_summary_numbers(run_dir):
    page = render_report(run_dir)
    table = page[page.index('<section id="results">') : page.index('<section id="data">')]
    header = re.findall(r'<th colspan="3"[^>]*>([^<]+)</th>', table)
    assert header == ["base", "sft", "rl"]
    assert 'gsm8k <span class="muted">n=8</span>' in table
    assert "<td>12.5</td><td>240</td><td>0.50</td>" in table  # base on gsm8k
    assert '<td class="best">62.5</td><td>120</td><td>0.50</td>' in table  # rl, the best
    assert '<tr class="avg"><td>average <span class="muted">n=16</span></td>' in table
    assert '<td class="best">50.0</td>' in table  # rl's average (0.625 + 0.375) / 2
    assert "Accuracy per stage" in table and "Length: base vs rl (all benchmarks)" in table
    assert "model tokens, tool results excluded" in table  # eval trajectories carry token ids
    assert "not run" not in table


def test_data_engine_counts_and_training_curves(run_dir):
    page = render_report(run_dir)
    engine = page[page.index('<section id="data">') : page.index('<section id="training">')]
    cards = dict(
        (name, value)
        for value, name in re.findall(
            r'<div class="value">([^<]+)</div><div class="name">([^<]+)</div>', engine
        )
    )
    assert cards == {
        "queries": "3",
        "candidates": "6",
        "HQ": "2",
        "AC-LQ": "1",
        "AW": "2",
        "repairs accepted / attempted": "2 / 3",
        "SFT records": "4",
        "preference pairs": "2",
    }
    assert (
        "<tr><td>AW</td><td>2</td><td>40%</td><td>2</td><td>1</td><td>1</td><td>50%</td></tr>"
        in (engine)
    )
    assert "Length: synthesized candidates vs SFT set" in engine
    assert "model words (no token ids)" in engine  # the fixture's candidates have no token ids
    training = page[page.index('<section id="training">') : page.index('<section id="viewer">')]
    assert "steps logged: 4; loss 2 → 0.5" in training
    assert "held-out pairwise accuracy 0.750 on 4 pairs (heldout)" in training
    assert "steps: 5; reward -0.8 → 0" in training
    curves = read_curves(run_dir / "rl/metrics.jsonl", ["rl/reward/mean", "rl/kl"])
    assert list(curves) == ["rl/reward/mean"]  # no kl logged
    assert curves["rl/reward/mean"][2] == (3, pytest.approx(-0.4))  # the resumed step's last row
    assert "RL accuracy and format rate per step" in training


def test_viewer_data_spans_scores_and_repair_diffs(run_dir):
    data = viewer_data(load_run(run_dir), max_trajectories=100)
    assert [q["id"] for q in data["queries"]] == ["q1", "q2", "q3"]
    by_id = {t["id"]: t for t in data["trajectories"]}
    assert [data["trajectories"][i]["id"] for i in data["queries"][0]["t"]] == [
        "q1/s0",
        "q1/s1",
        "q1/evil",
    ]
    s1 = by_id["q1/s1"]
    assert (s1["label"], s1["score"], s1["correct"]) == ("AC-LQ", 0.7, True)
    assert s1["components"] == {"confidence": 0.0, "length": 1.0, "repetition": 1.0}
    kinds = [kind for _, spans in s1["segments"] for kind, _ in spans]
    assert kinds == ["think", "text", "code", "result", "think", "text", "answer"]
    assert s1["calls"] == [["python", "ok", 0.05, "print(2*3)", "6"]]
    (accepted,) = s1["repairs"]
    assert (accepted["id"], accepted["how"], accepted["before"], accepted["after"]) == (
        "q1/s1/r",
        "first_pass",
        0.7,
        0.97,
    )
    changed = [row for row in accepted["rows"] if row[0] == "|"]
    assert changed == [
        [
            "|",
            [
                [False, "<think>"],
                [True, "maybe "],
                [False, "multiply"],
                [True, ", probably"],
                [False, "</think>"],
            ],
            [[False, "<think>"], [False, "multiply"], [False, "</think>"]],
        ]
    ]
    rejected = by_id["q2/s1"]["repairs"]
    assert [(r["accepted"], r["id"], r["reason"]) for r in rejected] == [
        (False, "q2/s1/r", "wrong answer"),
    ]
    assert by_id["q1/evil"]["label"] is None


def test_viewer_keeps_whole_queries_up_to_the_cap(tmp_path):
    files = load_run(write_run(tmp_path / "run"))
    data = viewer_data(files, max_trajectories=3)
    assert [q["id"] for q in data["queries"]] == ["q1"]  # q2 would make 4
    assert (len(data["trajectories"]), data["total"]) == (2, 5)
    assert len(viewer_data(files, max_trajectories=1)["trajectories"]) == 2  # never empty
    page = render_report(tmp_path / "run", max_trajectories=3)
    assert "first 2 of 5 candidates (whole queries)" in page


def test_long_texts_are_cut():
    long = product_traj("q1/long", "q1", "6", think="word " * 3000)
    entry = viewer_data_of(long)
    think = entry["segments"][0][1][0][1]
    assert len(think) < 4100 and think.endswith("more characters not shown]")


def viewer_data_of(t: Trajectory) -> dict:
    from autotraj.run_dir import RunFiles

    files = RunFiles(queries={}, trajectories={t.id: t}, scores={}, repairs={}, hard_cases=())
    return viewer_data(files, max_trajectories=10)["trajectories"][0]


# ---------------------------------------------------------------------------------------------
# Escaping


def test_model_text_stays_inert_and_intact(run_dir):
    page = render_report(run_dir)
    assert page.count("<script") == 2 and page.count("</script>") == 2  # data + viewer only
    assert "<img" not in page and "<b>hi" not in page
    assert 'title="tiny&quot;&gt;&lt;script&gt;alert(3)&lt;/script&gt;"' in page
    data = blob(page)
    evil = next(t for t in data["trajectories"] if t["id"] == "q1/evil")
    text = "".join(piece for _, spans in evil["segments"] for _, piece in spans)
    shown = "".join(clean(s.text.strip("\n")) for s in evil_trajectory().segments)
    assert text == shown  # the payload survives as text
    assert "\x0b" not in text and "\ufffd" in text and "\x00" not in text
    page.encode("utf-8")  # no lone surrogate left anywhere


def test_non_finite_numbers_become_null():
    from autotraj.report.viewer import data_script

    script = data_script({"x": [float("nan"), float("inf"), 1.5], "y": "a\ud800"})
    assert script.endswith('>{"x":[null,null,1.5],"y":"a\ufffd"}</script>')


def test_a_long_run_with_whole_number_steps_renders(run_dir):
    """Trainers log integer steps; over 10+ steps the axis ticks are whole numbers too."""
    rows = [{"step": step, "sft/train/loss": 2.0 / step} for step in range(2, 26, 2)]
    write_jsonl(run_dir / "sft/metrics.jsonl", rows)
    page = render_report(run_dir)
    assert "SFT loss" in page and ">20<" in page  # a tick label of the step axis


def test_non_finite_metrics_are_left_out(run_dir):
    rows = [{"step": 1, "sft/train/loss": 2.0}, {"step": 2, "sft/train/loss": float("nan")}]
    write_jsonl(run_dir / "sft/metrics.jsonl", rows)
    assert read_curves(run_dir / "sft/metrics.jsonl", ["sft/train/loss"]) == {
        "sft/train/loss": [(1, 2.0)]
    }
    svg = report_plots.histogram("h", {"a": [1.0, float("inf")], "b": [float("nan")]}, x_label="x")
    assert "nan" not in svg.lower() and "a (n=1, mean 1)" in svg and "b (n=0, mean 0)" in svg
    assert "steps logged: 1; loss 2 → 2" in render_report(run_dir)


def test_csp_pins_the_viewer_script(run_dir):
    import base64
    import hashlib

    page = render_report(run_dir)
    digest = base64.b64encode(hashlib.sha256(report_viewer.VIEWER_JS.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in page and "default-src 'none'" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page


def test_tag_spans():
    text = "<think>a <python>x</python></think>\n<answer>1</answer> <code>open"
    spans = tag_spans(text)
    assert "".join(piece for _, piece in spans) == text
    assert spans == [
        ("think", "<think>a "),
        ("code", "<python>x</python>"),
        ("think", "</think>"),
        ("text", "\n"),
        ("answer", "<answer>1</answer>"),
        ("text", " <code>open"),  # unclosed: plain text
    ]
    assert tag_spans("") == [] and tag_spans("</think>x") == [("text", "</think>x")]


# ---------------------------------------------------------------------------------------------
# Partial and malformed run directories


def sections_not_run(page: str) -> list[str]:
    return re.findall(r'<p class="not-run">([^<:]+): not run', page)


def test_empty_run_dir_says_not_run_everywhere(tmp_path):
    page = render_report(tmp_path)
    assert sections_not_run(page) == ["evaluation", "synthesize", "SFT", "reward model", "RL"] + [
        "synthesize"
    ]
    assert '<script id="viewer-data"' not in page
    with pytest.raises(DataError, match="no such run directory"):
        render_report(tmp_path / "missing")


def test_only_synthesize(tmp_path):
    root = write_run(tmp_path / "run")
    shutil.rmtree(root / "score")
    shutil.rmtree(root / "repair")
    page = render_report(root)
    assert sections_not_run(page) == ["evaluation", "score", "SFT set lengths", "SFT"] + [
        "reward model",
        "RL",
    ]
    assert '<div class="value">not run</div><div class="name">HQ</div>' in page
    assert all(t["label"] is None for t in blob(page)["trajectories"])


def test_unfinished_stages(run_dir):
    (run_dir / "rm/stats.json").unlink()
    (run_dir / "eval/rl/results.jsonl").unlink()
    (run_dir / "sft/manifest.json").unlink()
    page = render_report(run_dir)
    assert "no rm/stats.json yet (training not finished)" in page
    assert "Length: base vs rl" not in page and "length before / after: not run" in page
    assert '<span class="chip partial" title="partial">sft</span>' in page


@pytest.mark.parametrize(
    ("path", "content", "match"),
    [
        ("score/scores.jsonl", None, r"scores\.jsonl:2: malformed JSON"),
        ("eval/sft/summary.json", "{oops", r"eval/sft/summary\.json: malformed JSON"),
        ("eval/sft/summary.json", '{"benchmarks": {"gsm8k": {}}}', r"benchmarks\.gsm8k: 'acc"),
        ("eval/rl/results.jsonl", '{"benchmark": "gsm8k"}\n', r"results\.jsonl:1: .*trajectory"),
        ("rl/metrics.jsonl", '{"step": "x"}\n', r"rl/metrics\.jsonl:1: 'step' must be an int"),
        ("rm/stats.json", "[1]", r"stats\.json: expected a JSON object"),
    ],
)
def test_malformed_files_name_the_file_and_line(run_dir, path, content, match):
    target = run_dir / path
    if content is None:
        lines = target.read_text().splitlines()
        content = "\n".join([lines[0], "{not json", *lines[2:]]) + "\n"
    target.write_text(content)
    with pytest.raises(DataError, match=match):
        render_report(run_dir)


def test_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "out" / "r.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.is_file()
    assert main(["report", str(run_dir)]) == 0 and (run_dir / "report.html").is_file()
    (run_dir / "rl/metrics.jsonl").write_text("nope\n")
    assert main(["report", str(run_dir)]) == 2
    assert "rl/metrics.jsonl:1: malformed JSON" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A real browser


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)"
)


@needs_chromium
def test_viewer_renders_in_headless_chromium(run_dir, tmp_path):
    page = write_report(run_dir)
    dom = chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    assert 'data-viewer-ready="1"' in dom and "data-js-error" not in dom
    assert '<div id="js-error" hidden=""></div>' in dom
    assert dom.count('<li class="q-item') == 3 and 'data-count="3"' in dom
    assert '<li class="q-item selected"' in dom  # the first query is shown
    assert dom.count('<article class="traj">') == 3  # q1's candidates
    assert "data-pwned" not in dom  # the payload did not run ...
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # ... it is shown as text
    assert "<del>maybe </del>" in dom and 'class="k-answer"' in dom
    assert dom.count("<td><pre>print(2*3)</pre></td>") == 2  # an unchanged line, on both sides
    assert "3 of 3 queries" in dom


@needs_chromium
def test_label_filter_in_headless_chromium(run_dir, tmp_path):
    page = write_report(run_dir)
    dom = chromium(tmp_path, "--dump-dom", page.as_uri() + "?label=AW").stdout
    assert 'data-viewer-ready="1"' in dom and "data-js-error" not in dom
    assert dom.count('<li class="q-item') == 1 and "1 of 3 queries" in dom
    assert dom.count('<article class="traj">') == 2  # q2's two AW candidates
    dom = chromium(tmp_path, "--dump-dom", page.as_uri() + "?label=repaired&q=q1").stdout
    assert dom.count('<article class="traj">') == 1 and "2 of 3 candidates hidden" in dom


@needs_chromium
def test_screenshot(run_dir, tmp_path):
    page = write_report(run_dir)
    png = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,2000", page.as_uri())
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000
