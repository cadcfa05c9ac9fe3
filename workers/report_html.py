"""The HTML report: one self-contained file (no network, no scripts) with SVG plots.

Every plot is an SVG document embedded as a ``data:image/svg+xml`` image and every heatmap a
``data:image/png`` image, so the file opens from disk, survives being mailed or copied out of
the lake, and a browser can tell whether each picture loaded (``naturalWidth``). Plain string
building and ``html.escape``: no plotting library on the cluster.

``document`` gathers what the report job computed into one dict; ``render`` turns it into HTML.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from typing import Any

from medray.workers.model_card import render_html as render_card

W, H = 360, 300  # every plot, in CSS pixels
_M = {"left": 52, "right": 14, "top": 30, "bottom": 44}
BLUE, ORANGE, GREY, RED = "#1f77b4", "#ff7f0e", "#9a9a9a", "#d62728"


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, list | tuple):
        return ", ".join(str(x) for x in v) or "–"
    return str(v)


def _esc(v: Any) -> str:
    return html.escape(_num(v), quote=True)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- SVG


class _Axes:
    """Maps data coordinates on [x0, x1] x [y0, y1] to the plot's pixels."""

    def __init__(self, x0: float = 0.0, x1: float = 1.0, y0: float = 0.0, y1: float = 1.0
                 ) -> None:
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1 if y1 > y0 else y0 + 1.0
        self.pw = W - _M["left"] - _M["right"]
        self.ph = H - _M["top"] - _M["bottom"]

    def px(self, x: float) -> float:
        return _M["left"] + (x - self.x0) / (self.x1 - self.x0) * self.pw

    def py(self, y: float) -> float:
        return _M["top"] + (1 - (y - self.y0) / (self.y1 - self.y0)) * self.ph

    def frame(self, title: str, xlabel: str, ylabel: str, yfmt: str = "{:.1f}") -> list[str]:
        out = [f'<rect width="{W}" height="{H}" fill="#ffffff"/>',
               f'<text x="{W / 2:.0f}" y="18" text-anchor="middle" font-size="13" '
               f'font-weight="bold">{html.escape(title)}</text>']
        for k in range(6):
            fx = self.x0 + (self.x1 - self.x0) * k / 5
            fy = self.y0 + (self.y1 - self.y0) * k / 5
            x, y = self.px(fx), self.py(fy)
            out.append(f'<line x1="{x:.1f}" y1="{_M["top"]}" x2="{x:.1f}" '
                       f'y2="{H - _M["bottom"]}" stroke="#eeeeee"/>')
            out.append(f'<line x1="{_M["left"]}" y1="{y:.1f}" x2="{W - _M["right"]}" '
                       f'y2="{y:.1f}" stroke="#eeeeee"/>')
            out.append(f'<text x="{x:.1f}" y="{H - _M["bottom"] + 14}" text-anchor="middle" '
                       f'font-size="10">{fx:.1f}</text>')
            out.append(f'<text x="{_M["left"] - 4}" y="{y + 3:.1f}" text-anchor="end" '
                       f'font-size="10">{html.escape(yfmt.format(fy))}</text>')
        out.append(f'<rect x="{_M["left"]}" y="{_M["top"]}" width="{self.pw}" height="{self.ph}"'
                   ' fill="none" stroke="#444444"/>')
        out.append(f'<text x="{_M["left"] + self.pw / 2:.0f}" y="{H - 8}" text-anchor="middle" '
                   f'font-size="11">{html.escape(xlabel)}</text>')
        cy = _M["top"] + self.ph / 2
        out.append(f'<text x="12" y="{cy:.0f}" text-anchor="middle" font-size="11" '
                   f'transform="rotate(-90 12 {cy:.0f})">{html.escape(ylabel)}</text>')
        return out

    def path(self, xs: Sequence[float], ys: Sequence[float], color: str, width: float = 2.0,
             dash: str = "") -> str:
        pts = [(self.px(x), self.py(y)) for x, y in zip(xs, ys, strict=True)
               if _finite(x) and _finite(y)]
        if not pts:
            return ""
        d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        return (f'<path d="{d}" fill="none" stroke="{color}" stroke-width="{width}"'
                f'{dash_attr}/>')

    def point(self, x: float, y: float, color: str, label: str) -> str:
        if not (_finite(x) and _finite(y)):
            return ""
        return (f'<circle cx="{self.px(x):.1f}" cy="{self.py(y):.1f}" r="5" fill="{color}" '
                f'stroke="#000000"><title>{html.escape(label)}</title></circle>')


