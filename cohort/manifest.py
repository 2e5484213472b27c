"""The manifest: one SQLite row per case in OUTPUT/manifest.sqlite, written by the driver alone.

Columns: ``name`` (the case, unique), ``identity`` (SeriesInstanceUID, or path + size + mtime),
``input``, ``format``, ``status`` (``running``, ``done``, ``failed``), ``outputs`` (JSON
{format: path}), ``error``, ``attempts`` (attempts logged by workers, across runs), ``record``
(JSON: the measurements of the cohort table), ``updated`` (Unix time). Each update is its own
transaction (SQLite's journal makes it atomic: a killed driver leaves the last committed state).
"""

import json
import sqlite3
import time
from pathlib import Path

FILE_NAME = "manifest.sqlite"
SCHEMA = """CREATE TABLE IF NOT EXISTS cases (
    name TEXT PRIMARY KEY, identity TEXT NOT NULL, input TEXT NOT NULL, format TEXT NOT NULL,
    status TEXT NOT NULL, outputs TEXT NOT NULL DEFAULT '{}', error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, record TEXT NOT NULL DEFAULT '{}', updated REAL)"""
COLUMNS = ("name", "identity", "input", "format", "status", "outputs", "error", "attempts",
           "record", "updated")


class Manifest:
    """The manifest of one output folder; rows as dicts (``outputs`` and ``record`` parsed)."""

    def __init__(self, output_dir):
        self.path = Path(output_dir) / FILE_NAME
        self.connection = sqlite3.connect(self.path, timeout=30)
        with self.connection:
            self.connection.execute(SCHEMA)

    def close(self):
        self.connection.close()

    def get(self, name):
        row = self.connection.execute(f"SELECT {', '.join(COLUMNS)} FROM cases WHERE name = ?",
                                      (name,)).fetchone()
        return self._as_dict(row) if row else None

    def rows(self):
        """Every row, sorted by name."""
        cursor = self.connection.execute(f"SELECT {', '.join(COLUMNS)} FROM cases ORDER BY name")
        return [self._as_dict(row) for row in cursor]

    def put(self, case, status, outputs=None, error=None, attempts=0, record=None):
        """Insert or replace the row of ``case`` (a ``CohortCase``)."""
        with self.connection:
            self.connection.execute(
                f"INSERT OR REPLACE INTO cases ({', '.join(COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(COLUMNS))})",
                (case.name, case.identity, str(case.path), case.format, status,
                 json.dumps(outputs or {}), error, attempts, json.dumps(record or {}),
                 time.time()))

    def mark_running(self, cases):
        """Mark ``cases`` running (in one transaction), keeping their earlier attempts; a driver
        killed now leaves them so, and a rerun segments them again."""
        with self.connection:
            for case in cases:
                row = self.connection.execute("SELECT attempts FROM cases WHERE name = ?",
                                              (case.name,)).fetchone()
                self.connection.execute(
                    f"INSERT OR REPLACE INTO cases ({', '.join(COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(COLUMNS))})",
                    (case.name, case.identity, str(case.path), case.format, "running", "{}",
                     None, row[0] if row else 0, "{}", time.time()))

    @staticmethod
    def _as_dict(row):
        entry = dict(zip(COLUMNS, row))
        entry["outputs"] = json.loads(entry["outputs"])
        entry["record"] = json.loads(entry["record"])
        return entry
