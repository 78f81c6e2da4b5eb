"""The archive's index: a JSON line per input (path, duration, language, status, error,
outputs, real-time factor, worker, and what identifies the input and options for a rerun).

Lines are appended as files finish, so an interrupted run keeps what it did; at the end
the file is rewritten with the latest line per input (atomically), and written as Parquet
too when pyarrow can be imported."""

from __future__ import annotations

import contextlib
import json
import logging
import os

from ..writers import _atomic_write, _open_temp

log = logging.getLogger("susurrus")

COLUMNS = (
    "path", "status", "error", "duration", "language", "outputs", "rtf", "worker",
    "stem", "size", "mtime_ns", "fingerprint", "attempts", "finished",
)


class Index:
    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, "index.jsonl")
        self.parquet_path = os.path.join(output_dir, "index.parquet")
        self.records: dict[str, dict] = self._load()

    def _load(self) -> dict[str, dict]:
        records: dict[str, dict] = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by a crash: that file is done again
                    if isinstance(record, dict) and isinstance(record.get("path"), str):
                        records[record["path"]] = record
        except FileNotFoundError:
            pass
        return records

    def append(self, record: dict) -> None:
        line = json.dumps({key: record.get(key) for key in COLUMNS}, ensure_ascii=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["path"]] = record

    def compact(self) -> None:
        """One line per input, sorted by path, replacing the appended log at once."""
        rows = [{key: self.records[path].get(key) for key in COLUMNS}
                for path in sorted(self.records)]

        def write(f) -> None:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

        _atomic_write(self.path, write)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return
        table = pa.Table.from_pylist(rows, schema=pa.schema([
            ("path", pa.string()), ("status", pa.string()), ("error", pa.string()),
            ("duration", pa.float64()), ("language", pa.string()),
            ("outputs", pa.list_(pa.string())), ("rtf", pa.float64()), ("worker", pa.string()),
            ("stem", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
            ("fingerprint", pa.string()), ("attempts", pa.int64()), ("finished", pa.string()),
        ]))
        fd, tmp = _open_temp(self.parquet_path)
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, self.parquet_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
