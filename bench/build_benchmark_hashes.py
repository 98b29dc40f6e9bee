"""Regenerate autotraj/data/benchmark_questions.txt: one sha256 per normalized benchmark question.

The package ships only these digests, never the benchmark texts, so `load_eval_hashes()` can
decontaminate training queries offline. Run it after changing `normalize_question` or to add
evaluation sets (any source `load_queries` accepts: files, folders, known names, Hub ids):

    python bench/build_benchmark_hashes.py ../shared/data/benchmarks/*.jsonl
    python bench/build_benchmark_hashes.py ../shared/data/benchmarks/*.jsonl my_eval.jsonl
    python bench/build_benchmark_hashes.py --check ../shared/data/benchmarks/*.jsonl

A folder argument stands for every .jsonl/.json/.parquet file directly inside it.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

from autotraj.io import DataError
from autotraj.querysets import FILE_FORMATS, load_queries, question_hash, read_hash_lines

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "autotraj" / "data" / "benchmark_questions.txt"


def expand(sources: list[str]) -> list[str]:
    """Folders that are not save_to_disk datasets become the data files inside them."""
    out = []
    for source in sources:
        path = Path(source)
        saved = any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json"))
        if path.is_dir() and not saved:
            out += sorted(str(p) for p in path.iterdir() if p.suffix in FILE_FORMATS)
        else:
            out.append(source)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="benchmark files, folders, known names")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="hash file to write")
    parser.add_argument(
        "--check", action="store_true", help="only compare with --out; exit 1 when they differ"
    )
    args = parser.parse_args()

    hashes: set[str] = set()
    header = [
        "# sha256 of normalize_question(question) for every evaluation question (autotraj.querysets)",
        "# regenerate with bench/build_benchmark_hashes.py; lines starting with # are comments",
    ]
    try:
        for source in expand(args.sources):
            found = {question_hash(q.question) for q in load_queries(source)}
            header.append(f"# {Path(source).name}: {len(found)} questions")
            hashes |= found
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header.append(f"# {len(hashes)} distinct digests, {date.today().isoformat()}")

    if args.check:
        shipped = read_hash_lines(args.out.read_text(encoding="utf-8").splitlines(), str(args.out))
        if shipped == hashes:
            print(f"{args.out}: up to date ({len(hashes)} digests)")
            return 0
        print(
            f"{args.out}: differs: {len(hashes - shipped)} missing, {len(shipped - hashes)} extra",
            file=sys.stderr,
        )
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + sorted(hashes)) + "\n", encoding="utf-8")
    print(f"wrote {len(hashes)} digests to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
