"""The batched multi-turn loop, driven by a scripted generator and stub tools."""

from __future__ import annotations

import pytest

from autotraj.models.generator import GenerationRequest
from autotraj.models.scripted import ScriptedGenerator
from autotraj.records import Query, ToolCall
from autotraj.render import render_trajectory
from autotraj.rollout import RolloutConfig, rollout
from autotraj.tags import check_format, extract_answer
from autotraj.tools.tool import ToolInfraError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


class StubTool:
    """Evaluates arithmetic; records each batch so tests can check batching."""

    def __init__(self, name="python", fail=False):
        self.name = name
        self.batches: list[list[str]] = []
        self.fail = fail

    def run_batch(self, inputs):
        self.batches.append(list(inputs))
        if self.fail:
            raise ToolInfraError("backend down")
        out = []
        for text in inputs:
            expr = text.removeprefix("print(").removesuffix(")")
            out.append(ToolCall(tool=self.name, input=text, output=str(eval(expr)), status="ok"))
        return out

    def close(self):
        pass


def two_turn(request: GenerationRequest) -> str:
    """Call the tool once, then answer with what the result said."""
    if "<result>" not in request.prompt_text.split("<|im_start|>assistant")[-1]:
        return "<think>multiply</think>\n<code>\nprint(6*7)\n</code>trailing text never kept"
    value = request.prompt_text.rsplit("<result>\n", 1)[1].split("\n", 1)[0]
    return f"<think>done</think>\n<answer>\\boxed{{{value}}}</answer>"


QUERIES = [
    Query(id=f"q{i}", question=f"What is 6*7? ({i})", answers=("42",), kind="math")
    for i in range(16)
]


def items(queries, n=1):
    return [(f"{q.id}/s{k}", q) for q in queries for k in range(n)]


def test_tool_call_runs_and_result_is_masked(tokenizer):
    gen, tool = ScriptedGenerator(two_turn, tokenizer), StubTool()
    [traj] = rollout(gen, {"python": tool}, tokenizer, items(QUERIES[:1]), RolloutConfig())
    assert traj.finish_reason == "answer"
    assert [c.output for c in traj.tool_calls] == ["42"]
    assert [s.trainable for s in traj.segments] == [True, False, True]
    assert traj.segments[1].text == "\n<result>\n42\n</result>\n"
    assert extract_answer(traj.text) == "42"
    assert not check_format(traj.text).reasons
    assert "trailing text" not in traj.text


def test_render_equals_generated_ids_and_masks_results(tokenizer):
    gen = ScriptedGenerator(two_turn, tokenizer)
    [traj] = rollout(gen, {"python": StubTool()}, tokenizer, items(QUERIES[:1]), RolloutConfig())
    rendered = render_trajectory(tokenizer, QUERIES[0].question, traj)
    generated = list(traj.prompt_ids) + [i for s in traj.segments for i in s.token_ids]
    assert list(rendered.input_ids[:-1]) == generated
    assert rendered.input_ids[-1] == tokenizer.eos_token_id and rendered.trainable[-1]
    assert not any(rendered.trainable[: rendered.prompt_length])
    start = rendered.prompt_length + len(traj.segments[0].token_ids)
    result_span = slice(start, start + len(traj.segments[1].token_ids))
    assert not any(rendered.trainable[result_span])
    assert tokenizer.decode(list(rendered.input_ids[result_span])) == traj.segments[1].text


def test_all_trajectories_advance_together(tokenizer):
    gen, tool = ScriptedGenerator(two_turn, tokenizer), StubTool()
    trajs = rollout(gen, {"python": tool}, tokenizer, items(QUERIES, n=2), RolloutConfig())
    assert gen.calls == [32, 32]  # one batched generation call per round
    assert [len(b) for b in tool.batches] == [32]  # one tool batch for all pending calls
    assert [t.id for t in trajs] == [f"{q.id}/s{k}" for q in QUERIES for k in range(2)]


def test_fourth_tool_call_is_rejected(tokenizer):
    gen, tool = ScriptedGenerator(lambda r: "<code>print(1)</code>", tokenizer), StubTool()
    [traj] = rollout(gen, {"python": tool}, tokenizer, items(QUERIES[:1]), RolloutConfig())
    assert traj.finish_reason == "tool_limit"
    assert [c.status for c in traj.tool_calls] == ["ok", "ok", "ok", "rejected"]
    assert sum(not s.trainable for s in traj.segments) == 3


def test_infrastructure_failure_marks_trajectory(tokenizer):
    gen = ScriptedGenerator(two_turn, tokenizer)
    [traj] = rollout(
        gen, {"python": StubTool(fail=True)}, tokenizer, items(QUERIES[:1]), RolloutConfig()
    )
    assert traj.finish_reason == "infra_error" and "backend down" in traj.error


def test_missing_tool_and_malformed_call_are_tool_errors(tokenizer):
    replies = iter(["<search>who</search>", "oops </code>", "<answer>\\boxed{1}</answer>"])
    gen = ScriptedGenerator(lambda r: next(replies), tokenizer)
    [traj] = rollout(gen, {"python": StubTool()}, tokenizer, items(QUERIES[:1]), RolloutConfig())
    assert [c.status for c in traj.tool_calls] == ["error", "error"]
    assert "not available" in traj.tool_calls[0].output
    assert "opening tag" in traj.tool_calls[1].output
    assert traj.finish_reason == "answer"


def test_token_budget_ends_with_length(tokenizer):
    gen = ScriptedGenerator(lambda r: "<think>" + "x" * 500, tokenizer)
    cfg = RolloutConfig(max_new_tokens=64, max_response_tokens=64)
    [traj] = rollout(gen, {}, tokenizer, items(QUERIES[:1]), cfg)
    assert traj.finish_reason == "length"
    assert len(traj.segments[0].token_ids) == 64


def test_eos_without_answer(tokenizer):
    gen = ScriptedGenerator(lambda r: "I am not sure.", tokenizer)
    [traj] = rollout(gen, {}, tokenizer, items(QUERIES[:1]), RolloutConfig())
    assert traj.finish_reason == "eos" and not traj.tool_calls


def test_text_only_backend_renders_by_segment(tokenizer):
    gen, tool = (
        ScriptedGenerator(two_turn),
        StubTool(),
    )  # no tokenizer: behaves like an HTTP endpoint
    [traj] = rollout(gen, {"python": tool}, tokenizer, items(QUERIES[:1]), RolloutConfig())
    assert all(not s.token_ids for s in traj.segments) and not traj.prompt_ids
    rendered = render_trajectory(tokenizer, QUERIES[0].question, traj)
    trained = "".join(
        tokenizer.decode([i])
        for i, m in zip(rendered.input_ids, rendered.trainable, strict=True)
        if m
    )
    assert "<result>" not in trained and "\\boxed{42}" in trained


def test_requests_carry_sampling_and_distinct_seeds(tokenizer):
    seen: list[GenerationRequest] = []

    def reply(r):
        seen.append(r)
        return "<answer>\\boxed{1}</answer>"

    cfg = RolloutConfig(temperature=0.7, top_p=0.8, seed=3)
    rollout(ScriptedGenerator(reply, tokenizer), {}, tokenizer, items(QUERIES[:2], n=2), cfg)
    assert {(r.temperature, r.top_p) for r in seen} == {(0.7, 0.8)}
    assert len({r.seed for r in seen}) == 4
    assert all("</code>" in r.stop and "</answer>" in r.stop for r in seen)


def test_demonstrations_prompt_the_teacher_but_not_the_record(tokenizer):
    seen: list[str] = []

    def reply(r):
        seen.append(r.prompt_text)
        return "<answer>\\boxed{1}</answer>"

    cfg = RolloutConfig(demonstrations=2)
    [traj] = rollout(ScriptedGenerator(reply, tokenizer), {}, tokenizer, items(QUERIES[:1]), cfg)
    assert seen[0].count("<|im_start|>assistant") == 3  # two worked examples, then the reply
    assert "print(37 * 12)" in seen[0]
    assert traj.prompt_ids == ()  # training renders the standard prompt
    rendered = render_trajectory(tokenizer, QUERIES[0].question, traj)
    assert "print(37 * 12)" not in tokenizer.decode(list(rendered.input_ids))


@pytest.mark.parametrize("cap", [0, 2])
def test_consecutive_invalid_calls_end_the_trajectory_when_capped(tokenizer, cap):
    """A model that keeps writing malformed calls: without a cap it runs into the 3-call limit
    (release behaviour); with a cap of 2 it ends after the second failed call, as data."""
    replies = iter(["<code>print(1)</code>"] + ["oops </code>"] * 5)
    gen = ScriptedGenerator(lambda r: next(replies), tokenizer)
    cfg = RolloutConfig(max_tool_calls=5, max_consecutive_invalid_calls=cap)
    [traj] = rollout(gen, {"python": StubTool()}, tokenizer, items(QUERIES[:1]), cfg)
    statuses = [c.status for c in traj.tool_calls]
    if cap:
        assert traj.finish_reason == "tool_errors" and statuses == ["ok", "error", "error"]
        assert not traj.segments[-1].trainable  # the last result is shown, then it ends
    else:
        assert traj.finish_reason == "tool_limit"
        assert statuses == ["ok"] + ["error"] * 4 + ["rejected"]


def test_an_ok_call_resets_the_invalid_run(tokenizer):
    replies = iter(["oops </code>", "<code>print(2)</code>", "oops </code>", "<answer>x</answer>"])
    gen = ScriptedGenerator(lambda r: next(replies), tokenizer)
    cfg = RolloutConfig(max_tool_calls=5, max_consecutive_invalid_calls=2)
    [traj] = rollout(gen, {"python": StubTool()}, tokenizer, items(QUERIES[:1]), cfg)
    assert traj.finish_reason == "answer"
    assert [c.status for c in traj.tool_calls] == ["error", "ok", "error"]
