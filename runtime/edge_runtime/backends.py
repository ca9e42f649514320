"""Inference backends with one interface: ``load()``, ``infer(batch) -> outputs``, ``describe()``.

* `OrtBackend`: ONNX Runtime, session options from the release manifest (threads, graph
  optimisation level, execution providers filtered to those this device has), the model loaded
  from its file path (ORT memory-maps external data instead of copying bytes through Python),
  and IO binding with preallocated output buffers when all output shapes are static.
* `TensorRTBackend`: builds an engine ON the device from the shipped ONNX and caches it as
  ``<deploy_dir>/engines/<key>.engine`` with key = ONNX sha256 + TensorRT version + GPU name +
  precision. One code path for TensorRT 8.5, 10 and 11, chosen by feature (`tensorrt_features`,
  `plan_build`), never by version string: FP16 from the FP32 ONNX + ``BuilderFlag.FP16`` where that
  flag exists (8.5/10), else from the FP16 ONNX in a strongly typed network (11); INT8 from the
  symmetric-QDQ model (explicit quantization, no calibrator) with ``BuilderFlag.INT8`` (8.5/10) or
  strongly typed (11); ``EXPLICIT_BATCH`` on 8.x. Execution uses the name-based I/O tensor API all
  three share (``num_io_tensors``, ``set_tensor_address``, ``execute_async_v3``), page-locked
  host buffers and one CUDA stream.

tensorrt and pycuda are imported lazily, only inside the TensorRT code paths, so a Raspberry Pi
never needs them.
"""

from __future__ import annotations

import ast
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .fileio import atomic_write_bytes, atomic_write_json, sha256_file
from .manifest import PRECISIONS, OrtSettings

GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
TENSORRT_FIX = ("install TensorRT's Python bindings (JetPack: `sudo apt install python3-libnvinfer`) and "
                "`pip install pycuda`, or deploy the release with backend onnxruntime")


class BackendError(ValueError):
    """A backend cannot load or run the model: the message names the problem and the fix."""


class TensorRTUnavailable(BackendError):
    """TensorRT (or pycuda) cannot be imported on this device."""


class InputShapeError(BackendError):
    """`infer` got a batch whose shape or dtype the model does not accept."""


def _check_model_file(path: Path) -> None:
    if not path.is_file():
        raise BackendError(f"model file {path} not found; redeploy the release (or check --release)")


def parse_names(value: str) -> Tuple[str, ...]:
    """Class names from Ultralytics' ONNX metadata (a dict literal ``{0: 'a', 1: 'b'}``)."""
    try:
        names = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
        raise BackendError(f"model metadata 'names' is not a literal dict/list: {value[:80]!r}") from e
    if isinstance(names, dict):
        return tuple(str(names[k]) for k in sorted(names))
    if isinstance(names, (list, tuple)):
        return tuple(str(n) for n in names)
    raise BackendError(f"model metadata 'names' must be a dict or list of class names, got {value[:80]!r}")


class Backend:
    """The interface every backend implements (and what bench/realtime/health rely on)."""

    name = "backend"

    def load(self) -> None:
        """Prepare the model for inference (idempotent)."""
        raise NotImplementedError

    def infer(self, batch: np.ndarray, copy: bool = True) -> List[np.ndarray]:
        """Run the model on an NCHW float32 batch and return its outputs.

        With ``copy=False`` the returned arrays may be the backend's own buffers, valid only until
        the next ``infer`` call (hot loops that postprocess immediately save a copy).
        """
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        """What runs: backend, model file and hash, providers/engine, input/output shapes."""
        raise NotImplementedError

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """The model's input shape (static dims as ints)."""
        raise NotImplementedError

    @property
    def metadata(self) -> Dict[str, str]:
        """The model's ONNX metadata (output_format, names, imgsz, stride, ...)."""
        return {}

    def close(self) -> None:
        """Release resources (GPU memory, sessions)."""

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        expected = self.input_shape
        if not isinstance(batch, np.ndarray) or batch.ndim != len(expected):
            got = getattr(batch, "shape", type(batch).__name__)
            raise InputShapeError(f"input has shape {got}, the model expects {expected}; "
                                  "preprocess with edge_runtime.preprocess at the variant's imgsz")
        for want, have in zip(expected, batch.shape):
            if isinstance(want, int) and want > 0 and want != have:
                raise InputShapeError(f"input has shape {tuple(batch.shape)}, the model expects {expected}; "
                                      "preprocess with edge_runtime.preprocess at the variant's imgsz")
        if batch.dtype != np.float32:
            raise InputShapeError(f"input dtype is {batch.dtype}, the model expects float32; use preprocess.to_tensor")
        return np.ascontiguousarray(batch)


