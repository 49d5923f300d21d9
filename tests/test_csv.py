"""One CSV writer (data.io.write_csv): the committed plots and reports come out byte for byte."""

from __future__ import annotations

import csv
import io

import pytest

from align2llava.data.io import write_csv
from tests.conftest import ROOT


def _rows(name: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO((ROOT / name).read_text(encoding="utf-8"), newline="")))
    return rows[0], rows[1:]


def _num(x: str):
    """A cell as the stage had it before writing: int, float, None (empty) or text."""
    if x == "":
        return None
    for kind in (int, float):
        try:
            return kind(x)
        except ValueError:
            pass
    return x


@pytest.mark.parametrize("name", ["plots/select/funnel.csv", "plots/select/histogram.csv"])
def test_selection_plots(name, tmp_path):
    header, rows = _rows(name)
    out = write_csv([(a, int(n)) for a, n in rows], tmp_path / "x.csv", tuple(header))
    assert out.read_bytes() == (ROOT / name).read_bytes()


@pytest.mark.parametrize("name", ["plots/pretrain/steps.csv", "plots/pretrain/warmup.csv",
                                  "plots/train_reward/question.csv", "plots/train_reward/answer.csv"])
def test_curves_of_dicts(name, tmp_path):
    header, rows = _rows(name)
    dicts = [{k: _num(v) for k, v in zip(header, r)} for r in rows]
    assert write_csv(dicts, tmp_path / "x.csv").read_bytes() == (ROOT / name).read_bytes()


def test_finetune_steps(tmp_path):
    from align2llava.steps.finetune.train import write_steps_csv

    _, rows = _rows("plots/finetune/steps.csv")
    steps = [{"step": int(s), "loss": float(loss), "learning_rate": float(lr)} for s, loss, lr in rows]
    out = write_steps_csv(steps, tmp_path / "p" / "steps.csv")
    assert out.read_bytes() == (ROOT / "plots/finetune/steps.csv").read_bytes()


def test_compression_report(tmp_path):
    from align2llava.ops.experiments import COLUMNS

    header, rows = _rows("reports/compression.csv")
    # the committed report predates the likelihood columns: its columns are COLUMNS' in order
    assert header == [c for c in COLUMNS if c in header] and len(header) >= 10
    dicts = [{k: _num(v) for k, v in zip(header, r) if v != ""} for r in rows]  # missing key: empty
    dicts[0]["extra"] = "not a column"
    out = write_csv(dicts, tmp_path / "c.csv", tuple(header))
    assert out.read_bytes() == (ROOT / "reports/compression.csv").read_bytes()


def test_edge_cases(tmp_path):
    assert write_csv([], tmp_path / "empty.csv").read_bytes() == b""
    assert write_csv([], tmp_path / "h.csv", ["a", "b"]).read_bytes() == b"a,b\r\n"
    out = write_csv([{"a": 'say "hi", then', "b": None}], tmp_path / "q.csv")
    assert out.read_bytes() == b'a,b\r\n"say ""hi"", then",\r\n'
    assert not list(tmp_path.glob("*.tmp"))
