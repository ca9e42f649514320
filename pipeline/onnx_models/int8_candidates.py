"""INT8 building blocks shared by the quantize and benchmark stages.

ONNX Runtime static quantization of a YOLOv8 graph according to one `QuantizeCandidate`
(layers kept in float computed from the graph, optional pre-DFL cut), the dynamic-quantization
baseline, and interleaved latency measurement (models take turns, medians over rounds).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipeline.config.params import QuantizeCandidate
from pipeline.onnx_models.graph import (
    cut_before_decode,
    find_head_decode,
    head_convs,
    metadata,
    set_metadata,
    stem_conv,
    verify_node_names,
)


class _TensorReader:
    """ORT CalibrationDataReader over an (N, 3, H, W) array, one image per batch."""

    def __init__(self, tensors: np.ndarray, input_name: str) -> None:
        self._tensors = tensors
        self._input = input_name
        self._iter: Iterator[dict[str, np.ndarray]] | None = None
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next calibration batch, or None at the end."""
        return next(self._iter, None) if self._iter is not None else None

    def rewind(self) -> None:
        """Start over (ORT calls this between calibration passes)."""
        self._iter = ({self._input: t[None]} for t in self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


PREPROCESSED_NAME = "fp32.pre.onnx"  # what preprocessed_fp32 leaves in `work` (build_dynamic reads it)


def preprocessed_fp32(fp32_path: Path, work: Path) -> Any:
    """ORT's quantization pre-processing (shape inference, folding) of the FP32 export, metadata kept.

    Writes `work/fp32.pre.onnx` and returns it loaded. Pre-processing drops the metadata_props,
    and the decode after quantization needs them, so they are copied back.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pipeline.onnx_models.load import load_onnx

    meta = metadata(load_onnx(fp32_path, "export", weights=False))
    pre = work / PREPROCESSED_NAME
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
    model = load_onnx(pre, "export")
    set_metadata(model, meta)
    return model


def _calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"MinMax": CalibrationMethod.MinMax, "Percentile": CalibrationMethod.Percentile,
            "Entropy": CalibrationMethod.Entropy}[name]


def describe(c: QuantizeCandidate) -> str:
    """A one-line summary of a candidate's configuration (for the CSV and MLflow)."""
    ops = "+".join(c.op_types) if c.op_types else "all"
    rr = " reduce_range" if c.reduce_range else ""
    sym = " symmetric" if c.symmetric else ""
    fl = f" float={'+'.join(c.float_layers)}" if c.float_layers else ""
    return f"{c.format} {c.activation}{c.weight}{sym}{rr} {c.calibration} ops={ops}{fl} head={c.head}"


def build_candidate(fp32: Any, c: QuantizeCandidate, calib: np.ndarray, workdir: Path) -> bytes:
    """Quantize the pre-processed FP32 model `fp32` (onnx.ModelProto) according to `c`.

    The head decode is computed from the graph: kept in float (`head: float`) or removed from
    the graph so the device decodes it on the few candidates above threshold (`head: cut`).
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    head = find_head_decode(fp32)
    if c.head == "cut":
        model = cut_before_decode(fp32, head)
        exclude: list[str] = ["/predfl/Concat"] + [n.name for n in model.graph.node
                                                   if n.output[0] in (head.box_concat, head.cls_concat)]
    else:
        model = fp32
        exclude = list(head.nodes)
    # Computed on the full FP32 graph: the cut graph keeps these nodes but not the DFL they feed.
    if "head_convs" in c.float_layers:
        exclude += head_convs(fp32)
    if "stem" in c.float_layers:
        exclude += stem_conv(fp32)
    verify_node_names(model, exclude)
    src = workdir / f"{c.name}.src.onnx"
    dst = workdir / f"{c.name}.onnx"
    onnx.save(model, str(src))
    qtype = {"U8": QuantType.QUInt8, "S8": QuantType.QInt8}
    extra = {
        # U8 + symmetric = zero point 128: the fast U8S8 kernels with a symmetric range. Measured
        # here, asymmetric U8 ranges lost 0.8-1.7 points of mAP50-95 on camera frames where the
        # symmetric ones lost 0.1 (docs/results.md).
        "ActivationSymmetric": c.symmetric,
        "WeightSymmetric": True,
        "CalibPercentile": c.percentile,
        # Not CalibMaxIntermediateOutputs: ORT 1.31's MinMax calibrator discards the ranges of a
        # chunk when it clears it, and fails outright when the set size is a multiple of it.
    }
    quantize_static(
        str(src), str(dst), _TensorReader(calib, model.graph.input[0].name),
        quant_format=QuantFormat.QDQ if c.format == "QDQ" else QuantFormat.QOperator,
        op_types_to_quantize=list(c.op_types) or None,
        per_channel=True, reduce_range=c.reduce_range,
        activation_type=qtype[c.activation], weight_type=qtype[c.weight],
        nodes_to_exclude=exclude, calibrate_method=_calibration_method(c.calibration),
        extra_options=extra,
    )
    out = onnx.load(str(dst))
    set_metadata(out, {**metadata(model), "quantization": describe(c), "quantization_candidate": c.name})
    return out.SerializeToString()


def build_dynamic(fp32_path: Path, workdir: Path) -> bytes:
    """ORT dynamic quantization (weights int8, activations quantized at run time): the baseline."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = workdir / "dynamic.onnx"
    quantize_dynamic(str(fp32_path), str(dst), weight_type=QuantType.QUInt8, per_channel=False)
    out = onnx.load(str(dst))
    set_metadata(out, {"quantization": "dynamic U8 weights"})
    return out.SerializeToString()


def interleaved_latency(sessions: dict[str, Any], inputs: Sequence[np.ndarray], warmup: int, runs: int,
                        rounds: int, decode: dict[str, Callable[[np.ndarray], Any]] | None = None
                        ) -> dict[str, tuple[float, float]]:
    """Median ms per inference (+ decode) and spread (max-min of round medians) for each session.

    `decode[name]`, when given, runs on the session's first output inside the timed region: a
    model whose head decode was cut out of the graph pays for it in postprocessing, so timing
    `session.run` alone would flatter it. Sessions take turns inside every round (who goes
    first rotates), so a noisy neighbour or a frequency change hits all of them alike; the
    per-round median discards outliers and the median over rounds is reported.
    """
    names = list(sessions)
    feeds = {n: (sessions[n].get_inputs()[0].name) for n in names}
    post = decode or {}

    def once(n: str, x: np.ndarray) -> None:
        out = sessions[n].run(None, {feeds[n]: x})[0]
        if n in post:
            post[n](out)

    for n in names:
        for i in range(warmup):
            once(n, inputs[i % len(inputs)])
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for n in order:
            times = []
            for i in range(runs):
                x = inputs[i % len(inputs)]
                t0 = time.perf_counter()
                once(n, x)
                times.append((time.perf_counter() - t0) * 1000)
            per_round[n].append(statistics.median(times))
    return {n: (statistics.median(v), max(v) - min(v)) for n, v in per_round.items()}
