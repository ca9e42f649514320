"""Reading and cutting the exported YOLOv8 graph: the head decode, computed, never hard-coded.

The quantize stage keeps the detection head's decode in float (DFL softmax/conv, anchor and
stride arithmetic, the final Sigmoid/Concat) because INT8 there costs accuracy for no speed.
Which nodes those are is computed from the graph: walk back from the graph output and stop at
the head's last convolutions (a Conv fed by a Softmax is the DFL's fixed conv and belongs to
the decode). The same analysis gives the cut point for a "pre-DFL" model whose decode runs in
postprocessing, on the few candidates above the confidence threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_runtime.postprocess import FORMAT_PREDFL_LOGITS

_LEVEL_OPS = {"Reshape", "Flatten", "View"}


class GraphError(ValueError):
    """The ONNX graph is not the YOLOv8 detection graph this stage expects."""


@dataclass(frozen=True)
class HeadDecode:
    """Where the head's decode is: its nodes, and the box/class tensors that feed it."""

    nodes: tuple[str, ...]  # node names kept in float
    box_concat: str  # tensor (1, 4*reg_max, N): per-level box distributions, concatenated
    cls_concat: str  # tensor (1, nc, N): per-level class logits, concatenated
    reg_max: int


def _producers(model: Any) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output}


def _initializer_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {init.name: tuple(init.dims) for init in model.graph.initializer}


def find_head_decode(model: Any) -> HeadDecode:
    """Locate the decode part of a YOLOv8 detection head in `model` (an onnx.ModelProto)."""
    if len(model.graph.output) != 1:
        raise GraphError(f"expected one graph output (YOLOv8 detect), found {len(model.graph.output)}")
    producers = _producers(model)
    shapes = _initializer_shapes(model)
    decode: dict[str, Any] = {}
    stack = [producers[model.graph.output[0].name]]
    while stack:
        node = stack.pop()
        if node.name in decode:
            continue
        if node.op_type == "Conv":
            feeder = producers.get(node.input[0])
            if feeder is None or feeder.op_type != "Softmax":
                continue  # a head convolution: the decode starts after it
        decode[node.name] = node
        stack.extend(producers[i] for i in node.input if i in producers)
    if not any(n.op_type == "Softmax" for n in decode.values()):
        raise GraphError("no DFL Softmax found behind the graph output; is this a YOLOv8 detection export?")
    # The level concats: Concat nodes of the decode whose inputs are reshaped head-conv outputs.
    level_concats = []
    for node in decode.values():
        if node.op_type != "Concat":
            continue
        feeders = [producers.get(i) for i in node.input]
        if feeders and all(f is not None and f.op_type in _LEVEL_OPS and f.name in decode for f in feeders):
            convs = [producers.get(f.input[0]) for f in feeders]
            if all(c is not None and c.op_type == "Conv" and c.name not in decode for c in convs):
                channels = {shapes[c.input[1]][0] for c in convs if c.input[1] in shapes}
                if len(channels) != 1:
                    raise GraphError(f"level concat {node.name} mixes head convs of different widths {channels}")
                level_concats.append((node, channels.pop()))
    if len(level_concats) != 2:
        raise GraphError(f"expected a box and a class level concat in the head, found {len(level_concats)}")
    softmax = next(n for n in decode.values() if n.op_type == "Softmax")
    box_concat = _feeding_concat(softmax, producers, {c.name for c, _ in level_concats})
    box_node, box_channels = next((c, ch) for c, ch in level_concats if c.name == box_concat.name)
    cls_node = next(c for c, _ in level_concats if c.name != box_concat.name)
    if box_channels % 4:
        raise GraphError(f"box branch has {box_channels} channels, not 4 * reg_max")
    return HeadDecode(tuple(sorted(decode)), box_node.output[0], cls_node.output[0], box_channels // 4)


def _feeding_concat(node: Any, producers: dict[str, Any], candidates: set[str]) -> Any:
    """Walk back from `node` along first inputs until one of the `candidates` concats."""
    seen = 0
    while node is not None and seen < 16:
        if node.name in candidates:
            return node
        node = producers.get(node.input[0])
        seen += 1
    raise GraphError("could not trace the DFL input back to a level concat")


def head_convs(model: Any) -> list[str]:
    """Names of the head's last convolutions: the Convs whose outputs the level concats reshape."""
    head = find_head_decode(model)
    producers = _producers(model)
    out = []
    for node in model.graph.node:
        if node.output[0] in (head.box_concat, head.cls_concat):
            for i in node.input:
                reshape = producers.get(i)
                conv = producers.get(reshape.input[0]) if reshape is not None else None
                if conv is not None and conv.op_type == "Conv":
                    out.append(conv.name)
    return sorted(out)


def stem_conv(model: Any) -> list[str]:
    """The first convolution (it reads the graph input): most sensitive to input quantization."""
    inputs = {i.name for i in model.graph.input}
    return sorted(n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] in inputs)


def verify_node_names(model: Any, names: tuple[str, ...] | list[str]) -> None:
    """Raise GraphError if any of `names` is not a node of `model` (exclusions must be real)."""
    present = {n.name for n in model.graph.node}
    missing = sorted(set(names) - present)
    if missing:
        raise GraphError(f"{len(missing)} excluded node(s) not in the graph, e.g. '{missing[0]}'; "
                         "the exclusion list is stale: recompute it from this model")


def cut_before_decode(model: Any, head: HeadDecode) -> Any:
    """Return a copy of `model` whose output is concat(box distributions, class logits).

    The output (1, 4*reg_max + nc, N) is the `yolov8-predfl-logits` format the device's
    postprocess decodes (DFL + sigmoid only for anchors above the confidence threshold).
    Metadata records the format and reg_max.
    """
    import onnx
    from onnx import helper

    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    graph = cut.graph
    decode = set(head.nodes)
    kept = [n for n in graph.node if n.name not in decode]
    # The two level concats are part of the decode set but must stay: they make the output.
    keep_concats = [n for n in graph.node if n.output[0] in (head.box_concat, head.cls_concat)]
    level_nodes = set()
    producers = _producers(model)
    for concat in keep_concats:
        level_nodes.add(concat.name)
        level_nodes.update(producers[i].name for i in concat.input if i in producers)
    kept += [n for n in graph.node if n.name in level_nodes and n not in kept]
    order = {n.name: i for i, n in enumerate(graph.node)}
    kept.sort(key=lambda n: order[n.name])
    out_name = "output0"
    final = helper.make_node("Concat", [head.box_concat, head.cls_concat], [out_name], axis=1, name="/predfl/Concat")
    old_out = graph.output[0]
    del graph.node[:]
    graph.node.extend(kept + [final])
    dims = [d.dim_value for d in old_out.type.tensor_type.shape.dim]
    nc = dims[1] - 4
    del graph.output[:]
    out_shape = [dims[0], 4 * head.reg_max + nc, dims[2]]
    graph.output.append(helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, out_shape))
    used = {i for n in graph.node for i in n.input}
    kept_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.value_info[:]
    set_metadata(cut, {"output_format": FORMAT_PREDFL_LOGITS, "reg_max": str(head.reg_max)})
    onnx.checker.check_model(cut)
    return cut


def set_metadata(model: Any, updates: dict[str, str]) -> None:
    """Set metadata_props keys on `model` in place (sorted, replacing existing keys)."""
    props = {p.key: p.value for p in model.metadata_props}
    props.update(updates)
    del model.metadata_props[:]
    for key in sorted(props):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, props[key]


def metadata(model: Any) -> dict[str, str]:
    """The model's metadata_props as a dict."""
    return {p.key: p.value for p in model.metadata_props}
