"""distill: a student learns an ONNX teacher's outputs, through the CLI and the Python API."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest

from helpers import run_cli, run_model

torch = pytest.importorskip("torch")
import onnxcomp  # noqa: E402
from onnxcomp.distillation import DistillConfig  # noqa: E402

STUDENT = "models/digits_student.py:small_student"


@pytest.fixture(scope="module")
def digits_train(tmp_path_factory, digits_model):
    """The digits training split (the model's own, models/train_digits.py), with and without labels."""
    sys.path.insert(0, str(digits_model.parent))
    import train_digits

    x_train, _, y_train, _ = train_digits.load_split()
    folder = tmp_path_factory.mktemp("digits")
    np.savez(folder / "train.npz", input=x_train, labels=y_train)
    np.savez(folder / "unlabeled.npz", input=x_train)
    return folder


def test_cli_trains_a_student_deterministically(tmp_path, digits_model, digits_train):
    outputs = []
    for run in range(2):
        out = tmp_path / f"student{run}.onnx"
        result = run_cli("distill", digits_model, "--student", STUDENT, "--data", digits_train / "unlabeled.npz",
                         "-o", out, "--epochs", "4", "--lr", "0.01", "--seed", "3", cwd=digits_model.parent.parent)
        assert result.returncode == 0, result.stderr
        assert "epoch 4/4" in result.stderr and "held-out agreement" in result.stdout
        outputs.append(out)
    test = np.load(digits_model.parent / "digits_test.npz")
    first, second = (run_model(path, {"input": test["input"]})[0] for path in outputs)
    np.testing.assert_array_equal(first, second)
    teacher = run_model(digits_model, {"input": test["input"]})[0]
    assert np.mean(first.argmax(1) == teacher.argmax(1)) > 0.5  # 4 epochs: learning, far above chance


def test_onnx_student_keeps_its_graph_and_learns(tmp_path, digits_model, digits_train):
    """A teacher's copy with its weights scrambled, as the student: trained in place, same graph back."""
    model = onnx.load(digits_model)
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        values = onnx.numpy_helper.to_array(tensor)
        if values.ndim >= 2:
            tensor.CopyFrom(onnx.numpy_helper.from_array(rng.permutation(values.reshape(-1)).reshape(values.shape)
                                                         .astype(values.dtype), tensor.name))
    scrambled = tmp_path / "scrambled.onnx"
    onnx.save(model, scrambled)
    test = np.load(digits_model.parent / "digits_test.npz")
    before = np.mean(run_model(scrambled, {"input": test["input"]})[0].argmax(1) == test["labels"])
    trained, report = onnxcomp.distill(str(digits_model), str(scrambled), str(digits_train / "train.npz"),
                                       config=DistillConfig(epochs=5, learning_rate=0.01), progress=False)
    after = np.mean(run_model(trained, {"input": test["input"]})[0].argmax(1) == test["labels"])
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in model.graph.node]
    assert after > max(before + 0.3, 0.7), (before, after)
    assert report.epochs[-1].accuracy is not None and report.teacher_accuracy > 95


def test_init_from_teacher_copies_matching_tensors(digits_model, digits_train, tmp_path):
    from onnx import numpy_helper

    scrambled = onnx.load(digits_model)  # the teacher's graph with its float weights replaced by noise
    rng = np.random.default_rng(0)
    for tensor in scrambled.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32:
            noise = rng.uniform(0.5, 1.5, values.shape).astype(np.float32)  # positive: BN variances stay valid
            tensor.CopyFrom(numpy_helper.from_array(noise, tensor.name))
    student = tmp_path / "student.onnx"
    onnx.save(scrambled, student)
    config = DistillConfig(epochs=1, init_from_teacher=True, learning_rate=1e-6)
    _, report = onnxcomp.distill(str(digits_model), str(student), str(digits_train / "train.npz"), config=config,
                                 progress=False)
    assert report.transferred and all(row["copied"] for row in report.transferred)
    assert report.epochs[0].agreement > 95  # the teacher's weights came back
    _, report = onnxcomp.distill(str(digits_model), str(student), str(digits_train / "train.npz"),
                                 config=DistillConfig(epochs=1, learning_rate=1e-6), progress=False)
    assert report.epochs[0].agreement < 50  # without copying, the noise stays
    _, report = onnxcomp.distill(str(digits_model), STUDENT, str(digits_train / "train.npz"),
                                 config=DistillConfig(epochs=1, init_from_teacher=True), progress=False)
    assert not any(row["copied"] for row in report.transferred)
    assert all(row["reason"] for row in report.transferred)


