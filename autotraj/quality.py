r"""Multi-dimensional trajectory quality and the HQ / AC-LQ / AW partition (METHOD.md section 5).

What it does: scores the candidates of one query with named, weighted dimensions and labels each
one. The default weights give the release's formula

    S = 0.4 c + 0.3 l + 0.3 e

- confidence c: 0 if any closed `<think>` block contains a hedging word or phrase (whole words,
  any case), else 1. Hedging outside `<think>` does not count. The release's list is nine words
  (`flaws.RELEASE_HEDGING_WORDS`); autotraj's default (`flaws.HEDGES`) adds phrases such as "I
  think" and "not sure", which the nine words let through.
- length l = exp(-(L - L*)^2 / (2 sigma^2)), sigma = 0.5 L*, L = whitespace words of the whole
  trajectory text, L* = the shortest candidate of the same query (a singleton gets l = 1).
  Edge case (ours; the release divides by zero there): L* = 0 gives l = 1 if L == 0 else 0.
- repetition e = max(0, 1 - R), R = (sum of the counts of word trigrams occurring more than once)
  / (number of trigrams); fewer than 6 words gives e = 1. Words are compared as written (case
  and punctuation kept).

Extra dimensions (weight 0 by default: computed and reported in `components`, not scored):
- tool_validity: fraction of tool calls that ran with status "ok" and are not a repeat of an
  earlier call (same tool, same whitespace-normalized input); errors, timeouts, rejected calls
  and duplicates count against it. No tool call gives 1.
- format: 1 if `tags.check_format` accepts the full text, else 0.
- token_length: the length Gaussian on model tokens (segments' token_ids); when any candidate of
  the group lacks token ids it falls back to words (then equal to `length`).
`exclude_tool_results=True` computes confidence, length, repetition and token_length on what the
model wrote (`Trajectory.model_text`, trainable segments) instead of the whole text.

Weights must sum to 1 so that S stays in [0, 1] and the thresholds keep their meaning: to switch
a dimension on, take its weight from the others. The sum is never renormalized, so
`QualityConfig.release()` (the release's nine hedging words, no flaw rule) reproduces the
release's scores and labels bit for bit; the default differs only where a text has a hedge the
release's list lacks, or a flaw (`flawless_hq`).

Partition (per query): wrong answer -> AW; if every correct candidate has S >= hq_all (0.9) all
correct ones are HQ; else the best correct one (the first of equal bests) is HQ if S >= hq_best
(0.86), and the other correct ones are AC-LQ. With `flawless_hq` (autotraj's default; the release
has no such rule) a correct candidate with a flaw (`flaws.flaws`: a hedging phrase anywhere in
the model's text, a fragment, a repeated identical tool call, a `<result>` the model wrote) is
never HQ, whatever its S: it is AC-LQ and goes to repair. `QualityConfig.release()` is the
release's scorer exactly: its nine words and no flaw rule.

Not here: deciding correctness (grading.py), repairing (repair.py), reading or writing files.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

from autotraj.flaws import HEDGES, RELEASE_HEDGING_WORDS, flaws, hedge_regex
from autotraj.records import Label, QualityScore, Trajectory
from autotraj.tags import check_format

Dimension = Literal["confidence", "length", "repetition", "tool_validity", "format", "token_length"]
DIMENSIONS: tuple[Dimension, ...] = get_args(Dimension)

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class QualityConfig:
    """Weights of the quality dimensions and the partition thresholds."""

    weight_confidence: float = 0.4  # release
    weight_length: float = 0.3  # release
    weight_repetition: float = 0.3  # release
    weight_tool_validity: float = 0.0  # autotraj extra, off by default
    weight_format: float = 0.0  # autotraj extra, off by default
    weight_token_length: float = 0.0  # autotraj extra, off by default
    hq_all: float = 0.9  # release: every correct candidate >= 0.9 -> all HQ
    hq_best: float = 0.86  # release: else the best correct one is HQ if >= 0.86
    # autotraj: the release's nine words plus hedging phrases (release: RELEASE_HEDGING_WORDS)
    hedging_words: tuple[str, ...] = HEDGES
    length_sigma_ratio: float = 0.5  # release: sigma = 0.5 L*
    min_words_repetition: int = 6  # release: fewer than 6 words -> e = 1
    exclude_tool_results: bool = False  # release scored the whole text, tool results included
    # autotraj: a flawed correct candidate is AC-LQ, never HQ (release: no such rule)
    flawless_hq: bool = True

    def __post_init__(self) -> None:
        weights = self.weights()
        if any(w < 0 for _, w in weights):
            raise ValueError(f"quality weights must be >= 0, got {dict(weights)}")
        if abs(sum(w for _, w in weights) - 1.0) > 1e-6:
            raise ValueError(
                f"quality weights must sum to 1 (take weight from another dimension), "
                f"got {dict(weights)}"
            )
        if not self.hedging_words:
            raise ValueError("hedging_words must not be empty")
        if self.length_sigma_ratio <= 0:
            raise ValueError("length_sigma_ratio must be > 0")

    def weights(self) -> tuple[tuple[Dimension, float], ...]:
        return tuple((d, float(getattr(self, f"weight_{d}"))) for d in DIMENSIONS)

    @classmethod
    def release(cls) -> QualityConfig:
        """The release's scorer exactly (METHOD.md section 5): nine words, no flaw rule."""
        return cls(hedging_words=RELEASE_HEDGING_WORDS, flawless_hq=False)


