"""Test doubles for the `tensorrt` Python module (one per API generation: 8.5, 10, 11) and `pycuda.driver`.

Each double exposes exactly the names its generation's Python API has, for the part of the API it
models, and nothing the generation removed: `trt.BuilderFlag.FP16` on the 11 double raises
AttributeError like the real module does. The names come from NVIDIA's documentation and the
Python binding sources:

* 8.5 -- "API Changes For TensorRT 8.5.1" in the 8.5.1 API reference
  (https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-851/pdf/TensorRT-API.pdf): the
  name-based I/O tensor API is new in 8.5 (``ICudaEngine.num_io_tensors``, ``get_tensor_name``,
  ``get_tensor_mode``, ``get_tensor_shape``, ``get_tensor_dtype``; ``IExecutionContext.set_tensor_address``,
  ``execute_async_v3(stream_handle)``) next to the now-deprecated binding API (``num_bindings``,
  ``get_binding_index``, ``binding_is_input``, ``execute_async_v2``); C++ reference of
  ``nvinfer1::IExecutionContext`` for 8.5.3 (setTensorAddress, enqueueV3:
  https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-853/api/c_api/classnvinfer1_1_1_i_execution_context.html);
  the Python names as bound in NVIDIA/TensorRT tag 8.5.1, python/src/infer/pyCore.cpp (BuilderFlag
  FP16 ... REJECT_EMPTY_ALGORITHMS; NetworkDefinitionCreationFlag EXPLICIT_BATCH, EXPLICIT_PRECISION;
  ``Builder.max_batch_size``, ``platform_has_fast_fp16``, ``build_engine``) and pyOnnx.cpp
  (``OnnxParser.parse_from_file``, ``num_errors``, ``get_error``). pyCoreDoc.h of that tag: "to enable
  explicit batch mode, pass ``1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH)`` to create_network".
* 10 -- the ICudaEngine page of the 10.0.1 Python API
  (https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-1001/api/python_api/infer/Core/Engine.html:
  implicit batch removed, ``has_implicit_batch_dimension`` always False) and the 8.x -> 10.x migration
  guide (https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-1010/migration-guide/index.html:
  binding API, ``execute_async_v2``, ``build_engine``, ``max_batch_size``, ``max_workspace_size`` removed);
  NetworkDefinitionCreationFlag EXPLICIT_BATCH (deprecated, ignored) and STRONGLY_TYPED
  (tag v10.16, python/src/infer/pyCore.cpp).
* 11 -- "Removed Python APIs and Replacements"
  (https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/api/migration/tensorrt-10x-to-11x-python-api-reference.html:
  ``BuilderFlag.FP16``/``INT8``/``BF16``/``FP8``/``OBEY_PRECISION_CONSTRAINTS``/``PREFER_PRECISION_CONSTRAINTS``,
  ``IBuilderConfig.int8_calibrator``, calibrators, ``Builder.platform_has_fast_fp16``/``_int8``) and
  "Migrating from Weak Typing to Strong Typing"
  (https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/api/migration/tensorrt-10x-to-11x-python-api-patterns.html);
  tag v11.1 pyCoreDoc.h: STRONGLY_TYPED "[DEPRECATED] ... Strongly typed mode is always enabled ...
  retained for API compatibility but is ignored"; EXPLICIT_BATCH gone.
* pycuda.driver -- https://documen.tician.de/pycuda/driver.html (``init``, ``Device``, ``make_context``,
  ``Context.push/pop/detach``, ``Stream``, ``pagelocked_empty``, ``mem_alloc``, ``memcpy_htod_async``,
  ``memcpy_dtoh_async``).

`tests/runtime/test_tensorrt_conformance.py` checks these claims against real TensorRT Python
bindings where they import.

Behaviour modelled honestly (what the backend must get right, and the real library enforces):

* the 8.5 ONNX parser refuses a network created without EXPLICIT_BATCH (the real parser's message);
* the builder refuses INT8 without Q/DQ nodes or a calibrator, and precision flags on a strongly
  typed network; an engine's precision is the flags' (weakly typed) or the ONNX's types (strongly typed);
* engines deserialize only in the generation that built them;
* deserializing, allocating, copying and executing need a current CUDA context (the one pycuda's
  buffers live in; pycuda says "no currently active context");
* the "engine" runs the ONNX it was built from with ONNX Runtime on the bytes the backend copied to
  "device memory" at the addresses it bound, so shapes, dtypes and copies are checked for real.

Every attribute the code under test touches is recorded (`accessed`, hits and misses), so the
conformance test can check exactly those names against the real module.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import numpy as np

GENERATIONS = ("8.5", "10", "11")
VERSIONS = {"8.5": "8.5.2.2", "10": "10.3.0", "11": "11.4.0.106"}  # what each double reports as __version__

# ----------------------------------------------------------------------------- the API surface, per generation
# Enum members per generation (a subset of each enum, the part that matters here, plus neighbours).
ENUMS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "8.5": {
        "BuilderFlag": ("FP16", "INT8", "DEBUG", "GPU_FALLBACK", "STRICT_TYPES", "REFIT", "DISABLE_TIMING_CACHE",
                        "TF32", "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS",
                        "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS"),
        "NetworkDefinitionCreationFlag": ("EXPLICIT_BATCH", "EXPLICIT_PRECISION"),
    },
    "10": {
        "BuilderFlag": ("FP16", "BF16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
                        "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
                        "DIRECT_IO", "FP8"),
        "NetworkDefinitionCreationFlag": ("EXPLICIT_BATCH", "STRONGLY_TYPED"),
    },
    "11": {
        "BuilderFlag": ("DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
                        "SAFETY_SCOPE", "DIRECT_IO"),
        "NetworkDefinitionCreationFlag": ("STRONGLY_TYPED",),
    },
}
_COMMON_ENUMS = {
    "MemoryPoolType": ("WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM"),
    "TensorIOMode": ("NONE", "INPUT", "OUTPUT"),
    "DataType": ("FLOAT", "HALF", "INT8", "INT32", "BOOL"),
}
# Methods/properties per class per generation.
_COMMON_METHODS = {
    "Builder": ("create_network", "create_builder_config", "build_serialized_network"),
    "IBuilderConfig": ("set_flag", "get_flag", "clear_flag", "set_memory_pool_limit", "create_timing_cache",
                       "set_timing_cache"),
    "INetworkDefinition": ("has_implicit_batch_dimension", "num_inputs", "num_outputs", "num_layers"),
    "OnnxParser": ("parse_from_file", "parse", "num_errors", "get_error", "clear_errors"),
    "Runtime": ("deserialize_cuda_engine",),
    "ICudaEngine": ("num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_shape", "get_tensor_dtype",
                    "create_execution_context", "serialize"),
    "IExecutionContext": ("set_tensor_address", "execute_async_v3", "execute_v2"),
    "ITimingCache": ("serialize", "combine", "reset"),
}
_EXTRA_METHODS = {
    "8.5": {
        "Builder": ("build_engine", "max_batch_size", "platform_has_fast_fp16", "platform_has_fast_int8"),
        "IBuilderConfig": ("max_workspace_size", "int8_calibrator"),
        "ICudaEngine": ("num_bindings", "get_binding_index", "get_binding_name", "get_binding_shape",
                        "get_binding_dtype", "binding_is_input", "has_implicit_batch_dimension"),
        "IExecutionContext": ("execute_async_v2",),
    },
    "10": {
        "Builder": ("platform_has_fast_fp16", "platform_has_fast_int8"),
        "IBuilderConfig": ("int8_calibrator",),
        "ICudaEngine": ("has_implicit_batch_dimension",),
    },
    "11": {},
}
_MODULE_NAMES = ("Logger", "Builder", "OnnxParser", "Runtime", "BuilderFlag", "NetworkDefinitionCreationFlag",
                 "MemoryPoolType", "TensorIOMode", "DataType", "ICudaEngine", "IExecutionContext", "IBuilderConfig",
                 "INetworkDefinition", "ITimingCache", "IHostMemory", "nptype", "volume", "float32", "float16", "int8",
                 "int32", "bool")
_EXTRA_MODULE_NAMES = {"8.5": ("IInt8Calibrator", "IInt8EntropyCalibrator2"),
                       "10": ("IInt8Calibrator", "IInt8EntropyCalibrator2"), "11": ()}
LOGGER_SEVERITIES = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")


def api_surface(generation: str) -> Dict[str, Tuple[str, ...]]:
    """The names the `generation` double declares: {"tensorrt": module names, class name: members}."""
    out: Dict[str, Tuple[str, ...]] = {"tensorrt": _MODULE_NAMES + _EXTRA_MODULE_NAMES[generation]}
    out.update({k: v for k, v in _COMMON_ENUMS.items()})
    out.update(ENUMS[generation])
    for cls, names in _COMMON_METHODS.items():
        out[cls] = names + _EXTRA_METHODS[generation].get(cls, ())
    out["Logger"] = LOGGER_SEVERITIES + ("log",)
    return out


# ----------------------------------------------------------------------------- recording plumbing

class Recorder:
    """Every public attribute lookup on a double: (owner, name) -> found (True) or missing (False)."""

    def __init__(self) -> None:
        self.accessed: Dict[Tuple[str, str], bool] = {}

    def note(self, owner: str, name: str, found: bool) -> None:
        """Record one lookup (a hit stays a hit)."""
        self.accessed[(owner, name)] = self.accessed.get((owner, name), False) or found


class _Meta(type):
    """Records class-level lookups (`trt.BuilderFlag.FP16`, `hasattr(trt.Builder, "max_batch_size")`)."""

    def __getattribute__(cls, name: str) -> Any:
        if name.startswith("_"):
            return type.__getattribute__(cls, name)
        rec = type.__getattribute__(cls, "_recorder")
        owner = type.__getattribute__(cls, "__name__")
        try:
            value = type.__getattribute__(cls, name)
        except AttributeError:
            rec.note(owner, name, False)
            raise AttributeError(f"type object 'tensorrt.{owner}' has no attribute '{name}'") from None
        rec.note(owner, name, True)
        return value


class _Obj(metaclass=_Meta):
    """Base of the double's classes: records instance lookups under the class name."""

    _recorder: Recorder

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_"):
            return object.__getattribute__(self, name)
        cls = type(self)
        rec = type.__getattribute__(cls, "_recorder")
        try:
            value = object.__getattribute__(self, name)
        except AttributeError:
            rec.note(cls.__name__, name, False)
            raise AttributeError(f"'tensorrt.{cls.__name__}' object has no attribute '{name}'") from None
        rec.note(cls.__name__, name, True)
        return value


