"""Where the time goes: ONNX Runtime's own profile of FP32 vs our INT8, per op type.

For each imgsz (default: export.imgsz and 640) it profiles the FP32 model and the INT8 model the
quantize stage chose (at other sizes: built here the same way as benchmarks/quantization.py),
with the settings the device runtime uses (CPU, base.threads, full graph optimisation). Kernel
times come from ORT's profiler (`SessionOptions.enable_profiling`), warm-up runs excluded, and
are reported as ms per inference grouped by op type.

The last line per size is the bound the convolutions set: FP32's total kernel time divided by
the INT8 model's convolution time (QLinearConv, ConvInteger and any Conv/FusedConv left in
float). Even if every other INT8 op cost nothing, INT8 could not be faster than that ratio with
these kernels on this CPU.

Then what the int8 SiLU costs, measured rather than summed from the profile: the INT8 model is
rewritten, for timing only (its outputs are wrong), so each SiLU (QLinearSigmoid + QLinearMul)
becomes (a) one table-lookup pass, the QLinearSigmoid alone: the cheapest int8 elementwise op ORT
has, i.e. what a fused SiLU built from ORT's own kernels could at best cost; and (b) nothing: a
fused SiLU kernel that costs zero. FP32, INT8 and both rewrites are timed interleaved (inference
only, no decode: the rewritten models' garbage outputs would make NMS meaningless), median of
round medians. (b) is the ceiling for the SiLU model with ORT's other kernels on this CPU.

    python benchmarks/profile_ops.py [--imgsz 256 640] [--runs 50] [--out reports/benchmarks/profile.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("YOLO_OFFLINE", "1")

from quantization import chosen_candidate, pipeline_models, prepare  # noqa: E402

from edge_runtime.fileio import atomic_write_text  # noqa: E402
from edge_runtime.preprocess import preprocess  # noqa: E402
from pipeline.accuracy.mean_ap import load_split, onnx_session  # noqa: E402
from pipeline.config import paths  # noqa: E402
from pipeline.config.params import BaseParams, load_params  # noqa: E402
from pipeline.onnx_models.int8_candidates import interleaved_latency  # noqa: E402

# Op types that are convolutions, in either precision (FusedConv = Conv + activation fused by ORT).
CONV_OPS = {"Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcFusedConv"}


def profile_session(model: Path, threads: int, inputs: list[np.ndarray], warmup: int, runs: int,
                    workdir: Path) -> dict[str, float]:
    """ms per inference by op type for `model`, from ORT's profiler; warm-up runs excluded."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(workdir / model.stem)
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    for i in range(warmup + runs):
        sess.run(None, {feed: inputs[i % len(inputs)]})
    events = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(model_runs) != warmup + runs:
        raise RuntimeError(f"ORT profile of {model} has {len(model_runs)} model_run events, expected {warmup + runs}")
    timed_from = model_runs[warmup]["ts"]
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= timed_from:
            per_op[e["args"]["op_name"]] += e["dur"] / 1000.0 / runs
    return dict(per_op)


def conv_ms(per_op: dict[str, float]) -> float:
    """Kernel ms per inference spent in convolutions of any precision."""
    return sum(v for k, v in per_op.items() if k in CONV_OPS)


def table(imgsz: int, fp32: dict[str, float], int8: dict[str, float], top: int) -> list[str]:
    """Markdown rows: the `top` costliest op types of either model, totals, and the conv bound."""
    ops = sorted(set(fp32) | set(int8), key=lambda k: -max(fp32.get(k, 0.0), int8.get(k, 0.0)))
    shown, rest = ops[:top], ops[top:]
    lines = [f"### imgsz {imgsz}", "", "| op type | FP32 ms | INT8 ms |", "|---|---|---|"]
    for k in shown:
        lines.append(f"| {k} | {fp32.get(k, 0.0):.2f} | {int8.get(k, 0.0):.2f} |")
    if rest:
        lines.append(f"| other ({len(rest)} types) | {sum(fp32.get(k, 0.0) for k in rest):.2f} | "
                     f"{sum(int8.get(k, 0.0) for k in rest):.2f} |")
    total32, total8, conv8 = sum(fp32.values()), sum(int8.values()), conv_ms(int8)
    lines += [f"| **total kernel time** | **{total32:.2f}** | **{total8:.2f}** |", "",
              f"Kernel-time ratio FP32 / INT8: {total32 / total8:.2f}x. FP32 convolutions {conv_ms(fp32):.2f} ms, "
              f"INT8 convolutions {conv8:.2f} ms ({conv_ms(fp32) / conv8:.2f}x faster). "
              f"Bound with every non-convolution INT8 op free: {total32:.2f} / {conv8:.2f} = "
              f"**{total32 / conv8:.2f}x**.", ""]
    return lines


