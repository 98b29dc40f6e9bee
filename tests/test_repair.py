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


class CrashingRepairer(Repairer):
    """A Repairer killed on its second batch (the second chunk): a crash mid-stage."""

    def generate(self, requests):
        if len(self.calls) == 1:
            raise RuntimeError("killed")
        return super().generate(requests)


def written_ids(run_dir):
    """The original ids the stage wrote: accepted repairs first, then hard cases."""
    return [
        row["original_id"]
        for name in ("repairs", "hard_cases")
        for _, row in read_jsonl(run_dir / f"repair/{name}.jsonl")
    ]


def outcomes(run_dir):
    rows = [
        *read_jsonl(run_dir / "repair/repairs.jsonl"),
        *read_jsonl(run_dir / "repair/hard_cases.jsonl"),
    ]
    return {row["original_id"].split("/")[0]: Repair.from_dict(row) for _, row in rows}


@pytest.fixture(scope="module")
def one_attempt(tmp_path_factory, tokenizer, sandbox):
    """Every case of CASES repaired with the release's single attempt, no first pass:
    (score rows, the stage's counts, the repairer, Repair records by case, the original ids
    written to each of repairs.jsonl and hard_cases.jsonl)."""
    run_dir = tmp_path_factory.mktemp("one-attempt")
    scores = make_run(run_dir, {case: originals for case, (originals, _, _) in CASES.items()})
    gen = Repairer(tokenizer)
    tools = {"python": Recording(sandbox), "search": DownSearch()}
    counts = run_repair(RepairConfig(run_dir=str(run_dir), first_pass=False), gen, tools)
    written = {
        name: [row["original_id"] for _, row in read_jsonl(run_dir / f"repair/{name}.jsonl")]
        for name in ("repairs", "hard_cases")
    }
    return scores, counts, gen, outcomes(run_dir), written


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


def test_every_case_is_decided_once(one_attempt):
    """Each case's low-quality original is written exactly once: to repairs.jsonl when
    accepted, else to hard_cases.jsonl."""
    assert sorted(case for case, _, _ in ONE_ATTEMPT) == sorted(CASES)
    scores, written = one_attempt[0], one_attempt[4]
    originals = [tid for tid, row in scores.items() if row["label"] != "HQ"]
    assert sorted(written["repairs"] + written["hard_cases"]) == sorted(originals)
    assert sorted(tid.split("/")[0] for tid in originals) == sorted(CASES)
    accepted = sorted(case for case, ok, _ in ONE_ATTEMPT if ok)
    assert sorted(tid.split("/")[0] for tid in written["repairs"]) == accepted


def test_the_originals_are_labelled_as_the_cases_say(one_attempt):
    """acl_*: right answer, low quality (acl_not_better's shorter original is the HQ one);
    aw_* and the rest: wrong answer."""
    labels = {tid: row["label"] for tid, row in one_attempt[0].items()}
    assert labels == {
        "acl_ok/s0": "AC-LQ",
        "acl_not_better/s0": "HQ",
        "acl_not_better/s1": "AC-LQ",
        "acl_low/s0": "AC-LQ",
        "aw_ok/s0": "AW",
        "aw_wrong/s0": "AW",
        "aw_low/s0": "AW",
        "k2/s0": "AW",
        "infra/s0": "AW",
    }


def test_one_batched_call_repairs_the_whole_chunk(one_attempt):
    _, counts, gen, _, _ = one_attempt
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

    with pytest.raises(RuntimeError, match="killed"):
        run_repair(cfg, CrashingRepairer(tokenizer, replies), tools)
    assert not (tmp_path / "repair/repairs.jsonl").exists()
    resumed = Repairer(tokenizer, replies)
    counts = run_repair(cfg, resumed, tools)
    assert resumed.calls == [2, 1] and sorted(resumed.prompts) == ["aw2", "aw3", "aw4"]
    ids = written_ids(tmp_path)
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
    ids = written_ids(tmp_path)
    assert ids == ["aw0/s0", "aw1/s0"]


