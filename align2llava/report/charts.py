"""Charts for the curation report, and an offline page template for `dvc plots show`.

Charts are Vega-Lite specs rendered to static SVG by vl-convert (Vega bundled in a wheel, no
browser, no network), so the report shows them with no script at all. `offline_template()` is an
HTML page with the same Vega bundle inlined, for `dvc plots show --html-template` (DVC's own
page loads Vega from a CDN and is blank offline); .dvc/config points DVC at the committed copy,
.dvc/plots/offline.html (`align2llava plots-template` rewrites it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align2llava.errors import Align2LlavaError

# DVC's plot templates are Vega-Lite 5 specs; the charts here use the same version.
VL_VERSION = "5.21"
COLORS = {"kept": "#2e7d32", "dropped at the answer stage": "#ef6c00",
          "dropped at the question stage": "#9e9e9e"}
WIDTH, HEIGHT = 300, 130
_FONT = {"font": "DejaVu Sans, Liberation Sans, Arial, sans-serif"}


def _vlc() -> Any:
    try:
        import vl_convert
    except ImportError:
        raise Align2LlavaError("the report needs vl-convert-python (pip install vl-convert-python)") from None
    return vl_convert


def to_svg(spec: dict[str, Any]) -> str:
    """Render a Vega-Lite spec to an SVG string (no XML prolog)."""
    spec = {"config": {**_FONT, "view": {"stroke": None}, "axis": {"labelFontSize": 10, "titleFontSize": 11}},
            "background": "white", **spec}
    svg = _vlc().vegalite_to_svg(spec, vl_version=VL_VERSION)
    return svg[svg.index("<svg"):]


def histogram_spec(hist: dict[str, Any], labels: dict[str, str], title: str,
                   cut: float | None = None) -> dict[str, Any]:
    """Stacked bars of one score's histogram (report.data.histogram) by outcome, and the
    stage's cut-off score as a dashed rule."""
    values = []
    edges = hist["edges"]
    base = [0] * max(0, len(edges) - 1)
    for outcome, counts in hist["counts"].items():  # stacked in this order, bottom first
        for b, c in enumerate(counts):
            if c:
                values.append({"lo": round(edges[b], 4), "hi": round(edges[b + 1], 4), "y0": base[b],
                               "y1": base[b] + c, "count": c, "outcome": labels[outcome]})
                base[b] += c
    domain = [labels[o] for o in hist["counts"]]
    bars = {
        "data": {"values": values},
        "mark": {"type": "bar", "stroke": "white", "strokeWidth": 0.5},
        "encoding": {
            "x": {"field": "lo", "type": "quantitative", "title": f"{hist['kind']} score",
                  "scale": {"domain": [round(edges[0], 4), round(edges[-1], 4)] if edges else None, "nice": False}},
            "x2": {"field": "hi"},
            "y": {"field": "y1", "type": "quantitative", "title": "records"},
            "y2": {"field": "y0"},
            "color": {"field": "outcome", "type": "nominal", "title": None,
                      "scale": {"domain": domain, "range": [COLORS[d] for d in domain]},
                      "legend": None},  # the page shows one legend for all histograms
            "tooltip": [{"field": "outcome"}, {"field": "count"}, {"field": "lo", "title": "from"},
                        {"field": "hi", "title": "to"}],
        },
    }
    layers = [bars]
    if cut is not None:
        layers.append({
            "data": {"values": [{"cut": round(cut, 4), "label": f"cut {cut:.3g}"}]},
            "layer": [
                {"mark": {"type": "rule", "strokeDash": [4, 3], "color": "#c62828"},
                 "encoding": {"x": {"field": "cut", "type": "quantitative"}}},
                {"mark": {"type": "text", "align": "left", "dx": 3, "dy": -2, "baseline": "top",
                          "color": "#c62828", "fontSize": 10},
                 "encoding": {"x": {"field": "cut", "type": "quantitative"}, "y": {"value": 0},
                              "text": {"field": "label"}}},
            ],
        })
    return {"title": {"text": title, "fontSize": 12, "anchor": "start"}, "width": WIDTH, "height": HEIGHT,
            "layer": layers}


