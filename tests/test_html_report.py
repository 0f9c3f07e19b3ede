"""`--report out.html`: one self-contained page whose plots a browser draws; JSON stays for .json.

The page is rendered in headless Chromium (Debian package `chromium`; .ci/run installs it): the screenshot must
show the plots' colours, the DOM their SVG elements, and the console no message.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from helpers import run_cli, run_model
from onnxcomp import cli, html_report, model_io
from onnxcomp.report import Report

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: the HTML report is not "
                                                             "rendered (Debian: apt-get install chromium; .ci/run "
                                                             "installs it when it can)")
RECIPE = "prune:sparsity=0.5,min-size=0,share:bits=4,min-size=0,short-names"
BLUE, ORANGE, RED = (31, 119, 180), (255, 127, 14), (214, 39, 40)  # the bars of SNR and strength, the chosen star


def two_layer_model() -> onnx.ModelProto:
    """x[N,16] → Gemm(32) → Relu → Gemm(10) → logits: two weighted layers, enough for per-layer rows."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
               for name, shape in (("W1", (32, 16)), ("B1", (32,)), ("W2", (10, 32)), ("B2", (10,)))]
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "B2"], ["logits"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The model, labelled evaluation data (labels: the model's own top-1) and calibration data."""
    folder = tmp_path_factory.mktemp("html")
    model = two_layer_model()
    onnx.save(model, folder / "model.onnx")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    np.savez(folder / "data.npz", x=x, labels=run_model(model, {"x": x})[0].argmax(axis=1))
    np.savez(folder / "calib.npz", x=rng.normal(size=(64, 16)).astype(np.float32))
    return folder


@pytest.fixture(scope="module")
def html_page(work) -> Path:
    result = run_cli("optimize", work / "model.onnx", "-o", work / "out.onnx", "--passes", RECIPE,
                     "--calib-data", work / "calib.npz", "--data", work / "data.npz", "--runs", "20",
                     "--report", work / "report.html")
    assert result.returncode == 0, result.stderr
    return work / "report.html"


def test_html_report_is_self_contained_with_a_plot_per_topic(html_page):
    page = html_page.read_text()
    references = _References()
    references.feed(page)
    assert references.outside == [], "the page must fetch nothing"
    assert page.count("<svg") == 4  # prune's and share's layers, bytes by layer, latency (no candidates here)
    for heading in ("Per-layer sensitivity", "Bytes by layer", "Latency", "Tables"):
        assert f"<h2>{heading}</h2>" in page
    assert "prune per layer:" in page and "share per layer:" in page  # the terminal's tables


@needs_chromium
def test_chromium_draws_the_report_without_console_messages(html_page, tmp_path):
    pixels, console, dom = render_in_chromium(html_page, tmp_path)
    assert console == []
    assert dom.count("<svg") == 4 and dom.count("<path") > 100
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500, "the plots are blank (text alone gives ~200 colours)"
    assert _pixels_of(pixels, BLUE) > 10_000 and _pixels_of(pixels, ORANGE) > 10_000, "the bars are not drawn"


@needs_chromium
def test_chromium_check_sees_console_errors(tmp_path):
    """The check above would see a broken page: a script error reaches the captured console."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction()</script></body></html>")
    _, console, _ = render_in_chromium(page, tmp_path)
    assert any("Uncaught ReferenceError" in line for line in console), console


@needs_chromium
def test_candidates_are_plotted_with_their_front_and_the_chosen_one(work, tmp_path):
    candidates = [  # (bytes, accuracy): 2 and 4 are beaten by 3 (smaller and more accurate)
        {"recipe": "fuse-bn", "bytes": 280_000, "latency_ms": 1.1, "accuracy": 91.0, "drop": 0.0, "chosen": False},
        {"recipe": "a", "bytes": 120_000, "latency_ms": 1.0, "accuracy": 88.0, "drop": 3.0, "chosen": False},
        {"recipe": "b", "bytes": 60_000, "latency_ms": 1.0, "accuracy": 90.5, "drop": 0.5, "chosen": True},
        {"recipe": "c", "bytes": 70_000, "latency_ms": None, "accuracy": 89.0, "drop": 2.0, "chosen": False},
        {"recipe": "d", "bytes": 25_000, "latency_ms": 0.9, "accuracy": 80.0, "drop": 11.0, "chosen": False},
    ]
    report = Report(model=str(work / "model.onnx"), candidates=candidates)
    page = tmp_path / "candidates.html"
    model_io.save_text(html_report.render(report), page)
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", page.read_text())]
    assert [cells[1] for cells in rows[1:] if cells[6] == "yes"] == ["fuse-bn", "b", "d"]  # the front column
    pixels, console, dom = render_in_chromium(page, tmp_path)
    assert console == [] and dom.count("<svg") == 1
    assert _pixels_of(pixels, RED) > 100, "the chosen candidate's star is not drawn"
    assert _pixels_of(pixels, BLUE) > 500, "the front is not drawn"


def test_int8_activation_sqnr_and_quantized_layer_bytes_are_plotted(work, tmp_path):
    output = tmp_path / "int8.onnx"
    _, report = onnxcomp.optimize(work / "model.onnx", "int8", calib_data=str(work / "calib.npz"), output=output,
                                  validate_result=False)
    assert any(name.startswith("sqnr_db:") for name in report.passes[0].stats)
    page = html_report.render(report)
    sensitivity = page.split("<h2>Per-layer sensitivity</h2>")[1].split("<h2>")[0]
    assert sensitivity.count("<svg") == 1  # int8 has no layer rows: its SQNR of the worst tensors
    rows = html_report.match_layers(html_report.layer_bytes(model_io.load(work / "model.onnx")),
                                    html_report.layer_bytes(model_io.load(output)))
    assert [name for name, _, _ in rows] == ["fc1", "fc2"]  # DequantizeLinear's weights count for their Gemm
    assert all(stored < size / 2 for _, size, stored in rows)  # int8 weights, float biases


def test_json_report_keeps_candidates_and_each_timed_run(work, tmp_path):
    result = run_cli("validate", work / "model.onnx", work / "model.onnx", "--data", work / "data.npz",
                     "--runs", "7", "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["candidates"] == []
    latency = report["validation"]["providers"][0]["candidate_latency"]
    assert len(latency["timings_ms"]) == 7 and min(latency["timings_ms"]) <= latency["median_ms"]
    tried = {"recipe": "deep-compression", "bytes": 1000, "latency_ms": None, "accuracy": 90.0, "drop": 0.5,
             "chosen": True}
    assert json.loads(Report(model="m.onnx", candidates=[tried]).to_json())["candidates"] == [tried]


def test_report_of_another_kind_is_refused_before_any_work(work, tmp_path):
    output = tmp_path / "out.onnx"
    result = run_cli("optimize", work / "model.onnx", "-o", output, "--report", tmp_path / "report.txt")
    assert result.returncode == 2
    assert result.stderr.strip() == f"onnxcomp: error: --report {tmp_path / 'report.txt'}: give a .json or an " \
                                     ".html file name"
    assert not output.exists() and not (tmp_path / "report.txt").exists()


def test_html_report_without_matplotlib_names_the_extra(work, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    output = tmp_path / "out.onnx"
    status = cli.main(["optimize", str(work / "model.onnx"), "-o", str(output), "--report", str(tmp_path / "r.html")])
    error = capsys.readouterr().err
    assert status == 2 and len(error.strip().splitlines()) == 1
    assert "onnxcomp[report]" in error and "matplotlib" in error
    assert not output.exists() and not (tmp_path / "r.html").exists()


def test_bytes_by_layer_line_up_after_names_are_dropped(work, html_page):
    before = html_report.layer_bytes(model_io.load(work / "model.onnx"))
    after = html_report.layer_bytes(model_io.load(work / "out.onnx"))
    assert before == [("fc1", "Gemm", (32 * 16 + 32) * 4), ("fc2", "Gemm", (10 * 32 + 10) * 4)]
    assert [name for name, _, _ in after] != ["fc1", "fc2"]  # short-names dropped them
    rows = html_report.match_layers(before, after)
    assert [(name, size) for name, size, _ in rows] == [("fc1", 2176), ("fc2", 1320)]
    assert all(0 < stored < size for _, size, stored in rows)  # half pruned, 4-bit indices
    assert sum(stored for _, _, stored in rows) < model_io.file_size(work / "out.onnx")


def render_in_chromium(page: Path, folder: Path) -> tuple[np.ndarray, list[str], str]:
    """The screenshot's RGB pixels, the console's messages, and the DOM after loading."""
    from PIL import Image

    shot = folder / (page.stem + ".png")
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             f"--user-data-dir={folder / 'chromium-profile'}", "--window-size=1200,2600",
                             "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--dump-dom",
                             page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    with Image.open(shot) as image:
        return np.asarray(image.convert("RGB")), console, result.stdout


def _pixels_of(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(np.abs(pixels.astype(int) - colour) <= 6, axis=-1).sum())


class _References(HTMLParser):
    """Every src/href that points outside the page (anything but #fragments and data: URIs)."""

    def __init__(self):
        super().__init__()
        self.outside: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "xlink:href") and value and not value.startswith(("#", "data:")):
                self.outside.append(f"<{tag} {name}={value}>")
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.outside.append(f"<{tag}>")