# --------------------------------------------------------------------------- ONNX Runtime

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


class OrtBackend(Backend):
    """ONNX Runtime on the CPU (or whatever execution providers the manifest asks for and exist)."""

    name = "onnxruntime"

    def __init__(self, model_path: "os.PathLike[str] | str", settings: OrtSettings, io_binding: bool = True) -> None:
        self.model_path = Path(model_path)
        self.settings = settings
        self.use_io_binding = io_binding
        self._session: Any = None
        self._binding: Any = None
        self._out_buffers: List[np.ndarray] = []
        self._providers_used: List[str] = []
        self._sha256: Optional[str] = None

    def session_options(self) -> Any:
        """ORT SessionOptions from the manifest's `ort` settings (validated)."""
        import onnxruntime as ort

        s = self.settings
        if s.threads < 1:
            raise BackendError(f"ort.threads is {s.threads}; "
                               "set it to the number of cores to use (>= 1) in the manifest")
        if s.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise BackendError(f"ort.graph_optimization '{s.graph_optimization}' unknown; use one of "
                               f"{', '.join(GRAPH_OPTIMIZATION_LEVELS)}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = s.threads
        so.inter_op_num_threads = 1  # one model, one request at a time: a second pool only contends
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[s.graph_optimization]
        if self.model_path.suffix == ".ort":
            so.add_session_config_entry("session.load_model_format", "ORT")
        return so

    def select_providers(self) -> List[str]:
        """The manifest's providers that this onnxruntime build has, in the manifest's order."""
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        chosen = [p for p in self.settings.providers if p in available]
        if not chosen:
            raise BackendError(f"none of the manifest's execution providers {list(self.settings.providers)} exist in "
                               f"this onnxruntime (has {sorted(available)}); add CPUExecutionProvider to ort.providers")
        return chosen

    def load(self) -> None:
        """Create the session from the model's file path; prepare IO binding for static outputs."""
        if self._session is not None:
            return
        import onnxruntime as ort

        _check_model_file(self.model_path)
        providers = self.select_providers()
        try:
            # A path (not bytes): ORT reads/memory-maps the file itself, no extra copy in Python.
            self._session = ort.InferenceSession(str(self.model_path), self.session_options(), providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise BackendError(f"onnxruntime cannot load {self.model_path}: {e}; the file is not a valid ONNX model "
                               "for this onnxruntime version -- redeploy or upgrade onnxruntime") from e
        self._providers_used = list(self._session.get_providers())
        outputs = self._session.get_outputs()
        static = all(isinstance(d, int) and d > 0 for o in outputs for d in o.shape)
        if self.use_io_binding and static and all(o.type in _ORT_TYPES for o in outputs):
            # Preallocated outputs: no per-frame allocation, and ORT writes straight into numpy memory.
            self._out_buffers = [np.empty(tuple(o.shape), dtype=_ORT_TYPES[o.type]) for o in outputs]
            self._binding = self._session.io_binding()
            for o, buf in zip(outputs, self._out_buffers):
                self._binding.bind_output(o.name, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)

    def _require(self) -> Any:
        if self._session is None:
            self.load()
        return self._session

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Static input shape, e.g. (1, 3, 256, 256); symbolic dims are kept as strings."""
        return tuple(self._require().get_inputs()[0].shape)

    @property
    def metadata(self) -> Dict[str, str]:
        """The ONNX model's custom metadata."""
        return dict(self._require().get_modelmeta().custom_metadata_map)

    def infer(self, batch: np.ndarray, copy: bool = True) -> List[np.ndarray]:
        """Run one batch. Outputs are float arrays in the model's output order."""
        session = self._require()
        batch = self._check_batch(batch)
        name = session.get_inputs()[0].name
        if self._binding is not None:
            self._binding.bind_cpu_input(name, batch)
            session.run_with_iobinding(self._binding)
            return [b.copy() for b in self._out_buffers] if copy else list(self._out_buffers)
        return list(session.run(None, {name: batch}))

    def describe(self) -> Dict[str, Any]:
        """Backend, model, providers, options and shapes (goes into bench/health JSON)."""
        import onnxruntime as ort

        session = self._require()
        if self._sha256 is None:
            self._sha256 = sha256_file(self.model_path)
        return {
            "backend": self.name,
            "onnxruntime": ort.__version__,
            "model_file": self.model_path.name,
            "model_sha256": self._sha256,
            "providers_requested": list(self.settings.providers),
            "providers": self._providers_used,
            "threads": self.settings.threads,
            "graph_optimization": self.settings.graph_optimization,
            "io_binding": self._binding is not None,
            "input_shape": list(self.input_shape),
            "output_shapes": [list(o.shape) for o in session.get_outputs()],
        }

    def close(self) -> None:
        """Drop the session."""
        self._session = self._binding = None
        self._out_buffers = []


# --------------------------------------------------------------------------- TensorRT

def import_tensorrt() -> Tuple[Any, Any]:
    """Import (tensorrt, pycuda.driver) lazily, or raise TensorRTUnavailable naming the fix."""
    try:
        import tensorrt as trt  # noqa: F401  (only ever imported here)
    except ImportError as e:
        raise TensorRTUnavailable(f"TensorRT not available ({e}); {TENSORRT_FIX}") from e
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        raise TensorRTUnavailable(f"TensorRT not available: pycuda missing ({e}); {TENSORRT_FIX}") from e
    return trt, cuda


def tensorrt_info() -> Optional[Dict[str, Any]]:
    """TensorRT version and GPU name when both import on this device, else None (never raises)."""
    try:
        trt, cuda = import_tensorrt()
        cuda.init()
        dev = cuda.Device(0)
        return {"tensorrt": str(trt.__version__), "gpu": gpu_name(dev),
                "compute_capability": ".".join(str(v) for v in dev.compute_capability())}
    except Exception:  # info must work on any device; absence is the common case
        return None


def gpu_name(device: Any) -> str:
    """The CUDA device name (a Jetson reports e.g. 'Orin')."""
    name = device.name()
    return name.decode() if isinstance(name, bytes) else str(name)


@dataclass(frozen=True)
class TensorRTFeatures:
    """What the installed TensorRT offers, found by looking for the API itself, never by parsing
    ``__version__`` (JetPack, pip wheels and containers number their builds differently).

    * ``fp16_flag`` / ``int8_flag``: ``BuilderFlag.FP16`` / ``BuilderFlag.INT8`` exist, i.e. weakly
      typed networks where a builder flag lets TensorRT pick lower-precision kernels (8.x, 10.x;
      TensorRT 11 removed both, with weak typing, calibrators and ``platform_has_fast_*``).
    * ``implicit_batch``: the builder still knows implicit batch (``Builder.max_batch_size``, 8.x), so
      an ONNX network must be created with ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``. 10.x
      keeps the flag but ignores it (deprecated), 11 removed it.
    * ``strongly_typed_flag``: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists (10.x, 11.x;
      in 11 it is the only mode and the flag is kept, ignored, for compatibility).
    * ``tensor_io``: the name-based I/O tensor API (``ICudaEngine.num_io_tensors``,
      ``get_tensor_name``/``get_tensor_mode``, ``IExecutionContext.set_tensor_address``,
      ``execute_async_v3``), in TensorRT since 8.5 and the only one left in 10 and 11.
    """

    fp16_flag: bool
    int8_flag: bool
    implicit_batch: bool
    strongly_typed_flag: bool
    tensor_io: bool

    @property
    def weak_typing(self) -> bool:
        """Builder precision flags exist (TensorRT 8.x/10.x)."""
        return self.fp16_flag or self.int8_flag

    @property
    def strong_typing(self) -> bool:
        """Strongly typed networks can be built: the flag exists, or weak typing is gone (11+)."""
        return self.strongly_typed_flag or not self.weak_typing


def tensorrt_features(trt: Any) -> TensorRTFeatures:
    """Detect the TensorRT API generation by feature (attribute lookups only: works without a GPU)."""
    flags = trt.BuilderFlag
    net_flags = trt.NetworkDefinitionCreationFlag
    engine, context = trt.ICudaEngine, trt.IExecutionContext
    return TensorRTFeatures(
        fp16_flag=hasattr(flags, "FP16"),
        int8_flag=hasattr(flags, "INT8"),
        implicit_batch=hasattr(trt.Builder, "max_batch_size") and hasattr(net_flags, "EXPLICIT_BATCH"),
        strongly_typed_flag=hasattr(net_flags, "STRONGLY_TYPED"),
        tensor_io=all(hasattr(engine, a) for a in ("num_io_tensors", "get_tensor_name", "get_tensor_mode",
                                                   "get_tensor_shape", "get_tensor_dtype"))
        and all(hasattr(context, a) for a in ("set_tensor_address", "execute_async_v3")),
    )


@dataclass(frozen=True)
class BuildPlan:
    """How one engine is built: from which ONNX, weakly or strongly typed, with which flags.

    ``network_flags`` / ``builder_flags`` are the attribute names of
    ``trt.NetworkDefinitionCreationFlag`` / ``trt.BuilderFlag``, so the sidecar and `describe()`
    say exactly what TensorRT was asked for.
    """

    onnx_path: Path
    precision: str
    typing: str  # "weak" (precision from builder flags) | "strong" (precision from the ONNX's types)
    network_flags: Tuple[str, ...]
    builder_flags: Tuple[str, ...]

    def to_json(self) -> Dict[str, Any]:
        """The plan as recorded in the engine's sidecar and `build-engine`'s output."""
        return {"onnx_file": self.onnx_path.name, "precision": self.precision, "typing": self.typing,
                "network_flags": list(self.network_flags), "builder_flags": list(self.builder_flags)}


FP16_ONNX_FIX = ("this TensorRT has no BuilderFlag.FP16 (TensorRT 11 removed weak typing), so an FP16 engine is "
                 "built from the FP16 ONNX (models/yolov8n.fp16.onnx, shipped in fp16 releases) in a strongly "
                 "typed network; redeploy the release with its FP16 ONNX, or use precision fp32/int8")


def plan_build(trt: Any, precision: str, onnx_path: Path, fp16_onnx_path: Optional[Path] = None) -> BuildPlan:
    """Choose the build for `precision` from what this TensorRT offers (`tensorrt_features`).

    * fp32: the FP32 ONNX; weakly typed without flags (8.x/10.x), strongly typed where weak typing
      is gone (11).
    * fp16: the FP32 ONNX with ``BuilderFlag.FP16`` where that flag exists (8.5, 10); otherwise the
      FP16 ONNX (same weights converted, float32 input/output) in a strongly typed network (11, or
      any build without the flag). The FP16 ONNX's precision is in its types, so no flag is set.
    * int8: `onnx_path` is the symmetric-QDQ ONNX (explicit quantization: its Q/DQ nodes carry the
      scales, no calibrator). Weakly typed with ``INT8`` (+ ``FP16`` so unquantized layers need not
      run in FP32) where the flags exist; strongly typed QDQ otherwise (11: layers outside Q/DQ pairs
      run in the ONNX's float type, FP32).

    8.x networks add ``EXPLICIT_BATCH`` (the ONNX parser requires it there; 10 ignores it, 11 removed it).
    """
    if precision not in PRECISIONS:
        raise BackendError(f"precision '{precision}' unknown; use one of {', '.join(PRECISIONS)}")
    f = tensorrt_features(trt)
    explicit = ("EXPLICIT_BATCH",) if f.implicit_batch else ()
    weak_flags: Tuple[str, ...] = ()
    if precision == "fp16" and f.fp16_flag:
        weak_flags = ("FP16",)
    elif precision == "int8" and f.int8_flag:
        weak_flags = ("FP16", "INT8") if f.fp16_flag else ("INT8",)
    elif precision == "fp32" and f.weak_typing:
        return BuildPlan(onnx_path, precision, "weak", explicit, ())
    if weak_flags:
        return BuildPlan(onnx_path, precision, "weak", explicit, weak_flags)
    if not f.strong_typing:
        raise BackendError(f"TensorRT {trt.__version__} offers neither BuilderFlag.{precision.upper()} nor strongly "
                           f"typed networks; cannot build a {precision} engine -- use precision fp32")
    source = onnx_path
    if precision == "fp16":
        if fp16_onnx_path is None:
            raise BackendError(FP16_ONNX_FIX)
        source = fp16_onnx_path
    strong = ("STRONGLY_TYPED",) if f.strongly_typed_flag else ()
    return BuildPlan(source, precision, "strong", explicit + strong, ())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def engine_key(onnx_sha256: str, trt_version: str, gpu: str, precision: str) -> str:
    """Engine cache key: ONNX sha256 + TensorRT version + GPU name + precision.

    Engines are not portable across GPUs or TensorRT versions, so all four are in the key. The
    ONNX is the one the engine is built from (FP32, FP16 or QDQ, see `plan_build`). Its hash is
    shortened to 16 hex digits (64 bits: collisions are not a practical concern for a device's
    handful of models); the sidecar JSON keeps the full hash.
    """
    if precision not in PRECISIONS:
        raise BackendError(f"precision '{precision}' unknown; use one of {', '.join(PRECISIONS)}")
    if not re.fullmatch(r"[0-9a-f]{64}", onnx_sha256):
        raise BackendError(f"onnx sha256 '{onnx_sha256}' is not 64 hex digits")
    return f"{onnx_sha256[:16]}-trt{_slug(trt_version)}-{_slug(gpu)}-{precision}"


@dataclass(frozen=True)
class EnginePlan:
    """Where an engine lives and whether the cached one can be reused (and why not)."""

    key: str
    path: Path
    reuse: bool
    reason: str


def plan_engine(engines_dir: Path, key: str) -> EnginePlan:
    """Decide reuse vs build: reuse only an engine whose sidecar names this key and whose bytes
    still hash to what the sidecar recorded (a torn or tampered file is rebuilt)."""
    path = engines_dir / f"{key}.engine"
    sidecar = engines_dir / f"{key}.json"
    if not path.is_file():
        return EnginePlan(key, path, False, "no cached engine for this key")
    try:
        meta = json.loads(sidecar.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return EnginePlan(key, path, False, "cached engine has no readable sidecar")
    if meta.get("key") != key:
        return EnginePlan(key, path, False, "sidecar key differs")
    if meta.get("engine_sha256") != sha256_file(path):
        return EnginePlan(key, path, False, "cached engine sha256 differs from its sidecar")
    return EnginePlan(key, path, True, "cached engine matches key")


@dataclass(frozen=True)
class EngineResult:
    """An engine ready on disk (what `build-engine` prints)."""

    key: str
    path: Path
    reused: bool
    sha256: str
    build_s: float = 0.0
    build: Optional[BuildPlan] = None

    def to_json(self) -> Dict[str, Any]:
        """The contract of `python -m edge_runtime build-engine`."""
        return {"key": self.key, "path": str(self.path), "reused": self.reused, "sha256": self.sha256,
                "build_s": round(self.build_s, 3), "build": self.build.to_json() if self.build else None}


def build_serialized_engine(trt: Any, plan: BuildPlan, workspace_mb: int, timing_cache_path: Optional[Path]) -> bytes:
    """Build a serialized engine from `plan` (see `plan_build`) with the builder API that TensorRT
    8.5, 10 and 11 share (``create_network``, ``OnnxParser.parse_from_file``,
    ``set_memory_pool_limit``, ``build_serialized_network``).

    The workspace limit keeps Jetson builds (shared CPU/GPU memory) from running out of memory.
    """
    if workspace_mb < 1:
        raise BackendError(f"tensorrt.workspace_mb is {workspace_mb}; set a positive MiB limit in the manifest")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network_flags = 0
    for name in plan.network_flags:  # the documented idiom: 1 << int(NetworkDefinitionCreationFlag.X)
        network_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {plan.onnx_path.name}: {errors}; re-export the ONNX (opset 17)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    cache = None
    if timing_cache_path is not None:
        blob = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=True)  # a stale cache only costs build time
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {plan.onnx_path.name} ({plan.precision}, "
                           f"{plan.typing}ly typed); see the TensorRT log above -- often too small a workspace_mb "
                           "for this device")
    if cache is not None and timing_cache_path is not None:
        atomic_write_bytes(timing_cache_path, bytes(memoryview(cache.serialize())))
    return bytes(memoryview(serialized))


def ensure_engine(onnx_path: Path, engines_dir: Path, precision: str, workspace_mb: int, timing_cache: bool,
                  trt: Any, gpu: str, fp16_onnx_path: Optional[Path] = None) -> EngineResult:
    """Return the cached engine for this ONNX/TensorRT/GPU/precision, building it only when the key
    changed (or the cached file is damaged). The engine and its sidecar are written atomically.

    `onnx_path` is the model the manifest's precision builds from (FP32 for fp32/fp16, the QDQ
    model for int8); `fp16_onnx_path`, the FP16 ONNX, is used where TensorRT has no FP16 flag.
    """
    plan = plan_build(trt, precision, onnx_path, fp16_onnx_path)
    _check_model_file(plan.onnx_path)
    onnx_sha = sha256_file(plan.onnx_path)
    key = engine_key(onnx_sha, str(trt.__version__), gpu, precision)
    cached = plan_engine(engines_dir, key)
    if cached.reuse:
        return EngineResult(key, cached.path, True, sha256_file(cached.path), build=plan)
    t0 = time.perf_counter()
    cache_path = engines_dir / f"timing-{_slug(str(trt.__version__))}-{_slug(gpu)}.cache" if timing_cache else None
    engines_dir.mkdir(parents=True, exist_ok=True)
    blob = build_serialized_engine(trt, plan, workspace_mb, cache_path)
    atomic_write_bytes(cached.path, blob)
    import hashlib

    engine_sha = hashlib.sha256(blob).hexdigest()
    # The sidecar is written last: an engine without a matching sidecar is never reused.
    atomic_write_json(engines_dir / f"{key}.json", {
        "key": key, "onnx_sha256": onnx_sha, "onnx_file": plan.onnx_path.name, "tensorrt": str(trt.__version__),
        "gpu": gpu, "precision": precision, "workspace_mb": workspace_mb, "engine_sha256": engine_sha,
        "build": plan.to_json(),
    })
    return EngineResult(key, cached.path, False, engine_sha, time.perf_counter() - t0, plan)


TENSOR_IO_FIX = ("this TensorRT lacks the name-based I/O tensor API (num_io_tensors, set_tensor_address, "
                 "execute_async_v3; TensorRT 8.5+); upgrade to JetPack 5.1+ / TensorRT 8.5 or newer, or deploy "
                 "the release with backend onnxruntime")


class TensorRTBackend(Backend):
    """A TensorRT engine built (or reused) on this device, run with page-locked buffers + one stream.

    Works with TensorRT 8.5, 10 and 11: the build follows `plan_build` (feature-detected), and
    execution uses the name-based I/O tensor API that all three have. A dedicated CUDA context is
    created at load and pushed around every call, so ``infer`` works from whichever thread calls it
    (the real-time loop infers on its own thread).
    """

    name = "tensorrt"

    def __init__(self, onnx_path: "os.PathLike[str] | str", engines_dir: "os.PathLike[str] | str", precision: str,
                 workspace_mb: int, timing_cache: bool = True,
                 fp16_onnx_path: "os.PathLike[str] | str | None" = None) -> None:
        self.onnx_path = Path(onnx_path)
        self.fp16_onnx_path = Path(fp16_onnx_path) if fp16_onnx_path is not None else None
        self.engines_dir = Path(engines_dir)
        self.precision = precision
        self.workspace_mb = workspace_mb
        self.timing_cache = timing_cache
        self.engine_result: Optional[EngineResult] = None
        self._trt: Any = None
        self._cuda: Any = None
        self._ctx: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._inputs: List[Tuple[str, np.ndarray, Any]] = []
        self._outputs: List[Tuple[str, np.ndarray, Any]] = []
        self._gpu = ""

    def load(self) -> None:
        """Import TensorRT, build or reuse the engine, allocate buffers and the stream."""
        if self._engine is not None:
            return
        trt, cuda = import_tensorrt()
        if not tensorrt_features(trt).tensor_io:  # before any build: the engine could not be run anyway
            raise BackendError(f"TensorRT {trt.__version__}: {TENSOR_IO_FIX}")
        self._trt, self._cuda = trt, cuda
        cuda.init()
        device = cuda.Device(0)
        self._gpu = gpu_name(device)
        self._ctx = device.make_context()
        try:
            self.engine_result = ensure_engine(self.onnx_path, self.engines_dir, self.precision, self.workspace_mb,
                                               self.timing_cache, trt, self._gpu, self.fp16_onnx_path)
            logger = trt.Logger(trt.Logger.WARNING)
            runtime = trt.Runtime(logger)
            self._engine = runtime.deserialize_cuda_engine(self.engine_result.path.read_bytes())
            if self._engine is None:
                raise BackendError(f"TensorRT cannot deserialize {self.engine_result.path}; delete it and rerun "
                                   "build-engine")
            self._context = self._engine.create_execution_context()
            self._stream = cuda.Stream()
            for i in range(self._engine.num_io_tensors):
                name = self._engine.get_tensor_name(i)
                shape = tuple(self._engine.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise BackendError(f"engine tensor {name} has dynamic shape {shape}; export with a static batch")
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
                host = cuda.pagelocked_empty(shape, dtype)
                dev = cuda.mem_alloc(host.nbytes)
                self._context.set_tensor_address(name, int(dev))
                is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                (self._inputs if is_input else self._outputs).append((name, host, dev))
        finally:
            self._ctx.pop()
        if len(self._inputs) != 1:
            raise BackendError(f"engine has {len(self._inputs)} inputs; the runtime expects exactly one image input")

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """The engine's static input shape."""
        self.load()
        return tuple(self._inputs[0][1].shape)

    @property
    def metadata(self) -> Dict[str, str]:
        """ONNX metadata of the source model (read without onnx: via onnxruntime's model meta)."""
        try:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(str(self.onnx_path), so, providers=["CPUExecutionProvider"])
            return dict(sess.get_modelmeta().custom_metadata_map)
        except Exception:  # QDQ graphs ORT can't load still build in TensorRT; metadata is optional
            return {}

    def infer(self, batch: np.ndarray, copy: bool = True) -> List[np.ndarray]:
        """Copy in, execute_async_v3 on the stream, copy out, synchronize."""
        self.load()
        batch = self._check_batch(batch)
        cuda = self._cuda
        self._ctx.push()
        try:
            _, host_in, dev_in = self._inputs[0]
            np.copyto(host_in, batch)  # casts where an engine takes float16 input (a strongly typed FP16 ONNX)
            cuda.memcpy_htod_async(dev_in, host_in, self._stream)
            if not self._context.execute_async_v3(stream_handle=self._stream.handle):
                raise BackendError("TensorRT execute_async_v3 failed; see the TensorRT log")
            for _, host, dev in self._outputs:
                cuda.memcpy_dtoh_async(host, dev, self._stream)
            self._stream.synchronize()
        finally:
            self._ctx.pop()
        outs = [host for _, host, _ in self._outputs]
        # Postprocessing expects float32; an engine with float16 outputs is converted (that is a copy anyway).
        if any(o.dtype != np.float32 for o in outs):
            return [o.astype(np.float32) for o in outs]
        return [o.copy() for o in outs] if copy else outs

    def describe(self) -> Dict[str, Any]:
        """Backend, engine key/path/hash, how it was built, TensorRT version, GPU, shapes."""
        self.load()
        r = self.engine_result
        return {
            "backend": self.name,
            "tensorrt": str(self._trt.__version__),
            "gpu": self._gpu,
            "precision": self.precision,
            "model_file": self.onnx_path.name,
            "engine_key": r.key if r else None,
            "engine_sha256": r.sha256 if r else None,
            "engine_reused": r.reused if r else None,
            "engine_build": r.build.to_json() if r and r.build else None,
            "workspace_mb": self.workspace_mb,
            "input_shape": list(self.input_shape),
            "output_shapes": [list(h.shape) for _, h, _ in self._outputs],
        }

    def close(self) -> None:
        """Free device memory and the CUDA context."""
        if self._ctx is None:
            return
        self._ctx.push()
        try:
            for _, _, dev in self._inputs + self._outputs:
                dev.free()
            self._context = self._engine = self._stream = None
        finally:
            self._ctx.pop()
            self._ctx.detach()
            self._ctx = None
            self._inputs, self._outputs = [], []


def create_backend(kind: str, model_path: Path, ort_settings: OrtSettings, engines_dir: Optional[Path] = None,
                   precision: str = "fp32", workspace_mb: int = 0, timing_cache: bool = True,
                   fp16_onnx_path: Optional[Path] = None) -> Backend:
    """Construct (not load) the backend the manifest asks for (`fp16_onnx_path`: TensorRT only)."""
    if kind == "onnxruntime":
        return OrtBackend(model_path, ort_settings)
    if kind == "tensorrt":
        if engines_dir is None:
            raise BackendError("the TensorRT backend needs an engines folder; pass --engines <deploy_dir>/engines")
        return TensorRTBackend(model_path, engines_dir, precision, workspace_mb, timing_cache, fp16_onnx_path)
    raise BackendError(f"backend '{kind}' unknown; use onnxruntime or tensorrt")


__all__: Sequence[str] = (
    "Backend", "BackendError", "InputShapeError", "TensorRTUnavailable", "OrtBackend", "TensorRTBackend",
    "EnginePlan", "EngineResult", "BuildPlan", "TensorRTFeatures", "engine_key", "plan_engine", "plan_build",
    "ensure_engine", "build_serialized_engine", "tensorrt_features", "import_tensorrt", "tensorrt_info",
    "create_backend", "parse_names",
)