def auroc_spec(auroc: dict[str, float]) -> dict[str, Any]:
    """Horizontal bars of defect AUROC per defect type, records then turns, 0.5 marked as chance."""
    values = [{"defect": k.removeprefix("auroc_turn_").removeprefix("auroc_"), "auroc": v,
               "level": "per turn" if k.startswith("auroc_turn_") else "per record"}
              for k, v in sorted(auroc.items()) if isinstance(v, (int, float))]
    return {
        "title": {"text": "defect AUROC (clean above defective; 0.5 = chance)", "fontSize": 12, "anchor": "start"},
        "width": WIDTH, "height": {"step": 9},
        "layer": [
            {"data": {"values": values}, "mark": "bar",
             "encoding": {"y": {"field": "defect", "type": "nominal", "title": None},
                          "yOffset": {"field": "level", "sort": ["per record", "per turn"]},
                          "x": {"field": "auroc", "type": "quantitative", "scale": {"domain": [0, 1]},
                                "title": "AUROC"},
                          "color": {"field": "level", "type": "nominal", "title": None,
                                    "sort": ["per record", "per turn"],
                                    "scale": {"range": ["#1565c0", "#90caf9"]},
                                    "legend": {"orient": "bottom"}}}},
            {"data": {"values": [{"chance": 0.5}]}, "mark": {"type": "rule", "strokeDash": [4, 3]},
             "encoding": {"x": {"field": "chance", "type": "quantitative"}}},
        ],
    }


def rates_spec(rates: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Grouped bars of the oracle's defect rates per set (pool, after the question stage, kept)."""
    defects = sorted({d for r in rates.values() for d in r})  # a type a set lacks: rate 0 there
    values = [{"set": name, "defect": d, "rate": r.get(d, 0.0)} for name, r in rates.items() for d in defects]
    return {
        "title": {"text": "oracle defect rates: pool vs kept", "fontSize": 12, "anchor": "start"},
        "data": {"values": values}, "mark": "bar", "width": WIDTH, "height": {"step": 8},
        "encoding": {"y": {"field": "defect", "type": "nominal", "title": None},
                     "yOffset": {"field": "set", "sort": list(rates)},
                     "x": {"field": "rate", "type": "quantitative", "title": "share of records",
                           "axis": {"format": "%"}},
                     "color": {"field": "set", "type": "nominal", "title": None, "sort": list(rates),
                               "scale": {"range": ["#9e9e9e", "#ef6c00", "#2e7d32"]},
                               "legend": {"orient": "bottom"}}},
    }


def compression_spec(rows: list[dict[str, str]], metric: str = "benchmark_accuracy") -> dict[str, Any]:
    """Per-run points of `metric` by overall keep ratio, one colour per method."""
    values = []
    for r in rows:
        try:
            values.append({"keep_ratio": float(r["keep_ratio"]), metric: float(r[metric]),
                           "method": r.get("method", "?")})
        except (KeyError, TypeError, ValueError):
            continue
    return {
        "title": {"text": f"compression: {metric} per run", "fontSize": 12, "anchor": "start"},
        "data": {"values": values}, "width": {"step": 60}, "height": 160,
        "mark": {"type": "point", "filled": True, "size": 50, "opacity": 0.8},
        "encoding": {"x": {"field": "keep_ratio", "type": "ordinal", "title": "overall keep ratio",
                           "axis": {"labelAngle": 0}},
                     "xOffset": {"field": "method"},
                     "y": {"field": metric, "type": "quantitative", "scale": {"zero": False}},
                     "color": {"field": "method", "type": "nominal", "legend": {"orient": "bottom"}}},
    }


# ----------------------------------------------------------------------------- dvc plots show

_PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC Plot</title>
<!-- Vega {vega}, Vega-Lite {vega_lite}, Vega-Embed {vega_embed} (BSD-3-Clause, (c) the Vega
     Project / University of Washington Interactive Data Lab), bundled by vl-convert-python and
     inlined so this page needs no network. Rewrite with `align2llava plots-template`. -->
<script>
BUNDLE
</script>
<style>
table { border-spacing: 15px; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def offline_template() -> str:
    """An HTML template for `dvc plots show --html-template` with Vega inlined (no CDN)."""
    vlc = _vlc()
    bundle = vlc.javascript_bundle(vl_version=VL_VERSION)
    for bad in ("</script", "<!--", "{plot_divs}", "{refresh_tag}", "{scripts}"):
        if bad in bundle:
            raise Align2LlavaError(f"the Vega bundle contains {bad!r}; it cannot be inlined as it is")
    page = (_PAGE.replace("{vega}", vlc.get_vega_version()).replace("{vega_lite}", VL_VERSION)
            .replace("{vega_embed}", vlc.get_vega_embed_version()))
    return page.replace("BUNDLE", bundle)


def write_offline_template(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(offline_template(), encoding="utf-8")
    return path