# ---------------------------------------------------------------------------------------------
# Dimensions (pure functions of text or trajectory)


def confidence(text: str, hedging_words: Sequence[str] = HEDGES) -> float:
    """1.0 unless a closed `<think>` block holds a hedging word or phrase (whole words, any
    case): 0.0.

    >>> confidence("<think>It seems right</think> maybe")
    0.0
    >>> confidence("<think>It is right</think> maybe")
    1.0
    >>> confidence("<think>I am not sure.</think>"), confidence("<think>I am not sure.</think>", RELEASE_HEDGING_WORDS)
    (0.0, 1.0)
    """
    blocks = _THINK.findall(text)
    if blocks and hedge_regex(tuple(hedging_words)).search("\n".join(blocks)):
        return 0.0
    return 1.0


def length_score(length: int, reference: int, sigma_ratio: float = 0.5) -> float:
    """exp(-(L - L*)^2 / (2 sigma^2)), sigma = sigma_ratio * L*; L* = 0 gives 1 iff L == 0.

    >>> length_score(150, 100)  # sigma 50: exp(-2500 / 5000)
    0.6065306597126334
    """
    if reference <= 0:
        return 1.0 if length == 0 else 0.0
    sigma = sigma_ratio * reference
    return math.exp(-((length - reference) ** 2) / (2.0 * sigma * sigma))


def repetition(words: Sequence[str], min_words: int = 6) -> float:
    """max(0, 1 - R), R = (counts of repeated word trigrams) / (number of trigrams).

    >>> repetition("a b c a b c".split())  # trigrams abc bca cab abc: 2 of 4 repeated
    0.5
    """
    if len(words) < min_words:
        return 1.0
    n_trigrams = len(words) - 2
    counts = Counter(zip(words, words[1:], words[2:], strict=False))
    # trigrams in a repeated group = all trigrams minus those occurring exactly once
    repeated = n_trigrams - Counter(counts.values())[1]
    return max(0.0, 1.0 - repeated / n_trigrams)


def tool_validity(trajectory: Trajectory) -> float:
    """Fraction of tool calls that ran ("ok") and repeat no earlier call; 1.0 with no calls."""
    calls = trajectory.tool_calls
    if not calls:
        return 1.0
    seen: set[tuple[str, str]] = set()
    good = 0
    for call in calls:
        key = (call.tool, _SPACES.sub(" ", call.input).strip())
        if call.status == "ok" and key not in seen:
            good += 1
        seen.add(key)
    return good / len(calls)


def format_validity(text: str) -> float:
    """1.0 if the full trajectory text passes `tags.check_format` (release rule), else 0.0."""
    return 1.0 if check_format(text).valid else 0.0


def scored_text(trajectory: Trajectory, cfg: QualityConfig) -> str:
    """The text the text-based dimensions read: whole text, or model text only."""
    return trajectory.model_text if cfg.exclude_tool_results else trajectory.text


def length_words(trajectory: Trajectory, cfg: QualityConfig) -> int:
    """L in words (whitespace tokens of `scored_text`)."""
    return len(scored_text(trajectory, cfg).split())


def length_tokens(trajectory: Trajectory, cfg: QualityConfig) -> int | None:
    """L in model tokens from the segments' token_ids, or None if a scored segment has none."""
    total = 0
    for segment in trajectory.segments:
        if cfg.exclude_tool_results and not segment.trainable:
            continue
        if not segment.token_ids and segment.text:
            return None
        total += len(segment.token_ids)
    return total


# ---------------------------------------------------------------------------------------------
# Scores and the partition


class _Measured(NamedTuple):
    """What every dimension reads, computed once per trajectory."""

    text: str  # scored_text
    words: list[str]
    tokens: int | None


def _measure(trajectory: Trajectory, cfg: QualityConfig) -> _Measured:
    text = scored_text(trajectory, cfg)
    return _Measured(text, text.split(), length_tokens(trajectory, cfg))


def _components(
    trajectory: Trajectory,
    m: _Measured,
    cfg: QualityConfig,
    length_ref: int,
    token_length_ref: int | None,
) -> tuple[tuple[str, float], ...]:
    length = length_score(len(m.words), length_ref, cfg.length_sigma_ratio)
    if m.tokens is None or token_length_ref is None:
        token_length = length  # no token ids: fall back to words
    else:
        token_length = length_score(m.tokens, token_length_ref, cfg.length_sigma_ratio)
    full_text = trajectory.text if cfg.exclude_tool_results else m.text
    return (
        ("confidence", confidence(m.text, cfg.hedging_words)),
        ("length", length),
        ("repetition", repetition(m.words, cfg.min_words_repetition)),
        ("tool_validity", tool_validity(trajectory)),
        ("format", format_validity(full_text)),
        ("token_length", token_length),
    )


