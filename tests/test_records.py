"""Records: exact JSON round trips, and errors that name the record and the field."""

from __future__ import annotations

import copy
import json

import pytest

from autotraj.records import (
    Provenance,
    Query,
    RecordError,
    Segment,
    ToolCall,
    Trajectory,
)

PROV = Provenance(
    model="Qwen/Qwen2.5-0.5B-Instruct",
    backend="hf",
    temperature=0.3,
    top_p=0.9,
    max_new_tokens=1024,
    seed=7,
    role="teacher",
)
CALL = ToolCall(tool="python", input="print(6*7)", output="42", status="ok", latency_s=0.25)
SEGMENTS = (
    Segment(
        text="<think>6*7</think>\n<code>\nprint(6*7)\n</code>",
        trainable=True,
        token_ids=(1, 2, 3),
        logprobs=(-0.5, -0.25, 0.0),
    ),
    Segment(text="\n<result>\n42\n</result>\n", trainable=False, token_ids=(4, 5)),
    Segment(text="<answer>\\boxed{42}</answer>", trainable=True),
)
TRAJ = Trajectory(
    id="q1/s0",
    query_id="q1",
    segments=SEGMENTS,
    tool_calls=(CALL, ToolCall(tool="search", input="x", output="", status="rejected")),
    finish_reason="answer",
    provenance=PROV,
    prompt_ids=(10, 11, 12),
    parent_id="q1/s1",
    error="",
    extra=(("z_note", "unsorted"), ("a_note", "kept in order")),
)


def through_json(record):
    return type(record).from_dict(json.loads(json.dumps(record.to_dict())))


@pytest.mark.parametrize(
    "record",
    [
        Query(id="q1", question="What is 6*7?", answers=("42",), kind="math", source="gsm8k"),
        Query(id="h1", question="Capital?", answers=("Paris", "paris, France"), kind="qa"),
        Query(id="e1", question="none", answers=(), kind="math"),
        CALL,
        ToolCall(tool="search", input="q", output='"T"\ntext', status="timeout"),
        *SEGMENTS,
        Segment(text="", trainable=False),
        PROV,
        Provenance(model="m", backend="vllm", temperature=1, top_p=1.0, max_new_tokens=8),
        TRAJ,
        Trajectory(
            id="t2",
            query_id="q2",
            segments=(),
            tool_calls=(),
            finish_reason="infra_error",
            provenance=PROV,
            error="search: connection refused",
        ),
    ],
    ids=lambda r: type(r).__name__,
)
def test_round_trip_through_json(record):
    back = through_json(record)
    assert back == record
    assert back.to_dict() == record.to_dict()
    hash(back)  # frozen records with tuple fields are hashable


def test_round_trip_keeps_types():
    back = through_json(TRAJ)
    assert isinstance(back.segments, tuple) and isinstance(back.segments[0], Segment)
    assert isinstance(back.tool_calls[0], ToolCall)
    assert isinstance(back.provenance, Provenance)
    assert isinstance(back.segments[0].token_ids, tuple)
    assert isinstance(back.segments[0].logprobs, tuple)
    assert back.segments[2].logprobs is None
    assert back.extra == TRAJ.extra  # order preserved


def test_text_and_model_text():
    assert TRAJ.text == "".join(s.text for s in SEGMENTS)
    assert TRAJ.model_text == SEGMENTS[0].text + SEGMENTS[2].text
    assert "<result>" in TRAJ.text
    assert "<result>" not in TRAJ.model_text


def test_query_id_may_be_an_int_in_the_file():
    q = Query.from_dict({"id": 3, "question": "q", "answers": ["1"], "kind": "qa"})
    assert q.id == "3"


def test_optional_fields_take_defaults():
    q = Query.from_dict({"id": "q", "question": "?", "answers": ["1"]})
    assert (q.kind, q.source) == ("math", "")
    d = TRAJ.to_dict()
    for key in ("prompt_ids", "parent_id", "error", "extra"):
        del d[key]
    for seg in d["segments"]:
        seg.pop("token_ids")
        seg.pop("logprobs", None)
    t = Trajectory.from_dict(d)
    assert (t.prompt_ids, t.parent_id, t.error, t.extra) == ((), None, "", ())
    assert all(s.token_ids == () and s.logprobs is None for s in t.segments)


def _traj_dict():
    return copy.deepcopy(TRAJ.to_dict())


def _set(path):
    """A mutation of a trajectory dict that sets the value at `path` (keys and indices)."""

    def mutate(d, value):
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return mutate


def _delete(path):
    def mutate(d, _value):
        node = d
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]

    return mutate


