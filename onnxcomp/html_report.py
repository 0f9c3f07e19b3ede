"""The report as one self-contained HTML page: the plots people would rather see than read, and the tables.

Plots, drawn by matplotlib (onnxcomp[report]) and written into the page as inline SVG with text as paths:
- per layer, the output SNR each lossy pass left (its layer rows) next to the strength the layer got
  (sparsity, bits, ...), and int8's activation SQNR of the worst tensors (its stats);
- the bytes of each layer's weights in the input and the output model (compact weights at their stored size);
- size against accuracy of the candidates a search or a budget tried, with their front and the chosen one;
- each provider's latency distribution, every timed run of both models.

The page fetches nothing: no script, style sheet, font or image from anywhere else.
"""

from __future__ import annotations

import html
import io
import math
from collections import defaultdict
from pathlib import Path

import onnx

from onnxcomp import inspection, model_io
from onnxcomp.errors import InputError
from onnxcomp.report import Report, _bytes

SUFFIXES = (".html", ".htm")
# Nodes whose constant inputs are no layer's weights: the scale and zero point of an activation's quantization.
NOT_LAYERS = {"Constant", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
STRENGTH_COLUMNS = ("sparsity", "bits", "flops_ratio", "rank")  # what a pass's layer rows say it did to a layer
MOST_LAYERS = 40  # bars in the bytes plot; the smaller layers are summed in one bar
LABEL_CHARACTERS = 32
# Quantized and fused operators stand for the layer they replace, so that the layer keeps its place.
SAME_LAYER = {"QLinearConv": "Conv", "ConvInteger": "Conv", "FusedConv": "Conv", "QLinearMatMul": "MatMul",
              "MatMulInteger": "MatMul", "MatMulNBits": "MatMul", "DynamicQuantizeMatMul": "MatMul",
              "FusedMatMul": "MatMul", "QGemm": "Gemm", "GatherBlockQuantized": "Gather"}
STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
svg { max-width: 100%; height: auto; display: block; margin: 1em 0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 2px 8px; text-align: right; }
th { border-bottom: 1px solid #999; } td:nth-child(2) { text-align: left; font-family: monospace; }
.figures span { display: inline-block; margin-right: 2em; font-size: 1.1em; }
"""


def is_html(path: str) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def require_matplotlib() -> None:
    """Fail before any work when the plots cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("an HTML report needs matplotlib: pip install 'onnxcomp[report]', or write the report "
                         "as .json") from None


def render(report: Report) -> str:
    """The whole page, as text."""
    require_matplotlib()
    from matplotlib import rc_context

    with rc_context({"svg.fonttype": "path", "svg.hashsalt": "onnxcomp", "font.size": 9}):
        sections = [_summary(report), _candidates(report.candidates), _sensitivity(report),
                    _bytes_by_layer(report), _latency(report)]
    tables = report.render(candidates=False)  # the candidates have their own table, with the front
    sections.append(f"<h2>Tables</h2>\n<pre>{_text(tables)}</pre>" if tables else "")
    title = f"onnxcomp report: {Path(report.model).name}"
    body = "\n".join(section for section in sections if section)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{_text(title)}</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_text(title)}</h1>\n{body}\n</body>\n</html>\n")


def _summary(report: Report) -> str:
    lines = [f"<p>{_text(report.model)}" + (f" → {_text(report.output)}" if report.output else "") + "</p>"]
    result = report.validation
    if result is not None:
        figures = [f"size {_bytes(result.reference_bytes)} → {_bytes(result.candidate_bytes)} "
                   f"({result.size_ratio:.3f}×)"]
        if result.accuracy_drop is not None:
            figures.append(f"{'accuracy' if result.labelled else 'agreement'} drop {result.accuracy_drop:.2f} points")
        if result.latency_ratio is not None:
            figures.append(f"latency {result.latency_ratio:.2f}× (median, worst provider)")
        lines.append("<p class=\"figures\">" + "".join(f"<span>{_text(f)}</span>" for f in figures) + "</p>")
        lines.append(f"<p>measured on {_text(result.data_source)}</p>")
    if report.validation_skipped:
        lines.append(f"<p>validation skipped: {_text(report.validation_skipped)}</p>")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Size against accuracy of the candidates


def _candidates(candidates: list[dict]) -> str:
    if not candidates:
        return ""
    measured = [c for c in candidates if c.get("accuracy") is not None or c.get("drop") is not None]
    use_accuracy = bool(measured) and all(c.get("accuracy") is not None for c in measured)
    key = "accuracy" if use_accuracy else "drop"
    front = _front(measured, key)
    parts = ["<h2>Candidates: size against accuracy</h2>"]
    if measured:
        parts.append(_svg(_front_figure(candidates, measured, front, key)))
    rows = ["<tr><th>#</th><th>recipe</th><th>bytes</th><th>latency ms</th><th>accuracy %</th><th>drop</th>"
            "<th>front</th><th>chosen</th></tr>"]
    for number, candidate in enumerate(candidates, 1):
        rows.append("<tr>" + "".join(f"<td>{_text(cell)}</td>" for cell in (
            number, candidate.get("recipe", ""), _bytes(candidate["bytes"]), _figure(candidate.get("latency_ms"), 3),
            _figure(candidate.get("accuracy"), 2), _figure(candidate.get("drop"), 2),
            "yes" if any(c is candidate for c in front) else "", "yes" if candidate.get("chosen") else "")) + "</tr>")
    parts.append("<table>" + "".join(rows) + "</table>")
    return "\n".join(parts)


def _front(candidates: list[dict], key: str) -> list[dict]:
    """The candidates that no other is both smaller than and at least as accurate as (or the reverse)."""
    better = (lambda a, b: a >= b) if key == "accuracy" else (lambda a, b: a <= b)

    def beaten(c: dict) -> bool:
        return any(o is not c and o["bytes"] <= c["bytes"] and better(o[key], c[key])
                   and (o["bytes"] < c["bytes"] or o[key] != c[key]) for o in candidates)

    return sorted((c for c in candidates if not beaten(c)), key=lambda c: c["bytes"])


def _front_figure(candidates: list[dict], measured: list[dict], front: list[dict], key: str):
    figure = _figure_of(7.5, 4.2)
    axes = figure.subplots()
    axes.scatter([c["bytes"] / 1024 for c in measured], [c[key] for c in measured], s=28, color="#9aa5b1",
                 label="candidate", zorder=2)
    axes.plot([c["bytes"] / 1024 for c in front], [c[key] for c in front], "-o", color="#1f77b4", markersize=5,
              drawstyle="steps-post", label="front", zorder=3)
    chosen = [c for c in measured if c.get("chosen")]
    if chosen:
        axes.scatter([c["bytes"] / 1024 for c in chosen], [c[key] for c in chosen], s=180, marker="*",
                     color="#d62728", label="chosen", zorder=4)
    for number, candidate in enumerate(candidates, 1):
        if any(c is candidate for c in measured):
            axes.annotate(str(number), (candidate["bytes"] / 1024, candidate[key]), textcoords="offset points",
                          xytext=(4, 4), fontsize=8)
    sizes = [c["bytes"] for c in measured]
    if max(sizes) > 8 * min(sizes):
        from matplotlib.ticker import FuncFormatter

        axes.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 30, not 3×10¹
        axes.xaxis.set_major_formatter(plain)
        axes.xaxis.set_minor_formatter(plain)
    axes.set_xlabel("model size (KB)")
    axes.set_ylabel("top-1 accuracy (%)" if key == "accuracy" else "drop (points)")
    if key == "drop":
        axes.invert_yaxis()  # better is up in both cases
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right" if key == "accuracy" else "upper right")
    axes.set_title("size against accuracy (numbers: rows of the table)")
    return figure


# ---------------------------------------------------------------------------------------------------------
# Per-layer sensitivity


def _sensitivity(report: Report) -> str:
    figures = []
    for record in report.passes:
        rows = [row for row in record.layers if "layer" in row]
        if rows and any(_snr(row) is not None or _strength(row) for row in rows):
            figures.append(_svg(_layers_figure(record.name, rows)))
        sqnr = {name.split(":", 1)[1]: value for name, value in record.stats.items()
                if name.startswith("sqnr_db:") and isinstance(value, (int, float))}
        if sqnr:
            figures.append(_svg(_bars_figure(f"{record.name}: activation SQNR of the worst tensors (dB, higher "
                                             "is closer to float)", list(sqnr), list(sqnr.values()), "SQNR (dB)")))
    if not figures:
        return ""
    return "<h2>Per-layer sensitivity</h2>\n<p>Output SNR: each layer's output with its new weights against its " \
           "output with the original ones, on calibration data (higher is closer).</p>\n" + "\n".join(figures)


def _snr(row: dict) -> float | None:
    value = row.get("output_snr_db", row.get("weight_snr_db"))
    return float(value) if isinstance(value, (int, float)) else None


def _strength(row: dict) -> str | None:
    return next((column for column in STRENGTH_COLUMNS if isinstance(row.get(column), (int, float))), None)


def _layers_figure(name: str, rows: list[dict]):
    labels = [_label(row["layer"]) for row in rows]
    snr = [_snr(row) for row in rows]
    strength = _strength(rows[0])
    panels = (snr and any(v is not None for v in snr)) + (strength is not None)
    figure = _figure_of(8.5, _bars_height(len(rows)))
    axes = figure.subplots(1, panels, sharey=True, squeeze=False)[0]
    positions = list(range(len(rows)))
    used = 0
    if any(v is not None for v in snr):
        _finite_bars(axes[0], positions, [v if v is not None else 0.0 for v in snr], "#1f77b4")
        axes[0].set_xlabel("output SNR (dB)")
        axes[0].set_title(f"{name}: per-layer output SNR")
        used = 1
    if strength is not None:
        axes[used].barh(positions, [float(row.get(strength, 0)) for row in rows], color="#ff7f0e")
        axes[used].set_xlabel(strength)
        axes[used].set_title(f"{name}: {strength} per layer")
    _layer_axis(axes[0], labels)
    return figure


def _bars_figure(title: str, labels: list[str], values: list[float], unit: str):
    figure = _figure_of(8.5, _bars_height(len(labels)))
    axes = figure.subplots()
    _finite_bars(axes, range(len(labels)), values, "#2ca02c")
    axes.set_xlabel(unit)
    axes.set_title(title)
    _layer_axis(axes, [_label(label) for label in labels])
    return figure


# ---------------------------------------------------------------------------------------------------------
# Bytes by layer


def _bytes_by_layer(report: Report) -> str:
    paths = [report.model, report.output]
    if not all(path and Path(path).is_file() for path in paths):
        return ""
    before, after = (layer_bytes(model_io.load(path)) for path in paths)
    rows = match_layers(before, after)
    if not rows:
        return ""
    return ("<h2>Bytes by layer</h2>\n<p>The bytes of the weights each layer reads, compressed layouts at their "
            "stored size (the scales of activations' quantization left out); layers of the output model are "
            "matched to the input's by name, else by their order among layers of the same operator.</p>\n"
            + _svg(_bytes_figure(rows)))


def layer_bytes(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    """(name, operator, bytes) of each node that reads weights, in graph order; a weight read by several nodes
    counts for the first."""
    weights = {weight.name: weight.bytes for weight in inspection.summarize(model).weights}
    counted: set[str] = set()
    layers = []
    for node in model.graph.node:
        read = [name for name in node.input if name in weights and name not in counted]
        counted.update(read)
        total = sum(weights[name] for name in read)
        if total and node.op_type not in NOT_LAYERS:
            layers.append((node.name or node.output[0], node.op_type, total))
    return layers


def match_layers(before: list[tuple[str, str, int]], after: list[tuple[str, str, int]]) -> list[tuple[str, int, int]]:
    """(layer, bytes before, bytes after), in the input model's order; layers only the output has come last."""
    by_name = {name: index for index, (name, _, _) in enumerate(after)}
    paired: dict[int, int] = {}
    for index, (name, _, _) in enumerate(before):
        if name in by_name and by_name[name] not in paired.values():
            paired[index] = by_name.pop(name)
    unmatched_after = defaultdict(list)  # operator → the output's unmatched layers, in order
    for index, (_, op, _) in enumerate(after):
        if index not in paired.values():
            unmatched_after[SAME_LAYER.get(op, op)].append(index)
    for index, (_, op, _) in enumerate(before):
        waiting = unmatched_after[SAME_LAYER.get(op, op)]
        if index not in paired and waiting:
            paired[index] = waiting.pop(0)
    rows = [(name, size, after[paired[index]][2] if index in paired else 0)
            for index, (name, _, size) in enumerate(before)]
    rows += [(after[index][0], 0, after[index][2]) for waiting in unmatched_after.values() for index in waiting]
    return rows


def _bytes_figure(rows: list[tuple[str, int, int]]):
    shown = rows
    if len(rows) > MOST_LAYERS:
        largest = set(sorted(range(len(rows)), key=lambda i: -max(rows[i][1], rows[i][2]))[:MOST_LAYERS - 1])
        rest = [row for i, row in enumerate(rows) if i not in largest]
        shown = [row for i, row in enumerate(rows) if i in largest]
        shown.append((f"{len(rest)} other layers", sum(r[1] for r in rest), sum(r[2] for r in rest)))
    figure = _figure_of(8.5, _bars_height(len(shown)))
    axes = figure.subplots()
    positions = list(range(len(shown)))
    height = 0.4
    axes.barh([p - height / 2 for p in positions], [r[1] / 1024 for r in shown], height, color="#9aa5b1",
              label=f"input ({_bytes(sum(r[1] for r in rows))})")
    axes.barh([p + height / 2 for p in positions], [r[2] / 1024 for r in shown], height, color="#1f77b4",
              label=f"output ({_bytes(sum(r[2] for r in rows))})")
    axes.set_xlabel("weight bytes (KB)")
    axes.set_title("bytes by layer, before and after")
    axes.legend(loc="lower right")
    _layer_axis(axes, [_label(r[0]) for r in shown])
    return figure


# ---------------------------------------------------------------------------------------------------------
# Latency


def _latency(report: Report) -> str:
    providers = [p for p in (report.validation.providers if report.validation else [])
                 if p.reference_latency and p.candidate_latency and p.reference_latency.timings_ms]
    if not providers:
        return ""
    figure = _figure_of(8.5, 1.2 + 1.4 * len(providers))
    axes_list = figure.subplots(len(providers), 1, squeeze=False)[:, 0]
    for axes, provider in zip(axes_list, providers):
        timings = [provider.candidate_latency.timings_ms, provider.reference_latency.timings_ms]
        axes.boxplot(timings, vert=False, widths=0.5, showfliers=False)
        for row, values in enumerate(timings, 1):
            spread = [row + 0.18 * ((i * 0.618) % 1 - 0.5) for i in range(len(values))]  # even jitter, no RNG
            axes.scatter(values, spread, s=8, alpha=0.6, color="#1f77b4" if row == 1 else "#9aa5b1", zorder=3)
        axes.set_yticks([1, 2], ["output", "input"])
        axes.set_title(f"{provider.provider}: latency of each timed run (batch 1), median "
                       f"{provider.reference_latency.median_ms:.3f} → {provider.candidate_latency.median_ms:.3f} ms")
        axes.grid(True, axis="x", alpha=0.3)
    axes_list[-1].set_xlabel("milliseconds")
    return "<h2>Latency</h2>\n" + _svg(figure)


# ---------------------------------------------------------------------------------------------------------
# Drawing


def _figure_of(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _finite_bars(axes, positions, values: list[float], colour: str) -> None:
    """Horizontal bars; an infinite SNR (an exact output) is drawn a little past the longest finite bar and
    labelled "inf"."""
    finite = [v for v in values if math.isfinite(v)]
    longest = max(finite, default=0.0)
    reach = longest * 1.15 if longest > 0 else 100.0
    drawn = [v if math.isfinite(v) else reach if v > 0 else 0.0 for v in values]
    axes.barh(list(positions), drawn, color=colour)
    for position, value in zip(positions, values):
        if not math.isfinite(value):
            axes.annotate(str(value).replace("nan", "NaN"), (0, position), xytext=(3, 0), va="center", fontsize=7,
                          textcoords="offset points", color="white" if value > 0 else "black")


def _bars_height(count: int) -> float:
    return 1.2 + 0.17 * max(count, 3)


def _layer_axis(axes, labels: list[str]) -> None:
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.invert_yaxis()  # graph order, top to bottom
    axes.grid(True, axis="x", alpha=0.3)


def _svg(figure) -> str:
    """The figure as an <svg> element (no XML prologue), text drawn as paths so no font is needed."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _label(name: str) -> str:
    return name if len(name) <= LABEL_CHARACTERS else "…" + name[-(LABEL_CHARACTERS - 1):]


def _figure(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _text(value) -> str:
    return html.escape(str(value))
