r"""What makes a trajectory unfit to train on: hedging, broken text, repeated calls, fake results.

One home for the checks that guard the training data (METHOD.md section 6: a repair is never
accepted with "a fragment left by a deletion, a hedging phrase, a repeated identical tool call, or
a `<result>` block the model wrote itself"). Every check reads only what the model wrote (the
trainable segments): tool results are the environment's words, not the model's.

- `hedges(text)`: hedging words AND phrases ("I think", "not sure", "let me recheck", ...), whole
  words, any case. `HEDGES` extends the release's nine words (`RELEASE_HEDGING_WORDS`), which
  caught "maybe" but not "I am not sure".
- `fragments(text)`: traces of words deleted from inside a sentence: an empty clause (",."), a
  doubled word ("I I should"), a subject left without its verb ("It that X", "That right", "I so
  I will", "this be 42"), a lone pronoun ("I?"), an empty `<think>`. Heuristics, built from the
  broken text a word-deleting edit really wrote (tests/test_flaws.py): they flag those, and no
  sentence of the clean trajectories the built-in tasks' solver writes.
- `repeated_calls(trajectory)`: indices of tool calls identical (same tool, same input up to
  whitespace) to an earlier call of the same trajectory.
- `written_results(trajectory)`: `<result>` tags the model wrote itself (in trainable text).
- markup: the release's format rule (`tags.check_format`: <think> tags balanced, every tool
  call closed and followed by its result, a closed <answer> with \boxed{}), so text such as
  `<think>...</th>` (written by Qwen2.5-Coder-0.5B as a teacher, with a correct answer) never
  counts as high quality.
- `flaws(trajectory)`: all of the above as short reasons, () when the trajectory is clean.

Pure functions; no I/O. Not here: scoring (quality.py, which uses `hedges` for its confidence
dimension and `flaws` to keep flawed trajectories out of HQ), editing (edits.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from autotraj.records import Trajectory
from autotraj.tags import check_format

# Release hedging words (METHOD.md section 5).
RELEASE_HEDGING_WORDS: tuple[str, ...] = (
    "maybe",
    "unsure",
    "guess",
    "seems",
    "perhaps",
    "probably",
    "might",
    "likely",
    "recheck",
)
# autotraj's default list: the release words plus words and phrases of doubt, of second-guessing
# and of redundant re-checking (ours; every entry is matched as whole words, any case).
HEDGES: tuple[str, ...] = (
    *RELEASE_HEDGING_WORDS,
    "seem",
    "seemed",
    "possibly",
    "presumably",
    "apparently",
    "hmm",
    "uncertain",
    "unclear",
    "i think",
    "i believe",
    "i suppose",
    "not sure",
    "not certain",
    "not confident",
    "if i am not mistaken",
    "if i'm not mistaken",
    "could be wrong",
    "i misread",
    "made a mistake",
    "double-check",
    "double check",
    "check it again",
    "check again",
    "check the passage twice",
    "let me check",
    "let me verify",
)

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
# Tool inputs and the answer block are not prose: code and queries have their own punctuation.
_NOT_PROSE = re.compile(r"<(code|python|search|answer)>.*?(?:</\1>|$)", re.DOTALL)
_SPACES = re.compile(r"\s+")
_RESULT_TAG = re.compile(r"</?result>")

# Each pattern is a trace of a deletion inside a sentence; the name says which.
_FRAGMENT_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("empty clause", re.compile(r"[,;:]\s*[.?!]|[.?!]\s*[,;]|\(\s*\)")),
    ("space before punctuation", re.compile(r"[^\s] +[,.;:?!](?:\s|$)")),
    ("doubled word", re.compile(r"\b([A-Za-z]+)\s+\1\b", re.IGNORECASE)),
    ("verbless subject", re.compile(r"\b(?:It|it)\s+(?:that|the|a|an)\b")),
    (
        "verbless subject",
        re.compile(r"\b(?:It|That|This)\s+(?:right|fine|correct|wrong|good|okay|true|false)\b"),
    ),
    ("verbless subject", re.compile(r"\b(?:this|that|it|he|she|they|we|you|I)\s+be\b", re.I)),
    ("verbless subject", re.compile(r"\bI\s+(?:so|the|an|that|it|right|fine|sure)\b")),
    ("lone pronoun", re.compile(r"(?:^|[\s,;])I\s*[?.!,;]")),
    ("missing verb", re.compile(r"\b(?:let me|I will|I should|I can)\s+(?:the|a|an)\b", re.I)),
    ("empty think", re.compile(r"<think>\s*</think>")),
    ("clause starts with punctuation", re.compile(r"<think>\s*[,.;:?!]")),
)


@lru_cache(maxsize=16)
def hedge_regex(phrases: tuple[str, ...]) -> re.Pattern[str]:
    """One regex for whole-word, case-insensitive matches of any of `phrases` (longest first)."""
    if not phrases:
        raise ValueError("the hedging list must not be empty")
    ordered = sorted({p.lower() for p in phrases}, key=len, reverse=True)
    alternatives = "|".join(r"\s+".join(re.escape(w) for w in p.split()) for p in ordered)
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


def hedges(text: str, phrases: Sequence[str] = HEDGES) -> list[str]:
    """Every hedging word or phrase in `text`, lowercased, in order.

    >>> hedges("I am not sure. Maybe it is 12; it seems right.")
    ['not sure', 'maybe', 'seems']
    >>> hedges("The result is 12.")
    []
    """
    return [
        _SPACES.sub(" ", m.group(0).lower()) for m in hedge_regex(tuple(phrases)).finditer(text)
    ]


def think_hedges(text: str, phrases: Sequence[str] = HEDGES) -> list[str]:
    """The hedges inside closed `<think>` blocks only (the release's confidence reads these)."""
    return hedges("\n".join(_THINK.findall(text)), phrases)


def prose(text: str) -> str:
    """`text` without its tool inputs and answer block (each left as its bare tag).

    >>> prose("<think>Add.</think>\\n<code>\\nprint(1 , 2)\\n</code>")
    '<think>Add.</think>\\n<code>'
    """
    return _NOT_PROSE.sub(lambda m: f"<{m.group(1)}>", text)


def fragments(text: str) -> list[str]:
    """Traces of a deletion inside a sentence, as "kind: 'snippet'" strings (read it on
    `prose(text)`: code and queries have their own punctuation).

    >>> fragments("<think>It that Thigodu is a city in Gauthauland, I.</think>")
    ["verbless subject: 'It that'", "lone pronoun: ' I.'"]
    >>> fragments("<think>Thigodu is a city in Gauthauland. So the answer is Gauthauland.</think>")
    []
    """
    found = []
    for kind, pattern in _FRAGMENT_PATTERNS:
        found.extend(f"{kind}: {m.group(0)!r}" for m in pattern.finditer(text))
    return found


def call_key(tool: str, tool_input: str) -> tuple[str, str]:
    """What makes two tool calls the same call: the tool and its input up to whitespace."""
    return tool, _SPACES.sub(" ", tool_input).strip()


def repeated_calls(trajectory: Trajectory) -> list[int]:
    """Indices of the tool calls that repeat an earlier call of the same trajectory."""
    seen: set[tuple[str, str]] = set()
    repeats = []
    for i, call in enumerate(trajectory.tool_calls):
        key = call_key(call.tool, call.input)
        if key in seen:
            repeats.append(i)
        seen.add(key)
    return repeats


def written_results(trajectory: Trajectory) -> int:
    """How many `<result>`/`</result>` tags the model wrote itself (0 for a sound trajectory)."""
    return len(_RESULT_TAG.findall(trajectory.model_text))


def flaws(
    trajectory: Trajectory, phrases: Sequence[str] = HEDGES, complete: bool = True
) -> tuple[str, ...]:
    """Why `trajectory` must not be trained on as a good example; () when it is clean.
    `complete=False`: a prefix cut before the answer, so the answer rule of the markup check is
    left out."""
    text = prose(trajectory.model_text)
    out = [f"hedging: {h!r}" for h in dict.fromkeys(hedges(text, phrases))]
    out += [f"fragment: {f}" for f in fragments(text)]
    out += [f"repeated tool call {i}" for i in repeated_calls(trajectory)]
    if n := written_results(trajectory):
        out.append(f"model-written <result> tags: {n}")
    out += [f"markup: {r}" for r in check_format(trajectory.text, answer=complete).reasons]
    return tuple(out)
