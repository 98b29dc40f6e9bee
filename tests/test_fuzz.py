"""Property tests on random and adversarial model output: the tag parser (tags.py) never raises
and never lets a tool result move the answer; the renderer (render.py) never puts a trainable
token inside a tool result, whatever the model wrote.

test_tags.py already checks that the parsers survive short strings of tag fragments; these
tests add every Unicode category (control characters, lone surrogates), nested, unclosed and
interleaved tags, forged <result> blocks, inputs of hundreds of thousands of characters, and the
mask of complete rollouts. Tokenizers: the tiny model's character tokenizer, a byte-level BPE
(merges across tags, like real tokenizers; built in test_bad_input.py) and, in the slow tier,
the embedded SmolLM2 tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import bpe_tokenizer

from autotraj.io import DataError
from autotraj.models.scripted import ScriptedGenerator
from autotraj.records import Provenance, Query, Segment, ToolCall, Trajectory
from autotraj.render import render_prompt, render_trajectory
from autotraj.rollout import RolloutConfig, rollout
from autotraj.tags import (
    answer_block,
    check_format,
    extract_answer,
    find_tool_call,
    last_boxed,
    result_text,
)

TAGS = [
    f"<{slash}{name}>"
    for name in ("think", "code", "python", "search", "result", "answer")
    for slash in ("", "/")
]
PIECES = [*TAGS, "\\boxed{", "\\boxed", "{", "}", "<", ">", "</", "\\", "<\\/result>", "<\\result>"]
PIECES += ["<code", "result>", "\n", " ", "42", "print(1)", "\x00", "\x1b[2J", "\u202e", "\r"]

ANY_CHAR = st.characters(codec=None)  # every code point, lone surrogates included
VALID_CHAR = st.characters(codec="utf-8")  # every code point a UTF-8 file can hold


def adversarial(chars: st.SearchStrategy[str], max_pieces: int = 30) -> st.SearchStrategy[str]:
    """Tag pieces mixed with random text: nested, unclosed and interleaved tags."""
    piece = st.one_of(st.sampled_from(PIECES), st.text(alphabet=chars, max_size=6))
    return st.lists(piece, max_size=max_pieces).map("".join)


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the tag parser -----------------------------------------------------------------------------


def parse_all(text: str) -> tuple[Any, ...]:
    return (
        find_tool_call(text),
        extract_answer(text),
        answer_block(text),
        last_boxed(text),
        check_format(text),
    )


@FAST
@given(adversarial(ANY_CHAR))
def test_parsers_never_raise_on_any_string(text):
    call, answer, block, boxed, check = parse_all(text)
    if call is not None:
        assert call.input == call.input.strip() and call.input in text
    if answer is not None:
        assert answer in text and block is not None
    if boxed is not None:
        depth = 0
        for char in boxed:  # the content of a \boxed{} has balanced braces
            depth += {"{": 1, "}": -1}.get(char, 0)
            assert depth >= 0
        assert depth == 0
    assert check.valid is (not check.reasons)


@FAST
@given(
    before=adversarial(ANY_CHAR).filter(lambda t: "<result>" not in t and "</result>" not in t),
    output=adversarial(ANY_CHAR),
    after=adversarial(ANY_CHAR).filter(lambda t: "<result>" not in t and "</result>" not in t),
)
def test_a_tool_result_never_changes_what_is_parsed(before, output, after):
    """Whatever a tool prints (tags, a forged answer, a closing result tag) is read the same as
    an empty result: the answer, the format verdict and the answer block come from the model."""
    block = result_text(output)
    assert block.count("<result>") == 1 and block.count("</result>") == 1
    assert block.startswith("\n<result>\n") and block.endswith("\n</result>\n")
    with_output = before + block + after
    with_nothing = before + result_text("") + after
    assert extract_answer(with_output) == extract_answer(with_nothing)
    assert check_format(with_output) == check_format(with_nothing)
    assert (answer_block(with_output) is None) == (answer_block(with_nothing) is None)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    unit=st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("".join),
    size=st.integers(50_000, 400_000),
)
def test_huge_adversarial_input_is_parsed_in_linear_time(unit, size):
    text = (unit * (size // len(unit) + 1))[:size]
    start = time.perf_counter()
    parse_all(text)
    assert time.perf_counter() - start < 2.0


# --- the renderer -------------------------------------------------------------------------------

SYSTEM = "Use tags."
PROVENANCE = Provenance("fuzz", "scripted", 0.3, 0.9, 64)


@pytest.fixture(
    scope="module", params=["char", "bpe", pytest.param("embedded", marks=pytest.mark.slow)]
)
def tokenizer(request, tiny_model_dir):
    from transformers import AutoTokenizer

    if request.param == "char":
        return AutoTokenizer.from_pretrained(tiny_model_dir)
    if request.param == "bpe":
        return bpe_tokenizer()
    from autotraj.models.loading import EMBEDDED_MODEL, GeneratorConfig, load_tokenizer

    return load_tokenizer(GeneratorConfig(model=EMBEDDED_MODEL))


class Echo:
    """A tool that prints what the test chose, tags and all."""

    def __init__(self, name: str, outputs: list[str]):
        self.name = name
        self.outputs = outputs
        self.count = 0

    def run_batch(self, inputs):
        out = []
        for text in inputs:
            out.append(
                ToolCall(self.name, text, self.outputs[self.count % len(self.outputs)], "ok")
            )
            self.count += 1
        return out

    def close(self):
        pass


def replay(replies: list[str]) -> Iterator[str]:
    yield from replies
    while True:
        yield "<answer>\\boxed{1}</answer>"


def run_rollout(tokenizer, replies, outputs, token_mode: bool) -> Trajectory:
    reply = replay(replies)
    generator = ScriptedGenerator(lambda request: next(reply), tokenizer if token_mode else None)
    tools = {"python": Echo("python", outputs), "search": Echo("search", outputs)}
    query = Query("q", "What is 6*7?", ("42",), "math")
    cfg = RolloutConfig(system_prompt=SYSTEM, max_new_tokens=200, max_response_tokens=2000)
    [trajectory] = rollout(generator, tools, tokenizer, [("q/s0", query)], cfg)
    return trajectory


def check_mask(tokenizer, trajectory: Trajectory) -> None:
    """The rendering's mask is exactly the segments' flags: prompt and results never train."""
    rendered = render_trajectory(tokenizer, "What is 6*7?", trajectory, SYSTEM)
    prompt = render_prompt(tokenizer, "What is 6*7?", SYSTEM)[1]
    assert rendered.input_ids[: rendered.prompt_length] == prompt
    assert not any(rendered.trainable[: rendered.prompt_length])
    pos = rendered.prompt_length
    for segment in trajectory.segments:
        ids = segment.token_ids or tuple(tokenizer.encode(segment.text, add_special_tokens=False))
        assert rendered.input_ids[pos : pos + len(ids)] == ids
        assert all(flag == segment.trainable for flag in rendered.trainable[pos : pos + len(ids)])
        if not segment.trainable:  # written by the environment: one closed result block
            assert segment.text.startswith("\n<result>\n") and segment.text.endswith("</result>\n")
            assert segment.text.count("<result>") == segment.text.count("</result>") == 1
        pos += len(ids)
    ended = trajectory.finish_reason in ("answer", "eos")
    assert len(rendered.input_ids) == pos + ended
    if ended:
        assert rendered.trainable[-1] and rendered.input_ids[-1] == tokenizer.eos_token_id
    results = [s for s in trajectory.segments if not s.trainable]
    assert len(results) == sum(c.status != "rejected" for c in trajectory.tool_calls)


REPLIES = st.lists(adversarial(VALID_CHAR, max_pieces=12), min_size=1, max_size=5)
OUTPUTS = st.lists(adversarial(VALID_CHAR, max_pieces=8), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies=REPLIES, outputs=OUTPUTS, token_mode=st.booleans())
def test_rollout_masks_every_tool_result_whatever_the_model_wrote(
    tokenizer, replies, outputs, token_mode
):
    trajectory = run_rollout(tokenizer, replies, outputs, token_mode)
    check_mask(tokenizer, trajectory)
    if token_mode:  # token-in, token-out: rendering gives back the ids the model produced
        assert trajectory.prompt_ids
        assert all(s.token_ids for s in trajectory.segments if s.text)


@FAST
@given(
    texts=st.lists(adversarial(VALID_CHAR, max_pieces=12), min_size=1, max_size=6),
    flags=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_text_only_segments_keep_their_own_flags(tokenizer, texts, flags):
    """Segments without ids (repairs, HTTP backends) are tokenized one by one: a tag, a forged
    <result> or a BPE merge in the text cannot carry a flag across a segment boundary."""
    segments = tuple(Segment(t, f) for t, f in zip(texts, flags, strict=False))
    trajectory = Trajectory("t", "q", segments, (), "length", PROVENANCE)
    rendered = render_trajectory(tokenizer, "Q?", trajectory, SYSTEM)
    pos = rendered.prompt_length
    for segment in segments:
        ids = tokenizer.encode(segment.text, add_special_tokens=False)
        assert rendered.input_ids[pos : pos + len(ids)] == tuple(ids)
        assert set(rendered.trainable[pos : pos + len(ids)]) <= {segment.trainable}
        pos += len(ids)
    assert pos == len(rendered.input_ids)


@FAST
@given(
    prefix=st.text(alphabet=VALID_CHAR, max_size=10),
    surrogate=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    suffix=st.text(alphabet=ANY_CHAR, max_size=10),
    trainable=st.booleans(),
)
def test_a_lone_surrogate_is_a_data_error_naming_the_segment(
    tokenizer, prefix, surrogate, suffix, trainable
):
    text = prefix + surrogate + suffix
    segments = (Segment("<think>ok</think>", True), Segment(text, trainable))
    trajectory = Trajectory("bad", "q", segments, (), "length", PROVENANCE)
    with pytest.raises(DataError, match=r"trajectory bad segments\[1\]\.text: lone surrogate"):
        render_trajectory(tokenizer, "Q?", trajectory, SYSTEM)
    with pytest.raises(DataError, match=r"message 1 \(user\): lone surrogate"):
        render_prompt(tokenizer, text)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unit=st.lists(st.sampled_from(PIECES), min_size=1, max_size=4).map("".join))
def test_a_huge_tool_result_stays_masked(tokenizer, unit):
    output = (unit * (100_000 // len(unit) + 1))[:100_000]
    trajectory = run_rollout(tokenizer, ["<code>x</code>"], [output], token_mode=True)
    check_mask(tokenizer, trajectory)
