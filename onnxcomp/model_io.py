"""All file-system access for models: loading (with external data) and atomic saving.

Nothing else in onnxcomp opens model files. Loading refuses external-data locations that escape the model's
folder, so a downloaded model cannot make us read arbitrary files. Saving writes to temporary files in the
destination folder and renames them into place, so a crash never leaves a half-written model, and it refuses
to write over the model it was loaded from.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxcomp.errors import InputError, first_line

# Protobuf refuses to serialize messages of 2 GiB or more; stay clear of it with a margin for the graph itself.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20
# Initializers this large go to the external-data file (as onnx.save_model's size_threshold does), and are left
# out of the copy of the model that the checks read.
EXTERNAL_TENSOR_BYTES = 1024


def load(path: str | os.PathLike, *, weights: bool = True) -> onnx.ModelProto:
    """Read an ONNX model and its external data; raise InputError with a clear message when it cannot.

    `weights=False` gives the graph, shapes and names without reading the weights: tensors kept in external
    data are not read (their files are still checked), and the main graph's large inline initializers become
    references into the model file itself, in the external-data form (location, offset, length). The model is
    then runnable from the file's folder (runtime.session's `folder`), and its weights are read where needed.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path to the ONNX model")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected an .onnx model file")
    try:
        model = None if weights else _graph_only(path)
        if model is None:
            model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({first_line(exc)}); is the file complete?") from None
    if not model.graph.node and not model.graph.output:
        # protobuf happily decodes many non-ONNX byte strings into an empty message
        raise InputError(f"{path}: not an ONNX model (no graph found); pass an .onnx file")
    try:
        _check_text_fields(model)
    except UnicodeDecodeError:
        raise InputError(f"{path}: a name or other text in the model is not valid UTF-8; the file is damaged, "
                         "re-export or download it again") from None
    locations = external_data_locations(model)
    base = path.resolve().parent
    for location in locations:
        _check_external_location(path, base, location)
    if locations and weights:
        try:
            onnx.load_external_data_for_model(model, str(base))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise InputError(f"{path}: cannot read its external data ({first_line(exc)})") from None
    elif locations:
        _check_extents(path, model)
        _read_beyond_initializers(model, base)
    return model


def _read_beyond_initializers(model: onnx.ModelProto, folder: Path) -> None:
    """Read in the external values of the tensors outside the main graph's initializers (subgraphs' and Constant
    nodes'): the checks and graphsurgeon read those in place, and they are few and small beside the weights."""
    _read_in(itertools.islice(all_tensors(model), len(model.graph.initializer), None), folder)


def _read_in(tensors: Iterable[onnx.TensorProto], folder: str | os.PathLike) -> None:
    """Read the external values of `tensors` into them, in place."""
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.CopyFrom(read_tensor(tensor, folder))


def _check_extents(path: Path, model: onnx.ModelProto) -> None:
    """Raise InputError for an external tensor whose bytes its file does not hold (what reading it would find),
    so that a model read without its weights is refused as early as one read whole."""
    base, sizes = path.resolve().parent, {}
    for tensor in all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        place = {entry.key: entry.value for entry in tensor.external_data}
        location = place.get("location", "")
        if location not in sizes:
            file = base / location
            sizes[location] = file.stat().st_size if location and file.is_file() else None
        size, needed = sizes[location], _payload_bytes(tensor)
        try:
            offset = int(place.get("offset", 0))
            length = int(place["length"]) if "length" in place else (size or 0) - offset
        except ValueError:
            size = None
        if size is None:
            raise InputError(f"{path}: cannot read its external data (tensor '{tensor.name}' refers to "
                             f"'{location}', which is not a readable file beside the model)")
        if offset < 0 or offset + length > size or (needed is not None and length < needed):
            raise InputError(f"{path}: cannot read its external data (tensor '{tensor.name}' needs "
                             f"{needed} bytes at offset {offset} of '{location}', which holds {size}); the data "
                             "file is incomplete: copy or export it again")


