"""A short, readable digest of metrics/*.json: the headline figures of each stage that ran.

`dvc metrics show` prints every key of every stage side by side (over a hundred columns);
`align2llava summary` prints one line per stage with the figures a user looks at first, plus
the stage's wall time and peak memory when recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from align2llava.errors import DataError

# stage (pipeline order) -> (label, dotted metric key)
HEADLINES: dict[str, list[tuple[str, str]]] = {
    "synthesize": [("pool", "pool.total"), ("clean", "clean_fraction.all"),
                   ("strict pairs", "annotations.strict_pairs")],
    "pretrain": [("caption loss before", "before.caption_loss"), ("after", "after.caption_loss"),
                 ("colour", "after.generation_accuracy.color"), ("shape", "after.generation_accuracy.shape")],
    # the reward models' base (demo): the true colour / shape word's likelihood win rate in pool answers
    "instruct": [("grounding colour before", "grounding_before.color"), ("after", "grounding_after.color"),
                 ("shape before", "grounding_before.shape"), ("after", "grounding_after.shape")],
    "annotation_tasks": [("records", "records"), ("tasks", "tasks"), ("candidates", "candidates"),
                         ("rejected", "rejected")],
    "annotate_import": [("question pairs", "pairs_question"), ("answer pairs", "pairs_answer"),
                        ("ties dropped", "ties_dropped"), ("rejected", "rejected_rows"),
                        ("agreement alpha", "agreement_alpha")],
    "train_reward": [("question RM val acc", "question_val_pairwise_accuracy"),
                     ("longer-text baseline", "question_val_length_baseline_accuracy"),
                     ("answer RM val acc", "answer_val_pairwise_accuracy"),
                     ("longer-text baseline", "answer_val_length_baseline_accuracy")],
    "score": [("records", "scored"), ("answers", "answer_items"), ("rejected", "rejected"),
              ("this run rec/s", "records_per_s_this_run")],
    "select": [("kept", "kept"), ("of", "pool"), ("keep ratio", "keep_ratio_overall")],
    # demo diagnostics (the demo's defect oracle), not a method figure
    "diagnose": [("demo oracle: clean in pool", "defect_rates.pool.clean"),
                 ("in selected", "defect_rates.selected.clean"),
                 ("pool without oracle", "pool_without_oracle")],
    "restyle": [("rewrites accepted", "accepted"), ("of turns", "turns"), ("rate", "acceptance_rate")],
    "finetune": [("records", "train_records"), ("steps", "steps"), ("loss first", "first_loss"),
                 ("last", "final_loss")],
    "evaluate": [("benchmark accuracy", "benchmark_accuracy"), ("shape", "benchmark_accuracy_shape"),
                 ("colour", "benchmark_accuracy_color"), ("yes/no", "benchmark_accuracy_yes_no"),
                 ("POPE F1", "pope_f1"), ("POPE yes ratio", "pope_yes_ratio"),
                 ("likelihood accuracy", "benchmark_likelihood_accuracy"),
                 ("POPE likelihood F1", "pope_likelihood_f1")],
    "report": [("open", "index"), ("gallery cards", "gallery_cards"), ("images missing", "images_missing")],
}


def _get(data: dict[str, Any], dotted: str) -> Any:
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def summary_lines(metrics_dir: str | Path = "metrics") -> list[str]:
    """One line per stage with a metrics file, in pipeline order, then any other stages."""
    folder = Path(metrics_dir)
    files = {p.stem: p for p in sorted(folder.glob("*.json"))}
    if not files:
        raise DataError(f"{folder}: no metrics files (run `dvc repro` first)")
    order = [s for s in HEADLINES if s in files] + sorted(s for s in files if s not in HEADLINES)
    width = max(len(s) for s in order)
    lines = []
    for stage in order:
        try:
            data = json.loads(files[stage].read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{files[stage]}: not a readable JSON metrics file ({exc})") from None
        keys = HEADLINES.get(stage) or [(k, k) for k, v in sorted(data.items()) if isinstance(v, (int, float))][:4]
        parts = [f"{label} {_fmt(v)}" for label, key in keys if (v := _get(data, key)) is not None]
        res = data.get("run") if isinstance(data.get("run"), dict) else {}
        cost = []
        if "wall_seconds" in res:
            cost.append(f"{res['wall_seconds']:.0f} s")
        if "peak_rss_mb" in res:
            cost.append(f"{res['peak_rss_mb'] / 1024:.1f} GB peak")
        lines.append(f"{stage:<{width}}  {', '.join(parts) or '-'}" + (f"  [{', '.join(cost)}]" if cost else ""))
    return lines