TRAJ_ERRORS = [
    ("missing segments", _delete(["segments"]), None, ["q1/s0", "'segments'", "missing"]),
    ("missing id", _delete(["id"]), None, ["trajectory ?", "'id'"]),
    ("id not a string", _set(["id"]), 5, ["'id'", "str"]),
    ("segments not a list", _set(["segments"]), "abc", ["q1/s0", "'segments'", "list"]),
    ("bad finish reason", _set(["finish_reason"]), "weird", ["q1/s0", "finish_reason", "'weird'"]),
    ("bad status", _set(["tool_calls", 0, "status"]), "weird", ["q1/s0", "tool call 0", "status", "'weird'"]),
    ("bad tool", _set(["tool_calls", 1, "tool"]), "shell", ["q1/s0", "tool call 1", "'tool'", "'shell'"]),
    ("missing output", _delete(["tool_calls", 0, "output"]), None, ["tool call 0", "'output'"]),
    ("latency not a number", _set(["tool_calls", 0, "latency_s"]), "fast", ["tool call 0", "latency_s"]),
    ("segment text not str", _set(["segments", 1, "text"]), 3, ["q1/s0 segment 1", "'text'"]),
    ("trainable not bool", _set(["segments", 0, "trainable"]), 1, ["segment 0", "'trainable'", "bool"]),
    ("segment not an object", _set(["segments", 2]), "text", ["segment 2", "object"]),
    ("token_ids not ints", _set(["segments", 0, "token_ids"]), [1, "2"], ["segment 0", "token_ids"]),
    ("token_ids a string", _set(["segments", 0, "token_ids"]), "123", ["segment 0", "token_ids"]),
    ("logprobs not numbers", _set(["segments", 0, "logprobs"]), ["x"], ["segment 0", "logprobs"]),
    ("provenance missing", _delete(["provenance"]), None, ["q1/s0", "'provenance'"]),
    ("provenance not object", _set(["provenance"]), [], ["q1/s0", "'provenance'"]),
    ("temperature a string", _set(["provenance", "temperature"]), "hot", ["q1/s0 provenance", "temperature"]),
    ("temperature a bool", _set(["provenance", "temperature"]), True, ["provenance", "temperature"]),
    ("max_new_tokens a float", _set(["provenance", "max_new_tokens"]), 1.5, ["provenance", "max_new_tokens", "int"]),
    ("seed a string", _set(["provenance", "seed"]), "7", ["provenance", "'seed'"]),
    ("prompt_ids not ints", _set(["prompt_ids"]), [1.5], ["q1/s0", "prompt_ids"]),
    ("parent_id not str", _set(["parent_id"]), 3, ["q1/s0", "parent_id"]),
    ("extra not a mapping", _set(["extra"]), "x", ["q1/s0", "'extra'"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "value", "fragments"), [c[1:] for c in TRAJ_ERRORS], ids=[c[0] for c in TRAJ_ERRORS]
)
def test_trajectory_errors_name_record_and_field(mutate, value, fragments):
    d = _traj_dict()
    mutate(d, value)
    with pytest.raises(RecordError) as info:
        Trajectory.from_dict(d)
    for fragment in fragments:
        assert fragment in str(info.value)


QUERY_ERRORS = [
    ({"question": "q", "answers": ["1"]}, ["query ?", "'id'"]),
    ({"id": "q7", "answers": ["1"]}, ["query q7", "'question'", "missing"]),
    ({"id": "q7", "question": "q"}, ["query q7", "'answers'"]),
    ({"id": "q7", "question": "q", "answers": "1"}, ["query q7", "'answers'", "list"]),
    ({"id": "q7", "question": "q", "answers": [1]}, ["query q7", "'answers'", "strings"]),
    ({"id": "q7", "question": 5, "answers": ["1"]}, ["query q7", "'question'", "str"]),
    ({"id": "q7", "question": "q", "answers": ["1"], "kind": "code"}, ["query q7", "'kind'", "'code'"]),
    ({"id": True, "question": "q", "answers": ["1"]}, ["'id'", "bool"]),
]  # fmt: skip


@pytest.mark.parametrize(("data", "fragments"), QUERY_ERRORS)
def test_query_errors_name_record_and_field(data, fragments):
    with pytest.raises(RecordError) as info:
        Query.from_dict(data)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("data", [None, [], "q", 3])
def test_non_objects_are_record_errors(data):
    for cls in (Query, ToolCall, Segment, Provenance, Trajectory):
        with pytest.raises(RecordError, match="expected an object"):
            cls.from_dict(data)


def test_standalone_parts_name_themselves():
    with pytest.raises(RecordError, match=r"^tool call: field 'status'"):
        ToolCall.from_dict({"tool": "python", "input": "", "output": "", "status": "weird"})
    with pytest.raises(RecordError, match=r"^segment: missing field 'trainable'"):
        Segment.from_dict({"text": "x"})
    with pytest.raises(RecordError, match=r"^provenance: missing field 'top_p'"):
        Provenance.from_dict({"model": "m", "backend": "b", "temperature": 1.0})
    with pytest.raises(RecordError, match=r"^mine: field 'tool'"):
        ToolCall.from_dict({"tool": "bash", "input": "", "output": "", "status": "ok"}, "mine")


def test_record_error_is_a_value_error():
    assert issubclass(RecordError, ValueError)
