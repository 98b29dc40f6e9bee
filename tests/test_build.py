"""The build stage on hand-made run directories: sets, counts, invariants, HF output, re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import traj, write_jsonl

from autotraj import build
from autotraj.build import BuildConfig, run_build
from autotraj.cli import main
from autotraj.config import ConfigError
from autotraj.io import DataError
from autotraj.records import (
    QualityScore,
    Query,
    Repair,
    RepairAttempt,
    ScoreRow,
    ToolCall,
    Trajectory,
)
from autotraj.render import chat_messages
from autotraj.run_dir import load_preference_pairs, load_sft_records

QUERIES = [
    Query("q1", "What is 2*3?", ("6",), "math"),
    Query("q2", "What is 4*5?", ("20",), "math"),
    Query("q3", "What is 7*8?", ("56",), "math"),
]


def product_traj(
    tid: str, qid: str, value: str, think: str = "multiply", parent: str | None = None
) -> Trajectory:
    """A trajectory with one python call whose result is `value` and answer `value`."""
    a, b = {"q1": (2, 3), "q2": (4, 5), "q3": (7, 8)}[qid]
    return traj(
        f"<think>{think}</think>\n<code>\nprint({a}*{b})\n</code>",
        f"\n<result>\n{value}\n</result>\n",
        f"<think>ok</think>\n<answer>\\boxed{{{value}}}</answer>",
        tid=tid,
        qid=qid,
        calls=(ToolCall("python", f"print({a}*{b})", value, "ok", 0.05),),
        parent=parent,
    )


CANDIDATES = {
    "q1/s0": (product_traj("q1/s0", "q1", "6"), "HQ", 0.95),
    "q1/s1": (product_traj("q1/s1", "q1", "6", think="maybe multiply, probably"), "AC-LQ", 0.70),
    "q2/s0": (product_traj("q2/s0", "q2", "21"), "AW", 0.90),
    "q2/s1": (product_traj("q2/s1", "q2", "19"), "AW", 0.85),
    "q3/s0": (product_traj("q3/s0", "q3", "56"), "HQ", 0.92),
}


def score_row(t: Trajectory, label: str, score: float) -> dict:
    """A score/scores.jsonl row as the score stage writes it (records.ScoreRow)."""
    correct = label != "AW"
    components = {"confidence": 1.0 if score > 0.8 else 0.0, "length": 1.0, "repetition": 1.0}
    q = QualityScore(t.id, t.query_id, score, tuple(components.items()), correct, label)
    group = [c for c, _, _ in CANDIDATES.values() if c.query_id == t.query_id]
    words_ref = min(len(c.text.split()) for c in group)
    row = ScoreRow(q, float(correct), float(correct), "x", len(t.text.split()), words_ref)
    return row.to_dict()


def attempt(
    n: int, how: str, fixed: Trajectory, score: float | None, reason: str = ""
) -> RepairAttempt:
    """A judged repair attempt as repair.judge makes it (score None: not scored, infra error)."""
    correct = score is not None and not reason
    components = () if score is None else (("confidence", 1.0), ("length", 1.0))
    return RepairAttempt(n, how, fixed, correct, "6", score, None, 9, components, reason)


def repair_rows() -> list[dict]:
    """Accepted repairs as the repair stage writes them: the AC-LQ one by the first pass (its
    hedging cut), the AW one by the repairer model."""
    return [
        Repair(
            "q1/s1",
            "q1",
            "AC-LQ",
            0.70,
            attempt(0, "first_pass", product_traj("q1/s1/r", "q1", "6", parent="q1/s1"), 0.97),
        ).to_dict(),
        Repair(
            "q2/s0",
            "q2",
            "AW",
            0.90,
            attempt(1, "model", product_traj("q2/s0/r", "q2", "20", parent="q2/s0"), 0.93),
        ).to_dict(),
    ]


def hard_case_rows() -> list[dict]:
    """The one hard case: the first model attempt hit an infrastructure failure, the second
    answered wrong."""
    crashed = product_traj("q2/s1/r1", "q2", "18", parent="q2/s1")
    wrong = product_traj("q2/s1/r", "q2", "18", parent="q2/s1")
    return [
        Repair(
            "q2/s1",
            "q2",
            "AW",
            0.85,
            attempt(2, "model", wrong, 0.9, "wrong answer"),
            (attempt(1, "model", crashed, None, "infra error: sandbox crashed"),),
        ).to_dict()
    ]


def write_run(root: Path, repairs: list[dict] | None = None) -> Path:
    """A run dir with the four stage files (and hard cases) as the earlier stages write them."""
    write_jsonl(root / "synthesize/queries.jsonl", [q.to_dict() for q in QUERIES])
    write_jsonl(
        root / "synthesize/trajectories.jsonl", [t.to_dict() for t, _, _ in CANDIDATES.values()]
    )
    write_jsonl(root / "score/scores.jsonl", [score_row(*v) for v in CANDIDATES.values()])
    write_jsonl(root / "repair/repairs.jsonl", repair_rows() if repairs is None else repairs)
    write_jsonl(root / "repair/hard_cases.jsonl", hard_case_rows())
    return root


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return write_run(tmp_path / "run")


def test_counts_per_partition_and_source(run_dir):
    counts = run_build(BuildConfig(run_dir=str(run_dir)))
    assert counts == {
        "queries": 3,
        "trajectories": 5,
        "unscored": 0,
        "HQ": 2,
        "AC-LQ": 1,
        "AW": 2,
        "repairs_accepted": {"AC-LQ": 1, "AW": 1, "total": 2},
        "repairs_by_how": {"first_pass": 1, "model": 1},
        "hard_cases": {"AW": 1, "total": 1},
        "sft": {"HQ": 2, "repair:AC-LQ": 1, "repair:AW": 1, "total": 4},
        "preference_pairs": 2,
        "dropped_flawed": {"sft": 0, "preference_pairs": 0},
    }
    manifest = json.loads((run_dir / "build/manifest.json").read_text())
    assert manifest["counts"] == counts and manifest["stage"] == "build"
    assert set(manifest["inputs"]) == {"queries", "trajectories", "scores", "repairs", "hard_cases"}


def test_sft_holds_hq_and_accepted_repairs_only(run_dir):
    run_build(BuildConfig(run_dir=str(run_dir)))
    records = load_sft_records(run_dir / "build/sft.jsonl")
    assert [(r.id, r.source) for r in records] == [
        ("q1/s0", "HQ"),
        ("q3/s0", "HQ"),
        ("q1/s1/r", "repair:AC-LQ"),
        ("q2/s0/r", "repair:AW"),
    ]
    for record in records:
        question = QUERIES[int(record.query_id[1]) - 1].question
        system, user, assistant = (m.to_dict() for m in record.messages)
        assert [system, user] == chat_messages(question)
        assert assistant == {"role": "assistant", "content": record.trajectory.text}
        assert "<result>\n" in assistant["content"]  # tool results stay in the text
    by_id = {r.id: r for r in records}
    assert by_id["q1/s0"].trajectory == CANDIDATES["q1/s0"][0]  # segments survive exactly
    assert [s.trainable for s in by_id["q2/s0/r"].trajectory.segments] == [True, False, True]


def test_preference_pairs_chosen_repair_rejected_original(run_dir):
    run_build(BuildConfig(run_dir=str(run_dir)))
    pairs = load_preference_pairs(run_dir / "build/preferences.jsonl")
    assert [(p.chosen_trajectory.id, p.rejected_trajectory.id, p.label) for p in pairs] == [
        ("q1/s1/r", "q1/s1", "AC-LQ"),
        ("q2/s0/r", "q2/s0", "AW"),
    ]
    row = json.loads((run_dir / "build/preferences.jsonl").read_text().splitlines()[1])
    assert row["chosen"] == product_traj("q2/s0/r", "q2", "20").text
    assert row["rejected"] == CANDIDATES["q2/s0"][0].text
    assert row["prompt"] == chat_messages("What is 4*5?")
    assert (row["chosen_score"], row["rejected_score"]) == (0.93, 0.90)
    assert all(p.chosen_trajectory.query_id == p.rejected_trajectory.query_id for p in pairs)


def test_hf_datasets_are_saved_and_loadable(run_dir):
    from datasets import load_from_disk

    run_build(BuildConfig(run_dir=str(run_dir)))
    sft = load_from_disk(str(run_dir / "build/sft_hf"))
    prefs = load_from_disk(str(run_dir / "build/preferences_hf"))
    assert len(sft) == 4 and len(prefs) == 2
    assert sft[0]["messages"][2]["role"] == "assistant"
    assert Trajectory.from_dict(json.loads(sft[0]["trajectory"])) == CANDIDATES["q1/s0"][0]
    assert json.loads(prefs[0]["rejected_trajectory"])["id"] == "q1/s1"
    assert prefs[1]["chosen_score"] == pytest.approx(0.93)


def test_empty_sets_still_build(tmp_path):
    run_dir = write_run(tmp_path / "run", repairs=[])
    counts = run_build(BuildConfig(run_dir=str(run_dir)))
    assert counts["preference_pairs"] == 0 and counts["sft"]["total"] == 2
    assert (run_dir / "build/preferences.jsonl").read_text() == ""


def test_rerun_is_a_no_op_changed_inputs_and_config_are_refused(run_dir, monkeypatch):
    cfg = BuildConfig(run_dir=str(run_dir))
    first = run_build(cfg)
    calls = []
    monkeypatch.setattr(build, "sft_records", lambda *a: calls.append(a) or [])
    assert run_build(cfg) == first and calls == []
    with pytest.raises(ConfigError, match="different config"):
        run_build(BuildConfig(run_dir=str(run_dir), save_hf=False))
    monkeypatch.undo()
    write_jsonl(run_dir / "repair/repairs.jsonl", repair_rows()[:1])
    with pytest.raises(ConfigError, match=r"different input files \(repairs changed\)"):
        run_build(cfg)


def test_push_to_hub_pushes_both_sets(run_dir, monkeypatch):
    import datasets

    pushed = []

    def fake_push(self, repo_id, config_name="default", **kwargs):
        pushed.append((repo_id, config_name, len(self["train"])))

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_push)
    run_build(BuildConfig(run_dir=str(run_dir)))
    assert pushed == []  # only when asked
    run_build(BuildConfig(run_dir=str(run_dir), push_to_hub="me/autotraj-data"))
    assert pushed == [("me/autotraj-data", "sft", 4), ("me/autotraj-data", "preferences", 2)]


def test_cli_round_trip(run_dir, capsys):
    assert main(["build", f"run_dir={run_dir}", "save_hf=false"]) == 0
    assert json.loads(capsys.readouterr().out)["sft"]["total"] == 4
    assert not (run_dir / "build/sft_hf").exists()


# --- errors name the file, the line and the field ------------------------------------------


def build_error(run_dir: Path) -> str:
    with pytest.raises(DataError) as info:
        run_build(BuildConfig(run_dir=str(run_dir), save_hf=False))
    return str(info.value)


def test_missing_field_names_file_line_and_field(tmp_path):
    rows = repair_rows()
    del rows[1]["how"]
    message = build_error(write_run(tmp_path / "run", repairs=rows))
    assert "repairs.jsonl:2:" in message and "'how'" in message


def test_malformed_score_line_names_file_and_line(run_dir):
    path = run_dir / "score/scores.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    assert "scores.jsonl:3: malformed JSON" in build_error(run_dir)


def test_bad_score_label_and_missing_file(run_dir):
    path = run_dir / "score/scores.jsonl"
    path.write_text(path.read_text().replace('"label": "HQ"', '"label": "good"', 1))
    assert "scores.jsonl:1:" in (message := build_error(run_dir)) and "'label'" in message
    path.unlink()
    assert "scores.jsonl: no such file" in build_error(run_dir)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"original_id": "nope"}, "not in synthesize/trajectories.jsonl"),
        ({"label": "AW"}, "labelled AW but the original is AC-LQ"),
        ({"trajectory": product_traj("q1/s1/r", "q1", "6", parent="q1/s0").to_dict()}, "parent_id"),
        (
            {"trajectory": product_traj("q1/s1/r", "q2", "6", parent="q1/s1").to_dict()},
            "answers query",
        ),
        (
            {"trajectory": product_traj("q1/s0", "q1", "6", parent="q1/s1").to_dict()},
            "already used",
        ),
    ],
)
def test_repair_invariants(tmp_path, change, expected):
    rows = repair_rows()
    rows[0].update(change)
    assert expected in build_error(write_run(tmp_path / "run", repairs=rows))


def test_duplicates_are_refused(tmp_path):
    rows = repair_rows()
    message = build_error(write_run(tmp_path / "a", repairs=[rows[0], rows[0]]))
    assert "repairs.jsonl:2: duplicate original_id 'q1/s1' (first on line 1)" in message
    run_dir = write_run(tmp_path / "b")
    path = run_dir / "synthesize/trajectories.jsonl"
    path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")
    assert "trajectories.jsonl:6: duplicate trajectory id 'q1/s0'" in build_error(run_dir)


def test_different_prompt_ids_are_refused(tmp_path):
    rows = repair_rows()
    original = CANDIDATES["q1/s1"][0].to_dict()
    rows[0]["trajectory"]["prompt_ids"] = [1, 2, 3]
    run_dir = write_run(tmp_path / "run", repairs=rows)
    path = run_dir / "synthesize/trajectories.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[1] = {**original, "prompt_ids": [1, 2, 4]}
    write_jsonl(path, lines)
    assert "prompt_ids differ" in build_error(run_dir)


def test_loaders_check_records(run_dir, tmp_path):
    run_build(BuildConfig(run_dir=str(run_dir), save_hf=False))
    rows = [json.loads(x) for x in (run_dir / "build/sft.jsonl").read_text().splitlines()]
    rows[1]["messages"][2]["content"] = "something else"
    write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*not the trajectory's text"):
        load_sft_records(tmp_path / "bad.jsonl")
    write_jsonl(
        tmp_path / "dup.jsonl",
        [
            json.loads(x)
            for x in 2 * [(run_dir / "build/preferences.jsonl").read_text().splitlines()[0]]
        ],
    )
    with pytest.raises(DataError, match="duplicate id"):
        load_preference_pairs(tmp_path / "dup.jsonl")


def test_reads_rows_written_by_the_repair_stage(tmp_path):
    """Rows as repair.py writes them (records.Repair) carry every field build needs."""
    from autotraj.records import Repair, RepairAttempt

    def repair(original: str, fixed: Trajectory, label: str, reason: str) -> dict:
        score = None if reason.startswith("infra") else 0.95
        attempt = RepairAttempt(1, "model", fixed, not reason, "6", score, 0.7, 9, (), reason)
        return Repair(original, fixed.query_id, label, 0.7, attempt).to_dict()

    run_dir = write_run(
        tmp_path / "run",
        repairs=[repair("q1/s1", product_traj("q1/s1/r1", "q1", "6", parent="q1/s1"), "AC-LQ", "")],
    )
    hard = repair(
        "q2/s1", product_traj("q2/s1/r1", "q2", "18", parent="q2/s1"), "AW", "answer wrong"
    )
    write_jsonl(run_dir / "repair/hard_cases.jsonl", [hard])
    counts = run_build(BuildConfig(run_dir=str(run_dir), save_hf=False))
    assert counts["sft"]["repair:AC-LQ"] == 1 and counts["hard_cases"] == {"AW": 1, "total": 1}
    (pair,) = load_preference_pairs(run_dir / "build/preferences.jsonl")
    assert (pair.chosen_score, pair.rejected_score) == (0.95, 0.7)


def test_system_prompt_follows_the_synthesize_stage(run_dir):
    (run_dir / "synthesize/config.resolved.yaml").write_text(
        "rollout:\n  system_prompt: Be brief.\n"
    )
    run_build(BuildConfig(run_dir=str(run_dir), save_hf=False))
    records = load_sft_records(run_dir / "build/sft.jsonl")
    pairs = load_preference_pairs(run_dir / "build/preferences.jsonl")
    assert {r.messages[0].content for r in records} == {"Be brief."}
    assert {p.prompt[0].content for p in pairs} == {"Be brief."}


def test_ablation_sets_hold_what_their_names_say(run_dir):
    counts = run_build(BuildConfig(run_dir=str(run_dir), extra_sets=("hq", "correct", "all")))
    assert counts["extra_sets"] == {"hq": 2, "correct": 3, "all": 5}
    sets = {
        name: load_sft_records(run_dir / "build" / build.SFT_FILES[name])
        for name in ("hq", "correct", "all")
    }
    assert [r.id for r in sets["hq"]] == ["q1/s0", "q3/s0"]
    assert [(r.id, r.source) for r in sets["correct"]] == [
        ("q1/s0", "HQ"),
        ("q1/s1", "AC-LQ"),  # as sampled: hedging and all
        ("q3/s0", "HQ"),
    ]
    assert {r.source for r in sets["all"]} == {"HQ", "AC-LQ", "AW"}
    assert not any(r.trajectory.parent_id for s in sets.values() for r in s)  # no repairs


def test_a_flawed_repair_never_enters_the_training_sets(tmp_path):
    rows = repair_rows()
    rows[0]["trajectory"] = product_traj(
        "q1/s1/r", "q1", "6", "I think I multiply", "q1/s1"
    ).to_dict()
    run = write_run(tmp_path / "run", repairs=rows)
    counts = run_build(BuildConfig(run_dir=str(run)))
    assert counts["dropped_flawed"] == {"sft": 1, "preference_pairs": 1}
    sft_ids = [r.id for r in load_sft_records(run / "build/sft.jsonl")]
    pair_ids = [p.id for p in load_preference_pairs(run / "build/preferences.jsonl")]
    assert "q1/s1/r" not in sft_ids and pair_ids == ["q2/s0/r"]


def test_text_only_sets_train_a_model_with_another_tokenizer(tmp_path, tiny_model_dir):
    """Records generated by one model family (their ids from its tokenizer) and built with
    `keep_token_ids: false` carry text only, the same text, so a student with another tokenizer
    renders them with its own encoding; with the ids kept, that student refuses them."""
    from transformers import AutoTokenizer

    from autotraj.records import Segment
    from autotraj.render import TokenizerMismatch, render_trajectory

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # 104 ids, char-level

    def with_foreign_ids(t: Trajectory) -> Trajectory:  # ids of a 150k-token vocabulary
        segments = tuple(
            Segment(s.text, s.trainable, tuple(range(150_000, 150_000 + len(s.text.split()))))
            for s in t.segments
        )
        return Trajectory.from_dict(
            {**t.to_dict(), "segments": [s.to_dict() for s in segments], "prompt_ids": [151_644]}
        )

    root = write_run(tmp_path / "run")
    foreign = [with_foreign_ids(t) for t, _, _ in CANDIDATES.values()]
    write_jsonl(root / "synthesize/trajectories.jsonl", [t.to_dict() for t in foreign])
    kept = tmp_path / "kept"
    write_run(kept)
    write_jsonl(kept / "synthesize/trajectories.jsonl", [t.to_dict() for t in foreign])
    run_build(BuildConfig(run_dir=str(kept), extra_sets=("all",)))
    run_build(BuildConfig(run_dir=str(root), extra_sets=("all",), keep_token_ids=False))

    everything = load_sft_records(root / "build" / build.SFT_FILES["all"])
    assert [r.trajectory.text for r in everything] == [t.text for t in foreign]
    for record in everything + load_sft_records(root / "build/sft.jsonl"):
        t = record.trajectory
        assert t.prompt_ids == () and all(s.token_ids == () for s in t.segments), record.id
        rendered = render_trajectory(tokenizer, "What is 2*3?", t)
        assert max(rendered.input_ids) < len(tokenizer)
        trained = [i for i, m in zip(rendered.input_ids, rendered.trainable, strict=True) if m]
        assert tokenizer.decode(trained) == t.model_text + tokenizer.eos_token  # + end of turn
    for pair in load_preference_pairs(root / "build/preferences.jsonl"):
        for t in (pair.chosen_trajectory, pair.rejected_trajectory):
            assert t.prompt_ids == () and all(s.token_ids == () for s in t.segments)
    with pytest.raises(TokenizerMismatch):
        record = load_sft_records(kept / "build" / build.SFT_FILES["all"])[0]
        render_trajectory(tokenizer, "What is 2*3?", record.trajectory)
