"""Bad input records: where they are, why they were skipped, and how many.

A ``Problem`` names the file and line (or parquet row) of one record that was skipped.
``ProblemLog`` prints the first few, counts all of them by kind, and with ``strict`` turns
the first one into a hard stop. ``InputError`` is for problems that end the run whatever
``strict`` says (missing file, unreadable JSON array, absent parquet column...).
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass


class InputError(Exception):
    """Input that cannot be processed at all; the message names file and position."""


class RecordError(Exception):
    """Raised by record handlers: ``kind`` is a short category, ``detail`` the specifics."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(kind if not detail else f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass
class Problem:
    source: str
    line: int
    kind: str
    detail: str = ""
    unit: str = "line"  # "line" for json/jsonl/txt, "row" for parquet, "record" in a JSON array

    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.unit == "line" else \
            f"{self.source}: {self.unit} {self.line}"

    def __str__(self) -> str:
        return f"{self.where()}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


class StrictStop(InputError):
    pass


class ProblemLog:
    """Counts skipped records and prints the first ``max_print``. Until the first good record
    is ``accept``ed the lines are held back: input where every record is bad then ends in
    one error line (``nothing_left``) naming the first problem, not a screenful."""

    def __init__(self, strict: bool = False, max_print: int = 20, stream=None, write=None):
        self.strict = strict
        self.max_print = max_print
        self.counts: Counter = Counter()
        self.first = None  # the first Problem
        self.accepted = False
        self._held: list = []
        self._write = write or (lambda msg: print(msg, file=stream or sys.stderr, flush=True))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, problem: Problem) -> None:
        if self.strict:
            raise StrictStop(f"{problem} [--strict: stopping at the first bad record]")
        self.counts[problem.kind] += 1
        if self.first is None:
            self.first = problem
        if self.total <= self.max_print:
            self._emit(f"skipped {problem}")
        elif self.total == self.max_print + 1:
            self._emit("(more skipped records are only counted; summary at the end)")

    def _emit(self, msg: str) -> None:
        if self.accepted:
            self._write(msg)
        else:
            self._held.append(msg)

    def accept(self) -> None:
        """A good record went through: print what was held back, print from now on."""
        if not self.accepted:
            self.accepted = True
            for msg in self._held:
                self._write(msg)
            self._held = []

    def summary(self) -> str:
        if not self.counts:
            return "skipped 0 records"
        parts = ", ".join(f"{n} {kind}" for kind, n in self.counts.most_common())
        return f"skipped {self.total} record{'s' if self.total != 1 else ''}: {parts}"

    def nothing_left(self, what: str, files) -> InputError:
        """The error for a run that found no good record in ``files`` (``what``: e.g.
        "documents to write")."""
        files = list(files)
        names = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        if not self.total:
            return InputError(f"no {what}: {names} holds no records (empty input)")
        return InputError(f"no {what}: every record of {names} was skipped "
                          f"({self.summary()}; the first: {self.first})")