def test_resume_from_changed_scores_is_refused(tmp_path, tokenizer, tools):
    cases = ["aw0", "aw1"]
    make_run(tmp_path, {c: [WRONG] for c in cases})
    replies = {c: (SHORT, SHORT) for c in cases}
    cfg = RepairConfig(run_dir=str(tmp_path), first_pass=False, chunk=1)

    with pytest.raises(RuntimeError, match="killed"):
        run_repair(cfg, CrashingRepairer(tokenizer, replies), tools)
    scores = tmp_path / "score/scores.jsonl"
    scores.write_text(scores.read_text().replace('"score":', '"score": ', 1))
    with pytest.raises(ConfigError, match=r"different input files \(scores changed\)"):
        run_repair(cfg, Repairer(tokenizer, replies), tools)


# ---------------------------------------------------------------- the repairer for small models


def reply_once(tokenizer, text_of):
    """A repairer whose reply is `text_of(request)`; records every request."""
    seen = []

    def reply(request):
        seen.append(request)
        return text_of(request)

    gen = ScriptedGenerator(reply, tokenizer)
    gen.seen = seen
    return gen


def test_a_result_block_the_repairer_writes_itself_is_rejected(tmp_path, tokenizer, tools):
    """A reply that copies the original's result instead of calling the tool is never accepted
    (flaws.written_results), even though its answer is right and it scores high."""
    make_run(tmp_path, {"aw": [WRONG]})
    copied = (
        "<think>Six times seven.</think>\n<result>\n42\n</result>\n<answer>\\boxed{42}</answer>"
    )
    gen = reply_once(tokenizer, lambda r: copied)
    run_repair(RepairConfig(run_dir=str(tmp_path), first_pass=False), gen, tools)
    repair = outcomes(tmp_path)["aw"]
    assert not repair.accepted and repair.final.correct
    assert repair.final.reason == "flaw: model-written <result> tags: 2"
    assert tools["python"].batches == []  # nothing was executed: the result is made up


PREAMBLE = "Here's the correct, clean trajectory:\n"


@pytest.mark.parametrize("strip", [False, True])
def test_a_prose_preamble_is_dropped_when_asked(tmp_path, tokenizer, tools, strip):
    make_run(tmp_path, {"aw": [WRONG]})
    gen = reply_once(tokenizer, lambda r: PREAMBLE + SHORT)
    cfg = RepairConfig(run_dir=str(tmp_path), first_pass=False, strip_preamble=strip)
    run_repair(cfg, gen, tools)
    repaired = outcomes(tmp_path)["aw"].final.trajectory
    assert repaired.text == (SHORT if strip else PREAMBLE + SHORT)


def test_a_reply_without_any_protocol_tag_is_left_as_it_is(tokenizer):
    from autotraj.repair import as_repair

    bare = traj("The answer is 42.", tid="x", qid="q")
    assert as_repair(bare, bare, strip_preamble=True).text == "The answer is 42."


def test_prefill_starts_the_repairers_turn_in_the_protocol(tmp_path, tokenizer, tools):
    """The prompt ends with the prefill; the reply continues it and the repair holds both."""
    make_run(tmp_path, {"aw": [WRONG]})
    rest = SHORT.removeprefix("<think>")
    gen = reply_once(tokenizer, lambda r: rest if r.prompt_text.endswith("<think>") else "??")
    cfg = RepairConfig(run_dir=str(tmp_path), first_pass=False, prefill="<think>")
    run_repair(cfg, gen, tools)
    [request] = gen.seen
    assert request.prompt_text.endswith("assistant\n<think>")
    assert (
        list(request.prompt_ids[-3:])
        == tokenizer.encode(request.prompt_text, add_special_tokens=False)[-3:]
    )
    repair = outcomes(tmp_path)["aw"]
    assert repair.accepted and repair.final.trajectory.text == SHORT


def test_worked_examples_of_the_same_label_come_before_the_question(tmp_path, tokenizer, tools):
    from autotraj.repair import repair_examples

    make_run(tmp_path, {"acl_ok": [HEDGING], "aw_ok": [WRONG]})
    gen = Repairer(tokenizer)
    run_repair(RepairConfig(run_dir=str(tmp_path), first_pass=False, examples=2), gen, tools)
    for case, label, other in (("acl_ok", "AC-LQ", "AW"), ("aw_ok", "AW", "AC-LQ")):
        [prompt] = gen.prompts[case]
        for question, bad, good in repair_examples(label)[:2]:
            assert question in prompt and bad in prompt and good in prompt
            assert prompt.index(good) < prompt.index("What is 6*7?")
        assert not any(q in prompt for q, _, _ in repair_examples(other))
    zero = Repairer(tokenizer)
    make_run(tmp_path / "zero", {"aw_ok": [WRONG]})
    run_repair(RepairConfig(run_dir=str(tmp_path / "zero"), first_pass=False), zero, tools)
    assert repair_examples("AW")[0][2] not in zero.prompts["aw_ok"][0]