def test_flip_shift_moves_or_mirrors_each_image_within_an_eighth_of_its_side():
    from onnxcomp.distillation import flip_shift

    images = np.arange(4 * 2 * 16 * 24, dtype=np.float32).reshape(4, 2, 16, 24)
    first = flip_shift(images, np.random.default_rng(1))
    np.testing.assert_array_equal(first, flip_shift(images, np.random.default_rng(1)))  # seeded
    assert first.shape == images.shape and not np.array_equal(first, images)
    for original, altered in zip(images, first):
        padded = np.pad(original, ((0, 0), (2, 2), (3, 3)), mode="reflect")
        windows = [padded[:, t:t + 16, l:l + 24] for t in range(5) for l in range(7)]
        assert any(np.array_equal(altered, w) or np.array_equal(altered, w[..., ::-1]) for w in windows)


def test_mixup_blends_every_input_with_the_same_partner_and_weight():
    from onnxcomp.distillation import mixup

    first = np.random.default_rng(0).normal(size=(16, 3, 5)).astype(np.float32)
    feed = {"a": first, "b": 2 * first[:, :, :1]}
    blended, (partner, weight) = mixup(feed, np.random.default_rng(1))
    assert sorted(partner) == list(range(16)) and np.all((weight >= 0) & (weight <= 1)) and np.ptp(weight) > 0.3
    expected = weight[:, None, None] * first + (1 - weight[:, None, None]) * first[partner]
    np.testing.assert_allclose(blended["a"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(blended["b"], 2 * blended["a"][:, :, :1], rtol=1e-6, atol=1e-6)
    assert blended["a"].dtype == np.float32


def test_mixed_labels_weigh_each_cross_entropy_by_its_share():
    from onnxcomp.distillation import _loss

    logits, teacher = torch.randn(6, 10), torch.randn(6, 10)
    first, second = torch.arange(6), torch.arange(6).flip(0)
    config = DistillConfig(alpha=1.0)
    plain = _loss(torch, logits, teacher, first, config)
    assert torch.allclose(_loss(torch, logits, teacher, (first, second, torch.ones(6)), config), plain)
    half = _loss(torch, logits, teacher, (first, second, torch.full((6,), 0.5)), config)
    assert torch.allclose(half, (plain + _loss(torch, logits, teacher, second, config)) / 2)


@pytest.mark.parametrize("augment", ["flip-shift", "mixup", "flip-shift+mixup"])
def test_augmented_batches_are_taught_on_the_same_altered_images(digits_model, digits_train, augment):
    """The teacher as its own student: with augmentation, its targets come from the images the student sees, so
    the loss stays 0; targets from the unaltered images would give a loss well above 0."""
    _, report = onnxcomp.distill(str(digits_model), str(digits_model), str(digits_train / "unlabeled.npz"),
                                 config=DistillConfig(epochs=1, learning_rate=1e-9, augment=augment),
                                 progress=False)
    assert report.epochs[0].loss < 1e-3 and report.epochs[0].agreement == 100


def test_augment_and_schedule_options_are_checked(tmp_path):
    from onnx import TensorProto, helper

    with pytest.raises(onnxcomp.InputError, match="schedule must be one of cosine, constant"):
        DistillConfig(schedule="linear")
    with pytest.raises(onnxcomp.InputError, match="augment must be one of"):
        DistillConfig(augment="cutout")
    weight = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    np.save(tmp_path / "rows.npy", np.ones((8, 4), np.float32))
    with pytest.raises(onnxcomp.InputError, match=r"one \(N, C, H, W\) input"):
        onnxcomp.distill(model, model, str(tmp_path / "rows.npy"), config=DistillConfig(augment="flip-shift"),
                         progress=False)
    embedding = onnx.numpy_helper.from_array(np.ones((10, 4), np.float32), "table")
    lookup = helper.make_model(helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 4])], [embedding]),
        opset_imports=[helper.make_opsetid("", 17)])
    np.save(tmp_path / "ids.npy", np.ones((8, 4), np.int64))
    with pytest.raises(onnxcomp.InputError, match="ids are not floating-point"):
        onnxcomp.distill(lookup, lookup, str(tmp_path / "ids.npy"), config=DistillConfig(augment="mixup"),
                         progress=False)
    onnx.save(model, tmp_path / "rows.onnx")
    result = run_cli("distill", tmp_path / "rows.onnx", "--student", tmp_path / "rows.onnx", "--data",
                     tmp_path / "rows.npy", "-o", tmp_path / "s.onnx", "--augment", "flip-shift")
    assert result.returncode == 2 and "(N, C, H, W)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s.onnx").exists()


