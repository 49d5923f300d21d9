"""The report page: plain HTML, inline CSS, a little inline JS (id search, gallery filters) and
static SVG charts. Nothing loads from the network; thumbnails and the id index are files beside
index.html (report/assets.py)."""

from __future__ import annotations

import html
import json
from typing import Any

from align2llava.report import charts
from align2llava.report.assets import CSS, JS
from align2llava.report.data import KINDS, OUTCOME_LABEL, OUTCOMES, TaskCounts

_EVAL_KEYS = ("benchmark_accuracy", "benchmark_accuracy_shape", "benchmark_accuracy_color",
              "benchmark_accuracy_yes_no", "pope_accuracy", "pope_f1", "pope_yes_ratio",
              "benchmark_likelihood_accuracy", "benchmark_likelihood_accuracy_shape",
              "benchmark_likelihood_accuracy_color", "benchmark_likelihood_accuracy_yes_no",
              "pope_likelihood_accuracy", "pope_likelihood_f1", "pope_likelihood_yes_ratio",
              "eval_exact_match", "eval_vqa_accuracy", "benchmark_count", "pope_count")


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return "-" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return esc(x)


def _bar(value: int, total: int, cls: str = "", width: int = 180) -> str:
    w = max(1, round(width * value / total)) if total and value else 0
    return f'<span class="bar {cls}" style="width:{w}px"></span>'


# ----------------------------------------------------------------------------- sections


def funnel_section(counts: dict[str, TaskCounts], total: TaskCounts) -> str:
    rows = []
    for name, c in [("all types", total)] + sorted(counts.items()):
        rows.append(
            f'<tr data-scope="{esc(name)}"><th>{esc(name)}</th>'
            f'<td class="n" data-k="pool">{c.pool:,}</td>'
            f'<td class="n" data-k="scored">{c.scored:,}</td>'
            f'<td class="n" data-k="question">{c.question:,}</td><td class="n">{pct(c.question, c.scored)}</td>'
            f'<td class="n" data-k="kept">{c.kept:,}</td><td class="n">{pct(c.kept, c.question)}</td>'
            f'<td class="n"><b>{pct(c.kept, c.pool)}</b></td>'
            f'<td>{_bar(c.pool, total.pool, "p")}<br>{_bar(c.question, total.pool, "q")}<br>'
            f'{_bar(c.kept, total.pool)}</td></tr>'
        )
    return (
        '<section id="funnel"><h2>Selection funnel</h2>'
        '<table class="funnel"><tr><th>task type</th><th class="n">pool</th><th class="n">scored</th>'
        '<th class="n">question stage</th><th class="n">of scored</th><th class="n">answer stage (kept)</th>'
        '<th class="n">of question</th><th class="n">kept of pool</th><th>pool / question / kept</th></tr>'
        + "".join(rows) + "</table>"
        '<p class="note">Per task type, the question stage keeps the top share by question score, the answer '
        "stage the top share of those by answer score (params <code>select</code>); restyle rewrites answers "
        "and drops no record. Scored = pool minus records the score stage rejected.</p></section>"
    )


def histogram_section(hists: dict[str, dict[str, Any]], cuts: dict[str, dict[str, float | None]]) -> str:
    figs = []
    for scope, per_kind in hists.items():  # one block per scope: question | answer
        block = []
        for kind in KINDS:
            h = per_kind[kind]
            if not h["n"]:
                continue
            spec = charts.histogram_spec(h, OUTCOME_LABEL, f"{kind} reward model: {scope}", cuts[scope].get(kind))
            block.append(f'<figure data-chart="hist-{esc(scope)}-{kind}">{charts.to_svg(spec)}</figure>')
        if block:
            figs.append(f'<div class="scope">{"".join(block)}</div>')
    legend = "".join(f'<span class="key"><i style="background:{charts.COLORS[OUTCOME_LABEL[o]]}"></i>'
                     f"{esc(OUTCOME_LABEL[o])}</span>" for o in ("kept", "answer", "question"))
    return (
        '<section id="scores"><h2>Score distributions: kept vs dropped</h2>'
        f'<div class="legend">{legend}</div><div class="charts">'
        + "".join(figs) + "</div>"
        '<p class="note">Histograms computed from data/select/audit.jsonl (every pool record once); the dashed '
        "line is the lowest score that passed that stage for the type. On all types together each type has its "
        "own cut, so none is drawn.</p></section>"
    )


