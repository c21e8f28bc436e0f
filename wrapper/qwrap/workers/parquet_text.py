"""``python -m qwrap.workers.parquet_text IN.parquet OUT.txt``: a parquet ``text`` column to plain text.

Runs in the converter environment (pyarrow). WikiText rows already end with a newline (blank
rows are empty strings), so concatenating them reproduces the classic ``wiki.*.raw`` files.
The output is written to a temporary name and renamed, so a half-written file is never used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def convert(src: Path, dst: Path, *, column: str = "text") -> int:
    import pyarrow.parquet as pq

    table = pq.read_table(src, columns=[column])
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    chars = 0
    with tmp.open("w", encoding="utf-8", newline="") as out:
        for batch in table.to_batches():
            for value in batch.column(0).to_pylist():
                chars += out.write(value or "")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dst)
    return chars


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m qwrap.workers.parquet_text IN.parquet OUT.txt", file=sys.stderr)
        return 2
    chars = convert(Path(argv[0]), Path(argv[1]))
    print(f"wrote {chars} characters to {argv[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
