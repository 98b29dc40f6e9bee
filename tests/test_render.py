"""render.py, the one rendering that decides what is trained: each test checks one property of the
ids and the trainable mask, on the tiny model's character tokenizer and on a byte-level BPE (its
tokens merge across tags, like real tokenizers; built in test_bad_input.py); the slow tier adds
the embedded SmolLM2 tokenizer. Random and adversarial model output: test_fuzz.py.
"""

from __future__ import annotations

import json

import pytest
from conftest import traj
from test_bad_input import bpe_tokenizer

from autotraj.io import DataError
from autotraj.models.scripted import ScriptedGenerator
from autotraj.models.tiny import build_char_tokenizer
from autotraj.records import Query, Segment, ToolCall, Trajectory
from autotraj.render import (
    RenderedTrajectory,
    TokenizerMismatch,
    chat_messages,
    default_system_prompt,
    demonstration_messages,
    render_prompt,
    render_trajectory,
)
from autotraj.rollout import RolloutConfig, rollout

SYSTEM = "Use the tags."
QUESTION = "What is 6*7?"
CALL = "<think>Multiply.</think>\n<code>\nprint(6*7)\n</code>"
RESULT = "\n<result>\n42\n</result>\n"
ANSWER = "<think>It is 42.</think>\n<answer>\\boxed{42}</answer>"
TOOL_USE = traj(CALL, RESULT, ANSWER, calls=(ToolCall("python", "print(6*7)", "42", "ok"),))


@pytest.fixture(
    scope="module", params=["char", "bpe", pytest.param("embedded", marks=pytest.mark.slow)]
)
def tokenizer(request):
    if request.param == "char":
        return build_char_tokenizer()
    if request.param == "bpe":
        return bpe_tokenizer()
    from autotraj.models.loading import EMBEDDED_MODEL, GeneratorConfig, load_tokenizer

    return load_tokenizer(GeneratorConfig(model=EMBEDDED_MODEL))


def render(tokenizer, trajectory: Trajectory) -> RenderedTrajectory:
    return render_trajectory(tokenizer, QUESTION, trajectory, SYSTEM)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


def reply_ids(rendered: RenderedTrajectory, trainable: bool) -> list[int]:
    """The reply's ids (after the prompt) whose flag is `trainable`, in order."""
    reply = zip(rendered.input_ids, rendered.trainable, strict=True)
    return [
        i for n, (i, flag) in enumerate(reply) if n >= rendered.prompt_length and flag == trainable
    ]


# --- what is trained ----------------------------------------------------------------------------


def test_the_prompt_is_the_rendered_chat_and_never_trained(tokenizer):
    rendered = render(tokenizer, TOOL_USE)
    _, prompt = render_prompt(tokenizer, QUESTION, SYSTEM)
    assert rendered.input_ids[: rendered.prompt_length] == prompt
    assert not any(rendered.trainable[: rendered.prompt_length])


def test_model_text_and_the_end_of_turn_are_what_is_trained(tokenizer):
    trained = decode(tokenizer, reply_ids(render(tokenizer, TOOL_USE), trainable=True))
    assert trained == CALL + ANSWER + tokenizer.eos_token


def test_tool_results_are_never_trained_tags_included(tokenizer):
    assert decode(tokenizer, reply_ids(render(tokenizer, TOOL_USE), trainable=False)) == RESULT


def test_a_result_block_the_model_wrote_itself_is_trained(tokenizer):
    forged = f"{CALL}\n<result>\n41\n</result>\n{ANSWER}"  # the mask follows segments, not tags
    trained = decode(tokenizer, reply_ids(render(tokenizer, traj(forged)), trainable=True))
    assert trained == forged + tokenizer.eos_token


@pytest.mark.parametrize("finish", ["answer", "eos"])
def test_a_turn_the_model_ended_ends_with_a_trained_end_of_turn(tokenizer, finish):
    rendered = render(tokenizer, traj(ANSWER, finish=finish))
    assert rendered.input_ids[-1] == tokenizer.eos_token_id and rendered.trainable[-1]


@pytest.mark.parametrize("finish", ["length", "tool_limit", "infra_error"])
def test_a_cut_turn_gets_no_end_of_turn(tokenizer, finish):
    rendered = render(tokenizer, traj(ANSWER, finish=finish))
    assert tokenizer.eos_token_id not in rendered.input_ids[rendered.prompt_length :]
    assert decode(tokenizer, rendered.input_ids[rendered.prompt_length :]) == ANSWER


def test_ids_and_flags_have_the_same_length():
    with pytest.raises(ValueError, match="differ in length"):
        RenderedTrajectory(input_ids=(1, 2), trainable=(False,), prompt_length=1)


# --- token-in, token-out ------------------------------------------------------------------------


class StubPython:
    """Evaluates `print(expr)` without a sandbox."""

    name = "python"

    def run_batch(self, inputs):
        return [
            ToolCall("python", text, str(eval(text.strip().removeprefix("print")[1:-1])), "ok")
            for text in inputs
        ]

    def close(self):
        pass


