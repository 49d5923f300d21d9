"""The curation report: joins, funnel, histograms, sampling, the page's structure on a tiny run
(counts match the audit), the stage CLI with its MLflow artifact, and a headless-Chromium render."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from align2llava.errors import DataError
from align2llava.report import data as D
from align2llava.report.assets import fnv1a, shard_count
from align2llava.report.report import ReportInputs, ReportParams, evaluation_freshness, run_report
from align2llava.steps.selection import SelectParams, parse_scores, select
from tests.conftest import ROOT, make_image
from tests.test_selection import make_pool


def write_run(tmp_path: Path) -> dict[str, Path]:
    """A tiny pipeline run's files: pool (with a missing image and two unscored records),
    scores, the real selection's audit, a restyle log and metrics."""
    images = tmp_path / "images"
    make_image(images / "a.png")
    make_image(images / "b.png", color=(30, 30, 200))
    pool, rows = make_pool(n_per_task=20, seed=3)
    for i, rec in enumerate(pool):
        rec["image"] = ["a.png", "b.png"][i % 2]
    pool[5]["image"] = "missing.png"
    rows = [r for r in rows if r["id"] not in ("conv-004", "deta-011")]  # rejected by `score`
    sel = select(pool, parse_scores(rows), SelectParams())
    paths = {"pool": tmp_path / "pool.json", "images": images, "scores": tmp_path / "scores.jsonl",
             "audit": tmp_path / "audit.jsonl", "log": tmp_path / "log.jsonl", "metrics": tmp_path / "metrics",
             "curated": tmp_path / "curated.json"}
    paths["pool"].write_text(json.dumps(pool))
    paths["scores"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["audit"].write_text("".join(json.dumps(r) + "\n" for r in sel.audit))
    paths["curated"].write_text(json.dumps(sel.selected))
    log = []
    reasons = ["review", "content_check", "unchanged", None]
    for i, rec in enumerate(sel.selected):
        for k in range(len(rec["conversations"]) // 2):
            reason = reasons[(i + k) % len(reasons)]
            orig = rec["conversations"][2 * k + 1]["value"]
            log.append({"id": rec["id"], "turn": k, "original": orig, "rewrite": "Rewritten: " + orig,
                        "verdict": "rewrite" if reason is None else "original",
                        "check": {"passed": reason != "content_check", "failures": ["lost color: red"] if reason == "content_check" else []},
                        "kept": "rewrite" if reason is None else "original", "reason": reason,
                        "p_rewrite": 0.7 if reason is None else 0.3, "review_logodds": [0.1, 0.2], "rewrite_label": "A"})
    paths["log"].write_text("".join(json.dumps(r) + "\n" for r in log))
    m = paths["metrics"]
    m.mkdir()
    (m / "train_reward.json").write_text(json.dumps({"question_val_pairwise_accuracy": 0.81, "question_val_pairs": 78,
                                                     "answer_val_pairwise_accuracy": 0.66, "answer_val_pairs": 111}))
    (m / "score.json").write_text(json.dumps({"defect_auroc": {"auroc_generic_question": 0.93, "auroc_wrong_yes_no": 0.34}}))
    (m / "select.json").write_text(json.dumps(sel.metrics))
    (m / "evaluate.json").write_text(json.dumps({"benchmark_accuracy": 0.5, "pope_f1": 0.6}))
    paths["compression"] = tmp_path / "compression.csv"
    paths["compression"].write_text("method,keep_ratio,seed,benchmark_accuracy\nreward,0.09,0,0.5\nrandom,0.09,0,0.51\n")
    return paths


def inputs(p: dict[str, Path], **kw) -> ReportInputs:
    return ReportInputs(pool=p["pool"], image_root=p["images"], scores=p["scores"], audit=p["audit"],
                        restyle_log=p["log"], curated=p["curated"], metrics_dir=p["metrics"],
                        compression=p["compression"], dvc_lock=None, **kw)


class Page(HTMLParser):
    """Collects the attributes the tests read: funnel cells, gallery cards, restyle pairs."""

    def __init__(self):
        super().__init__()
        self.scope = None
        self.funnel: dict[str, dict[str, int]] = {}
        self.cards: list[dict[str, str]] = []
        self.pairs: list[dict[str, str]] = []
        self.charts: list[str] = []
        self.srcs: list[str] = []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-scope" in a:
            self.scope = a["data-scope"]
            self.funnel[self.scope] = {}
        if tag == "td" and self.scope and "data-k" in a:
            self._cell = a["data-k"]
        if tag == "article" and "data-rid" in a:
            self.cards.append(a)
        if tag == "div" and "data-restyle-rid" in a:
            self.pairs.append(a)
        if tag == "figure" and "data-chart" in a:
            self.charts.append(a["data-chart"])
        for k in ("src", "href"):
            if k in a:
                self.srcs.append(a[k])

    def handle_data(self, text):
        if self._cell:
            self.funnel[self.scope][self._cell] = int(text.replace(",", ""))
            self._cell = None

    def handle_endtag(self, tag):
        if tag == "table":
            self.scope = None


def load_shards(out: Path) -> dict[str, list]:
    rows = {}
    for f in sorted((out / "ids").glob("*.js")):
        m = re.fullmatch(r"A2L\.ids\((\d+),(.*)\);\n", f.read_text(), re.S)
        assert m, f
        rows.update(json.loads(m.group(2)))
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    p = write_run(tmp)
    result = run_report(inputs(p), ReportParams(gallery_border=2, gallery_spread=2, restyle_examples=2), tmp / "out")
    page = Page()
    page.feed(result.index.read_text())
    audit = [json.loads(line) for line in p["audit"].read_text().splitlines()]
    return p, result, page, audit


def test_funnel_counts_match_the_audit(built):
    _, result, page, audit = built
    for scope in ["all types", "complex_reasoning", "conversation", "detail"]:
        rows = [r for r in audit if scope == "all types" or r["task"] == scope]
        assert page.funnel[scope] == {
            "pool": len(rows),
            "scored": sum(r["dropped_at"] != "unscored" for r in rows),
            "question": sum(r["kept"] or r["dropped_at"] == "answer" for r in rows),
            "kept": sum(r["kept"] for r in rows),
        }
    assert page.funnel["conversation"]["scored"] == 19 and page.funnel["all types"]["kept"] == 6
    assert result.metrics["records"] == 60 and result.metrics["kept"] == 6


def test_cards_carry_the_audit_outcome_and_sampling(built):
    _, result, page, audit = built
    by_id = {r["id"]: r for r in audit}
    assert page.cards, "no gallery cards"
    for card in page.cards:
        r = by_id[card["data-rid"]]
        assert card["data-outcome"] == ("kept" if r["kept"] else r["dropped_at"])
        assert card["data-task"] == r["task"]
    # border 2 + spread 2 per type and outcome: every kept record (2 per type) is shown, at most
    # 4 of the 12 dropped at the question stage, both unscored ones.
    shown = [c["data-rid"] for c in page.cards]
    assert len(shown) == len(set(shown))
    assert {c["data-rid"] for c in page.cards if c["data-outcome"] == "kept"} == {r["id"] for r in audit if r["kept"]}
    assert {c["data-rid"] for c in page.cards if c["data-outcome"] == "unscored"} == {"conv-004", "deta-011"}
    for task in ("conversation", "detail", "complex_reasoning"):
        assert sum(c["data-task"] == task and c["data-outcome"] == "question" for c in page.cards) == 4
    assert result.metrics["images_missing"] == 1 and result.metrics["thumbnails"] == 2


def test_every_pool_id_is_in_the_id_index(built):
    p, result, _, audit = built
    rows = load_shards(p["metrics"].parent / "out")
    assert set(rows) == {r["id"] for r in audit}
    tasks = sorted({r["task"] for r in audit})
    for r in audit:
        task, outcome = rows[r["id"]][:2]
        assert (tasks[task], D.OUTCOMES[outcome]) == (r["task"], "kept" if r["kept"] else r["dropped_at"])
    assert result.metrics["id_shards"] == shard_count(len(audit))


def test_restyle_counts_and_pairs(built):
    p, _, page, _ = built
    html = (p["metrics"].parent / "out" / "index.html").read_text()
    log = [json.loads(line) for line in p["log"].read_text().splitlines()]
    accepted = sum(r["kept"] == "rewrite" for r in log)
    assert f'data-k="accepted">{accepted}<' in html
    for reason in ("review", "content_check", "unchanged"):
        n = sum(r["reason"] == reason for r in log)
        assert f'data-reason="{reason}">{n}<' in html
    outcomes = [d["data-outcome"] for d in page.pairs]
    assert outcomes[0] == "accepted" and set(outcomes) == {"accepted", "review", "content_check", "unchanged"}
    assert "<ins>Rewritten:</ins>" in html


def test_page_is_offline_and_shows_every_section(built):
    _, _, page, _ = built
    html_text = built[1].index.read_text()
    assert not [s for s in page.srcs if re.match(r"(https?:)?//", s)], page.srcs
    assert "<script src" not in html_text
    assert {"hist-all types-question", "hist-detail-answer", "auroc", "compression"} <= set(page.charts)
    assert html_text.count("<svg") >= 8
    for section in ('id="funnel"', 'id="scores"', 'id="gallery"', 'id="restyle"', 'id="models"', 'id="demo"',
                    'id="compression"'):
        assert section in html_text
    assert "0.810" in html_text and "Demo diagnostics" in html_text


def test_histogram_counts_every_scored_record_once():
    entries = [D.Entry(f"r{i}", "t", o, float(i), float(-i)) for i, o in enumerate(["kept", "answer", "question"] * 5)]
    h = D.histogram(entries, "question", 4)
    assert sum(sum(c) for c in h["counts"].values()) == 15 and h["n"] == 15
    assert sum(h["counts"]["kept"]) == 5 and len(h["edges"]) == 5
    assert D.histogram([D.Entry("x", "t", "kept", 1.0, 1.0)], "answer", 3)["counts"]["kept"] == [1, 0, 0]


def test_ranks_follow_select_and_gallery_starts_at_the_cut():
    rows = [{"id": f"r{i}", "task": "t", "kept": i < 2, "dropped_at": None if i < 2 else ("answer" if i < 5 else "question"),
             "question_score": 10.0 - i, "answer_score": float(i % 3)} for i in range(10)]
    joined = D.join(D.check_audit(rows))
    by_id = {e.id: e for e in joined.entries}
    assert by_id["r0"].q_rank == 1 and by_id["r9"].q_rank == 10 and by_id["r9"].a_rank is None
    assert joined.counts["t"].question == 5 and joined.counts["t"].kept == 2
    kept = D.order_for_gallery(joined.entries, "kept")
    assert kept[0].a_rank > kept[-1].a_rank  # worst kept first
    dropped = D.order_for_gallery(joined.entries, "question")
    assert [e.id for e in dropped] == ["r5", "r6", "r7", "r8", "r9"]  # best dropped first
    assert D.spread(list(range(10)), 3) == [0, 4, 9] and D.spread([1, 2], 5) == [1, 2]


def test_word_diff_marks_changed_words_only():
    a, b = D.word_diff("The red circle is small.", "The circle is very small.")
    assert [t for changed, t in a if changed] == ["red"]
    assert [t for changed, t in b if changed] == ["very"]
    assert "".join(t for _, t in a) == "The red circle is small."


@pytest.mark.parametrize("row,expected", [
    ({"id": "a", "task": "t", "kept": True, "dropped_at": "question", "question_score": 1, "answer_score": 1}, "kept must be true"),
    ({"id": "a", "task": "t", "kept": False, "dropped_at": "answer", "question_score": None, "answer_score": 1}, "numeric"),
    ({"id": "a"}, "expected an object with id"),
])
def test_bad_audit_row_is_one_line_error(row, expected):
    with pytest.raises(DataError, match=expected) as err:
        D.check_audit([row], "audit.jsonl")
    assert "audit.jsonl: line 1" in str(err.value) and "\n" not in str(err.value)


def test_audit_of_another_pool_is_refused(tmp_path):
    p = write_run(tmp_path)
    pool = json.loads(p["pool"].read_text())
    p["pool"].write_text(json.dumps(pool[:-1]))
    with pytest.raises(DataError, match="is not in the pool"):
        run_report(inputs(p), ReportParams(), tmp_path / "out")


def test_evaluation_freshness_from_dvc_lock(tmp_path):
    p = write_run(tmp_path)
    import hashlib

    md5 = hashlib.md5(p["curated"].read_bytes()).hexdigest()
    lock = {"schema": "2.0", "stages": {
        "finetune": {"deps": [{"path": "curated.json", "md5": md5}], "outs": [{"path": "models/finetune", "md5": "m1.dir"}]},
        "evaluate": {"deps": [{"path": "models/finetune", "md5": "m1.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    evaluate_json = p["metrics"] / "evaluate.json"
    assert evaluation_freshness(tmp_path / "dvc.lock", p["curated"], evaluate_json)[0] == "current"
    lock["stages"]["finetune"]["deps"][0]["md5"] = "0" * 32
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert evaluation_freshness(tmp_path / "dvc.lock", p["curated"], evaluate_json)[0] == "stale"
    assert evaluation_freshness(None, p["curated"], evaluate_json)[0] == "unknown"


def test_fnv1a_matches_reference_values():
    # Reference FNV-1a 32-bit values (the page's JS computes the same to find a shard).
    assert fnv1a("") == 0x811C9DC5 and fnv1a("a") == 0xE40C292C and fnv1a("foobar") == 0xBF9CF968


def test_stage_writes_report_metrics_and_mlflow_artifact(tmp_path, monkeypatch):
    from stages.report import main

    p = write_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN2LLAVA_RUN", "report-test")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(pool=str(p["pool"]), image_root=str(p["images"]))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--scores", str(p["scores"]), "--audit", str(p["audit"]), "--restyle-dir", str(tmp_path),
            "--compression", str(p["compression"]), "--out-dir", "rep", "--metrics-dir", str(p["metrics"])]
    (tmp_path / "log.jsonl").write_text(p["log"].read_text())
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    m = json.loads((p["metrics"] / "report.json").read_text())
    assert m["records"] == 60 and m["gallery_cards"] > 0 and (tmp_path / "rep" / "index.html").is_file()

    import mlflow

    runs = mlflow.search_runs(experiment_names=["align2llava"], output_format="list",
                              filter_string="tags.align2llava_run_key = 'run:report-test'")
    stage = next(r for r in runs if r.data.tags.get("stage") == "report")
    parent = next(r for r in runs if r.info.run_id == stage.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["align2llava_role"] == "pipeline" and parent.info.status == "FINISHED"
    assert parent.data.tags["report"] == str((tmp_path / "rep" / "index.html").resolve())
    assert parent.data.tags["report_artifact"].endswith("curation/index.html")
    assert parent.data.metrics["report.records"] == 60
    assert parent.data.metrics["train_reward.question_val_pairwise_accuracy"] == pytest.approx(0.81)
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(stage.info.run_id, "curation")}
    assert {"curation/index.html", "curation/thumbs", "curation/ids"} <= names

    # A broken input is a one-line error, no traceback.
    p["audit"].write_text('{"id": "x"}\n')
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "Error:" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------- headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _need_chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed (and installing it needs root): apt-get install -y chromium")
    pytest.fail("chromium is missing: `apt-get install -y chromium` (.ci/run installs it when run as root)")


def chromium(url: str, tmp: Path, *extra: str, size: str = "1280,1600") -> subprocess.CompletedProcess:
    cmd = [_need_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}",
           f"--window-size={size}", "--virtual-time-budget=4000", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def ink(png: Path, box=None) -> tuple[float, int]:
    """Share of pixels that are not the page background, and distinct colours, of a screenshot."""
    from PIL import Image

    im = Image.open(png).convert("RGB")
    if box:
        im = im.crop(box)
    bg = im.getpixel((im.width - 1, im.height - 1))
    px = list(im.getdata())
    return sum(p != bg for p in px) / len(px), len(set(px))


def test_report_renders_in_headless_chromium(built, tmp_path):
    p, result, _, audit = built
    shot = tmp_path / "report.png"
    out = chromium(result.index.as_uri(), tmp_path, f"--screenshot={shot}")
    assert shot.is_file(), out.stderr[-2000:]
    share, colours = ink(shot)
    assert share > 0.10 and colours > 50, (share, colours)
    # The id search: a record outside the gallery sample is found through the id index (a
    # <script> loaded from ids/ over file://, which is what a user's browser does).
    hidden = next(r for r in audit if r["dropped_at"] == "question" and r["task"] == "detail"
                  and r["id"] not in {c["data-rid"] for c in built[2].cards})
    dom = chromium(result.index.as_uri() + "#id=" + hidden["id"], tmp_path, "--dump-dom").stdout
    found = re.search(r'<span id="found">(.*?)</span>', dom, re.S)
    assert found and "dropped at the question stage" in found.group(1) and "not in the gallery sample" in found.group(1), dom[-3000:]


def test_dvc_plots_template_renders_offline(tmp_path):
    """dvc_render's own page with the committed template (what `dvc plots show` writes): the
    Vega bundle is inline, so the chart draws with no network."""
    from dvc_render import VegaRenderer, render_html

    template = ROOT / ".dvc" / "plots" / "offline.html"
    assert "cdn.jsdelivr" not in template.read_text() and "{plot_divs}" in template.read_text()
    assert "plots/offline.html" in (ROOT / ".dvc" / "config").read_text()
    points = [{"step": i, "loss": 1.0 / (i + 1), "rev": "workspace", "filename": "loss.csv", "field": "loss"} for i in range(20)]
    renderer = VegaRenderer(points, "loss.csv", x="step", y="loss", template="linear")
    page = tmp_path / "plots" / "index.html"
    render_html([renderer], page, html_template=template)
    assert "cdn.jsdelivr" not in page.read_text()
    shot = tmp_path / "plots.png"
    out = chromium(page.as_uri(), tmp_path, f"--screenshot={shot}", size="800,600")
    assert shot.is_file(), out.stderr[-2000:]
    share, colours = ink(shot, (0, 0, 800, 500))
    assert share > 0.01 and colours > 10, (share, colours)
