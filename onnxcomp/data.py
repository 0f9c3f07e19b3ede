"""Evaluation and calibration data: `.npz` / `.npy` files, folders of images, arrays in memory, or random.

A `Dataset` yields feed dictionaries `{input name: batch}` that match the model's inputs in name, shape and
dtype; every mismatch is found when the data is opened, not in the middle of a run. Image folders are read
batch by batch, so memory does not grow with the number of images.

Image folders: labels come from a `labels.csv` (columns `file,class_index`) in the folder, or from one
sub-folder per class (sorted names → 0, 1, …); otherwise there are no labels. A `.npz` holds one array per
model input, named as the input (a single-input model also accepts a file with one array of images under any
name), and optionally `labels`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from onnxcomp import text
from onnxcomp.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
LABEL_KEYS = ("labels", "label", "targets")


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and shape (ints, or strings / None for free dimensions).

    `batched` inputs carry samples along their first axis; the others (scalars, and inputs whose first
    dimension is fixed to another size than the batch, such as a recurrent state [2, N, 128]) are fed whole,
    the same array with every batch.
    """

    name: str
    dtype: np.dtype
    shape: tuple
    batched: bool = True

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if self.batched and isinstance(self.shape[0], int) else None

    @property
    def free_dims(self) -> list[str]:
        """Names of the free dimensions a random input would have to guess (the batch axis excepted)."""
        dims = self.shape[1:] if self.batched else self.shape
        return [str(d) if d else "?" for d in dims if not isinstance(d, int)]


def model_inputs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[InputSpec]:
    """The real inputs of a model (graph inputs that are not initializers), which must be numeric tensors.

    `input_shapes` fixes free dimensions by input name, as given by the user; it may not contradict a fixed one.
    Its first dimension is the batch of a run only where the model fixes the batch, or where an input without
    a batch axis is shaped too: otherwise samples still run in batches.
    """
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        type_name = value_type(value)
        if type_name not in NUMERIC_TYPES:
            raise InputError(f"model input '{value.name}' is {type_name}; onnxcomp feeds numeric tensors only")
        specs.append(InputSpec(value.name, np.dtype(type_name), tuple(value_dims(value))))
    if not specs:
        raise InputError("the model has no inputs, so there is nothing to feed it; onnxcomp needs a model "
                         "with inputs")
    input_shapes = input_shapes or {}
    _check_shape_names(input_shapes, specs)
    declared = _mark_batched(specs)
    shaped = _mark_batched([_with_shape(spec, input_shapes.get(spec.name)) for spec in specs])
    # A batch the model leaves free stays free, so that samples run in batches; unless an input without a batch
    # axis (a recurrent state) was given a shape, which ties every run to the batch given with it.
    if any(not spec.batched and spec.shape and spec.name in input_shapes for spec in shaped):
        return shaped
    return _mark_batched([InputSpec(s.name, s.dtype, (d.shape[0],) + s.shape[1:]) if d.batched and d.fixed_batch
                          is None else s for s, d in zip(shaped, declared)])


def _check_shape_names(input_shapes: dict, specs: list[InputSpec]) -> None:
    unknown = [name for name in input_shapes if name not in {spec.name for spec in specs}]
    if unknown:
        raise InputError(f"an input shape is given for '{unknown[0]}', which is not an input of the model; its "
                         f"inputs are {', '.join(spec.name for spec in specs)}")


def _with_shape(spec: InputSpec, shape: tuple[int, ...] | None) -> InputSpec:
    if shape is None:
        return spec
    declared = _declared(spec)
    if len(shape) != len(spec.shape):
        raise InputError(f"input shape {_dims(shape)} for '{spec.name}' has {len(shape)} dimension(s); the model's "
                         f"input is {declared}")
    for axis, (want, got) in enumerate(zip(spec.shape, shape)):
        if not isinstance(got, (int, np.integer)) or got < 1:
            raise InputError(f"input shape {_dims(shape)} for '{spec.name}': dimensions must be positive integers")
        if isinstance(want, int) and want != got:
            raise InputError(f"input shape {_dims(shape)} for '{spec.name}' sets axis {axis} to {got}, but the "
                             f"model fixes it at {want} ({declared})")
    return InputSpec(spec.name, spec.dtype, tuple(int(d) for d in shape))