def read_tensor(tensor: onnx.TensorProto, folder: str | os.PathLike,
                stamp: tuple[int, int] | None = None) -> onnx.TensorProto:
    """A copy of `tensor`, whose values lie in external data in `folder`, with the values read in; with `stamp`
    (data_stamp's, taken earlier), only if the file has not changed since."""
    from onnx.external_data_helper import load_external_data_for_tensor

    if stamp is not None and data_stamp(tensor, folder) != stamp:
        raise InputError(f"the file holding tensor '{tensor.name}' in {folder} changed during the run; run again "
                         "once it is written (onnxcomp reads a model's weights from its files as it needs them)")
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    try:
        load_external_data_for_tensor(copy, str(folder))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise InputError(f"cannot read the external data of tensor '{tensor.name}' from {folder} "
                         f"({first_line(exc)}); was the data file changed or removed during the run?") from None
    copy.ClearField("data_location")  # absent, as in a tensor that was never external (not set to DEFAULT)
    del copy.external_data[:]
    return copy


def data_stamp(tensor: onnx.TensorProto, folder: str | os.PathLike) -> tuple[int, int] | None:
    """(size, modification time in ns) of the file holding `tensor`'s external values, None where it is
    missing: what read_tensor compares to see that a file it reads again is still the one first read."""
    location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
    try:
        status = (Path(folder) / location).stat()
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


def moved_out(model: onnx.ModelProto, folder: str | os.PathLike) -> Iterator[tuple[onnx.TensorProto, bytes]]:
    """Take the initializers whose values lie in files in `folder` out of `model` (now), and give each as
    on_disk's `weights` do, read one at a time (as the iterator is consumed): for writing a model read with
    weights=False to another folder."""
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    kept = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)

    def read() -> Iterator[tuple[onnx.TensorProto, bytes]]:
        while external:
            yield tensor_weight(read_tensor(external.pop(0), folder))

    return read()


def tensor_weight(tensor: onnx.TensorProto) -> tuple[onnx.TensorProto, bytes]:
    """A tensor holding its values in raw_data as on_disk's `weights` take it: (the tensor without them, the
    bytes)."""
    header = onnx.TensorProto()
    copy_fields(tensor, header, skip="raw_data")
    return header, tensor.raw_data


def tensor_array(tensor: onnx.TensorProto, folder: str | os.PathLike | None = None,
                 stamp: tuple[int, int] | None = None) -> np.ndarray:
    """The values of `tensor` as an array, read from `folder` where they lie in external data (see read_tensor
    for `stamp`)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        tensor = read_tensor(tensor, folder, stamp)
    return numpy_helper.to_array(tensor)


def folder_of(path: str | os.PathLike) -> str:
    """The folder a model file's external data is read from (that of the file itself, through any link); also
    where load(weights=False) refers to the file's own inline weights."""
    return str(Path(path).resolve().parent)