def _rank_text(card: dict[str, Any], c: TaskCounts) -> str:
    o = card["outcome"]
    if o == "unscored":
        return "no score row: the score stage rejected this record"
    q = f"Q {card['question_score']:.3f} (rank {card['q_rank']:,} of {c.scored:,}; top {c.question:,} pass)"
    if card["a_rank"] is None:
        return f"{q} · A {card['answer_score']:.3f} · dropped at the question stage, rank {card['q_rank']:,}"
    a = f"A {card['answer_score']:.3f} (rank {card['a_rank']:,} of {c.question:,}; top {c.kept:,} kept)"
    tail = f" · dropped at the answer stage, rank {card['a_rank']:,}" if o == "answer" else ""
    return f"{q} · {a}{tail}"


def card_html(i: int, card: dict[str, Any], counts: dict[str, TaskCounts]) -> str:
    o = card["outcome"]
    img = (f'<img src="{esc(card["thumb"])}" loading="lazy" alt="image of {esc(card["id"])}">' if card["thumb"]
           else f'<div class="noimg">{"no image" if not card.get("image") else "image missing"}</div>')
    turns = []
    for t in card["turns"]:
        extra = f" · best of {t['candidates']}" if t["candidates"] > 1 else ""
        score = f' <span class="ts">[{t["score"]:.3f}{extra}]</span>' if t["score"] is not None else ""
        turns.append(f'<li><p class="q">{esc(t["question"])}</p><p class="a">{esc(t["answer"])}{score}</p></li>')
    restyle = ""
    if card.get("rewrites") is not None:
        restyle = f'<div class="tag">restyle: {card["rewrites"]} of {len(card["turns"])} answers rewritten</div>'
    sample = ("pool order" if o == "unscored" else "near the cut") if card["sample"] == "border" else "spread sample"
    return (
        f'<article class="card o-{o}" id="c{i}" data-rid="{esc(card["id"])}" data-task="{esc(card["task"])}" '
        f'data-outcome="{o}">{img}<div class="body"><div><code>{esc(card["id"])}</code> '
        f'<span class="badge">{esc(OUTCOME_LABEL[o])}</span> <span class="tag">{esc(card["task"])} · {sample}</span></div>'
        f'<div class="scores">{esc(_rank_text(card, counts[card["task"]]))}</div>'
        f'<ol class="turns">{"".join(turns)}</ol>{restyle}</div></article>'
    )


def gallery_section(cards: list[dict[str, Any]], counts: dict[str, TaskCounts], border: int, spread: int) -> str:
    tasks = "".join(f'<button data-k="task" data-v="{esc(t)}">{esc(t)}</button>' for t in sorted(counts))
    outs = "".join(f'<button data-k="outcome" data-v="{o}">{esc(OUTCOME_LABEL[o])}</button>' for o in OUTCOMES)
    body = "".join(card_html(i, c, counts) for i, c in enumerate(cards))
    return (
        '<section id="gallery"><h2>Gallery: kept and dropped records</h2>'
        f'<div class="filters">type: <button data-k="task" data-v="">all</button>{tasks}</div>'
        f'<div class="filters">outcome: <button data-k="outcome" data-v="">all</button>{outs}</div>'
        f'<p class="note">A sample of {len(cards):,} records, not the whole pool: per task type and outcome, the '
        f"{border} nearest the cut (worst kept first, best dropped first), then {spread} at evenly spaced ranks "
        "over the rest (the lowest included). Q/A: question and answer reward scores, ranked within the type. "
        "Search any pool id above: every record is in the id index.</p>"
        f'<div class="gallery">{body}</div></section>'
    )


def _diff(spans: list[tuple[bool, str]], tag: str) -> str:
    return "".join(f"<{tag}>{esc(t)}</{tag}>" if changed else esc(t) for changed, t in spans)


