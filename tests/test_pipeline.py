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

    monkeypatch.setattr(pipeline, "RUNNERS", {name: runner(name) for name in ORDER})
    return calls


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
    assert fake_runners == list(ORDER)
    assert all(r == {"runs": 1} for r in first.values())
    second = run_pipeline(cfg)
    assert all(r == {"runs": 2} for r in second.values())  # same folders, nothing moved
    assert stale_names(tmp_path) == []


def test_config_change_invalidates_the_stage_and_everything_downstream(tmp_path, fake_runners):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    run_pipeline(make_config(tmp_path, queries))
    changed = make_config(tmp_path, queries, score=ScoreConfig(quality=QualityConfig(hq_best=0.8)))
    result = run_pipeline(changed)
    assert result["synthesize"] == {"runs": 2}
    moved = ["build", "repair", "rl", "rm", "score", "sft"]
    assert stale_names(tmp_path) == moved
    assert all(result[name] == {"runs": 1} for name in moved)  # fresh folders
    # the stale outputs are kept, not deleted
    assert all((p / "output.txt").read_text() == "x" for p in (tmp_path / "run/stale").iterdir())


def test_input_file_content_is_part_of_the_key(tmp_path, fake_runners):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    cfg = make_config(tmp_path, queries)
    before = stage_keys(cfg)
    queries.write_text('{"id": "a", "question": "1+2?", "answer": "3"}\n')
    after = stage_keys(cfg)
    assert all(before[name] != after[name] for name in ORDER)


def test_a_late_stage_change_leaves_the_upstream_keys(tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text("{}\n")
    base = make_config(tmp_path, queries)
    changed = dataclasses.replace(base, rl=dataclasses.replace(base.rl, clip=0.3))
    a, b = stage_keys(base), stage_keys(changed)
    assert [n for n in ORDER if a[n] != b[n]] == ["rl"]


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
