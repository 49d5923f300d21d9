"""Reject budgets for external input: bad records are set aside with a reason, never dropped
silently; past the budget the stage fails."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align2llava.data.records import Problem
from align2llava.errors import RejectBudgetExceeded


@dataclass
class Rejects:
    """Collects rejected records of one input file.

    budget: a fraction of the input (0.01 = 1%) when < 1, else an absolute count.
    """

    file: str
    budget: float
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, index: int | None, rid: Any, reason: str, record: Any = None) -> None:
        self.rows.append({"file": self.file, "index": index, "id": rid, "reason": reason, "record": record})

    def add_problem(self, problem: Problem, record: Any = None) -> None:
        self.add(problem.index, problem.id, problem.message, record)

    @property
    def count(self) -> int:
        return len(self.rows)

    def allowed(self, total: int) -> int:
        if self.budget < 1:
            return math.floor(self.budget * total)
        return int(self.budget)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in self.rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        return path

    def check(self, total: int, rejects_path: str | Path | None = None) -> None:
        """Raise when more than the budget was rejected; the message names the first reason."""
        allowed = self.allowed(total)
        if self.count > allowed:
            first = self.rows[0]
            where = f"record {first['index']}" + (f" (id {first['id']})" if first["id"] is not None else "")
            extra = f"; all reasons in {rejects_path}" if rejects_path else ""
            raise RejectBudgetExceeded(
                f"{self.file}: rejected {self.count:,} of {total:,} records, over the budget of "
                f"{allowed:,} (first: {where}: {first['reason']}){extra}"
            )