def silu_rewrite(model: onnx.ModelProto, mode: str) -> onnx.ModelProto:
    """A timing-only copy of a QOperator INT8 model with every int8 SiLU rewritten.

    An int8 SiLU is QLinearSigmoid(x) -> s and QLinearMul(x, s) -> y. `mode` "lut" keeps only the
    QLinearSigmoid (y := s: one table-lookup pass per activation); "free" removes both (y := x).
    The outputs are wrong by design; the graph stays valid (uint8 in, uint8 out).
    """
    if mode not in ("lut", "free"):
        raise ValueError(f"mode must be 'lut' or 'free', not {mode!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producer = {o: n for n in graph.node for o in n.output}
    remove, rename = [], {}
    for node in graph.node:
        if node.op_type != "QLinearMul":
            continue
        a, b = node.input[0], node.input[3]  # QLinearMul(A, A_scale, A_zp, B, B_scale, B_zp, ...)
        for x, s in ((a, b), (b, a)):
            sig = producer.get(s)
            if sig is not None and sig.op_type == "QLinearSigmoid" and sig.input[0] == x:
                remove.append(node)
                if mode == "free":
                    remove.append(sig)
                rename[node.output[0]] = x if mode == "free" else s
                break
    if not rename:
        raise ValueError("no int8 SiLU (QLinearSigmoid + QLinearMul) in the model: it is not a QOperator INT8 YOLOv8")
    for node in remove:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    for o in graph.output:
        o.name = rename.get(o.name, o.name)
    return out


def silu_bound(fp32: Path, int8: Path, threads: int, inputs: list[np.ndarray], rounds: int, runs: int
               ) -> dict[str, tuple[float, float]]:
    """Interleaved inference latency (median ms, spread) of FP32, INT8 and INT8 with its SiLU
    rewritten to one LUT pass ("int8, SiLU = 1 LUT") and to nothing ("int8, SiLU free")."""
    model = onnx.load(str(int8))
    sessions = {"fp32": onnx_session(fp32, threads), "int8": onnx_session(int8, threads),
                "int8, SiLU = 1 LUT": onnx_session(silu_rewrite(model, "lut").SerializeToString(), threads),
                "int8, SiLU free": onnx_session(silu_rewrite(model, "free").SerializeToString(), threads)}
    return interleaved_latency(sessions, inputs, warmup=10, runs=runs, rounds=rounds)


def silu_table(imgsz: int, latency: dict[str, tuple[float, float]]) -> list[str]:
    """Markdown rows for `silu_bound`'s result, ratios vs FP32."""
    fp32 = latency["fp32"][0]
    lines = [f"#### What the int8 SiLU costs, imgsz {imgsz} (timing-only rewrites, inference only, interleaved)", "",
             "| model | ms (median, ± half the round spread) | vs FP32 |", "|---|---|---|"]
    for name, (ms, spread) in latency.items():
        lines.append(f"| {name} | {ms:.2f} (±{spread / 2:.2f}) | {fp32 / ms:.2f}x |")
    return lines + [""]


def main() -> None:
    """Profile FP32 and INT8 at each size and print (and with --out write) the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--imgsz", type=int, nargs="+", default=None, help="default: export.imgsz and 640")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--top", type=int, default=10, help="op types listed before 'other'")
    ap.add_argument("--rounds", type=int, default=7, help="SiLU bound: interleaved rounds")
    ap.add_argument("--round-runs", type=int, default=20, help="SiLU bound: runs per model per round")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sizes = prepare(args.imgsz)
    threads = load_params("base", BaseParams).threads
    num_classes = len(yaml.safe_load((REPO / paths.DATASET_YAML).read_text())["names"])
    items = load_split(REPO / paths.DATASET_DIR, "val", num_classes, 8)  # only the images are used
    lines = [f"ONNX Runtime profile, CPU, {threads} threads, {args.runs} runs after {args.warmup} warm-up; "
             f"INT8 = `{chosen_candidate().name}`; ms per inference (kernel time, no pre/post-processing).", ""]
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        work = Path(tmp)
        for imgsz in sizes:
            fp32_path, int8_path, _ = pipeline_models(imgsz, work)
            inputs = [preprocess(it.image, imgsz)[0] for it in items]
            per_op: dict[str, dict[str, float]] = {}
            for name, path in (("fp32", fp32_path), ("int8", int8_path)):
                per_op[name] = profile_session(path, threads, inputs, args.warmup, args.runs, work)
            lines += table(imgsz, per_op["fp32"], per_op["int8"], args.top)
            if chosen_candidate().format == "QOperator":
                lines += silu_table(imgsz, silu_bound(fp32_path, int8_path, threads, inputs, args.rounds,
                                                      args.round_runs))
            else:
                lines += ["(SiLU bound: the chosen candidate is QDQ; the rewrite needs the QOperator form.)", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
