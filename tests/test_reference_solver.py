"""The reference solver through the real rollout, sandbox, BM25 index, scorer and repair stage."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from autotraj.edits import calls_kept, similarity
from autotraj.flaws import flaws
from autotraj.models import reference
from autotraj.models.generator import GenerationRequest, GeneratorError
from autotraj.models.loading import GeneratorConfig, load_generator
from autotraj.quality import QualityConfig, confidence
from autotraj.querysets import load_queries
from autotraj.render import render_messages, render_prompt, render_trajectory
from autotraj.repair import RepairConfig, Target, repair_chunk, repair_messages
from autotraj.rollout import RolloutConfig, rollout
from autotraj.score import ScoreConfig, score_rows
from autotraj.tags import extract_answer
from autotraj.tasks import multihop
from autotraj.tasks.builtin import multihop_world
from autotraj.tools.toolbox import (
    PythonToolConfig,
    SearchToolConfig,
    ToolsConfig,
    close_tools,
    open_tools,
)

TOOLS = ToolsConfig(
    python=PythonToolConfig(workers=1),
    search=SearchToolConfig(backend="bm25", index_dir="builtin:multihop"),
)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return load_generator(GeneratorConfig(backend="reference", tokenizer=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    """The real sandbox and the BM25 index of the built-in corpus (built in a fresh home)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOTRAJ_HOME", str(tmp_path_factory.mktemp("autotraj-home")))
        opened = open_tools(TOOLS)
        yield opened
        close_tools(opened)


@pytest.fixture(scope="module")
def synthesized(generator, tools):
    """Two teacher candidates for each of 150 mixed queries, and their score rows."""
    queries = load_queries("builtin:mixed:train", limit=150)
    items = [(f"{q.id}/s{k}", q) for q in queries for k in range(2)]
    trajectories = rollout(generator, tools, generator.tokenizer, items, RolloutConfig())
    rows = score_rows({q.id: q for q in queries}, trajectories, ScoreConfig())
    return queries, trajectories, rows


def test_backend_is_registered_and_token_in_token_out(generator, tools):
    assert generator.name == "reference" and generator.tokenizer is not None
    query = load_queries("builtin:arithmetic:test", limit=1)[0]
    [traj] = rollout(generator, tools, generator.tokenizer, [(query.id, query)], RolloutConfig())
    rendered = render_trajectory(generator.tokenizer, query.question, traj)
    generated = list(traj.prompt_ids) + [i for s in traj.segments for i in s.token_ids]
    assert list(rendered.input_ids[:-1]) == generated


def test_reads_question_and_partial_reply(generator):
    tok = generator.tokenizer
    text, _ = render_prompt(tok, "In which country was Kora Vel born?")
    partial = text + "<think>x</think>\n<search>Kora Vel</search>\n<result>\nabc\n</result>\n"
    context = reference.read_context(partial)
    assert context.question == "In which country was Kora Vel born?" and not context.repair
    assert context.pieces == ("<think>x</think>\n<search>Kora Vel</search>",)
    assert context.results == ("abc",)
    messages = repair_messages("What is 2 + 2?", "<think>4</think>", "AW")
    context = reference.read_context(render_messages(tok, messages)[0])
    assert context.question == "What is 2 + 2?" and context.repair and context.pieces == ()


def test_refuses_questions_it_cannot_solve(generator):
    text, _ = render_prompt(generator.tokenizer, "Who wrote Hamlet?")
    with pytest.raises(GeneratorError, match="only solves the built-in tasks"):
        reference.reference_reply(GenerationRequest(prompt_text=text))


def test_style_shares():
    styles = Counter(reference.choose_style("q", seed, repair=False) for seed in range(4000))
    for style, share in reference.TEACHER_STYLES:
        assert abs(styles[style] / 4000 - share) < 0.03, styles
    repairs = Counter(reference.choose_style("q", seed, repair=True) for seed in range(4000))
    assert 0.05 < 1 - repairs["clean"] / 4000 < 0.15


def test_clean_style_solves_with_real_tools(generator, tools, monkeypatch):
    monkeypatch.setattr(reference, "TEACHER_STYLES", (("clean", 1.0),))
    queries = load_queries("builtin:arithmetic:test", limit=8)
    queries += load_queries("builtin:multihop:test", limit=12)
    items = [(q.id, q) for q in queries]
    trajectories = rollout(generator, tools, generator.tokenizer, items, RolloutConfig())
    rows = score_rows({q.id: q for q in queries}, trajectories, ScoreConfig())
    for query, traj, row in zip(queries, trajectories, rows, strict=True):
        assert traj.finish_reason == "answer" and row.quality.label == "HQ", traj.text
        assert flaws(traj) == () and row.quality.flaws == ()  # no false positive on clean text
        assert row.extracted == query.answers[0]
        assert all(c.status == "ok" for c in traj.tool_calls)
        parsed = multihop.parse_question(query.question)
        hops = len(multihop.CHAINS[parsed[0]]) if parsed else 1
        assert len(traj.tool_calls) == hops  # no redundant call
    assert {c.tool for t in trajectories for c in t.tool_calls} == {"python", "search"}


def test_teacher_label_mix(synthesized):
    _, trajectories, rows = synthesized
    shares = Counter(row.quality.label for row in rows)
    assert all(t.finish_reason == "answer" for t in trajectories)
    assert 0.25 <= shares["HQ"] / len(rows) <= 0.45, shares
    assert 0.2 <= shares["AC-LQ"] / len(rows) <= 0.4, shares
    assert 0.25 <= shares["AW"] / len(rows) <= 0.45, shares
    assert any(len(t.tool_calls) == 0 for t in trajectories)  # arithmetic "in the head"