def _legend(items: Sequence[tuple[str, str]], corner: str = "tr") -> list[str]:
    """Colour keys in a corner of the plot ("tr", "br", "bl", "tl") that the curve avoids."""
    out = []
    x = W - _M["right"] - 150 if corner[1] == "r" else _M["left"] + 8
    y0 = _M["top"] + 12 if corner[0] == "t" else H - _M["bottom"] - 8 - 15 * (len(items) - 1)
    for i, (color, text) in enumerate(items):
        y = y0 + 15 * i
        out.append(f'<rect x="{x}" y="{y - 8}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + 14}" y="{y + 1}" font-size="10">{html.escape(text)}</text>')
    return out


def svg_document(parts: Sequence[str]) -> str:
    body = "".join(p for p in parts if p)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" font-family="sans-serif">{body}</svg>')


def roc_svg(curve: dict[str, list] | None, op: dict[str, Any] | None, auroc: Any,
            label: str) -> str:
    ax = _Axes()
    parts = ax.frame(f"ROC: {label}", "false positive rate (1 - specificity)",
                     "true positive rate (sensitivity)")
    parts.append(ax.path([0, 1], [0, 1], GREY, 1, "4 3"))
    if curve:
        parts.append(ax.path(curve["x"], curve["y"], BLUE))
    if op:
        parts.append(ax.point(op["fpr"], op["tpr"], RED,
                              f"operating point, threshold {_num(op['threshold'])}"))
    parts += _legend([(BLUE, f"AUROC {_num(auroc)}"), (RED, "operating point")], "br")
    return svg_document(parts)


def pr_svg(curve: dict[str, list] | None, op: dict[str, Any] | None, auprc: Any,
           prevalence: Any, label: str) -> str:
    ax = _Axes()
    parts = ax.frame(f"Precision-recall: {label}", "recall (sensitivity)", "precision (PPV)")
    if _finite(prevalence):
        parts.append(ax.path([0, 1], [prevalence, prevalence], GREY, 1, "4 3"))
    if curve:
        parts.append(ax.path(curve["x"], curve["y"], BLUE))
    if op:
        parts.append(ax.point(op["recall"], op["precision"], RED,
                              f"operating point, threshold {_num(op['threshold'])}"))
    parts += _legend([(BLUE, f"AP {_num(auprc)}"), (RED, "operating point")], "bl")
    return svg_document(parts)


def reliability_svg(bins: Sequence[dict[str, Any]] | None, ece: Any, label: str) -> str:
    ax = _Axes()
    parts = ax.frame(f"Reliability: {label}", "mean predicted score", "observed positive share")
    parts.append(ax.path([0, 1], [0, 1], GREY, 1, "4 3"))
    bins = list(bins or [])
    most = max([b.get("count") or 0 for b in bins] or [0])
    for b in bins:  # bin sizes as faint bars along the bottom: a point from 3 images is noise
        if most and b.get("count"):
            h = 0.2 * b["count"] / most
            x, y = ax.px(b["lo"]), ax.py(h)
            parts.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{ax.px(b["hi"]) - x - 2:.1f}"'
                         f' height="{ax.py(0) - y:.1f}" fill="#c6dbef"/>')
    filled = [b for b in bins if b.get("count")]
    parts.append(ax.path([b["mean_score"] for b in filled], [b["frac_positive"] for b in filled],
                         BLUE))
    parts += [ax.point(b["mean_score"], b["frac_positive"], BLUE,
                       f"{b['count']} images, scores {b['lo']:.1f}-{b['hi']:.1f}")
              for b in filled]
    parts += _legend([(BLUE, f"ECE {_num(ece)}"), ("#c6dbef", "images per bin")], "tl")
    return svg_document(parts)


