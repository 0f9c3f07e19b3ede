"""ONNX Runtime sessions per execution provider, with a clear error when a provider is missing."""

from __future__ import annotations

import onnx
import onnxruntime as ort

from onnxcomp import model_io
from onnxcomp.errors import InputError, first_line

# A model in memory with more weights than this reaches ONNX Runtime as files with external data, not as bytes:
# over 2 GB there are no bytes (protobuf's limit), and below it the bytes are a copy of the weights that ORT
# parses into a second one (a 1.2 GB model's calibration session took 5.9 GB, 1.3 GB from files).
ON_DISK_BYTES = 256 * 2**20

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def channel_block() -> int:
    """The channel block of ONNX Runtime's CPU convolution kernels on this machine: 16 floats where the CPU has
    AVX-512F, else 8 (AVX2). MLAS runs convolutions in NCHWc layout, each layer's channels padded to whole blocks,
    so channel counts between two multiples of the block run at the upper one's speed. Measured on an AVX-512
    machine (1×1, depthwise 3×3 and 1×1 convolutions at 56×56, batch 1): 1308 µs at 72 channels, 1306 at 80,
    1444 at 88, 1449 at 96."""
    return 16 if _cpu_features().get("AVX512F") else 8


def _cpu_features() -> dict[str, bool]:
    """numpy's reading of the CPU's features (the instruction sets the OS enables), or none where it has none."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        return {}
    return dict(__cpu_features__)


def parse_providers(text: str | list[str] | tuple[str, ...]) -> list[str]:
    names = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    for name in names:
        if name not in PROVIDERS:
            raise InputError(f"unknown execution provider '{name}'; valid: {', '.join(PROVIDERS)}")
    return names or ["cpu"]


def require_available(providers: list[str]) -> None:
    """Fail before any work when onnxruntime lacks a provider the user asked for."""
    for name in providers:
        if PROVIDERS[name] not in ort.get_available_providers():
            raise InputError(
                f"onnxruntime {ort.__version__} has no {name.upper()} execution provider; "
                "install the GPU build: pip uninstall -y onnxruntime && pip install onnxruntime-gpu")


def session(model: onnx.ModelProto | str, provider: str = "cpu", optimization: str = "all",
            spinning: bool = True, folder: str | None = None,
            profile_prefix: str | None = None) -> ort.InferenceSession:
    """An inference session on exactly the provider asked for; never a silent fallback to the CPU.

    `folder` is where the external data of an in-memory `model` lies (a model read by model_io.load with
    weights=False, or cut from one): ORT reads the weights from there, and the model's bytes are its graph.
    With `profile_prefix`, ORT records each node's time in a JSON file starting with it (end_profiling)."""
    if optimization not in OPTIMIZATION_LEVELS:
        raise InputError(f"unknown ORT optimization level '{optimization}'; valid: {', '.join(OPTIMIZATION_LEVELS)}")
    provider_name = PROVIDERS[parse_providers([provider])[0]]
    require_available([provider])
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 4  # fatal only: failures reach the user as our one-line errors
    if not spinning:  # idle worker threads would spin and steal the cores from another session being timed
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    if profile_prefix is not None:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    if not isinstance(model, str) and folder is None and model_io.tensor_bytes(model) > ON_DISK_BYTES:
        with model_io.on_disk(model) as path:
            created = _created(path, options, provider, provider_name)
    else:
        created = _created(model if isinstance(model, str) else model.SerializeToString(), options, provider,
                           provider_name)
    if created.get_providers()[0] != provider_name:
        raise InputError(f"onnxruntime could not start the {provider.upper()} execution provider (no GPU, or "
                         "CUDA / cuDNN libraries missing); see onnxruntime's CUDA requirements")
    return created


def _created(source: str | bytes, options: ort.SessionOptions, provider: str,
             provider_name: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, options, providers=[provider_name])
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types for a model it rejects
        raise InputError(f"onnxruntime cannot load the model on {provider}: {first_line(exc)}") from None