def test_the_worked_examples_are_repairs_the_verification_accepts():
    """Each example's repair is correct for its question (the printed results are what Python
    prints), has no flaw, and the trajectory it repairs is low quality for its label."""
    import json
    from importlib import resources

    from autotraj.flaws import flaws
    from autotraj.quality import QualityConfig
    from autotraj.records import Segment

    path = resources.files("autotraj") / "prompts" / "repair_examples.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["label"] for r in rows} == {"AC-LQ", "AW"}

    def trajectory(text):
        pieces = re.split(r"(\n<result>\n.*?\n</result>\n)", text)
        return Trajectory(
            id="x",
            query_id="q",
            segments=tuple(Segment(p, not p.startswith("\n<result>")) for p in pieces if p),
            tool_calls=(),
            finish_reason="answer",
            provenance=traj("x").provenance,
        )

    hedging = QualityConfig().hedging_words
    for row in rows:
        for text in (row["trajectory"], row["repair"]):
            for code, printed in re.findall(r"<code>\n(.*?)\n</code>\n<result>\n(.*?)\n", text):
                assert str(eval(code.removeprefix("print(").removesuffix(")"))) == printed
        assert not flaws(trajectory(row["repair"]), hedging), row["repair"]
        bad = re.search(r"boxed\{(\d+)\}", row["trajectory"]).group(1)
        good = re.search(r"boxed\{(\d+)\}", row["repair"]).group(1)
        assert (bad == good) == (row["label"] == "AC-LQ")
        if row["label"] == "AC-LQ":  # right answer: low quality means a flaw to repair
            assert flaws(trajectory(row["trajectory"]), hedging), row["trajectory"]


def test_too_many_worked_examples_are_refused(tmp_path, tokenizer, tools):
    from autotraj.config import ConfigError

    make_run(tmp_path, {"aw_ok": [WRONG]})
    with pytest.raises(ConfigError, match="repair.examples: 99"):
        run_repair(RepairConfig(run_dir=str(tmp_path), examples=99), Repairer(tokenizer), tools)


# ---------------------------------------------------------------- strategy "continue"


def two_step(case, second="print(6*8)", second_out="48", answer="48"):
    """Right first step (6*7 = 42), wrong second step, wrong answer: AW."""
    return traj(
        "<think>Multiply six by seven.</think>\n<code>\nprint(6*7)\n</code>",
        "\n<result>\n42\n</result>\n",
        f"<think>Check the product.</think>\n<code>\n{second}\n</code>",
        f"\n<result>\n{second_out}\n</result>\n",
        f"<think>The product is {answer}.</think>\n<answer>\\boxed{{{answer}}}</answer>",
        tid=f"{case}/s0",
        qid=case,
        calls=[
            ToolCall(tool="python", input="print(6*7)", output="42", status="ok"),
            ToolCall(tool="python", input=second, output=second_out, status="ok"),
        ],
        finish="answer",
    )


def continuer(tokenizer):
    """Continues a prefix: after the 42 result it answers 42 (right); after the 48 result it
    answers 48 (wrong). Records every request."""

    def text_of(request):
        if "=== TRAJECTORY START ===" in request.prompt_text:
            return WRONG  # a rewrite: always wrong here
        if request.prompt_text.endswith("<result>\n48\n</result>\n"):
            return "<think>The product is 48.</think>\n<answer>\\boxed{48}</answer>"
        assert request.prompt_text.endswith("<result>\n42\n</result>\n"), request.prompt_text
        return "<think>The product is 42.</think>\n<answer>\\boxed{42}</answer>"

    return reply_once(tokenizer, text_of)