def test_a_stored_rollout_renders_to_exactly_the_generated_ids(tokenizer):
    """What synthesis stores (Trajectory -> JSON line -> Trajectory) renders token-exact."""
    replies = iter([CALL + " text after the call is dropped", ANSWER])
    gen = ScriptedGenerator(lambda request: next(replies), tokenizer)
    tool = StubPython()
    query = Query(id="q", question=QUESTION, answers=("42",), kind="math")
    config = RolloutConfig(system_prompt=SYSTEM)
    [generated] = rollout(gen, {"python": tool}, tokenizer, [("q/s0", query)], config)
    stored = Trajectory.from_dict(json.loads(json.dumps(generated.to_dict())))
    rendered = render(tokenizer, stored)
    ids = [*generated.prompt_ids, *(i for s in generated.segments for i in s.token_ids)]
    assert list(rendered.input_ids) == [*ids, tokenizer.eos_token_id]


def test_stored_segment_ids_are_used_not_retokenized(tokenizer):
    # Sampled ids need not be the canonical tokenization: one token per character here.
    ids = tuple(i for char in CALL for i in tokenizer.encode(char, add_special_tokens=False))
    t = traj(CALL, ANSWER)
    t = Trajectory(
        t.id, t.query_id, (Segment(CALL, True, ids), t.segments[1]), (), "answer", t.provenance
    )
    rendered = render(tokenizer, t)
    start = rendered.prompt_length
    assert rendered.input_ids[start : start + len(ids)] == ids


def test_stored_prompt_ids_are_used_instead_of_the_question(tokenizer):
    _, other_prompt = render_prompt(tokenizer, "What is 2+2?", "Another system prompt.")
    t = traj(ANSWER)
    t = Trajectory(
        t.id, t.query_id, t.segments, (), "answer", t.provenance, prompt_ids=other_prompt
    )
    rendered = render(tokenizer, t)
    assert rendered.input_ids[: rendered.prompt_length] == other_prompt


def test_text_only_segments_are_tokenized_one_at_a_time(tokenizer):
    """Text from an HTTP backend: no token of a result can merge with the model's text."""
    rendered = render(tokenizer, TOOL_USE)
    per_segment = [
        i
        for text in (CALL, RESULT, ANSWER)
        for i in tokenizer.encode(text, add_special_tokens=False)
    ]
    assert list(rendered.input_ids[rendered.prompt_length : -1]) == per_segment


# --- refusals -----------------------------------------------------------------------------------


def foreign(field: str, bpe, char) -> Trajectory:
    """TOOL_USE with one field's ids made by `char`, rendered with `bpe` in the test."""
    segments = list(TOOL_USE.segments)
    prompt_ids: tuple[int, ...] = ()
    if field == "prompt_ids":
        prompt_ids = render_prompt(char, QUESTION, SYSTEM)[1]
    elif field == "result":
        segments[1] = Segment(RESULT, False, tuple(char.encode(RESULT, add_special_tokens=False)))
    else:  # an id past the end of the vocabulary
        segments[0] = Segment(CALL, True, (len(bpe) + 7,))
    return Trajectory(
        "t", "q", tuple(segments), TOOL_USE.tool_calls, "answer", TOOL_USE.provenance, prompt_ids
    )


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("prompt_ids", "prompt_ids are not this tokenizer's tokenization"),
        ("result", r"segments\[1\].token_ids \(a tool result\)"),
        ("vocabulary", r"segments\[0\].token_ids holds id \d+, outside this tokenizer's"),
    ],
)
def test_ids_made_by_another_tokenizer_are_refused(field, message):
    bpe, char = bpe_tokenizer(), build_char_tokenizer()
    with pytest.raises(TokenizerMismatch, match=message):
        render(bpe, foreign(field, bpe, char))


def test_a_lone_surrogate_in_the_question_is_a_data_error_naming_the_message(tokenizer):
    with pytest.raises(DataError, match=r"message 1 \(user\): lone surrogate U\+D800"):
        render_trajectory(tokenizer, "What is \ud800?", TOOL_USE, SYSTEM)


def test_a_tokenizer_without_an_end_of_turn_token_is_refused():
    no_eos = build_char_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="no eos token"):
        render(no_eos, traj(ANSWER))


# --- the conversation ---------------------------------------------------------------------------


def test_the_default_system_prompt_is_the_packaged_protocol():
    system, user = chat_messages(QUESTION)
    assert system == {"role": "system", "content": default_system_prompt()}
    assert user == {"role": "user", "content": QUESTION} and "<code>" in system["content"]


def test_demonstrations_are_earlier_turns_before_the_question():
    messages = demonstration_messages(QUESTION, "math", 2, SYSTEM)
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert messages[-1]["content"] == QUESTION and messages[0]["content"] == SYSTEM


def test_asking_for_more_demonstrations_than_exist_is_an_error():
    with pytest.raises(ValueError, match="built-in demonstrations for kind 'math'"):
        demonstration_messages(QUESTION, "math", 1000)
