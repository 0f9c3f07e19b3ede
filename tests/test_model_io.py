"""onnxcomp.model_io: loading (external data, safe locations) and atomic saving that never harms the input."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import run_model
from onnxcomp import model_io, runtime
from onnxcomp.errors import InputError

OPSET = [helper.make_opsetid("", 17)]
WEIGHT = (np.arange(32 * 32, dtype=np.float32).reshape(32, 32) - 512) / 1000  # 4 KiB: goes to external data
BIAS = np.linspace(-1, 1, 32, dtype=np.float32)  # 128 bytes: small enough to stay in the model file


def dense_model() -> onnx.ModelProto:
    """x [N, 32] → MatMul(W) → Add(b) → y [N, 32]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(WEIGHT, "W"), numpy_helper.from_array(BIAS, "b")])
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    onnx.checker.check_model(model)
    return model


def with_external_weight(model: onnx.ModelProto, location: str, offset: int = 0) -> onnx.ModelProto:
    """A copy of `model` whose initializer W refers to external data at `location` / `offset`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weight = next(t for t in copy.graph.initializer if t.name == "W")
    length = len(weight.raw_data)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return copy


def write_external(folder: Path, location: str, model_name: str = "model.onnx") -> Path:
    """Write dense_model with W stored in `folder / location` (after 16 bytes of padding) by hand."""
    data = folder / location
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_bytes(b"\xff" * 16 + WEIGHT.tobytes())
    path = folder / model_name
    path.write_bytes(with_external_weight(dense_model(), location, offset=16).SerializeToString())
    return path


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_model(loaded: onnx.ModelProto, expected: onnx.ModelProto) -> None:
    assert [n.SerializeToString() for n in loaded.graph.node] == [n.SerializeToString() for n in expected.graph.node]
    assert loaded.graph.input == expected.graph.input and loaded.graph.output == expected.graph.output
    got, want = weights(loaded), weights(expected)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    assert all(t.data_location == TensorProto.DEFAULT for t in loaded.graph.initializer)  # data is in memory


def feed() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)}


def listing(folder: Path) -> list[str]:
    """Every entry in `folder`, hidden ones (temporary files, staging folders) included."""
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------------------------- load and save


def test_save_load_roundtrip(tmp_path):
    model = dense_model()
    path = model_io.save(model, tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx"
    assert path.read_bytes() == model.SerializeToString()
    assert model_io.load(path).SerializeToString() == model.SerializeToString()
    assert listing(tmp_path) == ["model.onnx"]  # small model: no external data, no temporary files


def test_save_accepts_str_path_and_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_io.save(dense_model(), "model.onnx")
    model_io.save(dense_model(), str(tmp_path / "other.onnx"))
    assert listing(tmp_path) == ["model.onnx", "other.onnx"]
    assert_same_model(model_io.load("model.onnx"), dense_model())


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old content")
    model_io.save(dense_model(), path)
    assert path.read_bytes() == dense_model().SerializeToString()
    assert listing(tmp_path) == ["model.onnx"]


def test_save_over_a_file_keeps_its_permissions(tmp_path):
    """The temporary file renamed over the output takes the mode the user gave the output before."""
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old content")
    path.chmod(0o640)
    model_io.save(dense_model(), path)
    assert path.stat().st_mode & 0o777 == 0o640


def test_save_does_not_change_the_model(tmp_path):
    model = dense_model()
    before = model.SerializeToString()
    model_io.save(model, tmp_path / "inline.onnx")
    model_io.save(model, tmp_path / "external.onnx", external_data=True)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("broken", ["fsync", "replace"])
def test_failed_save_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch, broken):
    path = tmp_path / "model.onnx"
    previous = b"previous model bytes"
    path.write_bytes(previous)

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_io.os, broken, fail)  # after the temporary file was (partly) written
    with pytest.raises((OSError, InputError)):
        model_io.save(dense_model(), path)
    monkeypatch.undo()
    assert path.read_bytes() == previous
    assert listing(tmp_path) == ["model.onnx"]


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_io.os, "replace", fail)
    with pytest.raises((OSError, InputError)):
        model_io.save(dense_model(), tmp_path / "model.onnx")
    monkeypatch.undo()
    assert listing(tmp_path) == []


def test_failed_external_save_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    previous = dense_model()
    previous.graph.name = "previous"
    model_io.save(previous, path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_io, "copy_fields", fail)  # serialization fails midway
    with pytest.raises((OSError, InputError)):
        model_io.save(dense_model(), path, external_data=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert listing(tmp_path) == ["model.onnx"]  # no staging folder, no data file


def fail_rename_onto(monkeypatch, name: str) -> None:
    """Make os.replace fail, as a full or failing disk would, when its target is called `name`."""
    real_replace = os.replace

    def replace(source, target):
        if Path(target).name == name:
            raise OSError(errno.EIO, "I/O error")
        real_replace(source, target)

    monkeypatch.setattr(model_io.os, "replace", replace)


def test_failed_external_rename_leaves_no_staging_folder(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    model_io.save(dense_model(), path)
    before = path.read_bytes()
    fail_rename_onto(monkeypatch, "model.onnx")
    with pytest.raises((OSError, InputError)):
        model_io.save(dense_model(), path, external_data=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not [name for name in listing(tmp_path) if name.startswith(".")]


def test_failed_external_rename_keeps_previous_model_usable(tmp_path, monkeypatch):
    # Overwriting an earlier external-data model (e.g. model.opt.onnx from the previous run): the data file is
    # renamed into place before the model file. If the model rename then fails, the previous model must still
    # load with ITS weights, not silently pick up the new ones from the shared <name>.data.
    path = tmp_path / "model.onnx"
    model_io.save(dense_model(), path, external_data=True)
    changed = dense_model()
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(WEIGHT * 2, "W"))
    fail_rename_onto(monkeypatch, "model.onnx")
    with pytest.raises((OSError, InputError)):
        model_io.save(changed, path, external_data=True)
    monkeypatch.undo()
    assert_same_model(model_io.load(path), dense_model())


def test_save_text_is_atomic(tmp_path, monkeypatch):
    report = tmp_path / "report.json"
    model_io.save_text('{"ok": true}', report)
    assert report.read_text(encoding="utf-8") == '{"ok": true}'

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_io.os, "replace", fail)
    with pytest.raises((OSError, InputError)):
        model_io.save_text('{"ok": false}', report)
    monkeypatch.undo()
    assert report.read_text(encoding="utf-8") == '{"ok": true}'
    assert listing(tmp_path) == ["report.json"]


# ------------------------------------------------------------------------------------------------ external data


def test_external_data_roundtrip(tmp_path):
    model = dense_model()
    path = model_io.save(model, tmp_path / "model.onnx", external_data=True)
    data = tmp_path / "model.onnx.data"
    assert listing(tmp_path) == ["model.onnx", "model.onnx.data"]
    assert data.stat().st_size >= WEIGHT.nbytes
    assert path.stat().st_size < WEIGHT.nbytes  # the weight really left the model file
    assert model_io.external_data_locations(onnx.load(str(path), load_external_data=False)) == ["model.onnx.data"]
    assert_same_model(model_io.load(path), model)
    expected = run_model(model, feed())
    for got, want in zip(run_model(path, feed()), expected):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(run_model(model_io.load(path), feed()), expected):
        np.testing.assert_array_equal(got, want)


def test_file_size_counts_external_data(tmp_path):
    path = model_io.save(dense_model(), tmp_path / "model.onnx", external_data=True)
    size = model_io.file_size(path)
    assert size == path.stat().st_size + (tmp_path / "model.onnx.data").stat().st_size
    assert size > WEIGHT.nbytes > path.stat().st_size


def test_file_size_without_external_data(tmp_path):
    path = model_io.save(dense_model(), tmp_path / "model.onnx")
    assert model_io.file_size(path) == path.stat().st_size


def test_external_data_can_be_forced_off(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    model_io.save(dense_model(), tmp_path / "model.onnx", external_data=False)
    assert listing(tmp_path) == ["model.onnx"]


def test_save_chooses_external_data_above_threshold(tmp_path, monkeypatch):
    model = dense_model()
    assert model_io.tensor_bytes(model) == WEIGHT.nbytes + BIAS.nbytes
    model_io.save(model, tmp_path / "small.onnx")
    assert listing(tmp_path) == ["small.onnx"]

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", WEIGHT.nbytes)
    path = model_io.save(model, tmp_path / "large.onnx")
    assert listing(tmp_path) == ["large.onnx", "large.onnx.data", "small.onnx"]
    assert_same_model(model_io.load(path), model)


def test_save_external_over_previous_external_model(tmp_path):
    path = tmp_path / "model.onnx"
    model_io.save(dense_model(), path, external_data=True)
    changed = dense_model()
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(WEIGHT * 2, "W"))
    model_io.save(changed, path, external_data=True)
    assert listing(tmp_path) == ["model.onnx", "model.onnx.data"]
    np.testing.assert_array_equal(weights(model_io.load(path))["W"], WEIGHT * 2)


def test_external_data_in_sub_folder_loads(tmp_path):
    path = write_external(tmp_path, "weights/w.bin")
    loaded = model_io.load(path)
    assert_same_model(loaded, dense_model())
    assert model_io.file_size(path) == path.stat().st_size + (tmp_path / "weights" / "w.bin").stat().st_size
    for got, want in zip(run_model(loaded, feed()), run_model(dense_model(), feed())):
        np.testing.assert_array_equal(got, want)


def test_external_data_through_link_inside_folder_loads(tmp_path):
    write_external(tmp_path, "real/w.bin")
    os.symlink(tmp_path / "real" / "w.bin", tmp_path / "w.bin")
    path = tmp_path / "model.onnx"
    path.write_bytes(with_external_weight(dense_model(), "w.bin", offset=16).SerializeToString())
    # onnx itself refuses to read external data through any symbolic link; either the weights load intact or
    # the user gets an InputError (one line in the CLI), never onnx's ValidationError (a traceback).
    try:
        loaded = model_io.load(path)
    except InputError as exc:
        assert "w.bin" in str(exc)
    else:
        assert_same_model(loaded, dense_model())


def test_external_data_link_outside_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    write_external(outside, "w.bin")  # a real, readable weight file elsewhere
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(outside / "w.bin", folder / "w.bin")
    path = folder / "model.onnx"
    path.write_bytes(with_external_weight(dense_model(), "w.bin", offset=16).SerializeToString())
    with pytest.raises(InputError, match="link"):
        model_io.load(path)


def test_external_data_in_linked_folder_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    write_external(outside, "w.bin")
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(outside, folder / "weights")  # the sub-folder itself is a link out
    path = folder / "model.onnx"
    path.write_bytes(with_external_weight(dense_model(), "weights/w.bin", offset=16).SerializeToString())
    with pytest.raises(InputError, match="outside"):
        model_io.load(path)


@pytest.mark.parametrize("location", ["../w.bin", "sub/../../w.bin", "ABSOLUTE"])
def test_external_data_outside_folder_is_refused(tmp_path, location):
    write_external(tmp_path, "w.bin")
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    if location == "ABSOLUTE":
        location = str(tmp_path / "w.bin")
    path = folder / "model.onnx"
    path.write_bytes(with_external_weight(dense_model(), location, offset=16).SerializeToString())
    with pytest.raises(InputError, match="refusing"):
        model_io.load(path)


def test_missing_external_data_is_an_input_error(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(with_external_weight(dense_model(), "w.bin").SerializeToString())
    with pytest.raises(InputError, match="w.bin|external data"):
        model_io.load(path)


# ---------------------------------------------------------------------------------------- never over the input


def test_save_refuses_to_overwrite_source(tmp_path):
    source = model_io.save(dense_model(), tmp_path / "model.onnx")
    before = source.read_bytes()
    other = dense_model()
    other.graph.name = "other"
    for spelling in (source, tmp_path / "sub" / ".." / "model.onnx", str(source)):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(InputError, match="input model"):
            model_io.save(other, spelling, source=source)
    assert source.read_bytes() == before


def test_save_refuses_to_overwrite_source_through_link(tmp_path):
    source = model_io.save(dense_model(), tmp_path / "model.onnx")
    before = source.read_bytes()
    os.symlink(source, tmp_path / "link.onnx")
    with pytest.raises(InputError, match="input model"):
        model_io.save(dense_model(), tmp_path / "link.onnx", source=source)
    assert source.read_bytes() == before


def test_save_refuses_to_overwrite_source_external_data(tmp_path):
    # model.onnx keeps its weight in out.onnx.data: saving out.onnx with external data would overwrite it
    source = write_external(tmp_path, "out.onnx.data")
    data = tmp_path / "out.onnx.data"
    before = {name: (tmp_path / name).read_bytes() for name in listing(tmp_path)}
    with pytest.raises(InputError, match="input model"):
        model_io.save(dense_model(), tmp_path / "out.onnx", source=source, external_data=True)
    with pytest.raises(InputError, match="input model"):
        model_io.save(dense_model(), data, source=source)  # the data file itself as the output
    assert {name: (tmp_path / name).read_bytes() for name in listing(tmp_path)} == before


def test_save_beside_source_with_external_data(tmp_path):
    source = model_io.save(dense_model(), tmp_path / "model.onnx", external_data=True)
    before = {name: (tmp_path / name).read_bytes() for name in listing(tmp_path)}
    out = model_io.save(model_io.load(source), tmp_path / "model.opt.onnx", source=source, external_data=True)
    assert listing(tmp_path) == ["model.onnx", "model.onnx.data", "model.opt.onnx", "model.opt.onnx.data"]
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert_same_model(model_io.load(out), dense_model())
    assert_same_model(model_io.load(source), dense_model())


@pytest.mark.parametrize("where", ["folder", "missing"])
def test_save_refuses_bad_destination(tmp_path, where):
    target = tmp_path if where == "folder" else tmp_path / "missing" / "model.onnx"
    with pytest.raises(InputError):
        model_io.save(dense_model(), target)
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------------------------- bad files


def test_load_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        model_io.load(tmp_path / "nope.onnx")


@pytest.mark.parametrize("content", [b"", b"not a model\n", bytes(range(256)) * 8])
@pytest.mark.parametrize("with_weights", [True, False])
def test_load_non_model(tmp_path, content, with_weights):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match="ONNX model"):
        model_io.load(path, weights=with_weights)


@pytest.mark.parametrize("with_weights", [True, False])
def test_load_truncated_model(tmp_path, with_weights):
    content = dense_model().SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(InputError, match="ONNX model"):
        model_io.load(path, weights=with_weights)


def test_loading_the_graph_only_refers_to_large_inline_weights_in_the_file(tmp_path):
    # Validation and the passes read the graph of a model whose weights ONNX Runtime reads from the file: a
    # model's inline weights are skipped in the file's bytes, not parsed, and become references to where they lie
    # in the file; everything else (the small bias, nodes, names, shapes) is kept, and the model still runs.
    model = dense_model()
    model.graph.node.append(helper.make_node("Constant", [], ["unused"], value=numpy_helper.from_array(WEIGHT)))
    path = tmp_path / "model.onnx"
    content = model.SerializeToString()
    path.write_bytes(content)
    graph_only = model_io.load(path, weights=False)
    weight = graph_only.graph.initializer[0]
    place = {entry.key: entry.value for entry in weight.external_data}
    offset, length = int(place["offset"]), int(place["length"])
    assert weight.data_location == TensorProto.EXTERNAL and place["location"] == "model.onnx"
    assert content[offset:offset + length] == WEIGHT.tobytes()
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    expected.graph.initializer[0].ClearField("raw_data")  # W, 4 KiB
    weight.ClearField("data_location")
    del weight.external_data[:]
    assert graph_only == expected
    assert numpy_helper.to_array(graph_only.graph.initializer[1]).tolist() == BIAS.tolist()
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    session = runtime.session(model_io.load(path, weights=False), folder=str(tmp_path))
    np.testing.assert_allclose(session.run(["y"], {"x": x})[0], x @ WEIGHT + BIAS, rtol=1e-5)


def test_saved_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        model_io.save(dense_model(), tmp_path / "plain.onnx")
        model_io.save(dense_model(), tmp_path / "external.onnx", external_data=True)
        model_io.save_text("{}", tmp_path / "report.json")
    finally:
        os.umask(umask)
    for name in ("plain.onnx", "external.onnx", "external.onnx.data", "report.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_sessions_of_large_models_are_made_from_a_file(monkeypatch):
    """A model over 2 GB has no bytes to hand ONNX Runtime, and below that its bytes would be one more copy of
    the weights: it is written with external data to a temporary folder, the session made from there, and the
    folder removed (runtime.ON_DISK_BYTES, 256 MiB, stands in as a few bytes)."""
    import tempfile

    from onnxcomp.runner import Runner

    weight = np.arange(8 * 1024, dtype=np.float32).reshape(8, 1024)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    monkeypatch.setattr(runtime, "ON_DISK_BYTES", 1024)
    folders = []
    made = model_io.on_disk

    def recorded(m):
        context = made(m)
        path = context.__enter__()
        folders.append(os.path.dirname(path))
        assert os.path.getsize(path + ".data") == weight.nbytes and os.path.getsize(path) < 1024
        return _Exiting(context, path)

    class _Exiting:
        def __init__(self, context, path):
            self.context, self.path = context, path

        def __enter__(self):
            return self.path

        def __exit__(self, *exc):
            return self.context.__exit__(*exc)

    monkeypatch.setattr(model_io, "on_disk", recorded)
    x = np.ones((1, 8), np.float32)
    np.testing.assert_allclose(Runner(model).run({"x": x})["y"], x @ weight)
    assert folders and not os.path.exists(folders[0]) and folders[0].startswith(tempfile.gettempdir())
