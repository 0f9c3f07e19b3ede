"""Text data for token models: sentences (.txt, one a line; .tsv, text<TAB>label) → token id arrays.

A tokenizer file in the format of Hugging Face's `tokenizers` (tokenizer.json, needs `onnxcomp[text]`) turns
each sentence into ids; they fill the model's integer inputs by name: `*mask*` → the attention mask (1 for
tokens, 0 for padding), `*type*` / `*segment*` → token type ids (zeros for one sentence), any other integer
input of rank 2 → the token ids. Every sentence is padded to the longest one, capped at the sequence length
the model fixes or at `max_length` tokens.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onnxcomp.errors import InputError, first_line

if TYPE_CHECKING:
    from onnxcomp.data import InputSpec

TEXT_SUFFIXES = (".txt", ".tsv")
MAX_LENGTH = 128


def is_text(source) -> bool:
    return isinstance(source, (str, Path)) and Path(source).suffix.lower() in TEXT_SUFFIXES


def read_sentences(path: Path) -> tuple[list[str], np.ndarray | None]:
    """Sentences and, for a .tsv with a label column (the last one, integers), their labels."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; save the sentences as UTF-8") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({first_line(exc)})") from None
    if path.suffix.lower() == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()], None
    rows = [row for row in csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    if rows and len(rows[0]) > 1 and not rows[0][-1].strip().lstrip("-").isdigit():
        rows = rows[1:]  # a header such as text<TAB>label
    if not rows:
        return [], None
    if len(rows[0]) == 1:
        return [row[0].strip() for row in rows], None
    try:
        labels = np.asarray([int(row[-1]) for row in rows], dtype=np.int64)
    except ValueError:
        raise InputError(f"{path}: the last column must be integer labels in every row (text<TAB>label)") from None
    return ["\t".join(row[:-1]).strip() for row in rows], labels


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError("text data needs the tokenizers package: pip install 'onnxcomp[text]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own Exception for any unreadable file
        raise InputError(f"{path}: not a tokenizer file in the Hugging Face tokenizers format "
                         f"(tokenizer.json): {first_line(exc)}") from None


def token_arrays(path: Path, tokenizer_path, inputs: "list[InputSpec]", max_length: int = MAX_LENGTH,
                 ) -> dict[str, np.ndarray]:
    """{input name: [N, T] array} (and 'labels' when the file has them) for the sentences in `path`."""
    _roles(path, inputs)  # a model without token inputs is the first thing to say
    if tokenizer_path is None:
        raise InputError(f"{path}: text data needs a tokenizer to turn sentences into token ids; give a "
                         "tokenizer.json")
    sentences, labels = read_sentences(path)
    if not sentences:
        raise InputError(f"{path}: holds no sentences")
    arrays = encode(sentences, tokenizer_path, inputs, max_length, source=str(path))
    if labels is not None:
        arrays["labels"] = labels
    return arrays


def encode(sentences: list[str], tokenizer_path, inputs: "list[InputSpec]", max_length: int = MAX_LENGTH,
           source: str = "sentences") -> dict[str, np.ndarray]:
    """{input name: [N, T] array} for `sentences`, padded to the longest (at most `max_length`, or the sequence
    length the model fixes); `source` names them in errors."""
    roles = _roles(source, inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    fixed = {spec.shape[1] for spec in inputs if spec.name in roles and isinstance(spec.shape[1], int)}
    limit = fixed.pop() if len(fixed) == 1 else max_length
    encodings = tokenizer.encode_batch(sentences)
    length = limit if fixed else min(limit, max(len(e.ids) for e in encodings))
    ids = np.zeros((len(sentences), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        tokens = encoding.ids[:length]
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    values = {"ids": ids, "mask": mask, "type": np.zeros_like(ids)}
    return {spec.name: values[roles[spec.name]].astype(spec.dtype) for spec in inputs if spec.name in roles}


def _roles(source, inputs: "list[InputSpec]") -> dict[str, str]:
    """What each token input holds: ids, mask or type; an error when the model takes no token ids."""
    roles = {}
    for spec in inputs:
        if spec.dtype.kind not in "iu" or len(spec.shape) != 2:
            continue
        name = spec.name.lower()
        roles[spec.name] = "mask" if "mask" in name else "type" if ("type" in name or "segment" in name) else "ids"
    if "ids" not in roles.values():
        described = ", ".join(f"{s.name} {s.dtype} {list(s.shape)}" for s in inputs)
        raise InputError(f"{source}: text data feeds models with token id inputs (integer [batch, sequence]); this "
                         f"model's inputs are {described}")
    missing = [spec.name for spec in inputs if spec.name not in roles]
    if missing:
        raise InputError(f"{source}: text data fills token inputs only; the model also needs {', '.join(missing)}")
    return roles