class EnumValue(int):
    """A pybind11 enum member: an int with a name (``int(flag)``, ``1 << int(flag)`` work)."""

    def __new__(cls, value: int, owner: str, name: str) -> "EnumValue":
        obj = super().__new__(cls, value)
        obj.owner, obj.name = owner, name  # type: ignore[attr-defined]
        return obj

    def __repr__(self) -> str:
        return f"<{self.owner}.{self.name}: {int(self)}>"  # type: ignore[attr-defined]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EnumValue):
            return (self.owner, self.name) == (other.owner, other.name)  # type: ignore[attr-defined]
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.owner, self.name))  # type: ignore[attr-defined]


class _Module(types.ModuleType):
    """The `tensorrt` module double: records module-level lookups too."""

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") and name != "__version__":
            return object.__getattribute__(self, name)
        rec = object.__getattribute__(self, "_recorder")
        try:
            value = object.__getattribute__(self, name)
        except AttributeError:
            rec.note("tensorrt", name, False)
            raise AttributeError(f"module 'tensorrt' has no attribute '{name}'") from None
        rec.note("tensorrt", name, True)
        return value


class DoubleError(RuntimeError):
    """A call the double does not model (the real API has it; the code under test should not need it)."""


def _unmodelled(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise DoubleError(f"{type(self).__name__}.{name} exists in this TensorRT generation but is not modelled")

    method.__name__ = name
    return method


# ----------------------------------------------------------------------------- a fake GPU + pycuda.driver

class FakeGpu:
    """Device memory (address -> bytes) and the CUDA context stack that pycuda and TensorRT share."""

    def __init__(self, name: str = "Orin (nvgpu)") -> None:
        self.name = name
        self.memory: Dict[int, bytearray] = {}
        self.next_address = 0x7F0000000000
        self.context_stack: List[Any] = []
        self.contexts_created = 0
        self.initialised = False

    def require_context(self, what: str) -> None:
        """pycuda and TensorRT both fail without a current context; so does the double."""
        if not self.context_stack:
            raise RuntimeError(f"{what}: explicit_context_dependent failed: invalid device context - "
                               "no currently active context?")

    def alloc(self, nbytes: int) -> int:
        """Reserve `nbytes` of device memory; returns its address."""
        address = self.next_address
        self.next_address += max(nbytes, 1) + 256
        self.memory[address] = bytearray(nbytes)
        return address

    def read(self, address: int, nbytes: int) -> bytes:
        """The bytes at `address` (which must be an allocation of at least `nbytes`)."""
        buf = self.memory.get(int(address))
        if buf is None or len(buf) < nbytes:
            raise RuntimeError(f"device address {address:#x} is not an allocation of >= {nbytes} bytes")
        return bytes(buf[:nbytes])

    def write(self, address: int, data: bytes) -> None:
        """Store `data` at `address` (an allocation at least that large)."""
        buf = self.memory.get(int(address))
        if buf is None or len(buf) < len(data):
            raise RuntimeError(f"device address {address:#x} is not an allocation of >= {len(data)} bytes")
        buf[:len(data)] = data


def make_pycuda(gpu: FakeGpu) -> types.ModuleType:
    """A `pycuda.driver` double on `gpu` (names from https://documen.tician.de/pycuda/driver.html)."""
    cuda = types.ModuleType("pycuda.driver")

    class LogicError(RuntimeError):
        pass

    class Context:
        def __init__(self) -> None:
            self.detached = False

        def push(self) -> None:
            gpu.context_stack.append(self)

        def pop(self) -> None:
            if not gpu.context_stack or gpu.context_stack[-1] is not self:
                raise LogicError("cuCtxPopCurrent failed: invalid device context")
            gpu.context_stack.pop()

        def detach(self) -> None:
            self.detached = True

    class Device:
        def __init__(self, ordinal: int) -> None:
            if not gpu.initialised:
                raise LogicError("cuDeviceGet failed: initialization error (call pycuda.driver.init() first)")
            if ordinal != 0:
                raise LogicError("cuDeviceGet failed: invalid device ordinal")

        def name(self) -> str:
            return gpu.name

        def compute_capability(self) -> Tuple[int, int]:
            return (8, 7)

        def make_context(self) -> Context:
            ctx = Context()
            gpu.contexts_created += 1
            gpu.context_stack.append(ctx)  # make_context makes it current, as pycuda's does
            return ctx

    class DeviceAllocation:
        def __init__(self, nbytes: int) -> None:
            self.address = gpu.alloc(nbytes)
            self.nbytes = nbytes

        def __int__(self) -> int:
            return self.address

        def free(self) -> None:
            gpu.require_context("mem_free")
            gpu.memory.pop(self.address, None)

    class Stream:
        def __init__(self) -> None:
            gpu.require_context("Stream")
            self.handle = 0x5000 + len(gpu.memory)

        def synchronize(self) -> None:
            gpu.require_context("Stream.synchronize")

    def init() -> None:
        gpu.initialised = True

    def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype)

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        gpu.require_context("mem_alloc")
        return DeviceAllocation(nbytes)

    def memcpy_htod_async(dest: Any, src: np.ndarray, stream: Any = None) -> None:
        gpu.require_context("memcpy_htod_async")
        gpu.write(int(dest), np.ascontiguousarray(src).tobytes())

    def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: Any = None) -> None:
        gpu.require_context("memcpy_dtoh_async")
        dest[...] = np.frombuffer(gpu.read(int(src), dest.nbytes), dest.dtype).reshape(dest.shape)

    for obj in (LogicError, Context, Device, DeviceAllocation, Stream, init, pagelocked_empty, mem_alloc,
                memcpy_htod_async, memcpy_dtoh_async):
        setattr(cuda, obj.__name__, obj)
    cuda.gpu = gpu  # type: ignore[attr-defined]
    return cuda