def test_repairs_are_verified_and_some_rejected(generator, tools, synthesized):
    queries, trajectories, rows = synthesized
    by_id = {q.id: q for q in queries}
    targets = [
        Target(t, by_id[t.query_id], row.quality.label, row.quality)
        for t, row in zip(trajectories, rows, strict=True)
        if row.quality.label != "HQ"
    ]
    cfg = RepairConfig(tools=TOOLS, first_pass=False, quality=QualityConfig())
    repairs = repair_chunk(targets, lambda: generator, tools, cfg)
    accepted = [r for r in repairs if r.accepted]
    assert 0.8 <= len(accepted) / len(repairs) < 0.97, Counter(r.final.reason for r in repairs)
    for repair in accepted:
        assert repair.final.correct and repair.final.trajectory.parent_id == repair.original_id
        assert confidence(repair.final.trajectory.text) == 1.0  # no hedging left
    assert {r.label for r in accepted} == {"AC-LQ", "AW"}


def test_wrong_multihop_answers_the_city(generator, tools, monkeypatch):
    monkeypatch.setattr(reference, "TEACHER_STYLES", (("wrong", 1.0),))
    queries = load_queries("builtin:multihop:test", limit=6)
    cities = {p.title for p in multihop_world().passages if p.id.startswith("city-")}
    items = [(q.id, q) for q in queries]
    trajectories = rollout(generator, tools, generator.tokenizer, items, RolloutConfig())
    for query, traj in zip(queries, trajectories, strict=True):
        kind, _ = multihop.parse_question(query.question)
        assert len(traj.tool_calls) == len(multihop.CHAINS[kind]) - 1  # one hop short
        assert extract_answer(traj.text) in cities and query.answers[0] not in traj.model_text


def _repairs_of(style, n_arith, n_multihop, generator, tools, monkeypatch):
    """Teacher trajectories of one style and the stand-in repairer's verified repairs of them
    (no first pass: the repairer gets every one)."""
    monkeypatch.setattr(reference, "TEACHER_STYLES", ((style, 1.0),))
    monkeypatch.setattr(reference, "REPAIR_STYLES", (("clean", 1.0),))
    queries = load_queries("builtin:arithmetic:train", limit=n_arith)
    queries += load_queries("builtin:multihop:train", limit=n_multihop)
    items = [(f"{q.id}/s0", q) for q in queries]
    trajectories = rollout(generator, tools, generator.tokenizer, items, RolloutConfig())
    rows = score_rows({q.id: q for q in queries}, trajectories, ScoreConfig())
    targets = [
        Target(t, q, row.quality.label, row.quality)
        for t, q, row in zip(trajectories, queries, rows, strict=True)
    ]
    cfg = RepairConfig(tools=TOOLS, first_pass=False)
    repairs = repair_chunk(targets, lambda: generator, tools, cfg)
    # what a repairer that ignores the trajectory would write: the clean solver's own solution
    monkeypatch.setattr(reference, "TEACHER_STYLES", (("clean", 1.0),))
    resolved = rollout(generator, tools, generator.tokenizer, items, RolloutConfig())
    return targets, repairs, resolved


@pytest.mark.parametrize("style", ["hedge", "recheck"])
def test_repairs_of_correct_trajectories_are_edits(style, generator, tools, monkeypatch):
    targets, repairs, resolved = _repairs_of(style, 6, 6, generator, tools, monkeypatch)
    for target, repair, solution in zip(targets, repairs, resolved, strict=True):
        assert target.label == "AC-LQ" and repair.accepted, repair.final.reason
        original, fixed = target.original, repair.final.trajectory
        assert flaws(fixed) == ()
        # every distinct call of the original is kept, in order; only repeats go
        assert [c.input for c in fixed.tool_calls] == list(
            dict.fromkeys(c.input for c in original.tool_calls)
        )
        assert calls_kept(original.tool_calls, fixed.tool_calls) == 1.0
        # the original's own wording survives where it did not hedge: the repair is closer to
        # the original than a fresh solution of the same question is
        assert any(s in original.model_text for s in _sentences(fixed.model_text))
        assert similarity(original.model_text, fixed.model_text) > similarity(
            original.model_text, solution.model_text
        )


def test_repairs_of_wrong_trajectories_keep_the_right_steps(generator, tools, monkeypatch):
    # The teacher's wrong trajectories are right up to the step that went wrong, so a fresh
    # solution makes the same calls; what tells an edit apart is tested on AC-LQ above.
    targets, repairs, _ = _repairs_of("wrong", 6, 8, generator, tools, monkeypatch)
    for target, repair in zip(targets, repairs, strict=True):
        assert target.label == "AW" and repair.accepted, repair.final.reason
        original, fixed = target.original, repair.final.trajectory
        assert flaws(fixed) == () and "by hand" not in fixed.model_text
        calls = [(c.tool, c.input) for c in fixed.tool_calls]
        if multihop.parse_question(target.query.question):
            # the searches it made are kept and the missing hop is added after them
            made = [(c.tool, c.input) for c in original.tool_calls]
            assert calls[: len(made)] == made and len(calls) == len(made) + 1
            # its wrong claim goes, its sound reasoning stays ("I search for X.")
            assert "the place the question asks for" not in fixed.model_text
            assert original.model_text.split("</think>")[0].split(". ")[-1] in fixed.model_text
        else:  # the hand computation is replaced by the tool call; the plan sentence is kept
            # (a one-step original: the repair can keep nothing else, so it reads like a fresh
            # solution here)
            assert original.tool_calls == () and [t for t, _ in calls] == ["python"]
            plan = original.model_text.split(". I can work")[0].removeprefix("<think>")
            assert plan in fixed.model_text


def _sentences(text):
    return [s.strip() for s in re.split(r"(?<=[.?!])\s+|</?think>", text) if s.strip()]