def _dims(shape) -> str:
    return ",".join(str(d) for d in shape)


def parse_input_shapes(items: list[str] | tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """`NAME:d1,d2,...` items (a scalar: `NAME:`) → {name: dims}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, colon, dims = item.rpartition(":")
        try:
            if not colon or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
        except ValueError:
            raise InputError(f"input shape '{item}' is not NAME:d1,d2,...; example: x:1,3,224,224") from None
        if any(d < 1 for d in shape):
            raise InputError(f"input shape '{item}': dimensions must be positive integers")
        if name in shapes:
            raise InputError(f"input shape for '{name}' is given twice")
        shapes[name] = shape
    return shapes


def batched_names(inputs: list[InputSpec]) -> set[str]:
    """The inputs that carry samples along their first axis; the others are fed whole."""
    return {spec.name for spec in inputs if spec.batched}


def _mark_batched(specs: list[InputSpec]) -> list[InputSpec]:
    """The first input with a first axis sets the batch; others whose first axis differs from it are fed whole."""
    ranked = [spec for spec in specs if spec.shape]
    if not ranked:
        return [InputSpec(s.name, s.dtype, s.shape, batched=False) for s in specs]
    batch = ranked[0].shape[0]
    free = not isinstance(batch, int)

    def batched(spec: InputSpec) -> bool:
        if not spec.shape:
            return False
        first = spec.shape[0]
        return not isinstance(first, int) if free else first == batch

    return [InputSpec(s.name, s.dtype, s.shape, batched=batched(s)) for s in specs]


NUMERIC_TYPES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                 "uint64", "bool"}


def value_type(value: onnx.ValueInfoProto) -> str:
    """numpy name of a tensor's element type ("float32"), or what else the value is ("sequence", "bfloat16")."""
    if not value.type.HasField("tensor_type"):
        return value.type.WhichOneof("value") or "unknown"
    elem_type = value.type.tensor_type.elem_type
    if not elem_type:
        return "unknown"
    if elem_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))