def test_student_whose_outputs_do_not_match_the_teacher_is_an_input_error(tmp_path, digits_model, digits_train):
    (tmp_path / "wrong.py").write_text("import torch\n\ndef five():\n"
                                       "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))\n")
    result = run_cli("distill", digits_model, "--student", f"{tmp_path / 'wrong.py'}:five", "--data",
                     digits_train / "train.npz", "-o", tmp_path / "s.onnx")
    assert result.returncode == 2 and "shape [5]" in result.stderr and "[10]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.onnx").exists()


def test_data_without_the_models_input_names_is_an_input_error(tmp_path, digits_model):
    # (a lone array would be taken for the lone input; two arrays named otherwise cannot be)
    np.savez(tmp_path / "other.npz", pixels=np.zeros((8, 1, 8, 8), np.float32), mask=np.ones((8, 1, 8, 8)))
    result = run_cli("distill", digits_model, "--student", STUDENT, "--data", tmp_path / "other.npz",
                     "-o", tmp_path / "s.onnx", cwd=digits_model.parent.parent)
    assert result.returncode == 2 and "input" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("student", ["nomodule:factory", "models/digits_student.py:missing", "no-colon"])
def test_bad_student_references_are_input_errors(tmp_path, digits_model, digits_train, student):
    result = run_cli("distill", digits_model, "--student", student, "--data", digits_train / "train.npz",
                     "-o", tmp_path / "s.onnx", cwd=digits_model.parent.parent)
    assert result.returncode == 2 and "--student" in result.stderr and "Traceback" not in result.stderr


def test_missing_torch_names_the_extra_to_install(monkeypatch):
    from onnxcomp.export import require_torch

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(onnxcomp.InputError, match=r"export needs PyTorch.*onnxcomp\[torch\]"):
        require_torch("export")


def test_export_keeps_batchnorm_when_asked_and_matches_torch(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\n\ndef net():\n    torch.manual_seed(0)\n"
        "    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())\n"
        "    model[1].running_mean.uniform_(-1, 1)\n    model[1].running_var.uniform_(0.5, 2)\n    return model\n")
    factory = f"{tmp_path / 'net.py'}:net"
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    sys.path.insert(0, str(tmp_path))
    import net

    expected = net.net().eval()(torch.from_numpy(x)).detach().numpy()
    counts = {}
    for keep in (False, True):
        out = tmp_path / f"net_{keep}.onnx"
        result = run_cli("export", factory, "--input-shape", "1,3,8,8", "-o", out,
                         *(["--keep-batchnorm"] if keep else []))
        assert result.returncode == 0, result.stderr
        model = onnx.load(out)
        counts[keep] = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        np.testing.assert_allclose(run_model(out, {"input": x})[0], expected, rtol=1e-4, atol=1e-5)
    assert counts == {False: 0, True: 1}
    torch.save({"0.weight": torch.zeros(2)}, tmp_path / "bad.pt")
    result = run_cli("export", factory, "--input-shape", "1,3,8,8", "-o", tmp_path / "x.onnx", "--weights",
                     tmp_path / "bad.pt")
    assert result.returncode == 2 and "state dict" in result.stderr and not (tmp_path / "x.onnx").exists()


def test_heal_recovers_accuracy_and_keeps_masks_codebooks_and_layout(tmp_path, digits_model, digits_train):
    from onnxcomp import encoding

    compressed = tmp_path / "compressed.onnx"
    onnxcomp.optimize(str(digits_model), "fuse-bn,prune:sparsity=0.7,share:bits=3",
                      calib_data=str(digits_model.parent / "digits_calib.npz"), output=compressed,
                      validate_result=False)
    healed = tmp_path / "healed.onnx"
    result = run_cli("distill", "--heal", compressed, "--teacher", digits_model, "--data",
                     digits_train / "unlabeled.npz", "-o", healed, "--epochs", "3", "--lr", "0.01")
    assert result.returncode == 0, result.stderr
    test = np.load(digits_model.parent / "digits_test.npz")
    accuracy = {path: np.mean(run_model(path, {"input": test["input"]})[0].argmax(1) == test["labels"])
                for path in (compressed, healed)}
    assert accuracy[healed] > accuracy[compressed], accuracy
    before, after = (encoding.layouts(onnx.load(path)) for path in (compressed, healed))
    assert len(before) == len(after) == 3
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old.present, new.present)  # the prune masks
        np.testing.assert_array_equal(old.index, new.index)      # each weight's codebook entry
    old_weights = {w.name: w.values for w in encoding.encoded_weights(onnx.load(compressed))}
    for weight in encoding.encoded_weights(onnx.load(healed)):
        rows = weight.values.reshape(weight.values.shape[0], -1)
        old_rows = old_weights[weight.name].reshape(rows.shape)
        assert [np.unique(r).size for r in rows] == [np.unique(r).size for r in old_rows]
        assert not np.array_equal(rows, old_rows)  # trained
    assert [n.op_type for n in onnx.load(healed).graph.node] == [n.op_type for n in onnx.load(compressed).graph.node]
    assert abs(healed.stat().st_size - compressed.stat().st_size) < 64


