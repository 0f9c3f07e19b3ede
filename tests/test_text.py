"""Sentences (.txt, .tsv with labels) through a tokenizer.json into a token model's inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import assert_input_error, run_cli
from onnxcomp import data as datasets
from test_real_inputs import image_model, token_model

VOCABULARY = {"[PAD]": 0, "[UNK]": 1, "good": 2, "bad": 3, "film": 4}


@pytest.fixture
def tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = tokenizers.Tokenizer(WordLevel(VOCABULARY, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_tsv_sentences_become_padded_ids_a_mask_and_labels(tmp_path, tokenizer_file):
    (tmp_path / "s.tsv").write_text("text\tlabel\ngood film\t1\nbad\t0\nodd good film\t1\n", encoding="utf-8")
    dataset = datasets.open_data(tmp_path / "s.tsv", token_model(rows=5), tokenizer=tokenizer_file)
    feed = dataset.batch(0, 3)
    assert feed["input_ids"].tolist() == [[2, 4, 0], [3, 0, 0], [1, 2, 4]]
    assert feed["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert dataset.labels.tolist() == [1, 0, 1]


def test_optimize_validates_on_sentences(tmp_path, tokenizer_file):
    model = tmp_path / "m.onnx"
    onnx.save(token_model(rows=5), model)
    (tmp_path / "s.txt").write_text("good film\nbad film\n\nfilm\n", encoding="utf-8")
    result = run_cli("optimize", model, "-o", tmp_path / "out.onnx", "--data", tmp_path / "s.txt",
                     "--tokenizer", tokenizer_file, "--runs", "2")
    assert result.returncode == 0, result.stderr
    assert f"validation on {tmp_path / 's.txt'}" in result.stdout and "cpu       3 " in result.stdout


def test_a_file_that_is_not_a_tokenizer_is_an_input_error(tmp_path):
    pytest.importorskip("tokenizers")
    model = tmp_path / "m.onnx"
    onnx.save(token_model(), model)
    (tmp_path / "s.txt").write_text("good film\n", encoding="utf-8")
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}', encoding="utf-8")
    result = run_cli("optimize", model, "-o", tmp_path / "out.onnx", "--data", tmp_path / "s.txt",
                     "--tokenizer", tmp_path / "tokenizer.json")
    assert_input_error(result, "tokenizer.json", "not a tokenizer")
    assert not (tmp_path / "out.onnx").exists()


def test_text_data_for_a_model_without_token_inputs_is_an_input_error(tmp_path, tokenizer_file):
    model = tmp_path / "m.onnx"
    onnx.save(image_model(), model)
    (tmp_path / "s.txt").write_text("good film\n", encoding="utf-8")
    result = run_cli("optimize", model, "-o", tmp_path / "out.onnx", "--data", tmp_path / "s.txt",
                     "--tokenizer", tokenizer_file)
    assert_input_error(result, "token id inputs", "x float32")


def test_text_data_without_a_tokenizer_and_a_tokenizer_without_text_are_input_errors(tmp_path, tokenizer_file):
    model = tmp_path / "m.onnx"
    onnx.save(token_model(), model)
    (tmp_path / "s.txt").write_text("good film\n", encoding="utf-8")
    np.savez(tmp_path / "d.npz", input_ids=np.zeros((2, 3), np.int64), attention_mask=np.ones((2, 3), np.int64))
    no_tokenizer = run_cli("optimize", model, "-o", tmp_path / "out.onnx", "--data", tmp_path / "s.txt")
    assert_input_error(no_tokenizer, "needs a tokenizer")
    no_text = run_cli("optimize", model, "-o", tmp_path / "out.onnx", "--data", tmp_path / "d.npz",
                      "--tokenizer", tokenizer_file)
    assert_input_error(no_text, "tokenizer", "sentences")


def test_a_sequence_length_the_model_fixes_is_kept(tmp_path, tokenizer_file):
    graph = helper.make_graph([helper.make_node("Identity", ["ids"], ["out"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
                              [helper.make_tensor_value_info("out", TensorProto.INT64, ["N", 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (tmp_path / "s.txt").write_text("good film good film good film good film\nbad\n", encoding="utf-8")
    feed = datasets.open_data(tmp_path / "s.txt", model, tokenizer=tokenizer_file).batch(0, 2)
    assert feed["ids"].tolist() == [[2, 4, 2, 4, 2, 4], [3, 0, 0, 0, 0, 0]]
