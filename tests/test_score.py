"""The score stage: labels and every component on hand-built synthesize outputs."""

from __future__ import annotations

import json
import math

import pytest
from conftest import traj, write_jsonl

from autotraj.config import ConfigError
from autotraj.io import DataError, read_jsonl
from autotraj.quality import QualityConfig
from autotraj.score import ScoreConfig, run_score


def write_synthesized(run_dir, queries, trajectories):
    write_jsonl(run_dir / "synthesize/queries.jsonl", queries)
    write_jsonl(run_dir / "synthesize/trajectories.jsonl", [t.to_dict() for t in trajectories])


CLEAN = "<think>Six times seven is 42.</think>\n<answer>\\boxed{42}</answer>"
HEDGING = "<think>It seems six times seven is probably 42.</think>\n<answer>\\boxed{42}</answer>"
WRONG = "<think>Six times seven is 41.</think>\n<answer>\\boxed{41}</answer>"


def write_two_queries(tmp_path):
    """q1 (math): a clean, a hedging and a wrong trajectory; q2 (QA): one partly right answer."""
    queries = [
        {"id": "q1", "question": "What is 6*7?", "answers": ["42"], "kind": "math"},
        {
            "id": "q2",
            "question": "Who wrote Hamlet?",
            "answers": ["William Shakespeare"],
            "kind": "qa",
        },
    ]
    trajectories = [
        traj(CLEAN, tid="q1/s0", qid="q1"),
        traj(HEDGING, tid="q1/s1", qid="q1"),
        traj(WRONG, tid="q1/s2", qid="q1"),
        traj(
            "<think>Hamlet is by Shakespeare.</think>\n<answer>\\boxed{Shakespeare}</answer>",
            tid="q2/s0",
            qid="q2",
        ),
    ]
    write_synthesized(tmp_path, queries, trajectories)
    return tmp_path


@pytest.fixture
def run_dir(tmp_path):
    return write_two_queries(tmp_path)


def rows(run_dir):
    return {row["trajectory_id"]: row for _, row in read_jsonl(run_dir / "score/scores.jsonl")}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The score stage run once on write_two_queries: (run dir, counts, score rows by id)."""
    run_dir = write_two_queries(tmp_path_factory.mktemp("score"))
    counts = run_score(ScoreConfig(run_dir=str(run_dir)))
    return run_dir, counts, rows(run_dir)


HEDGING_LENGTH = math.exp(-9 / 18)  # L = 9 words against L* = 6: l = exp(-(9 - 6)^2 / (2 * 3^2))

# (trajectory id, field, value computed by hand)
SCORE_ROWS = [
    ("q1/s0", "label", "HQ"),
    ("q1/s0", "score", pytest.approx(1.0)),
    ("q1/s1", "label", "AC-LQ"),
    ("q1/s1", "words", 9),
    ("q1/s1", "length_ref", 6),
    ("q1/s1", "score", pytest.approx(0.3 * HEDGING_LENGTH + 0.3)),  # c = 0; short text: e = 1
    ("q1/s2", "label", "AW"),
    ("q1/s2", "correct", False),
    ("q1/s2", "extracted", "41"),
    # QA: F1 0.67 against "William Shakespeare" counts as correct (release rule), EM does not
    ("q2/s0", "correct", True),
    ("q2/s0", "em", 0.0),
    ("q2/s0", "f1", pytest.approx(2 / 3)),
]


@pytest.mark.parametrize(("tid", "field", "expected"), SCORE_ROWS)
def test_score_rows_hold_hand_computed_values(scored, tid, field, expected):
    assert scored[2][tid][field] == expected


@pytest.mark.parametrize(
    ("component", "expected"),
    [("confidence", 0.0), ("length", pytest.approx(HEDGING_LENGTH))],
)
def test_components_of_the_hedging_trajectory(scored, component, expected):
    assert scored[2]["q1/s1"]["components"][component] == expected


def test_every_component_is_written(scored):
    components = scored[2]["q1/s1"]["components"]
    assert set(components) == {
        "confidence",
        "length",
        "repetition",
        "tool_validity",
        "format",
        "token_length",
    }


def test_rows_keep_the_file_order(scored):
    assert list(scored[2]) == ["q1/s0", "q1/s1", "q1/s2", "q2/s0"]


def test_counts_by_label_and_accuracy(scored):
    counts = scored[1]
    assert (counts["HQ"], counts["AC-LQ"], counts["AW"]) == (2, 1, 1)
    assert counts["accuracy"] == pytest.approx(3 / 4)


def test_manifest_and_resolved_config_are_written(scored):
    run_dir, counts, _ = scored
    manifest = json.loads((run_dir / "score/manifest.json").read_text())
    assert manifest["counts"] == counts and set(manifest["inputs"]) == {"queries", "trajectories"}
    assert (run_dir / "score/config.resolved.yaml").exists()


def test_rerun_is_a_no_op_and_changed_config_is_refused(run_dir):
    cfg = ScoreConfig(run_dir=str(run_dir))
    first = run_score(cfg)
    stamp = (run_dir / "score/scores.jsonl").stat().st_mtime_ns
    assert run_score(cfg) == first
    assert (run_dir / "score/scores.jsonl").stat().st_mtime_ns == stamp
    other = ScoreConfig(run_dir=str(run_dir), quality=QualityConfig(hq_best=0.5))
    with pytest.raises(ConfigError, match="different config"):
        run_score(other)


def test_changed_inputs_are_refused(run_dir):
    cfg = ScoreConfig(run_dir=str(run_dir))
    run_score(cfg)
    path = run_dir / "synthesize/trajectories.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(ConfigError, match=r"different input files \(trajectories changed\)"):
        run_score(cfg)


def test_missing_inputs_name_the_file_and_the_stage(tmp_path):
    with pytest.raises(DataError, match=r"queries\.jsonl.*autotraj synthesize"):
        run_score(ScoreConfig(run_dir=str(tmp_path)))
    (tmp_path / "synthesize").mkdir()
    (tmp_path / "synthesize/queries.jsonl").write_text("")
    (tmp_path / "synthesize/trajectories.jsonl.partial").write_text("")
    with pytest.raises(DataError, match=r"trajectories\.jsonl.*not finished"):
        run_score(ScoreConfig(run_dir=str(tmp_path)))


def test_unknown_query_is_an_error(tmp_path):
    write_synthesized(
        tmp_path,
        [{"id": "q1", "question": "?", "answers": ["1"]}],
        [traj(CLEAN, tid="q9/s0", qid="q9")],
    )
    with pytest.raises(DataError, match="q9"):
        run_score(ScoreConfig(run_dir=str(tmp_path)))
