"""Data layer: arrays matched to model inputs, image folders with labels and preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnxcomp.data import Preprocess, open_data
from onnxcomp.errors import InputError


def image_model(shape=("N", 3, 4, 4)):
    graph = helper.make_graph([helper.make_node("Relu", ["img"], ["y"])], "g",
                              [helper.make_tensor_value_info("img", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write_image(path, colour, size=(6, 8)):
    Image.new("RGB", size, colour).save(path)


def test_preprocess_resizes_crops_normalises_and_transposes(tmp_path):
    write_image(tmp_path / "a.png", (255, 0, 51))
    spec = Preprocess.parse("resize=4,crop=4,scale=1/255,mean=0.5|0.5|0.5,std=0.5|0.5|0.5,layout=NCHW")
    dataset = open_data(tmp_path, image_model(), preprocess=spec)
    batch = dataset.batch(0, 1)["img"]
    assert batch.shape == (1, 3, 4, 4) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0, :, 0, 0], [1.0, -1.0, -0.6], atol=1e-6)
    assert dataset.labels is None


def test_labels_from_csv_and_from_class_folders(tmp_path):
    csv_folder = tmp_path / "csv"
    csv_folder.mkdir()
    for name in ("x.png", "y.png"):
        write_image(csv_folder / name, (10, 20, 30))
    (csv_folder / "labels.csv").write_text("file,class_index,wnid\ny.png,7,n1\nx.png,3,n2\n")
    dataset = open_data(csv_folder, image_model())
    assert dataset.num_samples == 2 and dataset.labels.tolist() == [7, 3]

    class_folder = tmp_path / "classes"
    for index, name in enumerate(["cat", "dog"]):
        (class_folder / name).mkdir(parents=True)
        for k in range(index + 1):
            write_image(class_folder / name / f"{k}.jpg", (k, k, k))
    dataset = open_data(class_folder, image_model())
    assert dataset.labels.tolist() == [0, 1, 1]
    assert dataset.batch(0, 3)["img"].shape == (3, 3, 4, 4)


def test_npz_array_under_another_name_is_accepted_for_a_single_input_model(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(5), classes=np.array(["a", "b"]))
    dataset = open_data(tmp_path / "d.npz", image_model(), preprocess="scale=1/255")
    batch = dataset.batch(0, 5)["img"]
    np.testing.assert_allclose(batch, images.transpose(0, 3, 1, 2) / 255, rtol=1e-6)
    assert dataset.labels.tolist() == [0, 1, 2, 3, 4]


def test_integer_arrays_are_converted_to_float_inputs_and_limit_applies(tmp_path):
    array = np.ones((10, 3, 4, 4), np.uint8)
    np.save(tmp_path / "d.npy", array)
    dataset = open_data(tmp_path / "d.npy", image_model(), limit=4)
    assert dataset.num_samples == 4
    assert dataset.batch(0, 4)["img"].dtype == np.float32


def test_shape_mismatch_names_the_axis(tmp_path):
    np.savez(tmp_path / "d.npz", img=np.zeros((2, 3, 5, 4), np.float32))
    with pytest.raises(InputError, match="axis 2 is 5, not 4"):
        open_data(tmp_path / "d.npz", image_model((1, 3, 4, 4)))


def test_preprocess_spec_errors_give_an_example():
    with pytest.raises(InputError, match="preprocess option 'zoom' is unknown"):
        Preprocess.parse("zoom=2")
    with pytest.raises(InputError, match="example: resize=256"):
        Preprocess.parse("layout=CHW")


def test_column_labels_are_class_indices_not_one_hot(tmp_path):
    np.savez(tmp_path / "d.npz", img=np.zeros((3, 3, 4, 4), np.float32), labels=np.array([[2], [0], [1]]))
    assert open_data(tmp_path / "d.npz", image_model()).labels.tolist() == [2, 0, 1]


def test_hidden_and_tool_folders_are_not_classes(tmp_path):
    for name in (".ipynb_checkpoints", "__MACOSX", "cat", "dog"):
        (tmp_path / name).mkdir()
        write_image(tmp_path / name / "a.png", (1, 2, 3))
    assert open_data(tmp_path, image_model()).labels.tolist() == [0, 1]


def test_images_of_different_sizes_need_a_crop(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["img"], ["y"])], "g",
                              [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    write_image(tmp_path / "a.png", (1, 2, 3), size=(6, 8))
    write_image(tmp_path / "b.png", (1, 2, 3), size=(8, 8))
    with pytest.raises(InputError, match="images differ in size"):
        open_data(tmp_path, model).batch(0, 2)


def test_runner_fetches_large_batches_in_parts_within_the_byte_bound():
    """Runs whose fetched values would exceed max_bytes are cut into parts sized from the first sample; the
    values are those of the whole batches, and a model with a fixed batch keeps its batches."""
    from onnxcomp.runner import Runner

    images = np.random.default_rng(0).random((10, 3, 4, 4)).astype(np.float32)
    dataset = open_data({"img": images}, image_model())
    runner = Runner(image_model())
    per_sample = 3 * 4 * 4 * 4  # bytes of one sample's output
    parts = list(runner.batches(dataset, batch_size=8, max_bytes=3 * per_sample))
    assert [done for done, _ in parts] == [1, 4, 7, 8, 10]  # one sample first, then 3 at a time within each batch
    np.testing.assert_array_equal(np.concatenate([values["y"] for _, values in parts]), np.maximum(images, 0))
    assert [done for done, _ in runner.batches(dataset, batch_size=8)] == [8, 10]
    fixed = open_data({"img": images[:8]}, image_model((2, 3, 4, 4)))
    assert [done for done, _ in Runner(image_model((2, 3, 4, 4))).batches(fixed, batch_size=8, max_bytes=1)] == \
        [2, 4, 6, 8]


def test_prefix_runs_resume_from_the_tensors_earlier_runs_computed():
    """Each run computes only the nodes the earlier ones did not, from the tensors they kept: a later run sees
    changes to the nodes it computes, not to those computed before; past max_bytes it starts from the inputs."""
    from onnxcomp.runner import PrefixRuns

    def model(first: float, second: float):
        graph = helper.make_graph(
            [helper.make_node("Mul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Mul", ["b", "w2"], ["c"]), helper.make_node("Add", ["c", "a"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor("w1", TensorProto.FLOAT, [], [first]),
             helper.make_tensor("w2", TensorProto.FLOAT, [], [second])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    dataset = open_data({"x": x}, model(1, 1))
    for max_bytes, first_seen in ((1 << 20, 2.0), (0, 5.0)):
        prefixes = PrefixRuns(dataset, 10, 4, max_bytes=max_bytes)
        a = np.concatenate([values["a"] for _, values in prefixes.batches(model(2, 3), ["a"])])
        np.testing.assert_allclose(a, 2 * x, rtol=1e-6)
        again = np.concatenate([values["a"] for _, values in prefixes.batches(model(2, 3), ["a"])])  # kept: no run
        np.testing.assert_array_equal(again, a)
        # w1 changed too, against the contract, to show which nodes run again; w2's node had not run yet
        parts = list(prefixes.batches(model(5, 7), ["y"]))
        assert [done for done, _ in parts] == [4, 8, 10]
        y = np.concatenate([values["y"] for _, values in parts])
        np.testing.assert_allclose(y, 7 * np.maximum(first_seen * x, 0) + first_seen * x, rtol=1e-6)