def value_dims(value: onnx.ValueInfoProto) -> list:
    """A tensor's dimensions: ints, names of free dimensions, or None where unknown."""
    if not value.type.HasField("tensor_type"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


@dataclass(frozen=True)
class Preprocess:
    """How images become model input: resize the shorter side, centre-crop, (x·scale − mean) / std, layout.

    Text form: `resize=256,crop=224,scale=0.003921569,mean=0.485|0.456|0.406,std=0.229|0.224|0.225,layout=NCHW`.
    `channels=BGR` reverses the colour order; `channels=L` makes grey images.
    """

    resize: int | None = None
    crop: int | None = None
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    channels: str = "RGB"

    @classmethod
    def parse(cls, text: str | None) -> "Preprocess":
        if not text:
            return cls()
        values: dict = {}
        for item in (part.strip() for part in text.split(",") if part.strip()):
            key, equals, raw = item.partition("=")
            key = key.strip().lower()
            try:
                if not equals:
                    raise ValueError
                if key in ("resize", "crop"):
                    values[key] = int(raw)
                elif key == "scale":
                    values[key] = _number(raw)
                elif key in ("mean", "std"):
                    values[key] = tuple(_number(v) for v in raw.split("|"))
                    if key == "std" and 0 in values[key]:
                        raise ValueError
                elif key == "layout":
                    if raw.upper() not in ("NCHW", "NHWC"):
                        raise ValueError
                    values[key] = raw.upper()
                elif key == "channels":
                    if raw.upper() not in ("RGB", "BGR", "L"):
                        raise ValueError
                    values[key] = raw.upper()
                else:
                    raise InputError(f"preprocess option '{key}' is unknown; valid: resize, crop, scale, mean, "
                                     "std, layout, channels")
            except (ValueError, ZeroDivisionError):
                raise InputError(f"preprocess item '{item}' is not valid; example: resize=256,crop=224,"
                                 "scale=1/255,mean=0.485|0.456|0.406,std=0.229|0.224|0.225,layout=NCHW") from None
        return cls(**values)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """[N, H, W, C] (or [N, H, W]) pixels → float32 batch in the model's layout."""
        x = images.astype(np.float32)
        if x.ndim == 3:
            x = x[..., None]
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, x.shape[-1]):
                raise InputError(f"preprocess {name} has {len(values)} values but the images have "
                                 f"{x.shape[-1]} channels; give 1 or {x.shape[-1]}")
        if self.channels == "BGR":
            x = x[..., ::-1]
        x = (x * self.scale - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.float32)

    def load_image(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image = image.convert("L" if self.channels == "L" else "RGB")
                if self.resize:
                    width, height = image.size
                    ratio = self.resize / min(width, height)
                    image = image.resize((max(1, round(width * ratio)), max(1, round(height * ratio))),
                                         Image.BILINEAR)
                if self.crop:
                    width, height = image.size
                    if width < self.crop or height < self.crop:
                        raise InputError(f"{path}: image {width}x{height} is smaller than crop={self.crop}; "
                                         "add resize= to the preprocessing")
                    left, top = (width - self.crop) // 2, (height - self.crop) // 2
                    image = image.crop((left, top, left + self.crop, top + self.crop))
                return np.asarray(image)
        except OSError as exc:
            raise InputError(f"{path}: cannot read image ({exc})") from None


@dataclass
class Dataset:
    """Samples for a model: a function giving the feed for a range of sample indices, and optional labels."""

    source: str
    num_samples: int
    inputs: list[InputSpec]
    _take: object = field(repr=False)  # (start, stop) -> {name: array}
    labels: np.ndarray | None = None
    is_random: bool = False

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return self._take(start, stop)

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model's inputs fix, or None when the batch axis is free."""
        fixed = {spec.fixed_batch for spec in self.inputs if spec.fixed_batch is not None}
        if len(fixed) > 1:
            raise InputError(f"the model's inputs fix different batch sizes {sorted(fixed)}; onnxcomp cannot "
                             "split samples across them")
        return fixed.pop() if fixed else None

    def runs(self, samples: int, batch_size: int) -> list[tuple[int, int]]:
        """(start, stop) of the batches that cover the first `samples` samples: `batch_size` at a time, or
        exactly the fixed batch, dropping a last partial batch (at least one batch when there are enough)."""
        fixed = self.fixed_batch
        total = min(samples, self.num_samples)
        if fixed is None:
            return [(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]
        total = max(total, min(fixed, self.num_samples))
        if total < fixed:
            raise InputError(f"{self.source}: {self.num_samples} sample(s), but the model takes batches of exactly "
                             f"{fixed}; give at least {fixed} samples")
        return [(start, start + fixed) for start in range(0, total - total % fixed, fixed)]

    def select(self, indices) -> "Dataset":
        """The samples at `indices` (in that order) as a dataset of their own."""
        indices = np.asarray(indices, dtype=np.int64)
        take = self._take

        def take_selected(start: int, stop: int) -> dict[str, np.ndarray]:
            parts = [take(int(i), int(i) + 1) for i in indices[start:stop]]
            if not parts:
                return {}
            batched = batched_names(self.inputs)
            return {name: np.concatenate([p[name] for p in parts]) if name in batched else value
                    for name, value in parts[0].items()}

        return Dataset(self.source, len(indices), self.inputs, take_selected,
                       None if self.labels is None else self.labels[indices], self.is_random)

    def batches(self, batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(first sample index, feed) for consecutive batches covering every sample."""
        for start in range(0, self.num_samples, batch_size):
            yield start, self.batch(start, min(start + batch_size, self.num_samples))

    def subset(self, start: int, stop: int) -> "Dataset":
        """Samples start..stop-1 as a dataset of their own (nothing is copied)."""
        stop = min(stop, self.num_samples)
        take = self._take
        return Dataset(self.source, max(0, stop - start), self.inputs, lambda a, b: take(start + a, start + b),
                       None if self.labels is None else self.labels[start:stop], self.is_random)


def spread_indices(samples: int, count: int) -> np.ndarray:
    """`count` sample indices spread evenly over `samples`: the first, then every samples/count-th. Data in
    class order (an image folder, dev500's labels.csv) is sampled across its classes, not in its first ones."""
    return np.arange(count, dtype=np.int64) * samples // max(count, 1)


def open_data(source, model: onnx.ModelProto, *, preprocess: str | Preprocess | None = None,
              limit: int | None = None, seed: int = 0,
              input_shapes: dict[str, tuple[int, ...]] | None = None, tokenizer=None) -> Dataset:
    """Open `source` as samples for `model`.

    `source`: a path (.npz, .npy, image folder, or sentences in .txt / .tsv with a `tokenizer` file: see
    onnxcomp.text), "random", a dict of arrays, a Dataset, or any iterable of feed dicts `{input name: batch}` —
    ONNX Runtime's CalibrationDataReader objects (`get_next()`) work too.
    Iterables are read once and held in memory; files and folders are read batch by batch. `input_shapes`
    fixes free input dimensions ({name: dims}).
    """
    if tokenizer is not None and not isinstance(source, (str, Path)):
        raise InputError("a tokenizer turns sentences into token ids; give the sentences as a .txt/.tsv file")
    inputs = model_inputs(model, input_shapes)
    if isinstance(preprocess, str) or preprocess is None:
        preprocess = Preprocess.parse(preprocess) if preprocess else None
    if isinstance(source, Dataset):
        dataset = source
    elif isinstance(source, dict):
        dataset = _from_arrays("arrays", dict(source), inputs, preprocess)
    elif isinstance(source, str) and source == "random":
        dataset = random_data(model, seed=seed, input_shapes=input_shapes)
    elif hasattr(source, "get_next") or (hasattr(source, "__iter__") and not isinstance(source, (str, bytes, Path))):
        dataset = _from_arrays(type(source).__name__, _gather_feeds(source, limit, inputs), inputs, preprocess)
    else:
        path = Path(source)
        if not path.exists():
            raise InputError(f"{path}: data not found; give an .npz/.npy file, a folder of images, or sentences "
                             "(.txt/.tsv)")
        if tokenizer is not None and not text.is_text(path):
            raise InputError(f"a tokenizer turns sentences into token ids, but {path} is not text data (.txt/.tsv)")
        if text.is_text(path):
            dataset = _from_arrays(str(path), text.token_arrays(path, tokenizer, inputs), inputs, None)
        elif path.is_dir():
            dataset = _from_image_folder(path, inputs, preprocess)
        elif path.suffix == ".npz":
            dataset = _from_arrays(str(path), _read_npz(path), inputs, preprocess)
        elif path.suffix == ".npy":
            dataset = _from_arrays(str(path), {inputs[0].name if inputs else "input": _read_npy(path)},
                                   inputs, preprocess)
        else:
            raise InputError(f"{path}: unknown data format; use .npz, .npy, a folder of images, or sentences "
                             "(.txt/.tsv)")
    if dataset.num_samples == 0:
        raise InputError(f"{dataset.source}: holds no samples")
    if limit is not None and limit < dataset.num_samples:
        dataset = dataset.subset(0, limit)
    return dataset


class RandomInputsUnavailable(InputError):
    """Random inputs cannot be made for this model without more information (a shape or a valid value)."""


RANDOM_SAMPLES = 32
RANDOM_BYTES_LIMIT = 2 << 30  # random inputs beyond this are a shape mistake, not a validation set


def random_data(model: onnx.ModelProto, *, samples: int = RANDOM_SAMPLES, seed: int = 0,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> Dataset:
    """Random inputs a model can take, for agreement checks only.

    Floats are standard normal; integer inputs that index a table (Gather on a constant) take valid indices;
    inputs named like a mask are ones; other integers are small non-negative values. A free dimension other
    than the batch, or a scalar integer with no valid value in the graph, raises RandomInputsUnavailable.
    """
    inputs = model_inputs(model, input_shapes)
    rng = np.random.default_rng(seed)
    ranges = index_ranges(model)
    for spec in inputs:
        if spec.free_dims:
            raise RandomInputsUnavailable(
                f"random inputs cannot guess the free dimension(s) {', '.join(spec.free_dims)} of input "
                f"'{spec.name}' {_declared(spec)}; give data, or fix them with an input shape "
                f"(input_shapes= {spec.name}:{_example_dims(spec)})")
        if not spec.shape and spec.dtype.kind in "iu" and spec.name not in ranges:
            raise RandomInputsUnavailable(
                f"input '{spec.name}' is an integer scalar whose valid values cannot be read from the graph; "
                "give data with a real value for it (data= or calib_data=)")
    fixed = next((spec.fixed_batch for spec in inputs if spec.fixed_batch), None)
    samples = max(samples, fixed or 0)
    shapes = {spec.name: ((samples,) + tuple(spec.shape[1:]) if spec.batched else tuple(spec.shape))
              for spec in inputs}
    total = sum(int(np.prod(shape, dtype=np.float64)) * spec.dtype.itemsize
                for spec, shape in zip(inputs, shapes.values()))
    if total > RANDOM_BYTES_LIMIT:
        raise RandomInputsUnavailable(
            f"random inputs for {samples} sample(s) of shapes {list(shapes.values())} would take "
            f"{total / 2**30:.1f} GiB; give data, or smaller input shapes")
    arrays = {spec.name: _random_array(spec, shapes[spec.name], ranges.get(spec.name), rng) for spec in inputs}
    dataset = _from_arrays("random", arrays, inputs, None)
    dataset.is_random = True
    return dataset


def _random_array(spec: InputSpec, shape: tuple, index_range: int | None, rng) -> np.ndarray:
    if spec.dtype.kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if "mask" in spec.name.lower():
        return np.ones(shape, dtype=spec.dtype)
    if spec.dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    return rng.integers(0, index_range or 10, shape).astype(spec.dtype)


def _declared(spec: InputSpec) -> str:
    return "[" + ", ".join(str(d) if d else "?" for d in spec.shape) + "]"


def _example_dims(spec: InputSpec) -> str:
    return ",".join(str(d) if isinstance(d, int) else ("1" if axis == 0 and spec.batched else "?")
                    for axis, d in enumerate(spec.shape))


# Ops that pass integer indices through unchanged in value, so a Gather after them still reads the input's ids.
_INDEX_PRESERVING = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand", "Transpose"}


def index_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """{integer input: number of rows} for inputs that index a constant table (embeddings), directly or through
    shape-only ops; the smallest table wins when an input indexes several."""
    graph = model.graph
    constants = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = list(node.attribute[0].t.dims)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    ranges = {}
    for value in graph.input:
        if value.name in constants:
            continue
        rows, pending, seen = [], [value.name], set()
        while pending:
            tensor = pending.pop()
            for node in readers.get(tensor, []):
                if node.op_type in _INDEX_PRESERVING and node.input[0] == tensor and node.output[0] not in seen:
                    seen.add(node.output[0])
                    pending.append(node.output[0])
                elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                    table = constants.get(node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if table and -len(table) <= axis < len(table):
                        rows.append(table[axis])
        if rows:
            ranges[value.name] = min(rows)
    return ranges


def _from_arrays(source: str, arrays: dict[str, np.ndarray], inputs: list[InputSpec],
                 preprocess: Preprocess | None) -> Dataset:
    labels = None
    for key in LABEL_KEYS:
        if key in arrays:
            labels = arrays.pop(key)
            break
    feeds = {}
    names = [spec.name for spec in inputs]
    if len(inputs) == 1 and names[0] not in arrays:
        candidates = [k for k, v in arrays.items() if v.dtype.kind in "biuf" and v.ndim >= 2]
        if len(candidates) == 1:
            arrays = {names[0]: arrays[candidates[0]]}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"{source}: has arrays [{', '.join(arrays) or 'none'}] but the model's inputs are "
                         f"[{', '.join(names)}]; name the arrays after the inputs")
    for spec in inputs:
        array = arrays[spec.name]
        if preprocess is not None and spec.batched and array.ndim in (3, 4) and len(spec.shape) == 4:
            array = preprocess.apply(array)
        feeds[spec.name] = _check_array(source, spec, array)
    sample_axis = batched_names(inputs)
    batched = {name: array for name, array in feeds.items() if name in sample_axis}
    counts = {len(a) for a in batched.values()}
    if len(counts) > 1:
        raise InputError(f"{source}: input arrays have different numbers of samples: "
                         + ", ".join(f"{k}={len(v)}" for k, v in batched.items()))
    count = counts.pop() if counts else 1
    labels = _check_labels(source, labels, count)
    return Dataset(source, count, inputs,
                   lambda a, b: {k: v[a:b] if k in batched else v for k, v in feeds.items()}, labels)


def _gather_feeds(source, limit: int | None, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Concatenate the feed dicts an iterable (or a CalibrationDataReader) yields, up to `limit` samples; an
    input without a batch axis keeps the first feed's value."""
    feeds = iter(source.get_next, None) if hasattr(source, "get_next") else iter(source)
    whole = {spec.name for spec in inputs} - batched_names(inputs)
    parts: dict[str, list[np.ndarray]] = {}
    count = 0
    for feed in feeds:
        if not isinstance(feed, dict):
            raise InputError(f"data iterable yielded {type(feed).__name__}; yield dicts {{input name: array}}")
        for name, value in feed.items():
            parts.setdefault(name, []).append(np.asarray(value))
        count += next((len(np.asarray(v)) for k, v in feed.items() if k not in whole), 0)
        if limit is not None and count >= limit:
            break
    try:
        return {name: values[0] if name in whole else np.concatenate(values) for name, values in parts.items()}
    except ValueError as exc:
        raise InputError(f"data iterable yielded batches that do not stack: {exc}") from None


def _check_array(source: str, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    expected = _declared(spec)
    if not spec.batched:  # fed whole with every batch: the array is the input itself
        array = np.asarray(array)
        if array.ndim != len(spec.shape) or any(isinstance(want, int) and want != got
                                                for want, got in zip(spec.shape, array.shape)):
            raise InputError(f"{source}: array for input '{spec.name}' has shape {list(array.shape)}, the model "
                             f"expects {expected}; this input has no batch axis, so give it whole, once")
    elif array.ndim != len(spec.shape):
        raise InputError(f"{source}: array for input '{spec.name}' has shape {list(array.shape)}, the model expects "
                         f"{expected} (the first axis counts samples)")
    for axis, (want, got) in enumerate(zip(spec.shape[1:], array.shape[1:]), start=1):
        if spec.batched and isinstance(want, int) and want != got:
            raise InputError(f"{source}: array for input '{spec.name}' has shape {list(array.shape)}, the model "
                             f"expects {expected}: axis {axis} is {got}, not {want}")
    if array.dtype == spec.dtype:
        return array
    lossless = np.can_cast(array.dtype, spec.dtype, "safe") or (
        array.dtype.kind in "biu" and spec.dtype.kind == "f") or (
        array.dtype.kind == "f" and spec.dtype.kind == "f")
    if not lossless:
        raise InputError(f"{source}: array for input '{spec.name}' is {array.dtype}, the model expects "
                         f"{spec.dtype}; convert the data")
    return array.astype(spec.dtype)


def _check_labels(source: str, labels, count: int) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim == 2:  # one-hot
        labels = labels.argmax(axis=1)
    if labels.ndim != 1 or len(labels) != count or labels.dtype.kind not in "biu":
        raise InputError(f"{source}: labels must be {count} integer class indices, got {labels.dtype} "
                         f"shape {list(labels.shape)}")
    return labels.astype(np.int64)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy file ({exc})") from None


def _from_image_folder(folder: Path, inputs: list[InputSpec], preprocess: Preprocess | None) -> Dataset:
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise InputError(f"{folder}: image folders feed models with one 4-D image input; this model has "
                         f"inputs {[s.name for s in inputs]}")
    spec = inputs[0]
    preprocess = preprocess or _default_preprocess(spec)
    files, labels = _list_images(folder)
    if not files:
        raise InputError(f"{folder}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def take(start: int, stop: int) -> dict[str, np.ndarray]:
        images = [preprocess.load_image(p) for p in files[start:stop]]
        sizes = {image.shape for image in images}
        if len(sizes) > 1:
            raise InputError(f"{folder}: images differ in size ({', '.join(str(s[:2]) for s in sorted(sizes))}); "
                             "add resize= and crop= to --preprocess")
        images = np.stack(images)
        return {spec.name: _check_array(str(folder), spec, preprocess.apply(images))}

    take(0, 1)  # fail now, not mid-run, when the preprocessing does not fit the model
    return Dataset(f"{folder} ({len(files)} images)", len(files), inputs, take,
                   _check_labels(str(folder), labels, len(files)) if labels is not None else None)


def _default_preprocess(spec: InputSpec) -> Preprocess:
    """Resize and crop to the model's spatial size, scale to [0, 1], layout from where the channels are."""
    layout = "NHWC" if spec.shape[-1] in (1, 3) and spec.shape[1] not in (1, 3) else "NCHW"
    size = spec.shape[2] if layout == "NCHW" else spec.shape[1]
    channels = spec.shape[1] if layout == "NCHW" else spec.shape[-1]
    size = size if isinstance(size, int) else None
    return Preprocess(resize=size, crop=size, layout=layout, channels="L" if channels == 1 else "RGB")


def _list_images(folder: Path) -> tuple[list[Path], np.ndarray | None]:
    label_file = folder / "labels.csv"
    if label_file.exists():
        files, labels = [], []
        try:
            with label_file.open(newline="", encoding="utf-8") as handle:
                rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
        except UnicodeDecodeError:
            raise InputError(f"{label_file}: not UTF-8 text; save it as UTF-8 CSV (file,class_index)") from None
        if rows and (len(rows[0]) < 2 or not rows[0][1].strip().isdigit()):
            rows = rows[1:]  # a header such as file,class_index
        for row in rows:
            if len(row) < 2:
                raise InputError(f"{label_file}: each row needs file,class_index; got {row}")
            try:
                labels.append(int(row[1]))
            except ValueError:
                raise InputError(f"{label_file}: class index '{row[1]}' is not an integer") from None
            files.append(folder / row[0])
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise InputError(f"{label_file}: lists {len(missing)} missing image(s), e.g. {missing[0]}")
        return files, np.asarray(labels, dtype=np.int64)
    # hidden and tool folders (.ipynb_checkpoints, __MACOSX) are not classes
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
    if class_dirs:
        files, labels = [], []
        for index, class_dir in enumerate(class_dirs):
            for image in sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                files.append(image)
                labels.append(index)
        return files, np.asarray(labels, dtype=np.int64)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), None


def _number(text: str) -> float:
    if "/" in text:
        numerator, denominator = text.split("/", 1)
        return float(numerator) / float(denominator)
    return float(text)