def restyle_section(summary: dict[str, Any] | None, examples: list[dict[str, Any]], metrics: dict[str, Any] | None) -> str:
    if summary is None:
        return ('<section id="restyle"><h2>Restyle</h2><p class="note">No restyle log '
                "(data/restyle/log.jsonl) was found.</p></section>")
    if not summary["turns"]:
        return ('<section id="restyle"><h2>Restyle</h2><p class="note">The restyle log is empty: '
                "restyle.enabled is false, the selection passed through unchanged.</p></section>")
    n = summary["turns"]
    rows = [f'<tr><th>accepted (rewrite kept)</th><td class="n" data-k="accepted">{summary["accepted"]:,}</td>'
            f'<td class="n">{pct(summary["accepted"], n)}</td><td>{_bar(summary["accepted"], n)}</td></tr>']
    for reason, c in summary["reasons"].items():
        rows.append(f'<tr><th>rejected: {esc(reason)}</th><td class="n" data-reason="{esc(reason)}">{c:,}</td>'
                    f'<td class="n">{pct(c, n)}</td><td>{_bar(c, n, "q")}</td></tr>')
    nll = ""
    if metrics and metrics.get("nll_before") is not None:
        nll = (f" Answer NLL under the base model: {num(metrics.get('nll_before'))} before, "
               f"{num(metrics.get('nll_after'))} after.")
    pairs = []
    for ex in examples:
        check = ex.get("check")
        if check is None:
            chk = "content check: not run (rewrite unusable before it)"
        elif check.get("passed"):
            chk = '<span class="ok">content check passed</span>'
        else:
            chk = f'<span class="no">content check failed</span>: {esc("; ".join(check.get("failures") or []))}'
        p = ex.get("p_rewrite")
        review = ("review: not run" if ex.get("verdict") is None else
                  f"review prefers <b>{esc(ex['verdict'])}</b>" + (f" (p(rewrite) {p:.2f})" if isinstance(p, (int, float)) else ""))
        verdict = ('<span class="ok">rewrite kept</span>' if ex["kept"] == "rewrite"
                   else f'<span class="no">original kept</span> (reason: {esc(ex.get("reason"))})')
        pairs.append(
            f'<div class="pair" data-restyle-rid="{esc(ex["id"])}" data-outcome="{esc(ex["outcome"])}">'
            f'<div class="meta"><code>{esc(ex["id"])}</code> turn {esc(ex["turn"])} · {verdict} · {review} · {chk}</div>'
            f'<div class="t">{_diff(ex["diff_original"], "del")}</div>'
            f'<div class="t">{_diff(ex["diff_rewrite"], "ins")}</div></div>'
        )
    return (
        '<section id="restyle"><h2>Restyle: original vs rewrite</h2>'
        f'<p>{n:,} answers in {summary["records"]:,} kept records; {summary["accepted"]:,} rewrites accepted '
        f'({pct(summary["accepted"], n)}) in {summary["records_changed"]:,} records.{nll}</p>'
        f'<table class="reasons">{"".join(rows)}</table>'
        '<h3>Examples (original left, rewrite right; removed words struck, added words green)</h3>'
        '<p class="note">Up to the same number per outcome, spread over the log. A rewrite is kept only when it '
        "is usable, passes the content check and the review prefers it (docs/restyle.md).</p>"
        '<div class="pair"><div class="t"><b>original</b></div><div class="t"><b>rewrite</b></div></div>'
        + "".join(pairs) + "</section>"
    )


def models_section(rm: list[dict[str, Any]], evaluate: dict[str, Any] | None) -> str:
    out = ['<section id="models"><h2>Reward models and benchmark</h2>']
    if rm:
        rows = "".join(
            f'<tr><th>{esc(r["kind"])}</th><td class="n" data-k="acc-{esc(r["kind"])}">{num(r["accuracy"])}</td>'
            f'<td class="n">{num(r["before"])}</td><td class="n">{num(r["pairs"])}</td>'
            f'<td class="n">{num(r["train_pairs"])}</td></tr>' for r in rm)
        out.append('<h3>Reward-model validation (pairwise accuracy on held-out images)</h3><table>'
                   '<tr><th>model</th><th class="n">accuracy</th><th class="n">before training</th>'
                   f'<th class="n">val pairs</th><th class="n">train pairs</th></tr>{rows}</table>')
    else:
        out.append('<p class="note">No metrics/train_reward.json.</p>')
    if evaluate:
        m = evaluate["metrics"]
        rows = "".join(f'<tr><th>{esc(k)}</th><td class="n">{num(m[k])}</td></tr>' for k in _EVAL_KEYS if k in m)
        out.append(f'<h3>Benchmark of the fine-tuned model (metrics/evaluate.json)</h3><p class="note">{esc(evaluate["freshness"])}</p>'
                   f"<table>{rows}</table>")
    else:
        out.append('<p class="note">No metrics/evaluate.json yet (the evaluate stage has not run).</p>')
    return "".join(out) + "</section>"


def diagnostics_section(diag: dict[str, Any] | None) -> str:
    if not diag:
        return ""
    figs = []
    if diag["auroc"]:
        figs.append(f'<figure data-chart="auroc">{charts.to_svg(charts.auroc_spec(diag["auroc"]))}</figure>')
    table = ""
    if diag["rates"]:
        figs.append(f'<figure data-chart="rates">{charts.to_svg(charts.rates_spec(diag["rates"]))}</figure>')
        sets = list(diag["rates"])
        defects = sorted({d for r in diag["rates"].values() for d in r})
        head = "".join(f'<th class="n">{esc(s)}</th>' for s in sets)
        body = "".join("<tr><th>" + esc(d) + "</th>" + "".join(
            f'<td class="n">{num(diag["rates"][s].get(d, 0.0))}</td>' for s in sets) + "</tr>" for d in defects)
        table = f"<table><tr><th>defect</th>{head}</tr>{body}</table>"
    return (
        '<section id="demo" class="demo"><h2>Demo diagnostics (synthetic oracle, not part of the method)</h2>'
        f'<p class="note">From {esc(diag["source"])}. The demo world knows which records carry which defect; '
        "no curation stage reads that oracle. Real pools have no oracle.</p>"
        f'<div class="charts">{"".join(figs)}</div>{table}</section>'
    )


def compression_section(rows: list[dict[str, str]] | None) -> str:
    if not rows:
        return ""
    cols = [c for c in ("method", "keep_ratio", "seed", "benchmark_accuracy", "pope_f1", "pope_accuracy",
                        "train_records", "train_seconds", "experiment") if c in rows[0]]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    fig = ""
    if "benchmark_accuracy" in rows[0] and "keep_ratio" in rows[0]:
        fig = f'<div class="charts"><figure data-chart="compression">{charts.to_svg(charts.compression_spec(rows))}</figure></div>'
    return ('<section id="compression"><h2>Compression experiment (reports/compression.csv)</h2>'
            f"{fig}<table>{'<tr>' + head + '</tr>'}{body}</table></section>")


# ----------------------------------------------------------------------------- page


def render_page(m: dict[str, Any]) -> str:
    """The whole index.html from the report model that report.report.build_model makes."""
    total: TaskCounts = m["total"]
    meta = {"shards": m["shards"], "labels": OUTCOME_LABEL, "tasks": m["tasks"], "outcomes": list(OUTCOMES),
            "counts": {t: {"pool": c.pool, "scored": c.scored, "question": c.question, "kept": c.kept}
                       for t, c in m["counts"].items()}}
    nav = "".join(f'<a href="#{s}">{t}</a>' for s, t in (
        ("funnel", "funnel"), ("scores", "scores"), ("gallery", "gallery"), ("restyle", "restyle"),
        ("models", "models"), ("demo", "demo diagnostics"), ("compression", "compression")))
    sections = [
        funnel_section(m["counts"], total),
        histogram_section(m["hists"], m["cuts"]),
        gallery_section(m["cards"], m["counts"], m["border"], m["spread"]),
        restyle_section(m["restyle"], m["restyle_examples"], m["restyle_metrics"]),
        models_section(m["rm"], m["evaluate"]),
        diagnostics_section(m["diagnostics"]),
        compression_section(m["compression"]),
    ]
    meta_js = json.dumps(meta, separators=(",", ":")).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>Curation report: {total.kept:,} of {total.pool:,} kept</title><style>{CSS}</style>"
        f"<script>window.A2L={{meta:{meta_js}}};{JS}</script></head><body>"
        f'<header><h1>Curation report</h1><div class="sub">pool <code>{esc(m["pool"])}</code> · '
        f'select method <b>{esc(m["method"])}</b> · <span data-k="kept-total">{total.kept:,}</span> of '
        f'<span data-k="pool-total">{total.pool:,}</span> records kept ({pct(total.kept, total.pool)}) · '
        f'{len(m["counts"])} task types</div>'
        '<form id="idform" class="search" autocomplete="off"><label for="q">record id</label>'
        '<input id="q" name="q" placeholder="paste a record id" spellcheck="false"><button>find</button>'
        '<span id="found"></span></form>'
        f"<nav>{nav}</nav></header><main>" + "".join(sections) + "</main></body></html>\n"
    )
