"""One report per run: the passes with their stats and timing, and the validation; as text or JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from onnxcomp.manager import PassRecord
from onnxcomp.validate import Validation


@dataclass
class Report:
    model: str
    output: str | None = None
    passes: list[PassRecord] = field(default_factory=list)
    validation: Validation | None = None
    validation_skipped: str | None = None  # why the model could not be validated (no inputs could be made)
    # The candidates a search or a budget tried, one dict each: "recipe" (str), "bytes" (int),
    # "latency_ms" (float or None), "accuracy" (float or None, percent), "drop" (float or None, points),
    # "drop_error" (its standard error, points; absent where not measured), "chosen" (bool). The HTML report
    # plots them as the size/accuracy Pareto front.
    candidates: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "output": self.output,
            "passes": [asdict(record) for record in self.passes],
            "validation": self.validation.to_dict() if self.validation else None,
            "validation_skipped": self.validation_skipped,
            "candidates": [dict(candidate) for candidate in self.candidates],
        }

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2)

    def render(self, *, candidates: bool = True) -> str:
        lines = render_candidates(self.candidates) if candidates and self.candidates else []
        if self.passes:
            lines += [""] if lines else []
            lines.append(f"passes on {self.model}" + (f" → {self.output}" if self.output else ""))
            rows = [("pass", "changed", "time", "stats")]
            for record in self.passes:
                stats = ", ".join(f"{k}={_short(v)}" for k, v in record.stats.items() if v not in (0, "", None))
                name = record.name + (" (auto)" if record.automatic else "")
                rows.append((name, "yes" if record.modified else "no", f"{record.seconds * 1000:.0f} ms",
                             stats or "-"))
            lines += _table(rows)
            for record in self.passes:
                if record.layers:
                    columns = list(record.layers[0])
                    lines += ["", f"{record.name} per layer:"]
                    lines += _table([tuple(columns)] + [tuple(_short(row.get(c, "")) for c in columns)
                                                        for row in record.layers])
        if self.validation:
            lines += ([""] if lines else []) + render_validation(self.validation)
        if self.validation_skipped:
            lines += ([""] if lines else []) + [f"validation skipped: {self.validation_skipped}"]
        return "\n".join(lines)


def render_candidates(candidates: list[dict]) -> list[str]:
    """One row per candidate tried, in the order tried; the chosen one starred."""
    rows = [("", "recipe", "size", "latency ms", "accuracy", "drop")]
    for candidate in candidates:
        latency, drop, error = candidate.get("latency_ms"), candidate.get("drop"), candidate.get("drop_error")
        rows.append(("*" if candidate.get("chosen") else "", candidate["recipe"], _bytes(candidate["bytes"]),
                     "-" if latency is None else f"{latency:.3f}", _pct(candidate.get("accuracy")),
                     "-" if drop is None else f"{drop:.2f}" + ("" if error is None else f"±{error:.2f}")))
    return [f"candidates tried: {len(candidates)}"] + _table(rows)


def render_validation(result: Validation) -> list[str]:
    """One row per provider for its worst output (named), then a line for each other output."""
    lines = [f"validation on {result.data_source}"]
    rows = [("provider", "samples", "top-1 ref", "top-1 new", "agreement", "worst output", "max |err|", "cosine",
             "SQNR dB", "ref p50/p90 ms", "new p50/p90 ms", "ratio")]
    for p in result.providers:
        worst = p.worst_output
        rows.append((p.provider, str(p.samples), _pct(p.reference_accuracy), _pct(p.candidate_accuracy),
                     _pct(p.agreement), worst.name, f"{worst.max_abs_error:.3g}", _cosine(worst), _db(worst.sqnr_db),
                     _ms(p.reference_latency), _ms(p.candidate_latency),
                     f"{p.latency_ratio:.2f}x" if p.latency_ratio else "-"))
    lines += _table(rows)
    for p in result.providers:
        for output in p.outputs:
            if len(p.outputs) > 1 and output is not p.worst_output:
                lines.append(f"  {p.provider} output {output.name}: {_output_figures(output)}")
    lines.append(f"size: {_bytes(result.reference_bytes)} → {_bytes(result.candidate_bytes)} "
                 f"({result.size_ratio:.3f}x)")
    over = {o.agreement_over for p in result.providers for o in p.outputs if o.agreement is not None}
    if "position" in over:
        lines.append("note: agreement is the share of positions (sequence steps, map pixels) whose argmax matches "
                     "the reference, for outputs with more than one position")
    lines += [f"note: {note}" for note in result.notes]
    return lines


def _output_figures(output) -> str:
    if output.integer:
        return "exact" if output.mismatches == 0 else f"{output.mismatches} element(s) differ (integer output)"
    figures = f"max |err| {output.max_abs_error:.3g}, cosine {_cosine(output)}, SQNR {_db(output.sqnr_db)} dB"
    if output.agreement is not None:
        figures += f", argmax agreement {output.agreement:.2f}% per {output.agreement_over}"
    return figures


def _cosine(output) -> str:
    if output.integer:
        return "exact" if output.mismatches == 0 else f"{output.mismatches} differ"
    return f"{output.cosine:.6f}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _ms(latency) -> str:
    return "-" if latency is None else f"{latency.median_ms:.3f}/{latency.p90_ms:.3f}"


def _db(value: float) -> str:
    return "inf" if math.isinf(value) and value > 0 else f"{value:.1f}"


def _bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _finite(value):
    """JSON has no infinity: write it as the string "inf" (SQNR of identical outputs)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