def _weighted(
    components: tuple[tuple[str, float], ...], weights: tuple[tuple[Dimension, float], ...]
) -> float:
    # Summed in DIMENSIONS order with the release dimensions first and zero weights skipped, so
    # the default is exactly 0.4 * c + 0.3 * l + 0.3 * e, evaluated left to right.
    score = 0.0
    for (_, value), (_, weight) in zip(components, weights, strict=True):
        if weight:
            score += weight * value
    return score


def partition(
    scores: Sequence[float],
    correct: Sequence[bool],
    hq_all: float = 0.9,
    hq_best: float = 0.86,
    clean: Sequence[bool] | None = None,
) -> list[Label]:
    """Labels for the candidates of one query (see the module docstring); ties: first best.
    `clean[i]` False keeps candidate i out of HQ (None: every candidate may be HQ, the release).

    >>> partition([0.95, 0.5, 0.88], [True, False, True])
    ['HQ', 'AW', 'AC-LQ']
    >>> partition([0.86, 0.7], [True, True])
    ['HQ', 'AC-LQ']
    >>> partition([0.95, 0.92], [True, True], clean=[False, True])
    ['AC-LQ', 'HQ']
    """
    if len(scores) != len(correct) or (clean is not None and len(clean) != len(scores)):
        raise ValueError(f"{len(scores)} scores but {len(correct)} correctness flags")
    labels: list[Label] = ["AW"] * len(scores)
    right = [i for i, ok in enumerate(correct) if ok]
    eligible = [i for i in right if clean is None or clean[i]]
    if not right:
        return labels
    if len(eligible) == len(right) and all(scores[i] >= hq_all for i in right):
        for i in right:
            labels[i] = "HQ"
        return labels
    for i in right:
        labels[i] = "AC-LQ"
    if eligible:
        best = max(eligible, key=lambda i: scores[i])  # max() keeps the first of equal values
        if scores[best] >= hq_best:
            labels[best] = "HQ"
    return labels


def group_length_refs(
    trajectories: Sequence[Trajectory], cfg: QualityConfig
) -> tuple[int, int | None]:
    """(L* in words, L* in tokens or None if any candidate lacks token ids) for one group."""
    return _refs([_measure(t, cfg) for t in trajectories])


def _refs(measured: Sequence[_Measured]) -> tuple[int, int | None]:
    words_ref = min(len(m.words) for m in measured)
    tokens = [m.tokens for m in measured]
    tokens_ref = None if None in tokens else min(n for n in tokens if n is not None)
    return words_ref, tokens_ref


def _check_scorable(trajectories: Sequence[Trajectory]) -> None:
    for t in trajectories:
        if t.finish_reason == "infra_error":
            raise ValueError(f"trajectory {t.id}: infrastructure failure, not scorable ({t.error})")


def score_group(
    trajectories: Sequence[Trajectory], correct: Sequence[bool], cfg: QualityConfig
) -> list[QualityScore]:
    """Score the candidates of one query (L* = the group's shortest) and label them."""
    if not trajectories:
        return []
    if len(trajectories) != len(correct):
        raise ValueError(f"{len(trajectories)} trajectories but {len(correct)} correctness flags")
    query_ids = {t.query_id for t in trajectories}
    if len(query_ids) != 1:
        raise ValueError(f"score_group needs the candidates of one query, got {sorted(query_ids)}")
    _check_scorable(trajectories)
    measured = [_measure(t, cfg) for t in trajectories]
    words_ref, tokens_ref = _refs(measured)
    parts = [
        _components(t, m, cfg, words_ref, tokens_ref)
        for t, m in zip(trajectories, measured, strict=True)
    ]
    weights = cfg.weights()
    scores = [_weighted(p, weights) for p in parts]
    found = [flaws(t, cfg.hedging_words) for t in trajectories]
    clean = [not f for f in found] if cfg.flawless_hq else None
    labels = partition(scores, correct, cfg.hq_all, cfg.hq_best, clean)
    return [
        QualityScore(t.id, t.query_id, s, p, bool(ok), label, f)
        for t, s, p, ok, label, f in zip(
            trajectories, scores, parts, correct, labels, found, strict=True
        )
    ]


def score_one(
    trajectory: Trajectory,
    cfg: QualityConfig,
    length_ref: int,
    *,
    correct: bool,
    token_length_ref: int | None = None,
) -> QualityScore:
    """Score one trajectory against a given L* (for repairs: min(original, repair) or itself).

    The label is the one a group of just this trajectory would get: AW if wrong, else HQ iff
    S >= hq_best (and, with `flawless_hq`, it has no flaw). `token_length_ref` None makes
    token_length fall back to words.
    """
    _check_scorable([trajectory])
    parts = _components(trajectory, _measure(trajectory, cfg), cfg, length_ref, token_length_ref)
    score = _weighted(parts, cfg.weights())
    found = flaws(trajectory, cfg.hedging_words)
    clean = [not found] if cfg.flawless_hq else None
    (label,) = partition([score], [correct], cfg.hq_all, cfg.hq_best, clean)
    return QualityScore(trajectory.id, trajectory.query_id, score, parts, correct, label, found)