def test_heal_as_a_pipeline_step_trains_on_the_calibration_data_and_keeps_the_layout(digits_model, digits_train):
    """`heal` after prune and share: the input model teaches, the calibration data (the training split here) is
    the transfer set; the result keeps the masks, indices and file size, and is closer to the original."""
    from onnxcomp import encoding

    recipe = "fuse-bn,prune:sparsity=0.9,share:bits=3,short-names"  # heal reads layouts, not names
    calibration = str(digits_train / "train.npz")
    compressed, _ = onnxcomp.optimize(str(digits_model), recipe, calib_data=calibration, validate_result=False)
    healed, report = onnxcomp.optimize(str(digits_model), recipe + ",heal:epochs=3,learning-rate=0.01",
                                       calib_data=calibration, validate_result=False)
    (record,) = [r for r in report.passes if r.name == "heal"]
    assert record.stats["tensors_trained"] >= 3 and record.stats["epochs"] == 3
    test = np.load(digits_model.parent / "digits_test.npz")
    reference = run_model(digits_model, {"input": test["input"]})[0].argmax(1)
    agreement = {name: np.mean(run_model(model, {"input": test["input"]})[0].argmax(1) == reference)
                 for name, model in (("compressed", compressed), ("healed", healed))}
    assert agreement["healed"] > agreement["compressed"], agreement
    before, after = encoding.layouts(compressed), encoding.layouts(healed)
    assert len(before) == len(after) == 3
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old.present, new.present)
        np.testing.assert_array_equal(old.index, new.index)
    assert abs(healed.ByteSize() - compressed.ByteSize()) < 64


def test_heal_step_needs_calibration_data_and_compressed_weights(tmp_path, digits_model):
    for passes, data, message in (("fuse-bn,prune:sparsity=0.5,heal", None, "--calib-data"),
                                  ("cleanup,heal", "digits_calib.npz", "after the passes that compress it")):
        args = ["optimize", digits_model, "--passes", passes, "-o", tmp_path / "out.onnx", "--no-validate"]
        if data:
            args += ["--calib-data", digits_model.parent / data]
        result = run_cli(*args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, \
            result.stderr
        assert not (tmp_path / "out.onnx").exists()


def test_heal_needs_a_compressed_model(tmp_path, digits_model, digits_train):
    result = run_cli("distill", digits_model, "--heal", digits_model, "--data", digits_train / "train.npz",
                     "-o", tmp_path / "h.onnx")
    assert result.returncode == 2 and "the teacher itself" in result.stderr


def test_heal_trains_a_channel_pruned_model_with_plain_weights_in_its_graph(digits_model, digits_train):
    """Channel pruning leaves plain, thinner weights: heal trains them as they are, the graph unchanged."""
    recipe = "fuse-bn,prune:structure=channel,flops=0.3"
    calibration = str(digits_train / "train.npz")
    pruned, _ = onnxcomp.optimize(str(digits_model), recipe, calib_data=calibration, validate_result=False)
    healed, report = onnxcomp.optimize(str(digits_model), recipe + ",heal:epochs=3,learning-rate=0.003",
                                       calib_data=calibration, validate_result=False)
    (record,) = [r for r in report.passes if r.name == "heal"]
    assert record.stats["tensors_trained"] >= 2
    test = np.load(digits_model.parent / "digits_test.npz")
    reference = run_model(digits_model, {"input": test["input"]})[0].argmax(1)
    agreement = {name: np.mean(run_model(model, {"input": test["input"]})[0].argmax(1) == reference)
                 for name, model in (("pruned", pruned), ("healed", healed))}
    assert agreement["healed"] > agreement["pruned"], agreement
    shapes = {model_name: {t.name: tuple(t.dims) for t in model.graph.initializer}
              for model_name, model in (("pruned", pruned), ("healed", healed))}
    assert shapes["healed"] == shapes["pruned"]
    assert [n.op_type for n in healed.graph.node] == [n.op_type for n in pruned.graph.node]


def test_output_over_an_input_model_is_refused_before_training(tmp_path, digits_model, digits_train):
    student = tmp_path / "student.onnx"
    student.write_bytes(digits_model.read_bytes())
    result = run_cli("distill", digits_model, "--student", student, "--data", digits_train / "train.npz",
                     "-o", student)
    assert result.returncode == 2 and "epoch" not in result.stderr
    assert student.read_bytes() == digits_model.read_bytes()
