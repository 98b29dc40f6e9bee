"""The pipeline's cache: same inputs resume, a change invalidates exactly the stages downstream."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from autotraj import pipeline
from autotraj.config import ConfigError
from autotraj.pipeline import ORDER, PipelineConfig, run_pipeline, stage_keys
from autotraj.quality import QualityConfig
from autotraj.score import ScoreConfig
from autotraj.synthesize import SynthesizeConfig


@pytest.fixture
def fake_runners(monkeypatch) -> list[str]:
    """Each stage appends its name to `calls` and leaves a marker file in its folder."""
    calls: list[str] = []

    def runner(name: str):
        def run(cfg: Any) -> dict[str, Any]:
            calls.append(name)
            out = Path(cfg.run_dir) / name
            marker = out / "output.txt"
            marker.write_text(marker.read_text() + "x" if marker.exists() else "x")
            return {"runs": len(marker.read_text())}

        return run

    def evaluate(cfg: Any) -> dict[str, Any]:
        """Like `run_eval`: a summary of the model it was given, in <run_dir>/eval/<name>."""
        calls.append(f"eval:{cfg.name}")
        (Path(cfg.run_dir) / "eval" / cfg.name / "model.txt").write_text(cfg.generator.model)
        accuracy = {"base": 0.1, "sft": 0.5, "rl": 0.6}[cfg.name]
        return {
            "name": cfg.name,
            "benchmarks": {"arith": {"accuracy": accuracy}},
            "average": {"accuracy": accuracy, "mean_tokens": 50.0, "tool_calls_per_trajectory": 1},
        }

    runners = {name: runner(name) for name in ORDER if name != "eval"}
    monkeypatch.setattr(pipeline, "RUNNERS", {**runners, "eval": evaluate})
    return calls


TRAINING = [name for name in ORDER if name != "eval"]
EVALS = ["eval:base", "eval:sft", "eval:rl"]


def make_config(tmp_path: Path, queries: Path, **sections: Any) -> PipelineConfig:
    return PipelineConfig(
        run_dir=str(tmp_path / "run"),
        synthesize=SynthesizeConfig(queries=str(queries)),
        **sections,
    )


def stale_names(tmp_path: Path) -> list[str]:
    stale = tmp_path / "run" / "stale"
    return sorted(p.name.rsplit("-", 3)[0] for p in stale.iterdir()) if stale.exists() else []


def test_rerun_resumes_every_stage_in_place(tmp_path, fake_runners):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    cfg = make_config(tmp_path, queries)
    first = run_pipeline(cfg)
    assert fake_runners == TRAINING + EVALS
    assert all(first[name] == {"runs": 1} for name in TRAINING)
    second = run_pipeline(cfg)
    assert all(second[name] == {"runs": 2} for name in TRAINING)  # same folders, nothing moved
    assert stale_names(tmp_path) == []


def test_eval_compares_the_base_sft_and_rl_models(tmp_path, fake_runners):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    cfg = dataclasses.replace(make_config(tmp_path, queries), stages=("eval",))
    result = run_pipeline(cfg)["eval"]
    run = tmp_path / "run"
    assert (run / "eval/base/model.txt").read_text() == cfg.eval.generator.model
    assert (run / "eval/sft/model.txt").read_text() == str(run / "sft/model")
    assert (run / "eval/rl/model.txt").read_text() == str(run / "rl/model")
    assert result["models"]["rl"] == {"accuracy": 0.6, "mean_tokens": 50.0}
    lines = result["table"].splitlines()
    assert lines[0].split() == ["model", "arith", "average", "tokens", "tool", "calls"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["base", "10.0"],
        ["sft", "50.0"],
        ["rl", "60.0"],
    ]
    assert (run / "eval/table.txt").read_text() == result["table"] + "\n"


def test_a_training_change_reevaluates_only_the_models_it_trained(tmp_path, fake_runners):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    base = make_config(tmp_path, queries)
    run_pipeline(base)
    fake_runners.clear()
    changed = dataclasses.replace(base, rl=dataclasses.replace(base.rl, clip=0.3))
    run_pipeline(changed)
    assert fake_runners == TRAINING + EVALS  # every stage resumes (a no-op in a real stage)
    assert stale_names(tmp_path) == ["eval-rl", "rl"]


def test_config_change_invalidates_the_stage_and_everything_downstream(tmp_path, fake_runners):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    run_pipeline(make_config(tmp_path, queries))
    changed = make_config(tmp_path, queries, score=ScoreConfig(quality=QualityConfig(hq_best=0.8)))
    result = run_pipeline(changed)
    assert result["synthesize"] == {"runs": 2}
    moved = ["build", "eval-rl", "eval-sft", "repair", "rl", "rm", "score", "sft"]
    assert stale_names(tmp_path) == moved
    assert all(result[name] == {"runs": 1} for name in moved if name in result)  # fresh folders
    # the stale outputs are kept, not deleted
    for p in (tmp_path / "run/stale").iterdir():
        marker = p / ("model.txt" if p.name.startswith("eval-") else "output.txt")
        assert marker.read_text() == (
            str(tmp_path / "run" / p.name[5:].split("-")[0] / "model")
            if p.name.startswith("eval-")
            else "x"
        )


def test_input_file_content_is_part_of_the_key(tmp_path, fake_runners):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    cfg = make_config(tmp_path, queries)
    before = stage_keys(cfg)
    queries.write_text('{"id": "a", "question": "1+2?", "answer": "3"}\n')
    after = stage_keys(cfg)
    assert all(before[name] != after[name] for name in TRAINING)


def test_a_late_stage_change_leaves_the_upstream_keys(tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text("{}\n")
    base = make_config(tmp_path, queries)
    changed = dataclasses.replace(base, rl=dataclasses.replace(base.rl, clip=0.3))
    a, b = stage_keys(base), stage_keys(changed)
    assert [n for n in TRAINING if a[n] != b[n]] == ["rl"]


def test_more_rl_steps_reevaluate_the_rl_model_only(tmp_path, fake_runners):
    queries = tmp_path / "q.jsonl"
    queries.write_text("{}\n")
    base = make_config(tmp_path, queries)
    run_pipeline(base)
    longer = dataclasses.replace(base, rl=dataclasses.replace(base.rl, steps=base.rl.steps * 2))
    result = run_pipeline(longer)
    assert result["rl"] == {"runs": 2}  # the rl folder is resumed, not replaced
    assert stale_names(tmp_path) == ["eval-rl"]  # its evaluation is of the old model


def test_more_rl_steps_resume_the_same_run(tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text("{}\n")
    base = make_config(tmp_path, queries)
    longer = dataclasses.replace(base, rl=dataclasses.replace(base.rl, steps=base.rl.steps * 2))
    assert stage_keys(base) == stage_keys(longer)


def test_only_selected_stages_run(tmp_path, fake_runners):
    queries = tmp_path / "q.jsonl"
    queries.write_text("{}\n")
    cfg = dataclasses.replace(make_config(tmp_path, queries), stages=("score", "synthesize"))
    assert list(run_pipeline(cfg)) == ["synthesize", "score"]
    assert fake_runners == ["synthesize", "score"]


def test_a_section_run_dir_other_than_the_pipelines_is_an_error(tmp_path, fake_runners):
    queries = tmp_path / "q.jsonl"
    queries.write_text("{}\n")
    cfg = make_config(tmp_path, queries, score=ScoreConfig(run_dir="elsewhere"))
    with pytest.raises(ConfigError, match="score.run_dir"):
        run_pipeline(cfg)


def test_a_moved_run_directory_keeps_its_keys(tmp_path, fake_runners):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    run_pipeline(make_config(tmp_path, queries))
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (tmp_path / "run").rename(moved / "run")
    again = run_pipeline(make_config(moved, queries))
    assert all(again[name] == {"runs": 2} for name in TRAINING)  # resumed in place
    assert not (moved / "run" / "stale").exists()
    # the eval of the trained models now reads them from the new place
    assert (moved / "run" / "eval" / "sft" / "model.txt").read_text() == str(
        moved / "run" / "sft" / "model"
    )