def array_weight(name: str, array: np.ndarray) -> tuple[onnx.TensorProto, memoryview]:
    """An array as on_disk's `weights` take it: (a TensorProto stating its name, type and shape, its bytes),
    without a copy."""
    array = np.ascontiguousarray(array)
    header = onnx.TensorProto(name=name, dims=array.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
    return header, array.reshape(-1).view(np.uint8).data  # bytes: a buffer of bfloat16 or float8 is refused


def with_weights(model: onnx.ModelProto, folder: str | os.PathLike) -> onnx.ModelProto:
    """A copy of `model` (read with weights=False from a file in `folder`) holding all its weights."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _read_in(all_tensors(copy), folder)
    return copy


# TensorProto's value fields: float_data, int32_data, int64_data, raw_data, double_data, uint64_data.
_TENSOR_VALUE_FIELDS = frozenset({4, 5, 7, 9, 10, 11})
_RAW_DATA_FIELD = 9


def _graph_only(path: Path) -> onnx.ModelProto | None:
    """The model in `path` parsed without the values of its main graph's large initializers, or None where the
    file is not a protobuf this reads (the full parse then says what is wrong).

    The file is mapped, not read, and the values are skipped over in the wire format, so the pages that hold
    them are never touched: parsing a 1.2 GB model whole, to look at its graph, took 2.4 GB at its peak."""
    import mmap

    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return None
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as data:
            try:
                kept, places = _without_values(data)
            except (IndexError, ValueError):
                return None
            model = onnx.ModelProto.FromString(kept)
            for index, (offset, length) in places.items():
                tensor = model.graph.initializer[index]
                needed = _payload_bytes(tensor)
                if needed is not None and length < needed:  # kept whole, for the checks to name what is wrong
                    tensor.raw_data = bytes(data[offset:offset + length])
                else:  # by the name of the file itself: a link's name may not be in the folder the data is read from
                    _refer(tensor, path.resolve().name, offset, length)
    return model


def _without_values(data: memoryview) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """The message in `data` without the raw_data of its main graph's large initializers, and where each of
    those lies in `data` ({initializer index: (offset, length)}); initializers with other value fields (float_data
    and the like, not raw bytes a reference can point at) are kept whole."""
    kept, places = bytearray(), {}
    for number, wire, start, value_start, end in _wire_fields(data, 0, len(data)):
        if number != _GRAPH_FIELD or wire != 2:
            kept += data[start:end]
            continue
        graph, index = bytearray(), 0
        for inner, inner_wire, inner_start, inner_value_start, inner_end in _wire_fields(data, value_start, end):
            if inner == _INITIALIZER_FIELD and inner_wire == 2 and inner_end - inner_value_start >= EXTERNAL_TENSOR_BYTES:
                fields = list(_wire_fields(data, inner_value_start, inner_end))
                values = [f for f in fields if f[0] in _TENSOR_VALUE_FIELDS]
                if len(values) == 1 and values[0][0] == _RAW_DATA_FIELD:
                    tensor = b"".join(bytes(data[f[2]:f[4]]) for f in fields if f[0] != _RAW_DATA_FIELD)
                    graph += _field_header(_INITIALIZER_FIELD, len(tensor)) + tensor
                    places[index] = (values[0][3], values[0][4] - values[0][3])
                else:
                    graph += data[inner_start:inner_end]
            else:
                graph += data[inner_start:inner_end]
            index += inner == _INITIALIZER_FIELD
        kept += _field_header(_GRAPH_FIELD, len(graph)) + graph
    return bytes(kept), places


def _refer(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` refer to `length` bytes at `offset` of the file `location` (external data)."""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _wire_fields(data: memoryview, position: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start, value start, end) of each field of the message in data[position:end]."""
    while position < end:
        key, value_start = _read_varint(data, position)
        wire = key & 7
        if wire == 0:
            value_end = _read_varint(data, value_start)[1]
        elif wire in (1, 5):
            value_end = value_start + (8 if wire == 1 else 4)
        elif wire == 2:
            length, value_start = _read_varint(data, value_start)
            value_end = value_start + length
        else:
            raise ValueError(f"wire type {wire}: not an ONNX model")
        if value_end > end:
            raise ValueError("a field runs past the end of its message")
        yield key >> 3, wire, position, value_start, value_end
        position = value_end


def _read_varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    """The distinct external-data file names a model refers to, in order of first use."""
    seen: dict[str, None] = {}
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    seen.setdefault(entry.value, None)
    return list(seen)


def save(model: onnx.ModelProto, path: str | os.PathLike, *, source: str | os.PathLike | None = None,
         external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically and return the path.

    `source` is the file the model was read from: writing over it (or over its external data) is refused.
    `external_data=None` stores weights in `<name>.data` beside the model only when the model would exceed the
    protobuf limit; True or False forces the choice.
    """
    path = Path(path)
    check_output_path(source, path)
    folder = path.resolve().parent
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        _write_atomically(path, serialized_parts(model))
        return path

    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=folder, prefix=".onnxcomp-") as staging:
        staged_model = Path(staging) / path.name
        staged_data = Path(staging) / data_name
        _write_external(model, staged_model, staged_data)
        for staged in (staged_model, staged_data):
            if staged.exists():
                os.chmod(staged, _default_mode())
        target_data = folder / data_name
        previous_data = Path(staging) / (data_name + ".previous")
        # Data first, so a reader that sees the new model also sees its data. Should the model's rename
        # fail, the previous data goes back, so the previous model never reads the new weights.
        if target_data.exists():
            os.replace(target_data, previous_data)
        try:
            if staged_data.exists():
                os.replace(staged_data, target_data)
            os.replace(staged_model, path)
        except BaseException:
            if previous_data.exists():
                os.replace(previous_data, target_data)
            raise
    return path