# ----------------------------------------------------------------------------- ONNX inspection (what the parser sees)

_ONNX_DTYPES = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 9: "BOOL"}
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_}


def inspect_onnx(path: Path) -> Dict[str, Any]:
    """IO tensors (name, shape, TensorRT dtype name), whether it has Q/DQ nodes, its float type."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    init_names = {i.name for i in g.initializer}

    def io(values: Iterable[Any]) -> List[Tuple[str, List[int], str]]:
        out = []
        for v in values:
            if v.name in init_names:
                continue
            t = v.type.tensor_type
            out.append((v.name, [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim],
                        _ONNX_DTYPES.get(t.elem_type, "FLOAT")))
        return out

    float_inits = [i.data_type for i in g.initializer if i.data_type in (1, 10)]
    return {"inputs": io(g.input), "outputs": io(g.output),
            "qdq": any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node),
            "float_type": "fp16" if float_inits and all(t == 10 for t in float_inits) else "fp32",
            "layers": len(g.node)}


# ----------------------------------------------------------------------------- the tensorrt double

def make_tensorrt(generation: str, gpu: FakeGpu) -> types.ModuleType:
    """A `tensorrt` module double of API `generation` ("8.5", "10" or "11") on `gpu`.

    Extra, double-only state lives in underscore attributes: ``_recorder`` (every lookup),
    ``_builds`` (one dict per `build_serialized_network`), ``_log`` (what the Logger was told).
    """
    if generation not in GENERATIONS:
        raise ValueError(f"generation {generation!r} not one of {GENERATIONS}")
    surface = api_surface(generation)
    recorder = Recorder()
    trt = _Module("tensorrt")
    object.__setattr__(trt, "_recorder", recorder)
    trt.__version__ = VERSIONS[generation]
    trt._generation = generation
    trt._builds = []  # type: ignore[attr-defined]
    trt._log = []  # type: ignore[attr-defined]
    trt._gpu = gpu  # type: ignore[attr-defined]
    builds: List[Dict[str, Any]] = trt._builds  # type: ignore[attr-defined]
    log: List[Tuple[str, str]] = trt._log  # type: ignore[attr-defined]

    def cls(name: str, namespace: Dict[str, Any]) -> type:
        """A double class holding exactly the generation's declared members (+ private helpers)."""
        declared = set(surface.get(name, ()))
        ns: Dict[str, Any] = {"_recorder": recorder}
        for member in declared:
            ns[member] = namespace[member] if member in namespace else _unmodelled(member)
        ns.update({k: v for k, v in namespace.items() if k.startswith("_")})
        return _Meta(name, (_Obj,), ns)

    def enum(name: str) -> type:
        members = surface[name]
        return cls(name, {m: EnumValue(i, name, m) for i, m in enumerate(members)})

    BuilderFlag = enum("BuilderFlag")
    NetFlag = enum("NetworkDefinitionCreationFlag")
    MemoryPoolType = enum("MemoryPoolType")
    TensorIOMode = enum("TensorIOMode")
    DataType = enum("DataType")
    net_flag_names = surface["NetworkDefinitionCreationFlag"]

    def severity(name: str) -> EnumValue:
        return EnumValue(LOGGER_SEVERITIES.index(name), "Severity", name)

    def logger_init(self: Any, min_severity: Any = None) -> None:
        self._min = min_severity

    def logger_log(self: Any, sev: Any, msg: str) -> None:
        log.append((getattr(sev, "name", str(sev)), msg))

    Logger = cls("Logger", {**{s: severity(s) for s in LOGGER_SEVERITIES}, "log": logger_log,
                            "__init__": logger_init})

    def emit(sev: str, msg: str) -> None:
        log.append((sev, msg))

    # --- network + parser
    def net_init(self: Any, flags: int) -> None:
        self._flags = {n for i, n in enumerate(net_flag_names) if flags & (1 << i)}
        unknown = flags & ~((1 << len(net_flag_names)) - 1)
        if unknown:
            raise TypeError(f"create_network: flags {flags:#x} name no NetworkDefinitionCreationFlag of TensorRT "
                            f"{VERSIONS[generation]}")
        if generation == "10" and "EXPLICIT_BATCH" in self._flags:
            emit("WARNING", "NetworkDefinitionCreationFlag::kEXPLICIT_BATCH is deprecated and has no effect")
        self._parsed: Optional[Dict[str, Any]] = None

    def net_implicit(self: Any) -> bool:
        return generation == "8.5" and "EXPLICIT_BATCH" not in self._flags

    def net_strong(self: Any) -> bool:
        return generation == "11" or "STRONGLY_TYPED" in self._flags

    INetworkDefinition = cls("INetworkDefinition", {
        "__init__": net_init, "_strong": net_strong, "_implicit": net_implicit,
        "has_implicit_batch_dimension": property(net_implicit),
        "num_inputs": property(lambda self: len(self._parsed["inputs"]) if self._parsed else 0),
        "num_outputs": property(lambda self: len(self._parsed["outputs"]) if self._parsed else 0),
        "num_layers": property(lambda self: self._parsed["layers"] if self._parsed else 0),
    })

    def parser_init(self: Any, network: Any, logger: Any) -> None:
        self._network, self._errors = network, []

    def parse_from_file(self: Any, path: str) -> bool:
        if self._network._implicit():
            # The 8.x ONNX parser's refusal, as the real one words it.
            self._errors.append("This version of the ONNX parser only supports TensorRT INetworkDefinitions with "
                                "an explicit batch dimension. Please ensure the network was initialized with the "
                                "EXPLICIT_BATCH NetworkDefinitionCreationFlag.")
            return False
        try:
            info = inspect_onnx(Path(path))
        except Exception as e:  # onnx raises DecodeError & co for a file that is not a model
            self._errors.append(f"ModelImporter.cpp: failed to parse ONNX model from file {path}: {e}")
            return False
        info["path"] = str(Path(path).resolve())
        from edge_runtime.fileio import sha256_file

        info["sha256"] = sha256_file(Path(path))
        self._network._parsed = info
        return True

    OnnxParser = cls("OnnxParser", {
        "__init__": parser_init, "parse_from_file": parse_from_file,
        "num_errors": property(lambda self: len(self._errors)),
        "get_error": lambda self, i: self._errors[i],
        "clear_errors": lambda self: self._errors.clear(),
    })

    # --- host memory, timing cache, config
    class IHostMemoryBase(bytes):
        pass

    IHostMemory = _Meta("IHostMemory", (IHostMemoryBase,), {"_recorder": recorder})

    def tc_init(self: Any, blob: bytes) -> None:
        self._blob = bytes(blob)

    ITimingCache = cls("ITimingCache", {
        "__init__": tc_init, "serialize": lambda self: IHostMemory(self._blob + b"|entry"),
        "combine": lambda self, other, ignore_mismatch: True, "reset": lambda self: True,
    })

    def cfg_init(self: Any) -> None:
        self._flags: Set[str] = set()
        self._pools: Dict[str, int] = {}
        self._timing_cache: Any = None
        self._calibrator: Any = None

    def set_flag(self: Any, flag: Any) -> None:
        if not isinstance(flag, EnumValue) or flag.owner != "BuilderFlag":  # type: ignore[attr-defined]
            raise TypeError(f"set_flag(): incompatible function arguments: {flag!r} is not a tensorrt.BuilderFlag")
        self._flags.add(flag.name)  # type: ignore[attr-defined]

    def set_memory_pool_limit(self: Any, pool: Any, pool_size: int) -> None:
        self._pools[pool.name] = int(pool_size)

    def set_timing_cache(self: Any, cache: Any, ignore_mismatch: bool) -> bool:
        self._timing_cache = cache
        return True

    cfg_ns: Dict[str, Any] = {
        "__init__": cfg_init, "set_flag": set_flag,
        "get_flag": lambda self, flag: flag.name in self._flags,
        "clear_flag": lambda self, flag: self._flags.discard(flag.name),
        "set_memory_pool_limit": set_memory_pool_limit,
        "create_timing_cache": lambda self, serialized_timing_cache: ITimingCache(serialized_timing_cache),
        "set_timing_cache": set_timing_cache,
        "int8_calibrator": property(lambda self: self._calibrator),
    }
    IBuilderConfig = cls("IBuilderConfig", cfg_ns)

    # --- builder
    def builder_init(self: Any, logger: Any) -> None:
        self._logger = logger

    def build_serialized_network(self: Any, network: Any, config: Any) -> Optional[Any]:
        parsed = network._parsed
        record: Dict[str, Any] = {"network_flags": sorted(network._flags), "builder_flags": sorted(config._flags),
                                  "workspace": config._pools.get("WORKSPACE"),
                                  "timing_cache": config._timing_cache is not None,
                                  "strongly_typed": network._strong(), "engine": None}
        builds.append(record)
        if parsed is None:
            emit("ERROR", "Network must have at least one output")
            return None
        precision_flags = config._flags & {"FP16", "INT8", "BF16", "FP8"}
        if network._strong() and precision_flags:
            emit("ERROR", f"Builder flags {sorted(precision_flags)} are not allowed with a strongly typed network")
            return None
        if "INT8" in config._flags and not parsed["qdq"] and config._calibrator is None:
            emit("ERROR", "Calibration failure occurred with no scaling factors detected. This could be due to no "
                          "int8 calibrator or insufficient custom scales for network layers.")
            return None
        if network._strong():
            precision = "int8" if parsed["qdq"] else parsed["float_type"]
        else:
            precision = "int8" if "INT8" in config._flags and parsed["qdq"] else (
                "fp16" if "FP16" in config._flags else "fp32")
        engine = {"generation": generation, "onnx": parsed["path"], "onnx_sha256": parsed["sha256"],
                  "inputs": parsed["inputs"], "outputs": parsed["outputs"], "precision": precision,
                  "typing": "strong" if network._strong() else "weak"}
        record["engine"] = engine
        if config._timing_cache is not None:
            config._timing_cache._blob += b"|" + precision.encode()
        return IHostMemory(json.dumps(engine).encode())

    builder_ns: Dict[str, Any] = {
        "__init__": builder_init,
        "create_network": lambda self, flags=0: INetworkDefinition(flags),
        "create_builder_config": lambda self: IBuilderConfig(),
        "build_serialized_network": build_serialized_network,
        "max_batch_size": property(lambda self: 1),
        "platform_has_fast_fp16": property(lambda self: True),
        "platform_has_fast_int8": property(lambda self: True),
    }
    Builder = cls("Builder", builder_ns)

    # --- runtime, engine, execution context
    def engine_init(self: Any, spec: Dict[str, Any]) -> None:
        self._spec = spec
        self._io = [(n, tuple(s), d, "INPUT") for n, s, d in spec["inputs"]] + \
                   [(n, tuple(s), d, "OUTPUT") for n, s, d in spec["outputs"]]

    def _find(self: Any, name: str) -> Tuple[str, Tuple[int, ...], str, str]:
        for t in self._io:
            if t[0] == name:
                return t
        raise KeyError(f"no I/O tensor named {name!r}")

    ICudaEngine = cls("ICudaEngine", {
        "__init__": engine_init, "_find": _find,
        "num_io_tensors": property(lambda self: len(self._io)),
        "get_tensor_name": lambda self, index: self._io[index][0],
        "get_tensor_mode": lambda self, name: getattr(TensorIOMode, self._find(name)[3]),
        "get_tensor_shape": lambda self, name: self._find(name)[1],
        "get_tensor_dtype": lambda self, name: getattr(DataType, self._find(name)[2]),
        "create_execution_context": lambda self: IExecutionContext(self),
        "serialize": lambda self: IHostMemory(json.dumps(self._spec).encode()),
        "has_implicit_batch_dimension": property(lambda self: False),
    })

    def runtime_init(self: Any, logger: Any) -> None:
        self._logger = logger

    def deserialize(self: Any, serialized_engine: bytes) -> Optional[Any]:
        gpu.require_context("deserializeCudaEngine")
        try:
            spec = json.loads(bytes(serialized_engine).decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            emit("ERROR", "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (magic tag does not match)")
            return None
        if spec.get("generation") != generation:
            emit("ERROR", "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization assertion "
                          "stdVersionRead == kSERIALIZATION_VERSION failed. Version tag does not match)")
            return None
        return ICudaEngine(spec)

    Runtime = cls("Runtime", {"__init__": runtime_init, "deserialize_cuda_engine": deserialize})

    def ctx_init(self: Any, engine: Any) -> None:
        self._engine = engine
        self._addresses: Dict[str, int] = {}
        self._session: Any = None
        self._executions = 0

    def set_tensor_address(self: Any, name: str, memory: int) -> bool:
        self._engine._find(name)
        self._addresses[name] = int(memory)
        return True

    def execute_async_v3(self: Any, stream_handle: int) -> bool:
        gpu.require_context("enqueueV3")
        spec = self._engine._spec
        missing = [n for n, *_ in self._engine._io if n not in self._addresses]
        if missing:
            emit("ERROR", f"IExecutionContext::enqueueV3: Error Code 3: API Usage Error (tensor {missing[0]} has "
                          "no address set)")
            return False
        if self._session is None:
            import onnxruntime as ort

            self._session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        feeds = {}
        for name, shape, dtype in spec["inputs"]:
            dt = np.dtype(_NP[dtype])
            nbytes = int(np.prod(shape)) * dt.itemsize
            feeds[name] = np.frombuffer(gpu.read(self._addresses[name], nbytes), dt).reshape(shape)
        outs = self._session.run([n for n, _, _ in spec["outputs"]], feeds)
        for (name, shape, dtype), value in zip(spec["outputs"], outs):
            arr = np.ascontiguousarray(value.astype(_NP[dtype]).reshape(shape))
            gpu.write(self._addresses[name], arr.tobytes())
        self._executions += 1
        return True

    IExecutionContext = cls("IExecutionContext", {
        "__init__": ctx_init, "set_tensor_address": set_tensor_address, "execute_async_v3": execute_async_v3,
    })

    def nptype(trt_type: Any) -> type:
        return _NP[trt_type.name]

    def volume(iterable: Iterable[int]) -> int:
        v = 1
        for e in iterable:
            v *= e
        return v

    module_objects: Dict[str, Any] = {
        "Logger": Logger, "Builder": Builder, "OnnxParser": OnnxParser, "Runtime": Runtime,
        "BuilderFlag": BuilderFlag, "NetworkDefinitionCreationFlag": NetFlag, "MemoryPoolType": MemoryPoolType,
        "TensorIOMode": TensorIOMode, "DataType": DataType, "ICudaEngine": ICudaEngine,
        "IExecutionContext": IExecutionContext, "IBuilderConfig": IBuilderConfig,
        "INetworkDefinition": INetworkDefinition, "ITimingCache": ITimingCache, "IHostMemory": IHostMemory,
        "nptype": nptype, "volume": volume, "float32": DataType.FLOAT, "float16": DataType.HALF,
        "int8": DataType.INT8, "int32": DataType.INT32, "bool": DataType.BOOL,
        "IInt8Calibrator": cls("IInt8Calibrator", {}), "IInt8EntropyCalibrator2": cls("IInt8EntropyCalibrator2", {}),
    }
    for name in surface["tensorrt"]:
        setattr(trt, name, module_objects[name])
    recorder.accessed.clear()  # building the double is not "the code under test touching it"
    return trt


def install(monkeypatch: Any, generation: str, gpu: Optional[FakeGpu] = None) -> Tuple[types.ModuleType, Any]:
    """Put a `generation` tensorrt double and a pycuda double into sys.modules (undone by `monkeypatch`)."""
    gpu = gpu or FakeGpu()
    trt = make_tensorrt(generation, gpu)
    cuda = make_pycuda(gpu)
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    return trt, cuda


# ----------------------------------------------------------------------------- small detector-shaped ONNX models

CLASS_NAMES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


def make_models(folder: Path, imgsz: int = 32, seed: int = 0) -> Dict[str, Path]:
    """Three tiny YOLOv8-raw-shaped ONNX models in `folder`: ``fp32``, ``fp16`` (the same weights in
    float16, float32 input/output kept, as the pipeline's FP16 ONNX) and ``qdq`` (symmetric int8 Q/DQ,
    zero point 0, as the quantize stage's TensorRT model). Output (1, 4 + 6, anchors) like the real
    head: one strided conv per stride 8/16/32, boxes scaled to pixels, sigmoid class scores."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    channels = 4 + len(CLASS_NAMES)
    anchors = sum((imgsz // s) ** 2 for s in (8, 16, 32))
    weights = {s: rng.normal(0, 0.05, (channels, 3, s, s)).astype(np.float32) for s in (8, 16, 32)}
    scale = np.ones((1, channels, 1), np.float32)
    scale[0, :4, 0] = imgsz

    def graph(half: bool) -> Any:
        """The network in float32, or in float16 between a Cast in and a Cast out (float32 I/O kept,
        as the pipeline's FP16 ONNX keeps it)."""
        dt = np.float16 if half else np.float32
        if half:
            nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT16)]
        else:
            nodes = [helper.make_node("Identity", ["images"], ["x"])]
        inits, heads = [], []
        for s, w in weights.items():
            inits += [numpy_helper.from_array(w.astype(dt), f"w{s}"),
                      numpy_helper.from_array(np.zeros(channels, dt), f"b{s}")]
            nodes += [helper.make_node("Conv", ["x", f"w{s}", f"b{s}"], [f"c{s}"], strides=[s, s],
                                       kernel_shape=[s, s]),
                      helper.make_node("Reshape", [f"c{s}", "flat"], [f"r{s}"])]
            heads.append(f"r{s}")
        inits += [numpy_helper.from_array(np.array([1, channels, -1], np.int64), "flat"),
                  numpy_helper.from_array(scale.astype(dt), "scale")]
        last = "y" if half else "output0"
        nodes += [helper.make_node("Concat", heads, ["cat"], axis=2), helper.make_node("Sigmoid", ["cat"], ["sig"]),
                  helper.make_node("Mul", ["sig", "scale"], [last])]
        if half:
            nodes.append(helper.make_node("Cast", ["y"], ["output0"], to=TensorProto.FLOAT))
        return helper.make_graph(nodes, "tiny-yolov8",
                                 [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, imgsz, imgsz])],
                                 [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, channels, anchors])],
                                 inits)

    meta = {"names": repr(dict(enumerate(CLASS_NAMES))), "imgsz": f"[{imgsz}, {imgsz}]", "stride": "32",
            "output_format": "yolov8-raw", "task": "detect"}

    def finish(model: Any, name: str) -> Path:
        onnx.helper.set_model_props(model, meta)
        onnx.checker.check_model(model)
        path = folder / name
        onnx.save(model, str(path))
        return path

    folder.mkdir(parents=True, exist_ok=True)
    out = {"fp32": finish(helper.make_model(graph(False), opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                          "tiny.onnx"),
           "fp16": finish(helper.make_model(graph(True), opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                          "tiny.fp16.onnx")}

    qdq = onnx.load(str(out["fp32"]))
    g = qdq.graph
    new_inits, new_nodes = [], []
    act_scale = numpy_helper.from_array(np.array(1 / 127, np.float32), "x_scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zp")
    new_inits += [act_scale, zero]
    new_nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "zp"], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", "x_scale", "zp"], ["x_dq"])]
    for init in list(g.initializer):
        if init.name.startswith("w"):
            w = numpy_helper.to_array(init)
            s = float(np.abs(w).max() / 127)
            q = np.clip(np.round(w / s), -127, 127).astype(np.int8)
            new_inits += [numpy_helper.from_array(q, f"{init.name}_q"),
                          numpy_helper.from_array(np.array(s, np.float32), f"{init.name}_s")]
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{init.name}_q", f"{init.name}_s", "zp"],
                                              [f"{init.name}_dq"]))
    for node in g.node:
        if node.op_type == "Conv":
            node.input[0] = "x_dq"
            node.input[1] = f"{node.input[1]}_dq"
    keep = [i for i in g.initializer if not i.name.startswith("w")]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    old = list(g.node)
    del g.node[:]
    g.node.extend(old[:1] + new_nodes + old[1:])  # after the Identity that makes x
    out["qdq"] = finish(qdq, "tiny.int8.trt.onnx")
    return out
