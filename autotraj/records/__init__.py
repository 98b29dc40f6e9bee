"""Typed records that stages exchange through JSONL files: one schema per file, in one place.

Every record is a frozen dataclass with `to_dict()` and `from_dict()`; the stage that writes a
file builds its rows from these classes, and every reader parses them with the same
`from_dict`, which checks the fields and raises `RecordError` naming the record and the field,
so a bad line in a user's file fails loudly at the boundary instead of deep inside a stage.
Sequences are tuples so a record can be hashed and never mutated after it is built.

    records/fields.py     RecordError and the field checkers (require, optional, literal, numbers)
    records/core.py       Query, Trajectory (Segment, ToolCall, Provenance): what is generated
    records/verdicts.py   QualityScore, ScoreRow (score/), RepairAttempt, Repair (repair/)
    records/training.py   Message, SftRecord, PreferencePair (build/)

`from autotraj.records import X` works for every name below.

Not here: reading or writing files (io.py, run_dir.py), grading (grading.py), scoring
(quality.py).
"""

from autotraj.records.core import (
    FinishReason,
    Provenance,
    Query,
    Segment,
    TaskKind,
    ToolCall,
    ToolName,
    ToolStatus,
    Trajectory,
)
from autotraj.records.fields import RecordError, literal, numbers, optional, require
from autotraj.records.training import Message, PreferencePair, Role, SftRecord, SftSource
from autotraj.records.verdicts import (
    LABELS,
    Label,
    QualityScore,
    Repair,
    RepairAttempt,
    RepairHow,
    RepairLabel,
    ScoreRow,
)

__all__ = [
    "LABELS",
    "FinishReason",
    "Label",
    "Message",
    "PreferencePair",
    "Provenance",
    "QualityScore",
    "Query",
    "RecordError",
    "Repair",
    "RepairAttempt",
    "RepairHow",
    "RepairLabel",
    "Role",
    "ScoreRow",
    "Segment",
    "SftRecord",
    "SftSource",
    "TaskKind",
    "ToolCall",
    "ToolName",
    "ToolStatus",
    "Trajectory",
    "literal",
    "numbers",
    "optional",
    "require",
]