@contextmanager
def on_disk(model: onnx.ModelProto, weights: Iterable[tuple[onnx.TensorProto, Buffer]] = ()) -> Iterator[str]:
    """A path to `model` for the duration of the block: a model over protobuf's 2 GB limit cannot be handed to
    ONNX Runtime as bytes, so it is written to a temporary folder with its weights in external data.

    `weights` are more initializers, each a TensorProto that states name, type and shape without values and
    the bytes of its values: they are written one at a time, so a caller holding its weights as arrays never
    builds a second copy of them in a model."""
    with tempfile.TemporaryDirectory(prefix="onnxcomp-") as folder:
        path = Path(folder) / "model.onnx"
        _write_external(model, path, Path(folder) / "model.onnx.data", weights, durable=False)
        yield str(path)


Buffer = bytes | memoryview


def _write_external(model: onnx.ModelProto, model_path: Path, data_path: Path,
                    weights: Iterable[tuple[onnx.TensorProto, Buffer]] = (), *, durable: bool = True) -> None:
    """Save `model` (and `weights`, see on_disk) with its large initializers in `data_path`, written one tensor
    at a time; `durable` syncs the data to disk before the model refers to it.

    The model itself is not changed, and no second copy of its weights is made (onnx.save_model would need a
    copy of the whole model to move the weights out of)."""
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, skip="graph")
    copy_fields(model.graph, skeleton.graph, skip="initializer")
    with open(data_path, "wb") as data:
        for tensor in model.graph.initializer:
            stored = skeleton.graph.initializer.add()
            if len(tensor.raw_data) < EXTERNAL_TENSOR_BYTES:
                stored.CopyFrom(tensor)
                continue
            copy_fields(tensor, stored, skip="raw_data")
            _write_refer(stored, data, tensor.raw_data)
        for header, values in weights:
            stored = skeleton.graph.initializer.add()
            stored.CopyFrom(header)
            _write_refer(stored, data, values)
            del values  # the caller's buffer may be the only copy of a weight read for this write
        data.flush()
        if durable:
            os.fsync(data.fileno())
    if data_path.stat().st_size == 0:
        data_path.unlink()
    _write_atomically(model_path, skeleton.SerializeToString(), durable=durable)


def _write_refer(tensor: onnx.TensorProto, data, values: Buffer) -> None:
    """Append `values` to the open external-data file `data` and make `tensor` refer to them there."""
    offset = data.tell()
    data.write(values)
    _refer(tensor, Path(data.name).name, offset, data.tell() - offset)


def serialized_parts(model: onnx.ModelProto) -> Iterator[bytes]:
    """model.SerializeToString(), byte for byte, in pieces: the fields around the graph, the graph's fields
    around its initializers, and each initializer alone, so that no copy of all the weights is ever made."""
    graph = model.graph
    sizes = [tensor.ByteSize() for tensor in graph.initializer]
    graph_before, graph_after = _fields(graph, below=_INITIALIZER_FIELD), _fields(graph, above=_INITIALIZER_FIELD)
    length = len(graph_before) + len(graph_after) + sum(len(_field_header(_INITIALIZER_FIELD, n)) + n for n in sizes)
    yield _fields(model, below=_GRAPH_FIELD)
    if model.HasField("graph"):
        yield _field_header(_GRAPH_FIELD, length) + graph_before
        for tensor, size in zip(graph.initializer, sizes):
            yield _field_header(_INITIALIZER_FIELD, size) + tensor.SerializeToString()
        yield graph_after
    yield _fields(model, above=_GRAPH_FIELD)