def histogram_svg(hist: dict[str, list], reference: dict[str, list] | None, label: str,
                  threshold: Any = None) -> str:
    """Share of images per score bin; the reference run as an outline when given."""
    edges, counts = hist["edges"], hist["counts"]
    total = sum(counts) or 1
    shares = [c / total for c in counts]
    ref_shares = None
    if reference:
        rt = sum(reference["counts"]) or 1
        ref_shares = [c / rt for c in reference["counts"]]
    top = max(shares + (ref_shares or []) + [0.05])
    ax = _Axes(0.0, 1.0, 0.0, top * 1.1)
    parts = ax.frame(f"Scores: {label}", "score", "share of images", "{:.2f}")
    for lo, hi, v in zip(edges[:-1], edges[1:], shares, strict=True):
        if v > 0:
            x, y = ax.px(lo), ax.py(v)
            parts.append(f'<rect x="{x + 0.5:.1f}" y="{y:.1f}" width="{ax.px(hi) - x - 1:.1f}" '
                         f'height="{ax.py(0) - y:.1f}" fill="{BLUE}" fill-opacity="0.75"/>')
    legend = [(BLUE, f"this run ({sum(counts)})")]
    if reference is not None and ref_shares is not None:
        xs, ys = [], []
        for lo, hi, v in zip(reference["edges"][:-1], reference["edges"][1:], ref_shares,
                             strict=True):
            xs += [lo, hi]
            ys += [v, v]
        parts.append(ax.path(xs, ys, ORANGE, 2))
        legend.append((ORANGE, f"reference ({sum(reference['counts'])})"))
    if _finite(threshold):
        parts.append(ax.path([threshold, threshold], [0, top * 1.1], RED, 1.5, "5 3"))
        legend.append((RED, f"threshold {_num(threshold)}"))
    parts += _legend(legend)
    return svg_document(parts)


def img_tag(data: bytes, mime: str, alt: str, width: int | None = None,
            height: int | None = None, cls: str = "plot") -> str:
    uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    size = (f' width="{width}"' if width else "") + (f' height="{height}"' if height else "")
    return f'<img class="{cls}" src="{uri}" alt="{html.escape(alt, quote=True)}"{size}>'


def svg_img(svg: str, alt: str) -> str:
    return img_tag(svg.encode(), "image/svg+xml", alt, W, H)


# --------------------------------------------------------------------------- the page


