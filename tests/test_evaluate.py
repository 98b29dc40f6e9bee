"""The eval stage: scripted generator, real sandbox and BM25, summary math by hand, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CrashOnRound, write_jsonl

from autotraj.config import ConfigError, load_stage_config
from autotraj.eval_summary import EvalResult, render_table, summarize_results
from autotraj.evaluate import BenchmarkConfig, EvalConfig, check_config, load_summary, run_eval
from autotraj.io import DataError, read_jsonl
from autotraj.models.scripted import ScriptedGenerator
from autotraj.records import Provenance, Trajectory
from autotraj.rollout import RolloutConfig
from autotraj.run_dir import StageIncomplete
from autotraj.tags import result_text
from autotraj.tools.tool import ToolInfraError
from autotraj.tools.toolbox import SearchToolConfig, ToolsConfig

ROOT = Path(__file__).resolve().parents[1]

# Scripted model text (the char-level tokenizer gives one token per character).
QA_REPLIES = {
    "Who founded Westfield?": "<think>x</think>\n<answer>\\boxed{Frank Lowy AC}</answer>",
    "What is the capital of France?": "<think>x</think>\n<answer>\\boxed{Paris}</answer>",
    "What colour is the sky?": "<think>x</think>\n<answer>\\boxed{green}</answer>",
}
MATH = [  # (id, question, gold): 2*3 and 4*5 right, 3*3 has a wrong gold, 1/0 errors
    ("m0", "What is 2*3?", "6"),
    ("m1", "What is 4*5?", "20"),
    ("m2", "What is 3*3?", "10"),
    ("m3", "Say nothing.", "1"),
    ("m4", "What is 1/0?", "0"),
]
QA = [
    ("a0", "Who founded Westfield?", ["Frank Lowy"]),  # EM 0, F1 0.8: correct
    ("a1", "What is the capital of France?", ["Paris"]),  # EM 1, F1 1
    ("a2", "What colour is the sky?", ["blue"]),  # EM 0, F1 0
]


def code_call(expr: str) -> str:
    return f"<think>compute</think>\n<code>\nprint({expr})\n</code>"


def final(value: str) -> str:
    return f"<think>ok</think>\n<answer>\\boxed{{{value}}}</answer>"


def reply(request):
    question = request.prompt_text.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
    turn = request.prompt_text.rsplit("<|im_start|>assistant", 1)[1]
    if question in QA_REPLIES:
        return QA_REPLIES[question]
    if not question.startswith("What is "):
        return "no idea"
    if "<result>" not in turn:
        return code_call(question.removeprefix("What is ").rstrip("?"))
    value = turn.rsplit("<result>\n", 1)[1].split("\n", 1)[0]
    return final(value if value.isdigit() else "err")


@pytest.fixture(scope="module")
def tokenizer():
    from autotraj.models.tiny import build_char_tokenizer

    return build_char_tokenizer()


def write_files(folder: Path) -> tuple[Path, Path]:
    math = write_jsonl(
        folder / "math.jsonl", [{"id": i, "question": q, "answer": a} for i, q, a in MATH]
    )
    qa = write_jsonl(
        folder / "qa.jsonl", [{"id": i, "question": q, "answers": a} for i, q, a in QA]
    )
    return math, qa


@pytest.fixture
def files(tmp_path):
    return write_files(tmp_path)


def config(tmp_path, files, **kw) -> EvalConfig:
    math, qa = files
    kw.setdefault(
        "benchmarks",
        (BenchmarkConfig(name="math", path=str(math)), BenchmarkConfig(name="qa", path=str(qa))),
    )
    return EvalConfig(run_dir=str(tmp_path / "run"), batch_queries=3, **kw)


def results_on_disk(cfg: EvalConfig, name: str = "results.jsonl") -> list[dict]:
    return [row for _, row in read_jsonl(Path(cfg.run_dir) / "eval" / cfg.name / name)]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tokenizer) -> tuple[EvalConfig, dict, dict[str, dict]]:
    """One eval of MATH and QA, read by the tests below: (config, summary, result rows by id)."""
    tmp_path = tmp_path_factory.mktemp("eval")
    cfg = config(tmp_path, write_files(tmp_path))
    summary = run_eval(cfg, ScriptedGenerator(reply, tokenizer))
    return cfg, summary, {r["id"]: r for r in results_on_disk(cfg)}


M0_TOKENS = len(code_call("2*3")) + len(final("6"))  # one token per character

# (result id, field, value computed by hand)
RESULT_ROWS = [
    ("math/m0/s0", "correct", True),
    ("math/m0/s0", "extracted", "6"),
    ("math/m0/s0", "em", None),  # math is graded by equivalence, not EM/F1
    ("math/m0/s0", "f1", None),
    ("math/m0/s0", "tokens", M0_TOKENS),
    ("math/m0/s0", "total_tokens", M0_TOKENS + len(result_text("6"))),
    ("math/m0/s0", "format_valid", True),
    ("math/m0/s0", "finish_reason", "answer"),
    ("math/m0/s0", "tool_calls", 1),
    ("math/m3/s0", "correct", False),
    ("math/m3/s0", "format_valid", False),
    ("math/m3/s0", "finish_reason", "eos"),
    ("math/m3/s0", "tokens", len("no idea")),
    ("math/m4/s0", "tool_errors", 1),  # ZeroDivisionError
    ("qa/a0/s0", "em", 0.0),
    ("qa/a0/s0", "f1", pytest.approx(0.8)),
]


@pytest.mark.parametrize(("rid", "field", "expected"), RESULT_ROWS)
def test_result_rows_hold_hand_computed_values(evaluated, rid, field, expected):
    _, _, rows = evaluated
    assert rows[rid][field] == expected


# (benchmark, field, value computed by hand): math 2 right of 5, QA 2 of 3 by F1
SUMMARY = [
    ("math", "n", 5),
    ("math", "accuracy", pytest.approx(2 / 5)),
    ("math", "em", None),
    ("math", "f1", None),
    ("math", "tool_calls_per_trajectory", pytest.approx(4 / 5)),
    ("math", "tool_error_rate", pytest.approx(1 / 4)),
    ("math", "format_valid_rate", pytest.approx(4 / 5)),
    # words of the model's text: 5 for each code trajectory, 2 for "no idea"
    ("math", "mean_words", pytest.approx((4 * 5 + 2) / 5)),
    ("qa", "n", 3),
    ("qa", "accuracy", pytest.approx(2 / 3)),
    ("qa", "em", pytest.approx(1 / 3)),
    ("qa", "f1", pytest.approx((0.8 + 1 + 0) / 3)),
    ("qa", "mean_tokens", pytest.approx(sum(len(t) for t in QA_REPLIES.values()) / 3)),
    ("qa", "tool_calls_per_trajectory", 0),
    ("qa", "tool_error_rate", 0),
    ("average", "n", 8),
    ("average", "accuracy", pytest.approx((2 / 5 + 2 / 3) / 2)),
    ("average", "em", pytest.approx(1 / 3)),
    ("average", "file_sha256", None),
]


@pytest.mark.parametrize(("benchmark", "field", "expected"), SUMMARY)
def test_summary_holds_hand_computed_values(evaluated, benchmark, field, expected):
    _, summary, _ = evaluated
    numbers = summary["average"] if benchmark == "average" else summary["benchmarks"][benchmark]
    assert numbers[field] == expected


def test_one_result_per_item_and_tools_really_ran(evaluated):
    _, summary, rows = evaluated
    assert len(rows) == 8
    assert rows["math/m0/s0"]["trajectory"]["tool_calls"][0]["output"] == "6"  # the sandbox ran
    assert len(summary["benchmarks"]["math"]["file_sha256"]) == 64


def test_summary_names_its_rules_and_decoding(evaluated):
    _, summary, _ = evaluated
    assert summary["name"] == "base" and summary["seeds"] == [0]
    # qa.jsonl matches no benchmark name: HotpotQA's rule, the default (grading.QA_RULES)
    assert summary["sources"]["qa"]["qa_rules"] == ["hotpot"]
    assert summary["sources"]["math"]["qa_rules"] == []
    assert summary["decoding"]["temperature"] == 0.0 and summary["git_sha"]


def test_the_summary_and_stage_files_are_written(evaluated):
    cfg, summary, _ = evaluated
    assert load_summary(Path(cfg.run_dir) / "eval" / "base") == summary
    for name in ("manifest.json", "config.resolved.yaml", "metrics.jsonl"):
        assert (Path(cfg.run_dir) / "eval" / "base" / name).exists()


def test_finished_eval_is_a_no_op(tmp_path, files, tokenizer):
    cfg = config(tmp_path, files)
    first = run_eval(cfg, ScriptedGenerator(reply, tokenizer))
    idle = ScriptedGenerator(reply, tokenizer)
    assert run_eval(cfg, idle) == first and idle.calls == []


def test_resume_after_crash_has_no_duplicates(tmp_path, files, tokenizer):
    cfg = config(tmp_path, files)
    with pytest.raises(RuntimeError, match="killed"):  # in the second chunk's first round
        run_eval(cfg, CrashOnRound(reply, tokenizer, crash_round=3))
    assert len(results_on_disk(cfg, "results.jsonl.partial")) == 3  # the first chunk survived
    resumed = ScriptedGenerator(reply, tokenizer)
    summary = run_eval(cfg, resumed)
    ids = [r["id"] for r in results_on_disk(cfg)]
    assert len(ids) == len(set(ids)) == 8
    assert resumed.calls == [3, 1, 2]  # only the 5 missing items: chunks of 3 and 2
    assert summary["benchmarks"]["math"]["accuracy"] == pytest.approx(2 / 5)


def test_infra_failures_are_not_written_and_the_stage_raises(
    tmp_path, files, tokenizer, monkeypatch
):
    class Down:
        name = "python"

        def run_batch(self, inputs):
            raise ToolInfraError("sandbox pool died")

        def close(self):
            pass

    cfg = config(tmp_path, files)
    monkeypatch.setattr("autotraj.evaluate.open_tools", lambda tools_cfg: {"python": Down()})
    with pytest.raises(StageIncomplete, match="4 rollouts"):
        run_eval(cfg, ScriptedGenerator(reply, tokenizer))
    written = {r["id"] for r in results_on_disk(cfg, "results.jsonl.partial")}
    assert written == {"math/m3/s0", "qa/a0/s0", "qa/a1/s0", "qa/a2/s0"}  # no tool call
    monkeypatch.undo()
    run_eval(cfg, ScriptedGenerator(reply, tokenizer))
    assert len(results_on_disk(cfg)) == 8


def test_seeds_report_the_mean_and_per_seed_values(tmp_path, files, tokenizer):
    asked = []

    def second_pass_knows_the_sky(request):
        """`reply`, except that the second time (seed 1's pass) the sky is blue."""
        if "What colour is the sky?" in request.prompt_text:
            asked.append(request.seed)
            if len(asked) == 2:
                return final("blue")
        return reply(request)

    cfg = config(tmp_path, files, seeds=(0, 1), rollout=RolloutConfig(temperature=0.5, top_p=1.0))
    summary = run_eval(cfg, ScriptedGenerator(second_pass_knows_the_sky, tokenizer))
    assert len(results_on_disk(cfg)) == 16
    assert len(asked) == 2 and asked[0] != asked[1]  # one pass per seed, each its own sampling
    assert summary["seeds"] == [0, 1]
    math, qa = summary["benchmarks"]["math"], summary["benchmarks"]["qa"]
    assert math["n"] == 5 and qa["n"] == 3
    # math: 2 of 5 under both seeds; QA: 2 of 3 under seed 0, 3 of 3 under seed 1
    assert {s: m["accuracy"] for s, m in math["per_seed"].items()} == {
        "0": pytest.approx(2 / 5),
        "1": pytest.approx(2 / 5),
    }
    assert {s: m["accuracy"] for s, m in qa["per_seed"].items()} == {
        "0": pytest.approx(2 / 3),
        "1": pytest.approx(1.0),
    }
    assert math["accuracy"] == pytest.approx(2 / 5)
    assert qa["accuracy"] == pytest.approx((2 / 3 + 1) / 2)  # the mean over seeds
    assert qa["em"] == pytest.approx((1 / 3 + 2 / 3) / 2)  # EM 1 on Paris, then also the sky
    average = summary["average"]
    assert {s: m["accuracy"] for s, m in average["per_seed"].items()} == {
        "0": pytest.approx((2 / 5 + 2 / 3) / 2),
        "1": pytest.approx((2 / 5 + 1) / 2),
    }
    assert average["accuracy"] == pytest.approx(((2 / 5 + 2 / 3) / 2 + (2 / 5 + 1) / 2) / 2)


def make_result(benchmark: str, seed: int, correct: bool, tokens: int) -> EvalResult:
    trajectory = Trajectory(
        id="t",
        query_id="q",
        segments=(),
        tool_calls=(),
        finish_reason="answer",
        provenance=Provenance("m", "scripted", 0.5, 1.0, 16, seed),
    )
    return EvalResult(
        id=f"{benchmark}/{tokens}/s{seed}",
        benchmark=benchmark,
        query_id=str(tokens),
        seed=seed,
        question="?",
        gold=("1",),
        kind="math",
        extracted="1" if correct else "2",
        correct=correct,
        em=None,
        f1=None,
        tokens=tokens,
        total_tokens=tokens,
        words=tokens // 2,
        tool_calls=0,
        tool_errors=0,
        tool_timeouts=0,
        tool_rejected=0,
        format_valid=True,
        finish_reason="answer",
        trajectory=trajectory,
    )


def test_summary_averages_seeds_then_benchmarks():
    results = [
        make_result("a", 0, True, 10),
        make_result("a", 0, True, 20),  # seed 0: a = 1.0
        make_result("a", 1, True, 30),
        make_result("a", 1, False, 40),  # seed 1: a = 0.5
        make_result("b", 0, False, 100),
        make_result("b", 1, False, 200),  # b = 0.0
    ]
    out = summarize_results(results, ["a", "b"], [0, 1])
    a = out["benchmarks"]["a"]
    assert (a["per_seed"]["0"]["accuracy"], a["per_seed"]["1"]["accuracy"]) == (1.0, 0.5)
    assert a["accuracy"] == 0.75 and a["mean_tokens"] == 25.0 and a["n"] == 2
    assert out["average"]["accuracy"] == pytest.approx((0.75 + 0.0) / 2)
    assert out["average"]["per_seed"]["1"]["accuracy"] == pytest.approx(0.25)
    assert out["average"]["mean_tokens"] == pytest.approx((25 + 150) / 2)
    assert out["average"]["n"] == 3
    with pytest.raises(ValueError, match="no results"):
        summarize_results(results, ["a", "b", "c"], [0, 1])


def test_config_mismatch_and_changed_benchmark_are_refused(tmp_path, files, tokenizer):
    cfg = config(tmp_path, files)
    run_eval(cfg, ScriptedGenerator(reply, tokenizer))
    with pytest.raises(ConfigError, match="different config"):
        run_eval(config(tmp_path, files, checker="release"), ScriptedGenerator(reply, tokenizer))
    math, _ = files
    write_jsonl(math, [{"id": "m0", "question": "What is 7*7?", "answer": "49"}])
    with pytest.raises(ConfigError, match="changed"):
        run_eval(cfg, ScriptedGenerator(reply, tokenizer))


def test_bad_benchmarks_and_configs_fail_loudly(tmp_path, files, tokenizer):
    missing = tmp_path / "nowhere" / "gsm8k_test.jsonl"
    cfg = config(tmp_path, files, benchmarks=(BenchmarkConfig(name="gsm8k", path=str(missing)),))
    with pytest.raises(DataError, match=r"benchmark gsm8k: .*nowhere/gsm8k_test\.jsonl"):
        run_eval(cfg, ScriptedGenerator(reply, tokenizer))
    math, _ = files
    bench = BenchmarkConfig(name="math", path=str(math))
    for bad, message in [
        (config(tmp_path, files, seeds=(0, 1)), "greedy"),
        (config(tmp_path, files, benchmarks=()), "at least one"),
        (config(tmp_path, files, benchmarks=(bench, bench)), "used twice"),
        (config(tmp_path, files, name="../x"), "plain folder"),
        (config(tmp_path, files, corpus="c.jsonl"), "bm25 only"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_config(bad)


def test_seeded_sample_is_stable_and_differs_from_the_first_n(tmp_path, files, tokenizer):
    math, _ = files
    sample = BenchmarkConfig(name="math", path=str(math), limit=2, sample_seed=3)
    cfg = config(tmp_path, files, benchmarks=(sample,))
    run_eval(cfg, ScriptedGenerator(reply, tokenizer))
    ids = sorted(r["query_id"] for r in results_on_disk(cfg))
    from autotraj.evaluate import load_benchmark

    assert ids == sorted(q.id for q in load_benchmark(sample).queries)  # same sample again
    assert ids == ["m1", "m4"]  # random.Random(3).sample(range(5), 2), in file order
    first = load_benchmark(BenchmarkConfig(name="math", path=str(math), limit=2))
    assert [q.id for q in first.queries] == ["m0", "m1"]
    assert ids != [q.id for q in first.queries]  # the seed picked, not the first `limit`


def test_search_over_a_corpus_indexed_by_the_stage(tmp_path, files, tokenizer):
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl",
        [
            {"id": "1", "title": "Westfield Group", "text": "Westfield was founded by Frank Lowy."},
            {"id": "2", "title": "Paris", "text": "Paris is the capital of France."},
        ],
    )
    _, qa = files

    def search_reply(request):
        turn = request.prompt_text.rsplit("<|im_start|>assistant", 1)[1]
        if "<result>" not in turn:
            return "<think>look it up</think>\n<search>Westfield founded</search>"
        return final("Frank Lowy")

    cfg = config(
        tmp_path,
        files,
        benchmarks=(BenchmarkConfig(name="qa", path=str(qa), limit=1),),
        corpus=str(corpus),
        tools=ToolsConfig(search=SearchToolConfig(backend="bm25")),
    )
    summary = run_eval(cfg, ScriptedGenerator(search_reply, tokenizer))
    row = results_on_disk(cfg)[0]
    assert row["trajectory"]["tool_calls"][0]["output"].startswith('"Westfield Group"')
    assert row["em"] == 1.0 and summary["benchmarks"]["qa"]["tool_calls_per_trajectory"] == 1
    assert (Path(cfg.run_dir) / "index" / "meta.json").is_file()
    assert summary["search_index"]["count"] == 2


def test_render_table():
    base = {
        "name": "base",
        "benchmarks": {"gsm8k": {"accuracy": 0.1}, "hotpotqa": {"accuracy": 0.02}},
        "average": {"accuracy": 0.06, "mean_tokens": 312.4, "tool_calls_per_trajectory": 0.0},
    }
    sft = {
        "name": "sft",
        "benchmarks": {"gsm8k": {"accuracy": 0.455}},
        "average": {"accuracy": 0.455, "mean_tokens": 95.0, "tool_calls_per_trajectory": 1.25},
    }
    assert render_table([base, sft]).splitlines() == [
        "model  gsm8k  hotpotqa  average  tokens  tool calls",
        "base   10.0   2.0       6.0      312     0.00",
        "sft    45.5   -         45.5     95      1.25",
    ]


@pytest.mark.parametrize("name", ["cpu.yaml", "paper.yaml"])
def test_shipped_configs_pass_the_stage_check_greedy_and_zero_shot(name):
    # (that every shipped config loads: tests/test_config.py)
    cfg = load_stage_config(EvalConfig, "eval", ROOT / "configs" / name)
    check_config(cfg)
    assert cfg.rollout.temperature == 0.0 and cfg.rollout.demonstrations == 0
    assert len(cfg.benchmarks) == (2 if name == "cpu.yaml" else 9)