def _fields(message, *, below: int = 0, above: int = 2**29) -> bytes:
    """The serialized fields of `message` numbered below `below` or above `above` (protobuf writes fields in
    the order of their numbers, so the pieces of one message join into its serialization)."""
    part = type(message)()
    for field, value in message.ListFields():
        if field.number < below or field.number > above:
            _copy_field(part, field, value)
    return part.SerializeToString()


_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


def _field_header(number: int, length: int) -> bytes:
    """The tag of a length-delimited field (wire type 2) and its length, as varints."""
    return _varint(number << 3 | 2) + _varint(length)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def copy_fields(source, target, *, skip: str | tuple[str, ...]) -> None:
    """Copy every set field of protobuf message `source` into `target` except the field(s) named in `skip`: a
    model without its weights, or a tensor without its payload, at the cost of the rest only."""
    skipped = (skip,) if isinstance(skip, str) else skip
    for field, value in source.ListFields():
        if field.name not in skipped:
            _copy_field(target, field, value)


def _copy_field(target, field, value) -> None:
    if field.is_repeated:
        getattr(target, field.name).extend(value)
    elif field.message_type is None:
        setattr(target, field.name, value)
    else:
        getattr(target, field.name).CopyFrom(value)


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose large initializers are graph inputs of the same type and shape.

    onnx.checker and type inference learn from it all they check except the payloads (see payload_error),
    without the copies of the weights that checking the model itself takes (it is serialized, then parsed)."""
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, skip="graph")
    copy_fields(model.graph, skeleton.graph, skip="initializer")
    inputs = {value.name for value in model.graph.input}
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) < EXTERNAL_TENSOR_BYTES and tensor.data_location != onnx.TensorProto.EXTERNAL:
            skeleton.graph.initializer.add().CopyFrom(tensor)
        elif tensor.name not in inputs:
            skeleton.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                           list(tensor.dims)))
    return skeleton


def payload_error(model: onnx.ModelProto) -> str | None:
    """What is wrong with the raw payload of an initializer that `weightless` leaves out, or None."""
    for tensor in model.graph.initializer:
        size = len(tensor.raw_data)
        if size < EXTERNAL_TENSOR_BYTES:
            continue
        needed = _payload_bytes(tensor)
        if needed is None:
            return f"initializer '{tensor.name}' has an unknown data type ({tensor.data_type})"
        if size < needed:  # the words of onnx.checker, which says the same of the small ones
            return (f"initializer '{tensor.name}' raw_data size ({size} bytes) is too small for the declared "
                    f"shape and type ({needed} bytes required)")
    return None


def _payload_bytes(tensor: onnx.TensorProto) -> int | None:
    count = 1
    for dim in tensor.dims:
        count *= dim
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError):
        return None
    if tensor.data_type in _FOUR_BIT_TYPES:
        return (count + 1) // 2
    return count * itemsize


_FOUR_BIT_TYPES = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1")
                   if hasattr(onnx.TensorProto, name)}


def check_output_path(source: str | os.PathLike | None, output: str | os.PathLike) -> None:
    """Refuse an output path that is a folder, lies in a missing folder, or is the input model or its data."""
    output = Path(output)
    if output.is_dir():
        raise InputError(f"{output}: is a folder; give the output as a file name such as model.opt.onnx")
    if not output.resolve().parent.is_dir():
        raise InputError(f"{output.parent}: output folder does not exist; create it first")
    if source is not None:
        _refuse_overwrite(Path(source), output)


def save_text(text: str, path: str | os.PathLike, *, protect: tuple = ()) -> Path:
    """Write a report or other text file atomically; refuse to write over the model files in `protect`."""
    path = Path(path)
    if path.is_dir() or not path.resolve().parent.is_dir():
        raise InputError(f"{path}: cannot write here; give a file name in an existing folder")
    for model_path in protect:
        if model_path is not None and path.exists() and Path(model_path).exists() and os.path.samefile(path, model_path):
            raise InputError(f"{path}: is a model file of this run; write the report to another file")
    _write_atomically(path, text.encode("utf-8"))
    return path


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus the external-data files it refers to."""
    path = Path(path)
    total = path.stat().st_size
    model = load(path, weights=False)
    for location in external_data_locations(model):
        if location != path.resolve().name:  # inline weights, which load(weights=False) refers to in the file itself
            total += (path.resolve().parent / location).stat().st_size
    return total


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor payload held in the model (initializers and Constant values, subgraphs included)."""
    total = 0
    for tensor in all_tensors(model):
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            count = 1
            for dim in tensor.dims:
                count *= dim
            total += count * max(1, onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    return total


def _check_text_fields(message) -> None:
    """Raise UnicodeDecodeError at the first text field that is not valid UTF-8.

    protobuf parses proto2 strings without checking them and hands the damaged ones to Python as bytes, which
    fail only when a pass copies them into a new model."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            for text in (value if field.is_repeated else [value]):
                if isinstance(text, bytes):
                    text.decode("utf-8")
        elif field.message_type is not None:
            for item in (value if field.is_repeated else [value]):
                _check_text_fields(item)