def test_continue_cuts_after_the_latest_tool_result_first_then_goes_back(
    tmp_path, tokenizer, tools
):
    make_run(tmp_path, {"aw": [two_step("aw")]})
    gen = continuer(tokenizer)
    cfg = RepairConfig(run_dir=str(tmp_path), strategy="continue", continue_samples=3)
    counts = run_repair(cfg, gen, tools)
    assert gen.calls == [3, 3]  # k samples at the latest cut (all wrong), then k at the first
    assert all(r.temperature == 0.7 for r in gen.seen)
    assert all("=== TRAJECTORY START ===" not in r.prompt_text for r in gen.seen)
    repair = outcomes(tmp_path)["aw"]
    assert repair.accepted and repair.final.how == "continue"
    assert [(a.attempt, a.reason) for a in repair.rejected] == [
        (i, "wrong answer") for i in (1, 2, 3)
    ]
    fixed = repair.final.trajectory
    assert repair.final.attempt == 4 and fixed.id == "aw/s0/r4" and fixed.parent_id == "aw/s0"
    original = two_step("aw")
    assert fixed.segments[:2] == tuple(
        dataclasses_replace_ids(s) for s in original.segments[:2]
    )  # the prefix is the original's, word for word
    assert fixed.text.endswith("<think>The product is 42.</think>\n<answer>\\boxed{42}</answer>")
    assert fixed.tool_calls == original.tool_calls[:1]
    assert tools["python"].batches == []  # the prefix keeps its recorded results
    assert counts["accepted_by"]["continue"] == {"AC-LQ": 0, "AW": 1}
    assert counts["continue_attempts"] == 4


def dataclasses_replace_ids(segment):
    from autotraj.records import Segment

    return Segment(segment.text, segment.trainable)


def test_continue_stops_at_the_first_accepted_sample(tmp_path, tokenizer, tools):
    make_run(tmp_path, {"aw": [two_step("aw")]})
    replies = iter(
        [
            "<think>The product is 41.</think>\n<answer>\\boxed{41}</answer>",
            "<think>The product is 42.</think>\n<answer>\\boxed{42}</answer>",
            "<think>The product is 43.</think>\n<answer>\\boxed{43}</answer>",
            "<think>The product is 42.</think>\n<answer>\\boxed{42}</answer>",
        ]
    )
    gen = reply_once(tokenizer, lambda r: next(replies))
    cfg = RepairConfig(run_dir=str(tmp_path), strategy="continue", continue_samples=4)
    run_repair(cfg, gen, tools)
    repair = outcomes(tmp_path)["aw"]
    assert gen.calls == [4]
    assert repair.accepted and repair.final.attempt == 2
    assert [a.attempt for a in repair.rejected] == [1]  # samples after the accepted one: dropped


def test_rewrite_then_continue_only_where_the_rewrite_failed(tmp_path, tokenizer, tools):
    make_run(tmp_path, {"aw": [two_step("aw")], "aw_ok": [WRONG]})

    def text_of(request):
        if "(case aw_ok)" in request.prompt_text:
            return SHORT
        return continuer(tokenizer).reply(request)

    gen = reply_once(tokenizer, text_of)
    cfg = RepairConfig(
        run_dir=str(tmp_path), strategy="rewrite+continue", attempts=2, continue_samples=2
    )
    run_repair(cfg, gen, tools)
    got = outcomes(tmp_path)
    assert got["aw_ok"].accepted and got["aw_ok"].final.how == "model"
    assert gen.calls == [2, 1, 2, 2]  # rewrite 1 (both), rewrite 2 (aw), two continue rounds
    aw = got["aw"]
    assert [(a.attempt, a.how) for a in aw.rejected] == [
        (1, "model"),
        (2, "model"),
        (3, "continue"),
        (4, "continue"),
    ]
    assert aw.accepted and (aw.final.attempt, aw.final.how) == (5, "continue")


def test_continue_without_a_usable_cut_point_is_a_hard_case_without_a_call(
    tmp_path, tokenizer, tools
):
    from autotraj.quality import QualityConfig
    from autotraj.repair import cut_prefixes

    words = QualityConfig().hedging_words
    assert [len(p.segments) for p in cut_prefixes(two_step("x"), words)] == [4, 2]
    # its only prefix hedges through and through ("Maybe."): the edit cannot clean it
    hopeless = traj(
        "<think>Maybe.</think>\n<code>\nprint(6*7)\n</code>",
        "\n<result>\n42\n</result>\n",
        "<think>The product is 41.</think>\n<answer>\\boxed{41}</answer>",
        tid="h/s0",
        qid="h",
        calls=[ToolCall(tool="python", input="print(6*7)", output="42", status="ok")],
    )
    assert cut_prefixes(hopeless, words) == []
    make_run(tmp_path, {"aw": [WRONG], "h": [hopeless]})
    gen = ScriptedGenerator(lambda r: pytest.fail("nothing to continue"), tokenizer)
    cfg = RepairConfig(run_dir=str(tmp_path), strategy="continue", first_pass=False)
    counts = run_repair(cfg, gen, tools)
    got = outcomes(tmp_path)
    assert gen.calls == [] and counts["hard_cases"] == 2
    assert got["aw"].final.reason == "no cut point after a tool result"
    assert got["h"].final.reason == "no cut point after a tool result"
    nothing = got["aw"].final.trajectory
    assert (nothing.id, nothing.parent_id, nothing.segments) == ("aw/s0/r1", "aw/s0", ())


def test_continue_cleans_a_hedged_prefix_before_continuing_it(tmp_path, tokenizer, tools):
    """The prefix "Perhaps multiply six by seven." + call + result is flawed; the first pass's
    edit cleans it to "Multiply six by seven." and the continuation goes on from there."""
    hedged_wrong = traj(
        "<think>Perhaps multiply six by seven.</think>\n<code>\nprint(6*7)\n</code>",
        "\n<result>\n42\n</result>\n",
        "<think>The product is probably 41.</think>\n<answer>\\boxed{41}</answer>",
        tid="aw/s0",
        qid="aw",
        calls=[ToolCall(tool="python", input="print(6*7)", output="42", status="ok")],
    )
    make_run(tmp_path, {"aw": [hedged_wrong]})
    gen = continuer(tokenizer)
    cfg = RepairConfig(run_dir=str(tmp_path), strategy="continue", continue_samples=1)
    run_repair(cfg, gen, tools)
    [request] = gen.seen
    assert "Perhaps" not in request.prompt_text
    repair = outcomes(tmp_path)["aw"]
    assert repair.accepted and repair.final.how == "continue"
    assert repair.final.trajectory.text == (
        "<think>Multiply six by seven.</think>\n<code>\nprint(6*7)\n</code>"
        "\n<result>\n42\n</result>\n"
        "<think>The product is 42.</think>\n<answer>\\boxed{42}</answer>"
    )


def test_an_unknown_strategy_is_refused(tmp_path, tokenizer, tools):
    from autotraj.config import ConfigError

    make_run(tmp_path, {"aw_ok": [WRONG]})
    with pytest.raises(ConfigError, match="repair.strategy: 'resolve'"):
        run_repair(
            RepairConfig(run_dir=str(tmp_path), strategy="resolve"), Repairer(tokenizer), tools
        )


def test_a_prefix_ending_in_a_repeated_call_is_cut_back_to_the_first_one():
    from autotraj.quality import QualityConfig
    from autotraj.repair import cut_prefixes

    repeated = two_step("x", second="print(6*7)", second_out="42", answer="42")
    [only] = cut_prefixes(repeated, QualityConfig().hedging_words)
    assert only.text == repeated.segments[0].text + repeated.segments[1].text
    assert only.tool_calls == repeated.tool_calls[:1]


@pytest.mark.parametrize("change", [{"prefill": "<think>"}, {"strategy": "continue"}])
def test_the_stand_in_repairer_is_refused_where_it_would_have_to_continue(
    tmp_path, tokenizer, tools, change
):
    from autotraj.config import ConfigError
    from autotraj.models.loading import GeneratorConfig

    make_run(tmp_path, {"aw_ok": [WRONG]})
    cfg = RepairConfig(
        run_dir=str(tmp_path), generator=GeneratorConfig(backend="reference"), **change
    )
    with pytest.raises(ConfigError, match="stand-in solver"):
        run_repair(cfg, Repairer(tokenizer), tools)
