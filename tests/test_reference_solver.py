"""The reference solver through the real rollout, sandbox, BM25 index, scorer and repair stage."""

from __future__ import annotations

from collections import Counter

import pytest

from autotraj.models import reference
from autotraj.models.generator import GenerationRequest, GeneratorError
from autotraj.models.loading import GeneratorConfig, load_generator
from autotraj.quality import QualityConfig, QualityScore, confidence
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
        assert traj.finish_reason == "answer" and row["label"] == "HQ", traj.text
        assert row["extracted"] == query.answers[0]
        assert all(c.status == "ok" for c in traj.tool_calls)
        parsed = multihop.parse_question(query.question)
        hops = len(multihop.CHAINS[parsed[0]]) if parsed else 1
        assert len(traj.tool_calls) == hops  # no redundant call
    assert {c.tool for t in trajectories for c in t.tool_calls} == {"python", "search"}


def test_teacher_label_mix(synthesized):
    _, trajectories, rows = synthesized
    shares = Counter(row["label"] for row in rows)
    assert all(t.finish_reason == "answer" for t in trajectories)
    assert 0.25 <= shares["HQ"] / len(rows) <= 0.45, shares
    assert 0.2 <= shares["AC-LQ"] / len(rows) <= 0.4, shares
    assert 0.25 <= shares["AW"] / len(rows) <= 0.45, shares
    assert any(len(t.tool_calls) == 0 for t in trajectories)  # arithmetic "in the head"


def test_repairs_are_verified_and_some_rejected(generator, tools, synthesized):
    queries, trajectories, rows = synthesized
    by_id = {q.id: q for q in queries}
    targets = [
        Target(t, by_id[t.query_id], row["label"], QualityScore.from_dict(row))
        for t, row in zip(trajectories, rows, strict=True)
        if row["label"] != "HQ"
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