def all_tensors(model: onnx.ModelProto):
    """Every TensorProto of `model`: initializers, attribute values, those of subgraphs, in a fixed order."""
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def _check_external_location(model_path: Path, base: Path, location: str) -> None:
    problem = None
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        problem = "is an absolute path"
    elif ".." in Path(location.replace("\\", "/")).parts:
        problem = "goes up out of the model's folder"
    else:
        resolved = (base / location).resolve()
        if resolved != base and base not in resolved.parents:
            problem = "resolves (through a link) outside the model's folder"
    if problem:
        raise InputError(
            f"{model_path}: external data location '{location}' {problem}; refusing to read it. "
            "Keep external data files next to the model and refer to them by plain file name")


def _refuse_overwrite(source: Path, target: Path) -> None:
    if not source.exists():
        return
    protected = [source]
    try:
        source_model = load(source, weights=False)  # the graph only: parsing an inline model held its weights
        protected += [source.resolve().parent / loc for loc in external_data_locations(source_model)]
    except Exception:  # noqa: BLE001 - an unreadable source still protects its own path
        pass
    candidates = [target, target.resolve().parent / (target.name + ".data")]
    for existing in protected:
        for candidate in candidates:
            if candidate.exists() and os.path.samefile(existing, candidate):
                raise InputError(
                    f"{target}: is the input model (or its data); onnxcomp never writes over its input. "
                    "Choose another output path with -o")


def _write_atomically(path: Path, payload: bytes | Iterable[bytes], *, durable: bool = True) -> None:
    """Write `payload` (bytes, or pieces of bytes) to a temporary file beside `path`, then rename it there;
    `durable` syncs it to disk first (a temporary file that dies with the process need not be)."""
    pieces = [payload] if isinstance(payload, bytes) else payload
    if path.exists() and not path.is_file():
        # /dev/null, /dev/stdout, a pipe: the user asked to stream there; renaming over it would replace it
        with open(path, "wb") as handle:
            for piece in pieces:
                handle.write(piece)
        return
    folder = path.resolve().parent
    mode = path.stat().st_mode & 0o777 if path.exists() else _default_mode()
    fd, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            for piece in pieces:
                handle.write(piece)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(temp_name, mode)  # mkstemp makes 0600; a saved model should be as readable as any new file
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask

