"""The repair stage: acceptance rules, the repairer's prompt, the first pass and resume.

The repairer is a ScriptedGenerator whose reply depends on the case named in the question; the
Python tool is the real sandbox (one worker, shared by the module).
"""

from __future__ import annotations

import re

import pytest
from conftest import traj, write_jsonl

from autotraj.config import ConfigError
from autotraj.io import read_jsonl
from autotraj.models.scripted import ScriptedGenerator
from autotraj.records import Repair, ToolCall, Trajectory
from autotraj.repair import RepairConfig, run_repair
from autotraj.score import ScoreConfig, run_score
from autotraj.tools.tool import ToolInfraError
from autotraj.tools.toolbox import PythonToolConfig, ToolsConfig, open_tools

GOLD = "42.0000"  # equal to 42, but the string itself appears nowhere else
SHORT = "<think>Six times seven is 42.</think>\n<answer>\\boxed{42}</answer>"  # 6 words, S = 1
LONG = (
    "<think>Multiply the two factors given in this question: six times seven gives 42."
    "</think>\n<answer>\\boxed{42}</answer>"
)  # clean but long
LONGER = LONG.replace("42.</think>", "42. Indeed, the product equals forty two.</think>")
HEDGING = "<think>It seems six times seven is probably 42.</think>\n<answer>\\boxed{42}</answer>"
WRONG = "<think>Six times seven is 41.</think>\n<answer>\\boxed{41}</answer>"

# case -> (original trajectories of the query (the first is the one repaired), repair replies
# by temperature: greedy first attempt, then sampled retries)
CASES = {
    "acl_ok": ([HEDGING], SHORT, SHORT),
    "acl_not_better": ([SHORT, LONG], LONGER, SHORT),
    "acl_low": ([HEDGING], "<think>Probably 42.</think>\n<answer>\\boxed{42}</answer>", SHORT),
    "aw_ok": ([WRONG], SHORT, SHORT),
    "aw_wrong": ([WRONG], WRONG, WRONG),
    "aw_low": ([WRONG], HEDGING, HEDGING),
    "k2": ([WRONG], WRONG, SHORT),
    "infra": ([WRONG], "<think>Look it up.</think>\n<search>six times seven</search>", SHORT),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


class DownSearch:
    name = "search"

    def run_batch(self, inputs):
        raise ToolInfraError("retrieval server unreachable")

    def close(self):
        pass


class Recording:
    """Wraps a tool and records every batch of inputs it runs."""

    def __init__(self, inner):
        self.inner, self.name, self.batches = inner, inner.name, []

    def run_batch(self, inputs):
        self.batches.append(list(inputs))
        return self.inner.run_batch(inputs)

    def close(self):
        pass


@pytest.fixture(scope="module")
def sandbox():
    tools = open_tools(ToolsConfig(python=PythonToolConfig(workers=1)))
    yield tools["python"]
    tools["python"].close()


@pytest.fixture
def tools(sandbox):
    return {"python": Recording(sandbox), "search": DownSearch()}


def make_run(run_dir, originals):
    """Write synthesize outputs for {case: [texts or trajectories]} and run the score stage."""
    queries, trajectories = [], []
    for case, texts in originals.items():
        queries.append({"id": case, "question": f"What is 6*7? (case {case})", "answers": [GOLD]})
        for k, text in enumerate(texts):
            t = text if isinstance(text, Trajectory) else traj(text, tid=f"{case}/s{k}", qid=case)
            trajectories.append(t.to_dict())
    write_jsonl(run_dir / "synthesize/queries.jsonl", queries)
    write_jsonl(run_dir / "synthesize/trajectories.jsonl", trajectories)
    run_score(ScoreConfig(run_dir=str(run_dir)))
    return {row["trajectory_id"]: row for _, row in read_jsonl(run_dir / "score/scores.jsonl")}


def case_of(request):
    return re.search(r"\(case (\w+)\)", request.prompt_text).group(1)


class Repairer(ScriptedGenerator):
    """Replies from CASES by case and temperature; records every first-turn prompt."""

    def __init__(self, tokenizer, replies=None):
        self.prompts: dict[str, list[str]] = {}
        replies = replies or {c: (greedy, sampled) for c, (_, greedy, sampled) in CASES.items()}

        def reply(request):
            case = case_of(request)
            self.prompts.setdefault(case, []).append(request.prompt_text)
            greedy, sampled = replies[case]
            return greedy if request.temperature == 0.0 else sampled

        super().__init__(reply, tokenizer)


def outcomes(run_dir):
    rows = [
        *read_jsonl(run_dir / "repair/repairs.jsonl"),
        *read_jsonl(run_dir / "repair/hard_cases.jsonl"),
    ]
    return {row["original_id"].split("/")[0]: Repair.from_dict(row) for _, row in rows}


@pytest.fixture(scope="module")
def one_attempt(tmp_path_factory, tokenizer, sandbox):
    """Every case of CASES repaired with the release's single attempt, no first pass:
    (score rows, the stage's counts, the repairer, Repair records by case)."""
    run_dir = tmp_path_factory.mktemp("one-attempt")
    scores = make_run(run_dir, {case: originals for case, (originals, _, _) in CASES.items()})
    gen = Repairer(tokenizer)
    tools = {"python": Recording(sandbox), "search": DownSearch()}
    counts = run_repair(RepairConfig(run_dir=str(run_dir), first_pass=False), gen, tools)
    return scores, counts, gen, outcomes(run_dir)


# case -> (accepted, the reason on the attempt's verdict)
ONE_ATTEMPT = [
    ("acl_ok", True, ""),
    ("acl_not_better", False, "S 0.908 <= original 1.000"),
    ("acl_low", False, "flaw: hedging: 'probably'"),
    ("aw_ok", True, ""),
    ("aw_wrong", False, "wrong answer"),
    ("aw_low", False, "flaw: hedging: 'seems'; hedging: 'probably'"),
    ("k2", False, "wrong answer"),  # the sampled retry would be right: never asked
    ("infra", False, "infra error: search: retrieval server unreachable"),
]


@pytest.mark.parametrize(("case", "accepted", "reason"), ONE_ATTEMPT)
def test_release_acceptance_rule(one_attempt, case, accepted, reason):
    repair = one_attempt[3][case]
    assert (repair.accepted, repair.final.reason, repair.rejected) == (accepted, reason, ())


def test_every_case_is_decided_once():
    assert sorted(case for case, _, _ in ONE_ATTEMPT) == sorted(CASES)


def test_the_originals_are_labelled_as_the_cases_say(one_attempt):
    scores = one_attempt[0]
    assert scores["acl_not_better/s1"]["label"] == scores["acl_ok/s0"]["label"] == "AC-LQ"


def test_one_batched_call_repairs_the_whole_chunk(one_attempt):
    _, counts, gen, _ = one_attempt
    assert gen.calls == [8]  # all repairs of the chunk in one batched call, one turn each
    assert counts["accepted"] == {"AC-LQ": 1, "AW": 1} and counts["hard_cases"] == 6
    assert counts["to_repair"] == {"AC-LQ": 3, "AW": 5} and counts["infra_errors"] == 1


def test_an_accepted_repair_scores_above_its_reference(one_attempt):
    final = one_attempt[3]["acl_ok"].final
    assert final.score == pytest.approx(1.0) and final.reference_score < final.score


@pytest.mark.parametrize(
    ("case", "length_ref"),
    [("acl_not_better", 14), ("aw_ok", 6)],  # AC-LQ: L* = the shorter, the original; AW: itself
)
def test_the_length_reference(one_attempt, case, length_ref):
    assert one_attempt[3][case].final.length_ref == length_ref


def test_an_infrastructure_failure_gets_no_score(one_attempt):
    assert one_attempt[3]["infra"].final.score is None


def test_a_repair_is_a_text_trajectory_of_the_repairer_linked_to_its_original(one_attempt):
    repaired = one_attempt[3]["acl_ok"].final.trajectory
    assert repaired.id == "acl_ok/s0/r1" and repaired.parent_id == "acl_ok/s0"
    assert repaired.query_id == "acl_ok" and repaired.provenance.role == "repairer"
    assert repaired.prompt_ids == () and all(not s.token_ids for s in repaired.segments)


def test_second_attempt_runs_only_where_the_first_failed(tmp_path, tokenizer, tools):
    make_run(tmp_path, {case: originals for case, (originals, _, _) in CASES.items()})
    gen = Repairer(tokenizer)
    cfg = RepairConfig(run_dir=str(tmp_path), first_pass=False, attempts=2)
    counts = run_repair(cfg, gen, tools)
    assert gen.calls == [8, 6]  # the two accepted at attempt 1 are not tried again
    got = outcomes(tmp_path)
    k2 = got["k2"]
    assert k2.accepted and k2.final.attempt == 2 and k2.final.trajectory.id == "k2/s0/r2"
    assert [(a.attempt, a.reason) for a in k2.rejected] == [(1, "wrong answer")]
    assert got["acl_low"].accepted and got["acl_low"].final.attempt == 2
    assert got["acl_not_better"].accepted and got["acl_not_better"].final.attempt == 2
    assert not got["aw_wrong"].accepted and len(got["aw_wrong"].rejected) == 1
    assert counts["accepted"] == {"AC-LQ": 3, "AW": 3} and counts["hard_cases"] == 2


def test_prompt_shows_the_trajectory_and_never_the_gold_answer(tmp_path, tokenizer, tools):
    make_run(tmp_path, {"acl_ok": [HEDGING], "aw_ok": [WRONG]})
    gen = Repairer(tokenizer)
    run_repair(RepairConfig(run_dir=str(tmp_path), first_pass=False), gen, tools)
    for case, original in (("acl_ok", HEDGING), ("aw_ok", WRONG)):
        [prompt] = gen.prompts[case]
        assert original in prompt and "What is 6*7?" in prompt
        assert GOLD not in prompt
        assert "<code>" in prompt and "at most 3" in prompt  # the protocol is included
    assert "right final answer" in gen.prompts["acl_ok"][0]
    assert "wrong final answer" in gen.prompts["aw_ok"][0]


def hedged_tool_trajectory(case, output="42"):
    call = ToolCall(tool="python", input="print(6*7)", output=output, status="ok")
    return traj(
        "<think>Perhaps multiply six by seven.</think>\n<code>\nprint(6*7)\n</code>",
        f"\n<result>\n{output}\n</result>\n",
        "<think>The product is probably 42.</think>\n<answer>\\boxed{42}</answer>",
        tid=f"{case}/s0",
        qid=case,
        calls=[call],
    )


def test_first_pass_repairs_hedging_without_the_model(tmp_path, tokenizer, tools):
    scores = make_run(tmp_path, {"fp": [hedged_tool_trajectory("fp")]})
    assert scores["fp/s0"]["label"] == "AC-LQ"
    gen = ScriptedGenerator(lambda r: pytest.fail("the repairer must not be called"), tokenizer)
    counts = run_repair(RepairConfig(run_dir=str(tmp_path)), gen, tools)
    assert gen.calls == [] and counts["first_pass_accepted"] == 1
    assert tools["python"].batches == [["print(6*7)"]]  # the tool call was re-executed
    repair = outcomes(tmp_path)["fp"]
    assert repair.accepted and repair.final.how == "first_pass" and repair.final.attempt == 0
    fixed = repair.final.trajectory
    assert fixed.id == "fp/s0/r0" and fixed.parent_id == "fp/s0"
    assert fixed.text.startswith("<think>Multiply six by seven.</think>")
    assert "<think>The product is 42.</think>" in fixed.text
    assert [c.output for c in fixed.tool_calls] == ["42"]


def test_first_pass_falls_back_to_the_model_when_a_tool_output_changed(tmp_path, tokenizer, tools):
    make_run(tmp_path, {"fp": [hedged_tool_trajectory("fp", output="43")]})
    gen = Repairer(tokenizer, {"fp": (SHORT, SHORT)})
    run_repair(RepairConfig(run_dir=str(tmp_path)), gen, tools)
    repair = outcomes(tmp_path)["fp"]
    assert gen.calls == [1] and repair.accepted and repair.final.how == "model"
    [first] = repair.rejected
    assert first.how == "first_pass" and "different output" in first.reason


def test_first_pass_never_leaves_a_fragment(tmp_path, tokenizer, tools):
    # The reference teacher's hedging trajectory that the old word-deleting pass turned into
    # "I think this be 8056020 + ..., I? That right,. ... It fine, I so I will go with ...".
    call = ToolCall("python", "print(8056020 + 1679215 - 371493)", "9363742", "ok")
    original = traj(
        "<think>Hmm, I think this might be 8056020 + 1679215 - 371493, but I am not sure. The "
        "ore left is the two years of output added together, minus the ore sold, I guess? That "
        "seems right, maybe. I should probably let Python do the arithmetic.</think>\n<code>\n"
        "print(8056020 + 1679215 - 371493)\n</code>",
        "\n<result>\n9363742\n</result>\n",
        "<think>It prints 9363742. I think that is probably the answer, but maybe I misread the "
        "question. It seems fine, I guess, so I will go with 9363742.</think>\n"
        "<answer>\\boxed{9363742}</answer>",
        tid="ore/s0",
        qid="ore",
        calls=[call],
    )
    queries = [{"id": "ore", "question": "How much ore is left?", "answers": ["9363742"]}]
    write_jsonl(tmp_path / "synthesize/queries.jsonl", queries)
    write_jsonl(tmp_path / "synthesize/trajectories.jsonl", [original.to_dict()])
    run_score(ScoreConfig(run_dir=str(tmp_path)))
    gen = ScriptedGenerator(lambda r: pytest.fail("the repairer must not be called"), tokenizer)
    run_repair(RepairConfig(run_dir=str(tmp_path)), gen, tools)
    repair = outcomes(tmp_path)["ore"]
    assert repair.accepted and repair.final.how == "first_pass"
    assert repair.final.trajectory.model_text == (
        "<think>The ore left is the two years of output added together, minus the ore sold. "
        "I should let Python do the arithmetic.</think>\n<code>\n"
        "print(8056020 + 1679215 - 371493)\n</code>"
        "<think>It prints 9363742.</think>\n<answer>\\boxed{9363742}</answer>"
    )


def test_first_pass_leaves_a_trajectory_it_cannot_edit_whole_to_the_model(
    tmp_path, tokenizer, tools
):
    # Every sentence of the first reasoning block hedges: no whole-sentence edit is left.
    call = ToolCall(tool="python", input="print(6*7)", output="42", status="ok")
    hedged = traj(
        "<think>Maybe it is six times seven, I am not sure.</think>\n<code>\nprint(6*7)\n</code>",
        "\n<result>\n42\n</result>\n",
        "<think>The product is 42.</think>\n<answer>\\boxed{42}</answer>",
        tid="fp/s0",
        qid="fp",
        calls=[call],
    )
    make_run(tmp_path, {"fp": [hedged]})
    gen = Repairer(tokenizer, {"fp": (SHORT, SHORT)})
    run_repair(RepairConfig(run_dir=str(tmp_path)), gen, tools)
    repair = outcomes(tmp_path)["fp"]
    assert gen.calls == [1] and repair.final.how == "model" and not repair.rejected


def test_resume_after_a_crash_has_no_duplicates_or_losses(tmp_path, tokenizer, tools):
    cases = [f"aw{i}" for i in range(5)]
    make_run(tmp_path, {c: [WRONG] for c in cases})
    replies = {c: (SHORT if i % 2 == 0 else WRONG,) * 2 for i, c in enumerate(cases)}
    cfg = RepairConfig(run_dir=str(tmp_path), first_pass=False, chunk=2)

    class Crash(Repairer):
        def generate(self, requests):
            if len(self.calls) == 1:  # the second chunk
                raise RuntimeError("killed")
            return super().generate(requests)

    with pytest.raises(RuntimeError, match="killed"):
        run_repair(cfg, Crash(tokenizer, replies), tools)
    assert not (tmp_path / "repair/repairs.jsonl").exists()
    resumed = Repairer(tokenizer, replies)
    counts = run_repair(cfg, resumed, tools)
    assert resumed.calls == [2, 1] and sorted(resumed.prompts) == ["aw2", "aw3", "aw4"]
    ids = [
        row["original_id"]
        for name in ("repairs", "hard_cases")
        for _, row in read_jsonl(tmp_path / f"repair/{name}.jsonl")
    ]
    assert sorted(ids) == [f"{c}/s0" for c in cases]
    assert counts["accepted"]["AW"] == 3 and counts["hard_cases"] == 2
    idle = Repairer(tokenizer, replies)
    assert run_repair(cfg, idle, tools) == counts and idle.calls == []


def test_kill_between_the_two_appends_redoes_only_the_unwritten_rows(
    tmp_path, tokenizer, tools, monkeypatch
):
    from autotraj.io import ResumableJsonl

    cases = ["aw0", "aw1"]
    make_run(tmp_path, {c: [WRONG] for c in cases})
    replies = {"aw0": (SHORT, SHORT), "aw1": (WRONG, WRONG)}  # aw0 accepted, aw1 a hard case
    cfg = RepairConfig(run_dir=str(tmp_path), first_pass=False)
    append = ResumableJsonl.append

    def killed_at_hard_cases(self, rows):
        if self.path.name == "hard_cases.jsonl":
            raise KeyboardInterrupt
        append(self, rows)

    monkeypatch.setattr(ResumableJsonl, "append", killed_at_hard_cases)
    with pytest.raises(KeyboardInterrupt):
        run_repair(cfg, Repairer(tokenizer, replies), tools)
    monkeypatch.setattr(ResumableJsonl, "append", append)
    resumed = Repairer(tokenizer, replies)
    run_repair(cfg, resumed, tools)
    assert sorted(resumed.prompts) == ["aw1"]
    ids = [
        row["original_id"]
        for name in ("repairs", "hard_cases")
        for _, row in read_jsonl(tmp_path / f"repair/{name}.jsonl")
    ]
    assert ids == ["aw0/s0", "aw1/s0"]


def test_resume_from_changed_scores_is_refused(tmp_path, tokenizer, tools):
    cases = ["aw0", "aw1"]
    make_run(tmp_path, {c: [WRONG] for c in cases})
    replies = {c: (SHORT, SHORT) for c in cases}
    cfg = RepairConfig(run_dir=str(tmp_path), first_pass=False, chunk=1)

    class Crash(Repairer):
        def generate(self, requests):
            if len(self.calls) == 1:  # the second chunk
                raise RuntimeError("killed")
            return super().generate(requests)

    with pytest.raises(RuntimeError, match="killed"):
        run_repair(cfg, Crash(tokenizer, replies), tools)
    scores = tmp_path / "score/scores.jsonl"
    scores.write_text(scores.read_text().replace('"score":', '"score": ', 1))
    with pytest.raises(ConfigError, match=r"different input files \(scores changed\)"):
        run_repair(cfg, Repairer(tokenizer, replies), tools)