def document(summary: dict[str, Any], per_label: list[dict[str, Any]],
             plots: dict[str, dict[str, Any]], drift: list[dict[str, Any]] | None,
             compare: list[dict[str, Any]] | None,
             heatmaps: list[dict[str, Any]] | None = None,
             operating: list[dict[str, Any]] | None = None,
             subgroups: list[dict[str, Any]] | None = None,
             gaps: list[dict[str, Any]] | None = None,
             card: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``render`` needs, in one dict (heatmaps carry their PNG bytes)."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for h in heatmaps or []:
        by_label.setdefault(h["label"], []).append(h)
    return {"summary": summary, "per_label": per_label, "plots": plots, "drift": drift,
            "compare": compare, "heatmaps": by_label, "operating": operating or [],
            "subgroups": subgroups or [], "gaps": gaps or [], "card": card}


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plot{border:1px solid #ddd}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:6px 0}
.drifted{color:#b00000;font-weight:bold}
figure{display:inline-block;margin:4px;text-align:center;font-size:11px}
.heat{border:1px solid #ddd;image-rendering:pixelated}
"""

_METRIC_COLUMNS = (
    ("images", "images"), ("positives", "positives"), ("prevalence", "prevalence"),
    ("threshold", "threshold"), ("positive_rate", "positive rate"), ("auroc", "AUROC"),
    ("auprc", "AUPRC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
    ("ppv", "PPV"), ("npv", "NPV"), ("f1", "F1"), ("ece", "ECE"),
)
_OPERATING_COLUMNS = (
    ("label", "label"), ("rule", "rule"), ("primary", "primary"), ("threshold", "threshold"),
    ("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"),
    ("npv", "NPV"), ("f1", "F1"), ("tp", "TP"), ("fp", "FP"), ("tn", "TN"), ("fn", "FN"),
)
_SUBGROUP_COLUMNS = (
    ("label", "label"), ("attribute", "attribute"), ("group", "group"), ("images", "images"),
    ("positives", "positives"), ("auroc", "AUROC"), ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
)
_GAP_COLUMNS = (
    ("label", "label"), ("attribute", "attribute"), ("metric", "metric"), ("high", "best"),
    ("low", "worst"), ("gap", "gap"), ("groups", "groups compared"), ("flagged", "flagged"),
)


def _with_ci(row: dict[str, Any], key: str) -> str:
    value = _esc(row.get(key))
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if _finite(lo) and _finite(hi):
        value += f"<br><small>({_num(lo)}–{_num(hi)})</small>"
    return value


def _rows_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]],
                ci: bool = False) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            if key == "drifted" and r.get(key):
                cells.append('<td class="drifted">DRIFTED</td>')
            elif key == "flagged" and r.get(key):
                cells.append('<td class="drifted">GAP</td>')
            else:
                cells.append(f"<td>{_with_ci(r, key) if ci else _esc(r.get(key))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _confusion(row: dict[str, Any]) -> str:
    if row.get("tp") is None:
        return ""
    return ("<table><tr><th>at threshold " + _esc(row.get("threshold")) + "</th>"
            "<th>truth positive</th><th>truth negative</th></tr>"
            f"<tr><th>called positive</th><td>TP {_esc(row['tp'])}</td>"
            f"<td>FP {_esc(row['fp'])}</td></tr>"
            f"<tr><th>called negative</th><td>FN {_esc(row['fn'])}</td>"
            f"<td>TN {_esc(row['tn'])}</td></tr></table>")


def _label_section(row: dict[str, Any], plots: dict[str, Any],
                   heat: list[dict[str, Any]], note: str | None = None) -> str:
    label = str(row["label"])
    imgs = []
    if plots.get("roc") or plots.get("op"):
        imgs.append(svg_img(roc_svg(plots.get("roc"), plots.get("op"), row.get("auroc"), label),
                            f"ROC curve for {label}"))
        imgs.append(svg_img(pr_svg(plots.get("pr"), plots.get("op"), row.get("auprc"),
                                   row.get("prevalence"), label), f"PR curve for {label}"))
    if plots.get("calibration"):
        imgs.append(svg_img(reliability_svg(plots["calibration"], row.get("ece"), label),
                            f"reliability diagram for {label}"))
    if plots.get("histogram"):
        imgs.append(svg_img(histogram_svg(plots["histogram"], plots.get("reference_histogram"),
                                          label, row.get("threshold")),
                            f"score histogram for {label}"))
    parts = [f"<h2>{html.escape(label)}</h2>"]
    if not plots.get("roc"):
        parts.append('<p class="note">No ROC/PR curve: this label has no ground truth with '
                     "both classes in this run.</p>")
    parts.append(f'<div class="plots">{"".join(imgs)}</div>')
    parts.append(_confusion(row))
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    if heat:
        figs = "".join(
            "<figure>" + img_tag(h["png"], "image/png", f"Grad-CAM {label} #{h['rank']}", 160,
                                 160, "heat")
            + f"<figcaption>#{h['rank']} score {_num(h['score'])}<br>"
            f"{html.escape(h['image_id'][:12])}</figcaption></figure>"
            for h in sorted(heat, key=lambda h: h["rank"]))
        n = len(heat)
        parts.append(f"<h3>Grad-CAM on the {n} highest-scored image{'s' if n > 1 else ''}</h3>"
                     f"<div>{figs}</div>")
    return "\n".join(parts)


def render(doc: dict[str, Any]) -> str:
    """The report as one HTML string."""
    s = doc["summary"]
    title = f"medray report: {s.get('run_id', '')}"
    keys = ("run_id", "model", "model_version", "dataset", "dataset_version", "split", "images",
            "errors", "with_truth", "patients", "ci_unit", "n_boot", "reference", "compare",
            "drift_psi", "drifted_labels", "heatmaps", "calibration", "subgroup_attributes",
            "flagged_gaps", "cpu_seconds", "gpu_seconds",
            "cost_total", "cost_per_1000_images", "currency", "created_at")
    summary_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_esc(s.get(k))}</td></tr>"
                           for k in keys if s.get(k) is not None)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", f"<table>{summary_rows}</table>"]
    if s.get("ci_note"):
        parts.append(f'<p class="note">{html.escape(str(s["ci_note"]))}</p>')
    if s.get("drifted_labels"):
        parts.append(f'<p class="note drifted">Drift against {html.escape(str(s["reference"]))}'
                     f": {html.escape(', '.join(s['drifted_labels']))}</p>")
    parts.append("<h2>Per-label metrics</h2><p>95% bootstrap intervals in brackets. ECE: "
                 "expected calibration error of the scores (" + _esc(s.get("calibration")) +
                 " applied when scored).</p>")
    parts.append(_rows_table(doc["per_label"], [("label", "label"), *_METRIC_COLUMNS], ci=True))
    if doc.get("operating"):
        parts.append("<h2>Operating points</h2><p>Each threshold the model card stores, with the "
                     "rule that chose it on validation; rates on this run with 95% bootstrap "
                     "intervals. The primary one decides <code>predicted_labels</code>.</p>")
        parts.append(_rows_table(doc["operating"], _OPERATING_COLUMNS, ci=True))
    if doc.get("subgroups"):
        parts.append("<h2>Subgroups</h2><p>Metrics per patient group at the primary threshold, "
                     "95% bootstrap intervals over patients. The largest gap compares the best "
                     "and worst group with at least "
                     f"{_esc(doc['gaps'][0].get('min_cases') if doc.get('gaps') else '-')} "
                     "cases of the class the metric needs; its interval holds for all pairs at "
                     "once, and GAP marks one that excludes zero.</p>")
        parts.append(_rows_table(doc["subgroups"], _SUBGROUP_COLUMNS, ci=True))
        parts.append(_rows_table(doc.get("gaps") or [], _GAP_COLUMNS, ci=True))
    if doc.get("drift") is not None:
        parts.append(f"<h2>Drift against {html.escape(str(s.get('reference')))}</h2>")
        parts.append(_rows_table(doc["drift"], [
            ("label", "label"), ("images", "images"), ("reference_images", "reference images"),
            ("positive_rate", "positive rate"), ("reference_positive_rate", "reference rate"),
            ("psi", "PSI"), ("ks", "KS"), ("ks_pvalue", "KS p"), ("drifted", "drifted")]))
    if doc.get("compare") is not None:
        parts.append(f"<h2>Compared with {html.escape(str(s.get('compare')))}</h2>")
        parts.append(_rows_table(doc["compare"], [
            ("label", "label"), ("paired_images", "paired images"), ("auroc", "AUROC"),
            ("compare_auroc", "AUROC (other)"), ("auroc_diff", "difference"),
            ("auroc_diff_lo", "lo"), ("auroc_diff_hi", "hi"), ("auroc_diff_p", "p")]))
    for row in doc["per_label"]:
        label = row["label"]
        parts.append(_label_section(row, doc["plots"].get(label, {}),
                                    doc["heatmaps"].get(label, []), s.get("heatmaps_note")))
    if doc.get("card"):
        parts.append(render_card(doc["card"]))
    parts.append("</body></html>")
    return "\n".join(parts)
