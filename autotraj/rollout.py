"""THE multi-turn tool loop, batched over many trajectories at once (METHOD.md section 1).

`rollout()` advances every active trajectory together: one batched generation call continues
all of them until a closed tool tag, a closed answer, the end of turn or a token budget; then all
pending tool calls run concurrently (one batch per tool, tools in parallel); each result is
appended as tokens (token-in, token-out: decoded text is never re-tokenized) and marked not
trainable; the loop repeats until no trajectory is active.

Limits (release values, METHOD.md section 1): at most 3 tool calls per trajectory, code and
search counted together; a 4th call is recorded as `rejected`, not executed, and ends the
trajectory (`tool_limit`).

Infrastructure failures end trajectories with finish reason `infra_error` and the cause in
`error`; they are never scored as wrong answers (stages drop or exclude them, see
docs/reliability.md). A tool failure (`ToolInfraError`) ends the trajectories whose calls were in
the failed batch. A generator failure (`GeneratorError`, raised by a backend after its own
retries) ends every trajectory still generating in that call, with `error` starting with
`GENERATOR_FAILURE` (`generator_failed(t)`); trajectories that finished earlier keep their
results, so the stage can write them and stop.

Not here: sampling strategy per stage (synthesize.py, repair.py, train/), grading, scoring.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from autotraj.models.generator import Completion, GenerationRequest, Generator, GeneratorError
from autotraj.records import (
    FinishReason,
    Provenance,
    Query,
    Segment,
    ToolCall,
    ToolName,
    Trajectory,
)
from autotraj.render import Tokenizer, demonstration_messages, render_messages, render_prompt
from autotraj.tags import ANSWER_STOP, STOP_STRINGS, TOOL_STOPS, find_tool_call, result_text
from autotraj.tools.tool import Tool, ToolInfraError

log = logging.getLogger(__name__)

# Backends that return the generated token ids; the others (HTTP endpoints) return text only.
TOKEN_BACKENDS = frozenset({"transformers", "vllm", "scripted"})
# `Trajectory.error` of a trajectory ended by a generator failure starts with this.
GENERATOR_FAILURE = "generator: "


def generator_failed(trajectory: Trajectory) -> bool:
    """True when `trajectory` ended because the generator failed (not a tool)."""
    return trajectory.finish_reason == "infra_error" and trajectory.error.startswith(
        GENERATOR_FAILURE
    )


@dataclass(frozen=True)
class RolloutConfig:
    max_tool_calls: int = 3  # release: at most 3 tool calls, code and search together
    max_new_tokens: int = 1024  # release: per generated segment in synthesis/eval
    max_response_tokens: int = 4096  # whole assistant turn, tool-result tokens included (RL: 2048)
    temperature: float = 0.3  # release synthesis sampling
    top_p: float = 0.9  # release synthesis sampling
    seed: int | None = 0
    system_prompt: str | None = None  # None: the packaged protocol prompt (prompts/system.txt)
    # Worked examples shown as earlier chat turns (0 = the standard zero-shot prompt, as
    # released). Only for generation by a teacher that needs them; training re-renders the
    # trajectory with the standard prompt.
    demonstrations: int = 0
    # End a trajectory (finish reason `tool_errors`) after this many tool calls in a row that
    # errored or timed out (malformed call, unavailable tool, code that raised or hung); its
    # result is shown, then the trajectory is kept as data. 0: no cap (the release has none;
    # its 3-call limit bounds the loop).
    max_consecutive_invalid_calls: int = 0


@dataclass
class _State:
    """Mutable progress of one trajectory inside the loop (never leaves this module)."""

    id: str
    query: Query
    prompt_text: str
    prompt_ids: tuple[int, ...]
    segments: list[Segment] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    used_tokens: int = 0
    finish: FinishReason | None = None
    error: str = ""

    def context_text(self) -> str:
        return self.prompt_text + "".join(s.text for s in self.segments)

    def context_ids(self) -> tuple[int, ...]:
        ids = list(self.prompt_ids)
        for s in self.segments:
            ids.extend(s.token_ids)
        return tuple(ids)


def _request_seed(seed: int | None, trajectory_id: str, turn: int) -> int | None:
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}/{trajectory_id}/{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _token_count(tokenizer: Tokenizer, segment: Segment) -> int:
    if segment.token_ids:
        return len(segment.token_ids)
    return len(tokenizer.encode(segment.text, add_special_tokens=False))


def rollout(
    generator: Generator,
    tools: Mapping[ToolName, Tool],
    tokenizer: Tokenizer,
    items: Sequence[tuple[str, Query]],
    cfg: RolloutConfig,
    role: str = "policy",
    progress: Callable[[int], None] | None = None,
    messages: Sequence[Sequence[dict[str, str]]] | None = None,
    starts: Sequence[tuple[Sequence[Segment], Sequence[ToolCall]]] | None = None,
) -> list[Trajectory]:
    """Roll out one trajectory per (trajectory id, query) item; results keep the input order.

    `tokenizer` renders the prompt (chat template) and tokenizes tool results; `progress` is
    called with the number of trajectories that finished in each round. `messages`, one
    conversation per item, replaces the standard prompt (the repair stage shows the repairer
    its instructions and the trajectory to repair this way). `starts`, one per item: segments
    (and the tool calls whose results they hold) that the assistant turn already begins with,
    generation continues after them: a prefill such as "<think>", or a prefix of an earlier
    trajectory (the repair stage's "continue" strategy). Their token ids are taken as given, or
    encoded with `tokenizer` when empty; they count towards the budgets and the tool-call limit
    and are part of the returned trajectory.
    """
    if messages is not None and len(messages) != len(items):
        raise ValueError(f"{len(messages)} conversations for {len(items)} rollout items")
    if starts is not None and len(starts) != len(items):
        raise ValueError(f"{len(starts)} starts for {len(items)} rollout items")
    token_mode = generator.backend in TOKEN_BACKENDS
    states = []
    for i, (traj_id, query) in enumerate(items):
        if messages is not None:
            text, ids = render_messages(tokenizer, messages[i])
        elif cfg.demonstrations:
            conversation = demonstration_messages(
                query.question, query.kind, cfg.demonstrations, cfg.system_prompt
            )
            text, ids = render_messages(tokenizer, conversation)
        else:
            text, ids = render_prompt(tokenizer, query.question, cfg.system_prompt)
        state = _State(traj_id, query, text, ids if token_mode else ())
        if starts is not None:
            _begin(state, starts[i], tokenizer, token_mode)
        states.append(state)
    # A trajectory's prompt_ids are those of the standard prompt or empty (the renderer then
    # builds the standard prompt): never a repair or demonstration prompt.
    standard = messages is None and not cfg.demonstrations
    turn = 0
    while active := [s for s in states if s.finish is None]:
        try:
            completions = generator.generate([_request(s, cfg, turn, token_mode) for s in active])
        except GeneratorError as e:
            log.warning(
                "generator %s failed for %d trajectories: %s", generator.name, len(active), e
            )
            for state in active:
                state.finish, state.error = "infra_error", f"{GENERATOR_FAILURE}{e}"
            if progress is not None:
                progress(len(active))
            break
        if len(completions) != len(active):
            raise RuntimeError(
                f"generator returned {len(completions)} completions for {len(active)} requests"
            )
        pending: list[tuple[_State, ToolName, str]] = []
        for state, completion in zip(active, completions, strict=True):
            call = _absorb(state, completion, tokenizer, cfg)
            if call is None:
                continue
            if call[1] is None:  # a closing tool tag without its opening tag: tell the model
                _append_result(
                    state,
                    ToolCall(
                        tool=call[0],
                        input="",
                        status="error",
                        output="Error: tool call without an opening tag",
                    ),
                    tokenizer,
                    token_mode,
                    cfg,
                )
            else:
                pending.append((state, call[0], call[1]))
        _run_tools(pending, tools, tokenizer, token_mode, cfg)
        turn += 1
        if progress is not None:
            progress(sum(1 for s in active if s.finish is not None))
    provenance = Provenance(
        model=generator.name,
        backend=generator.backend,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        role=role,
    )
    return [
        Trajectory(
            id=s.id,
            query_id=s.query.id,
            segments=tuple(s.segments),
            tool_calls=tuple(s.calls),
            finish_reason=s.finish or "length",
            provenance=provenance,
            prompt_ids=s.prompt_ids if standard else (),
            error=s.error,
        )
        for s in states
    ]


def _begin(
    state: _State,
    start: tuple[Sequence[Segment], Sequence[ToolCall]],
    tokenizer: Tokenizer,
    token_mode: bool,
) -> None:
    """Put the given opening segments and tool calls into a fresh trajectory."""
    segments, calls = start
    for segment in segments:
        if token_mode and not segment.token_ids:
            ids = tuple(tokenizer.encode(segment.text, add_special_tokens=False))
            segment = Segment(segment.text, segment.trainable, token_ids=ids)
        elif not token_mode and segment.token_ids:
            segment = Segment(segment.text, segment.trainable)
        state.segments.append(segment)
        state.used_tokens += _token_count(tokenizer, segment)
    state.calls.extend(calls)


def _request(state: _State, cfg: RolloutConfig, turn: int, token_mode: bool) -> GenerationRequest:
    budget = min(cfg.max_new_tokens, cfg.max_response_tokens - state.used_tokens)
    return GenerationRequest(
        prompt_text=state.context_text(),
        prompt_ids=state.context_ids() if token_mode else (),
        max_new_tokens=budget,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop=STOP_STRINGS,
        seed=_request_seed(cfg.seed, state.id, turn),
        # after a tool call that will run, this context comes back with the result appended
        resume_after=TOOL_STOPS if len(state.calls) < cfg.max_tool_calls else (),
    )


def _absorb(
    state: _State, completion: Completion, tokenizer: Tokenizer, cfg: RolloutConfig
) -> tuple[ToolName, str | None] | None:
    """Append a completion to its trajectory; return the tool call to run, if any.

    The input is None for a malformed call (a closing tag with no opening tag).
    """
    segment = Segment(
        text=completion.text,
        trainable=True,
        token_ids=completion.token_ids,
        logprobs=completion.logprobs,
    )
    state.segments.append(segment)
    state.used_tokens += _token_count(tokenizer, segment)
    if completion.stop_reason == "eos":
        state.finish = "answer" if ANSWER_STOP in completion.text else "eos"
        return None
    if completion.stop_reason == "length" or state.used_tokens >= cfg.max_response_tokens:
        state.finish = "length"
        return None
    if completion.text.rstrip().endswith(ANSWER_STOP):
        state.finish = "answer"
        return None
    call = find_tool_call(completion.text)
    tool: ToolName = call.tool if call else "python"
    if len(state.calls) >= cfg.max_tool_calls:
        state.calls.append(
            ToolCall(tool=tool, input=call.input if call else "", output="", status="rejected")
        )
        state.finish = "tool_limit"
        return None
    return tool, call.input if call else None


def _run_tools(
    pending: list[tuple[_State, ToolName, str]],
    tools: Mapping[ToolName, Tool],
    tokenizer: Tokenizer,
    token_mode: bool,
    cfg: RolloutConfig,
) -> None:
    """Run every pending call (one batch per tool, tools concurrently) and append the results."""
    by_tool: dict[ToolName, list[int]] = {}
    for i, (_, name, _) in enumerate(pending):
        by_tool.setdefault(name, []).append(i)
    results: dict[int, ToolCall] = {}
    failures: dict[int, str] = {}

    def run(name: ToolName, indices: list[int]) -> None:
        inputs = [pending[i][2] for i in indices]
        if name not in tools:
            for i, text in zip(indices, inputs, strict=True):
                results[i] = ToolCall(
                    tool=name,
                    input=text,
                    status="error",
                    output=f"Error: the {name} tool is not available",
                )
            return
        start = time.perf_counter()
        try:
            calls = tools[name].run_batch(inputs)
        except ToolInfraError as e:
            log.warning("%s tool failed for %d calls: %s", name, len(indices), e)
            failures.update(dict.fromkeys(indices, f"{name}: {e}"))
            return
        if len(calls) != len(indices):
            raise RuntimeError(
                f"{name} tool returned {len(calls)} results for {len(indices)} calls"
            )
        log.debug("%s: %d calls in %.3fs", name, len(calls), time.perf_counter() - start)
        results.update(zip(indices, calls, strict=True))

    with ThreadPoolExecutor(max_workers=max(1, len(by_tool))) as pool:
        for future in [pool.submit(run, name, idx) for name, idx in by_tool.items()]:
            future.result()
    for i, (state, _, _) in enumerate(pending):
        if i in failures:
            state.finish, state.error = "infra_error", failures[i]
            continue
        _append_result(state, results[i], tokenizer, token_mode, cfg)


def _append_result(
    state: _State, call: ToolCall, tokenizer: Tokenizer, token_mode: bool, cfg: RolloutConfig
) -> None:
    """Record a tool call and append its result block as a non-trainable segment."""
    state.calls.append(call)
    body = result_text(call.output)
    ids = tuple(tokenizer.encode(body, add_special_tokens=False)) if token_mode else ()
    segment = Segment(text=body, trainable=False, token_ids=ids)
    state.segments.append(segment)
    state.used_tokens += len(ids) if ids else _token_count(tokenizer, segment)
    if state.used_tokens >= cfg.max_response_tokens:
        state.finish = "length"
    elif cap := cfg.max_consecutive_invalid_calls:
        recent = state.calls[-cap:]
        if len(recent) == cap and all(c.status in ("error", "timeout") for c in recent):
            state.finish = "tool_errors"
