"""Validation and loading of untrusted model and dataset files. No FastAPI, no database.

Nothing here unpickles: ONNX is parsed as protobuf and converted to torch.nn modules (onnx2pytorch),
safetensors headers are read and checked before any tensor, `.npz` goes through
np.load(allow_pickle=False) after its zip directory is checked, CSV is parsed as text.
Every rejection is an ArtifactError with a stable slug that the API turns into a 4xx problem.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from app.influence.adapters import SingleLogitAsTwoClasses

from .architectures import architecture_adapter

MODEL_FORMATS = ("onnx", "safetensors")
DATASET_FORMATS = ("npz", "csv", "parquet")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".pt2", ".ckpt", ".bin", ".jit", ".torchscript", ".joblib")
EXPORT_HELP = (
    "Export the model to ONNX instead: torch.onnx.export(model.eval(), (example_batch,), 'model.onnx', "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)) and upload model.onnx as `file` and model.onnx.data as "
    "`external_data`, or upload its state_dict as .safetensors "
    "with an `architecture` form field naming a built-in architecture."
)
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024


class ArtifactError(ValueError):
    def __init__(self, slug: str, detail: str, status: int = 422):
        super().__init__(detail)
        self.slug = slug
        self.detail = detail
        self.status = status


# What a model takes and what a dataset holds, one entry per input:
#   {"name": str, "dtype": "float32" | "int64" | "int32" | "bool" | ..., "shape": [sizes after the batch axis]}
# plus, for integer inputs, "range": [min, max] on a dataset (the values it holds) and "vocab_size" on a
# model (ids must lie in 0..vocab_size-1 because the input indexes an embedding table).
# Single-input datasets name their one input "inputs"; it matches a single-input model whatever its name.
SINGLE_INPUT = "inputs"
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def single_input_spec(shape: list[int]) -> list[dict]:
    return [{"name": SINGLE_INPUT, "dtype": "float32", "shape": [int(d) for d in shape]}]


@dataclass
class LoadedModel:
    module: nn.Module  # takes one tensor: the dataset's input, or several inputs packed (see pack_inputs)
    format: str
    num_parameters: int
    input_shape: list[int]
    num_outputs: int
    architecture: dict | None = None
    inputs: list[dict] = field(default_factory=list)


@dataclass
class LoadedDataset:
    arrays: dict[str, np.ndarray]  # input name -> (N, *shape), float32 or int64
    labels: np.ndarray  # int64 (N,)
    format: str
    num_classes: int
    label_counts: list[int] = field(default_factory=list)

    @property
    def inputs(self) -> np.ndarray:
        """The one input array of a single-input dataset."""
        if len(self.arrays) != 1:
            raise ValueError(f"the dataset has {len(self.arrays)} inputs: use pack_inputs")
        return next(iter(self.arrays.values()))

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> list[int]:
        return [int(d) for d in next(iter(self.arrays.values())).shape[1:]]

    @property
    def input_specs(self) -> list[dict]:
        specs = []
        for name, array in self.arrays.items():
            spec = {"name": name, "dtype": str(array.dtype), "shape": [int(d) for d in array.shape[1:]]}
            if array.dtype.kind in "iu" and array.size:
                spec["range"] = [int(array.min()), int(array.max())]
            specs.append(spec)
        return specs


# ----------------------------------------------------------------------------------------- models

def detect_model_format(filename: str, head: bytes) -> str:
    name = (filename or "").lower()
    # Trust the two accepted suffixes (their parsers are safe on any bytes: a safetensors header length
    # can itself start with 0x80); elsewhere, recognise pickles and zip archives by their magic too.
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(PICKLE_SUFFIXES) or head.startswith(b"\x80") or head.startswith(b"PK\x03\x04"):
        raise ArtifactError(
            "pickle-model-refused",
            "pickle-based model files (torch.save full modules, TorchScript, torch.export .pt2, checkpoints) "
            "can run arbitrary code when loaded and are refused. " + EXPORT_HELP, status=415)
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith(".safetensors"):
        return "safetensors"
    raise ArtifactError("unsupported-model-format",
                        f"unsupported model file {filename!r}: upload a .onnx model or .safetensors weights. " + EXPORT_HELP,
                        status=415)


def _all_onnx_tensors(graph):
    for tensor in graph.initializer:
        yield tensor
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_onnx_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_onnx_tensors(sub)


def packed_dtype(specs: list[dict]) -> str:
    """The dtype of the one tensor a model's inputs travel in: float32 when all are float, int64 when all are
    integer (token ids stay exact), float64 when mixed (exact for integers below 2**53)."""
    floats = {spec["dtype"] in FLOAT_DTYPES for spec in specs}
    return "float32" if floats == {True} else "int64" if floats == {False} else "float64"


def packed_shape(specs: list[dict]) -> list[int]:
    """One input keeps its shape; several are flattened and laid side by side, in the model's order."""
    return list(specs[0]["shape"]) if len(specs) == 1 else [sum(math.prod(spec["shape"]) for spec in specs)]


class GraphInputs(nn.Module):
    """Runs a converted ONNX graph on one tensor per batch: the engine slices, batches and vmaps a single
    tensor, so a model with several graph inputs (input_ids, attention_mask) takes them packed side by
    side (pack_inputs), and each part is reshaped and cast to the dtype its graph input declares. Float
    parts follow the parameters' dtype (the PBRF check runs a float64 copy)."""

    def __init__(self, graph: nn.Module, specs: list[dict]):
        super().__init__()
        self.graph = graph
        self.specs = [(list(spec["shape"]), spec["dtype"]) for spec in specs]

    def _cast(self, part: torch.Tensor, dtype: str) -> torch.Tensor:
        if dtype in FLOAT_DTYPES:
            return part.to(next(self.graph.parameters()).dtype)
        return part.to(getattr(torch, dtype))

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        if len(self.specs) == 1:
            return self.graph(self._cast(packed, self.specs[0][1]))
        parts, start, lead = [], 0, packed.shape[:-1]  # under vmap an example is (total,), a batch (B, total)
        for shape, dtype in self.specs:
            size = math.prod(shape)
            parts.append(self._cast(packed[..., start : start + size].reshape(*lead, *shape), dtype))
            start += size
        return self.graph(*parts)


def _example_batch(specs: list[dict], batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch the model must accept: zeros (or seeded normal values) for float inputs; for integer inputs
    id 1 where the vocabulary allows it (an all-zero attention mask would mask every position)."""
    return _packed(_example_parts(specs, batch, generator), specs)


def _packed(parts: list[torch.Tensor], specs: list[dict]) -> torch.Tensor:
    """One batch per graph input -> the one tensor the loaded module takes (see pack_inputs)."""
    dtype = getattr(torch, packed_dtype(specs))
    return parts[0].to(dtype) if len(parts) == 1 else torch.cat([part.to(dtype) for part in parts], dim=1)


def _example_parts(specs: list[dict], batch: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    parts = []
    for spec in specs:
        shape = (batch, math.prod(spec["shape"])) if len(specs) > 1 else (batch, *spec["shape"])
        if spec["dtype"] in FLOAT_DTYPES:
            parts.append(torch.randn(shape, generator=generator) if generator is not None else torch.zeros(shape))
        else:
            fill = 1 if spec.get("vocab_size") is None or spec["vocab_size"] > 1 else 0
            parts.append(torch.full(shape, fill, dtype=torch.int64))
    return parts


# Models up to this size are also run by ONNX Runtime, as a reference for the conversion (a larger one
# would hold its weights three times over in the validator's memory budget).
REFERENCE_CHECK_BYTES = 512 * 2**20


def _check_against_onnx_runtime(model_bytes: bytes | None, module: nn.Module, specs: list[dict]) -> None:
    """onnx2pytorch rebuilds the graph from modules of its own, and a pattern it gets wrong gives wrong
    outputs without an error (an untrained BatchNorm whose statistics the exporter merged normalised with
    the batch's own statistics: logits off by 0.8). So the converted model's logits on a seeded random
    batch are compared with ONNX Runtime's, which executes the graph as the ONNX standard defines it; a
    difference beyond float32 rounding is a 422. A graph ONNX Runtime cannot run (an operator or opset
    it lacks) is not refused for that: the smoke test alone then vouches for it."""
    if model_bytes is None:
        return
    try:
        import onnxruntime
    except ImportError:  # an install without it: the smoke test alone
        return
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    options.log_severity_level = 4
    # exact allocations, freed when done: an arena that grows by doubling would need far more than the
    # graph itself under the validator's memory limit
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    parts = _example_parts(specs, 3, torch.Generator().manual_seed(7))
    try:
        # (an input dtype numpy lacks, such as bfloat16, leaves no reference to compare with)
        feeds = {spec["name"]: part.reshape(3, *spec["shape"]).numpy().astype(spec["dtype"])
                 for spec, part in zip(specs, parts)}
        session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        if sorted(i.name for i in session.get_inputs()) != sorted(feeds):
            return
        reference = torch.from_numpy(np.asarray(session.run(None, feeds)[0], dtype=np.float64))
    except Exception:  # noqa: BLE001 - no reference to compare with
        return
    with torch.no_grad():
        converted = module(_packed(parts, specs)).double()
    if converted.shape != reference.shape:
        raise ArtifactError("onnx-conversion-mismatch",
                            f"the converted model returns shape {tuple(converted.shape)} where ONNX Runtime returns "
                            f"{tuple(reference.shape)} for the same inputs; this graph is not converted faithfully")
    if not bool(torch.isfinite(reference).all()):
        return
    scale = float(reference.abs().max())
    difference = float((converted - reference).abs().max())
    if not difference <= 1e-3 * scale + 1e-4:  # float32 rounding of two kernels, with a wide margin
        raise ArtifactError("onnx-conversion-mismatch",
                            f"the converted model's logits differ from ONNX Runtime's by up to {difference:.3g} "
                            f"(largest logit {scale:.3g}) on the same random inputs: this graph pattern is not converted "
                            "faithfully, and auditing it would audit another model")


def _smoke_test(module: nn.Module, specs: list[dict]) -> int:
    """Run the model on small batches of two sizes; returns the output size."""
    sizes = []
    described = ", ".join(f"{spec['name']} {spec['dtype']} {spec['shape']}" for spec in specs)
    with torch.no_grad():
        for batch in (2, 3):
            try:
                out = module(_example_batch(specs, batch))
            except Exception as exc:
                if "training_mode=True" in str(exc):  # onnx2pytorch's words for a Dropout left active
                    raise ArtifactError("onnx-training-mode",
                                        "the model was exported in training mode (its Dropout is active, so its "
                                        "outputs are random); call model.eval() before torch.onnx.export") from exc
                raise ArtifactError(
                    "model-smoke-test-failed",
                    f"the model failed a forward pass on a batch of {batch} examples ({described}): {exc}. "
                    "If it was exported with a fixed batch size, export it with a dynamic batch axis "
                    "(dynamic_shapes / dynamic_axes).") from exc
            if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ArtifactError("model-output-shape",
                                    f"the model must map a batch of {batch} inputs to a ({batch}, num_outputs) tensor; "
                                    f"got {shape}")
            if not torch.isfinite(out).all():
                raise ArtifactError("model-non-finite-output", "the model produced non-finite outputs on zero inputs")
            sizes.append(out.shape[1])
        # Influence needs logits: a softmax layer at the end would silently change the loss and its curvature.
        probe = module(_example_batch(specs, 4, torch.Generator().manual_seed(0)))
        if (probe.shape[1] > 1 and bool(((probe >= 0) & (probe <= 1)).all())
                and bool(torch.allclose(probe.sum(1), torch.ones(probe.shape[0]), atol=1e-4))):
            raise ArtifactError("model-outputs-probabilities",
                                "the model's outputs are probabilities (it ends in a softmax); export the model "
                                "without its final softmax so that it returns logits (log-softmax is fine)")
    return int(sizes[0])


def _check_parameters(module: nn.Module) -> int:
    count = 0
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise ArtifactError("model-non-finite-weights", f"parameter {name} contains NaN or infinite values")
        count += p.numel()
    if count == 0:
        raise ArtifactError("model-without-parameters", "the model has no trainable parameters")
    return count


def _drop_inference_batchnorm_mode(proto) -> None:
    """The TorchScript exporter (opset 14+) writes BatchNormalization's `training_mode=0`, which is the
    default but which onnx2pytorch refuses to read: drop it. A model exported in training mode is refused."""
    for node in proto.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        for attribute in list(node.attribute):
            if attribute.name == "training_mode":
                if attribute.i:
                    raise ArtifactError("onnx-training-mode",
                                        "the model was exported in training mode (BatchNormalization training_mode=1); "
                                        "call model.eval() before torch.onnx.export")
                node.attribute.remove(attribute)


def _split_merged_initializers(proto) -> None:
    """The TorchScript exporter merges initializers with equal values (the zero biases and unit scales
    of an untrained BatchNorm, its running statistics, BatchNorm-folded convolution biases) into one,
    which the other readers reach through `Identity` nodes. onnx2pytorch then takes such a weight for
    a runtime input: a Conv with three inputs fails to run, and a BatchNormalization whose statistics
    are not initializers normalises with the batch's own statistics (wrong outputs, silently). Each
    Identity of an initializer becomes an initializer of its own, a copy: these were separate weights
    of the model that happened to be equal (a weight the model really shares is one initializer that
    several nodes read, which this leaves alone)."""
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    initializers = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:  # in topological order: an Identity of an Identity follows its source
        if (node.op_type == "Identity" and node.domain in ("", "ai.onnx") and len(node.input) == 1
                and len(node.output) == 1 and node.input[0] in initializers
                and node.output[0] not in initializers and node.output[0] not in outputs):
            copy_ = graph.initializer.add()
            copy_.CopyFrom(initializers[node.input[0]])
            copy_.name = node.output[0]
            initializers[copy_.name] = copy_
        else:
            kept.append(node)
    if len(kept) < len(graph.node):
        _replace_nodes(graph, kept)


def _replace_nodes(graph, kept: list) -> None:
    """The graph's nodes become `kept` (some of its own nodes, in order; copied before the field is
    cleared, which would release them): one rebuild instead of a linear-time remove per node."""
    copies = [copy.deepcopy(node) for node in kept]
    del graph.node[:]
    graph.node.extend(copies)


def _constant_normalisation_inputs_as_initializers(proto) -> None:
    """The TorchScript exporter gives GroupNorm's InstanceNormalization its unit scale and zero shift as
    Constant nodes; onnx2pytorch then builds a lazy module that writes them into its parameters on every
    forward pass (`.data = ...`, which torch.func refuses, and an uninitialised parameter until the first
    call). As initializers they are read once, at conversion, as the dynamo exporter writes them."""
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    wanted = {name for node in graph.node if node.op_type == "InstanceNormalization" for name in node.input[1:3]}
    kept = []
    for node in graph.node:
        if (node.op_type == "Constant" and len(node.output) == 1 and node.output[0] in wanted
                and node.output[0] not in initializers and len(node.attribute) == 1
                and node.attribute[0].name == "value"):
            tensor = graph.initializer.add()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
        else:
            kept.append(node)
    if len(kept) < len(graph.node):
        _replace_nodes(graph, kept)


def _dotless_submodule_names(module: nn.Module) -> None:
    """onnx2pytorch names submodules after ONNX nodes, which the TorchScript exporter writes as paths
    such as `/features/features.0/Gemm`; a dot inside a submodule's name breaks every dotted-path
    lookup (named_parameters -> functional_call, get_submodule). Rename, and keep its node mapping."""
    renamed, taken = {}, set(module._modules)
    for name in list(module._modules):
        if "." not in name:
            continue
        new = name.replace(".", "_")
        while new in taken:
            new += "_"
        taken.add(new)
        renamed[name] = new
    if not renamed:
        return
    module._modules = type(module._modules)((renamed.get(k, k), v) for k, v in module._modules.items())
    module.mapping = {op: renamed.get(name, name) for op, name in module.mapping.items()}


# ONNX operators whose initializer inputs at these positions are learned weights. onnx2pytorch keeps
# every initializer as a buffer, so without this they would silently drop out of the audit.
_LEARNED_INPUTS = {"LayerNormalization": (1, 2), "GroupNormalization": (1, 2), "InstanceNormalization": (1, 2),
                   "PRelu": (1,)}


def _learned_initializers_as_parameters(module: nn.Module, proto) -> None:
    from onnx2pytorch.convert.operations import get_buffer_name

    sizes = {t.name: math.prod(t.dims) for t in proto.graph.initializer}
    ranks = {t.name: len(t.dims) for t in proto.graph.initializer}
    producer = {output: node for node in proto.graph.node for output in node.output}
    # outputs of embedding lookups: a Gather whose data is a table of weights
    lookups = {node.output[0] for node in proto.graph.node
               if node.op_type == "Gather" and node.input and ranks.get(node.input[0], 0) >= 2}

    def made_by(name: str, op_type: str):
        node = producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    readers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    # GroupNorm as both exporters write it: Reshape -> InstanceNormalization with a constant unit scale
    # and zero shift -> Reshape -> Mul(gamma) -> Add(beta). gamma and beta are the weights; the
    # InstanceNormalization's scale and shift are constants.
    group_norms = {node.output[0] for node in proto.graph.node
                   if node.op_type == "InstanceNormalization" and made_by(node.input[0], "Reshape") is not None
                   and [r.op_type for r in readers.get(node.output[0], [])] == ["Reshape"]}
    regrouped = {r.output[0] for name in group_norms for r in readers[name]}  # the Reshapes after them

    scale_nodes = set()  # ids of Mul nodes that scale a normalised tensor
    for node in proto.graph.node:
        positions = _LEARNED_INPUTS.get(node.op_type, ())
        if node.op_type == "InstanceNormalization" and node.output and node.output[0] in group_norms:
            positions = ()
            wrapper = module._modules.get(module.mapping.get(node.output[0], ""))
            for norm in (wrapper.modules() if wrapper is not None else ()):
                for attr in [a for a, p in norm._parameters.items() if p is not None]:
                    norm.register_buffer(attr, norm._parameters.pop(attr).detach())
        if node.op_type == "Gather" and node.output and node.output[0] in lookups:
            positions = (0,)  # an embedding table (nn.Embedding); only float initializers are promoted
        # LayerNorm written out as elementwise ops (opsets before LayerNormalization):
        # y = Div(x - mean, Sqrt(var + eps)) * gamma + beta. Only gamma and beta are weights; other
        # constants a model multiplies or adds (baked input scaling, epsilon) are not.
        if node.op_type in ("Mul", "Add"):
            tensors = [i for i, name in enumerate(node.input) if sizes.get(name, 0) > 1]
            others = [name for name in node.input if name not in sizes]
            if len(tensors) == 1 and len(others) == 1:
                if node.op_type == "Mul":
                    div = made_by(others[0], "Div")
                    if (div is not None and len(div.input) == 2 and made_by(div.input[1], "Sqrt") is not None) \
                            or others[0] in regrouped:
                        positions = tuple(tensors)
                        scale_nodes.add(id(node))
                elif id(producer.get(others[0])) in scale_nodes:
                    positions = tuple(tensors)
                # token embedding + a table added to it: a position embedding whose lookup with constant
                # positions (arange) both exporters fold into the table rows used. (A fixed sinusoidal
                # encoding added the same way cannot be told apart and is audited too.)
                elif others[0] in lookups and ranks.get(node.input[tensors[0]], 0) >= 2:
                    positions = tuple(tensors)
        for position in positions:
            if position >= len(node.input) or node.input[position] not in sizes:
                continue
            key = get_buffer_name(node.input[position])
            buffer = module._buffers.get(key)
            if buffer is not None and buffer.is_floating_point():
                del module._buffers[key]
                module.register_parameter(key, nn.Parameter(buffer.detach().clone()))


_FLOAT_TENSOR_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _shared_weights_tied(module: nn.Module, proto) -> None:
    """One learned weight used in several places (a module the model calls twice, an embedding table
    reused as the output layer) reaches us as copies: onnx2pytorch copies an initializer into every node
    that reads it, and the TorchScript exporter writes a tied output layer as a second, transposed
    initializer. The copies would be audited as separate weights, counted twice, and scored in the wrong
    parameter space. Undo that, for exactly those two graph patterns:
    - nodes reading one initializer that are the same operation (op type, attributes, the same
      initializers at the same positions) run one module, called several times, which the engine treats
      as one layer at several positions;
    - the remaining parameters that hold the initializer's values (or its transposed twin's) become one
      shared nn.Parameter; the engine gives a weight shared across modules its per-example-gradient
      fallback.
    Constant initializers (all zeros, all ones) are left alone: exporters merge equal initializers, so two
    untrained LayerNorm scales arrive as one tensor without being one weight. Parameters that merely
    have equal values without such a link in the graph stay separate."""
    from onnx import numpy_helper
    from onnx2pytorch.convert.operations import get_buffer_name

    initializers = {t.name: t for t in proto.graph.initializer if t.data_type in _FLOAT_TENSOR_TYPES}
    readers: dict[str, list] = {}  # initializer -> the top-level nodes with a module that read it
    for node in proto.graph.node:
        owner = module.mapping.get(node.output[0]) if node.output else None
        if owner is None or owner not in module._modules:
            continue
        for name in dict.fromkeys(node.input):
            if name in initializers:
                readers.setdefault(name, []).append(node)
    values: dict[str, torch.Tensor] = {}

    def value(name: str) -> torch.Tensor:
        if name not in values:
            values[name] = torch.from_numpy(np.array(numpy_helper.to_array(initializers[name])))
        return values[name]

    groups = [[name] for name, nodes in readers.items() if len(nodes) >= 2 and not _constant(value(name))]
    matrices: dict[tuple, list[str]] = {}
    for name in readers:
        if len(initializers[name].dims) == 2 and min(initializers[name].dims) >= 2:
            matrices.setdefault((tuple(value(name).shape), _digest(value(name))), []).append(name)
    for names in list(matrices.values()):
        for name in names:
            transposed = value(name).T.contiguous()
            for other in matrices.get((tuple(transposed.shape), _digest(transposed)), []):
                if name < other and not _constant(transposed) and torch.equal(transposed, value(other)):
                    groups.append([name, other])
    for group in groups:
        if len(group) == 1:  # one operation applied several times: one module
            kept = []
            for node in readers[group[0]]:
                twin = next((k for k in kept if _same_operation(k, node, initializers)
                             and _same_state(module._modules[module.mapping[k.output[0]]],
                                             module._modules[module.mapping[node.output[0]]])), None)
                if twin is None:
                    kept.append(node)
                    continue
                # the node runs its twin's module; registering one module under two names would confuse
                # torch.func, which swaps parameters by name and restores the alias last
                owner = module.mapping[node.output[0]]
                module.mapping[node.output[0]] = module.mapping[twin.output[0]]
                if owner not in module.mapping.values():
                    del module._modules[owner]
        holders = [(module, get_buffer_name(name)) for name in group if get_buffer_name(name) in module._parameters]
        owners = {module.mapping[node.output[0]] for name in group for node in readers[name]}
        holders += [(sub, attr) for owner in sorted(owners) for sub in module._modules[owner].modules()
                    for attr in sub._parameters if sub._parameters[attr] is not None]
        targets = [value(name) for name in group]
        shared = None
        for owner, attr in holders:
            p = owner._parameters[attr]
            if not any(p.shape == t.shape and torch.equal(p.detach(), t.to(p.dtype)) for t in targets):
                continue
            if shared is None:
                shared = p
            elif p is not shared:
                owner._parameters[attr] = shared


def _digest(t: torch.Tensor) -> bytes:
    return hashlib.blake2b(t.reshape(-1).contiguous().view(torch.uint8).numpy(), digest_size=16).digest()


def _constant(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    return flat.numel() == 0 or bool((flat == flat[0]).all())


def _same_operation(a, b, initializers) -> bool:
    """Two ONNX nodes that compute the same function of their data inputs: same operator, same
    attributes (none holding a subgraph), the same initializers at the same input positions."""
    if a.op_type != b.op_type or a.domain != b.domain or len(a.input) != len(b.input):
        return False
    if any(attr.type in (5, 10) for attr in list(a.attribute) + list(b.attribute)):  # GRAPH, GRAPHS
        return False
    attributes = [sorted(attr.SerializeToString() for attr in node.attribute) for node in (a, b)]
    if attributes[0] != attributes[1]:
        return False
    return all(x == y for x, y in zip(a.input, b.input) if x in initializers or y in initializers)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    """The converted modules agree too (type, structure, every tensor), as a check on the conversion."""
    if [type(m) for m in a.modules()] != [type(m) for m in b.modules()]:
        return False
    if [m.extra_repr() for m in a.modules()] != [m.extra_repr() for m in b.modules()]:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def _external_references(proto, external: dict[str, Path]) -> list[tuple[object, Path, int, int]]:
    """Check every external-data reference against the uploaded parts before any byte is read: the
    location is the bare name of an uploaded part, the byte range lies inside it and has the tensor's
    size, and every part is used. Returns (tensor, part, offset, length) for each reference."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    references, used = [], set()
    for tensor in _all_onnx_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL and len(tensor.external_data) == 0:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if (not location or location in (".", "..") or "/" in location or "\\" in location or "\0" in location
                or ":" in location):
            raise ArtifactError("onnx-external-data-path",
                                f"tensor {tensor.name!r} refers to external data at {location!r}; only the bare "
                                "file name of an uploaded external_data part is accepted (no directories)")
        if location not in external:
            raise ArtifactError("onnx-external-data-missing",
                                f"tensor {tensor.name!r} refers to external data file {location!r}, which was not "
                                f"uploaded; send it as a multipart part named external_data with that file name "
                                f"(uploaded: {sorted(external) or 'none'})")
        size = external[location].stat().st_size
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else size - offset
            itemsize = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError("onnx-external-data-range",
                                f"tensor {tensor.name!r}: unreadable external-data offset, length or type") from exc
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        if offset < 0 or length != expected or offset + length > size:
            raise ArtifactError("onnx-external-data-range",
                                f"tensor {tensor.name!r} needs {expected} bytes at offset {offset} of {location!r}, "
                                f"which has {size} bytes (length given: {length}); was the file truncated?")
        references.append((tensor, external[location], offset, length))
        used.add(location)
    # torch's exporter writes an empty .data file when every tensor is small enough to stay inline: that
    # part is harmless; any other part no tensor uses is a mistake worth naming
    unused = sorted(name for name in set(external) - used if external[name].stat().st_size > 0)
    if unused:
        raise ArtifactError("onnx-external-data-unused",
                            f"external_data part(s) {unused} are not referenced by any tensor of the model")
    return references


def _inline_external_data(references) -> None:
    import onnx

    for tensor, part, offset, length in references:
        with open(part, "rb") as handle:
            handle.seek(offset)
            tensor.raw_data = handle.read(length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


MAX_GRAPH_INPUTS = 16
_ONNX_INPUT_DTYPES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "DOUBLE": "float64",
                      "INT64": "int64", "INT32": "int32", "INT16": "int16", "INT8": "int8", "UINT8": "uint8",
                      "BOOL": "bool"}


def _vocab_size(proto, name: str) -> int | None:
    """Integer ids that index an embedding table (a Gather on a weight initializer, axis 0, directly or
    after a Cast) must lie in 0..rows-1: returns the smallest such table's row count, or None."""
    tables = {t.name: list(t.dims) for t in proto.graph.initializer}
    aliases = {name} | {node.output[0] for node in proto.graph.node
                        if node.op_type == "Cast" and node.input and node.input[0] == name and node.output}
    sizes = []
    for node in proto.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in aliases:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        dims = tables.get(node.input[0])
        if axis == 0 and dims and len(dims) >= 2:
            sizes.append(int(dims[0]))
    return min(sizes) if sizes else None


def _graph_input_specs(proto) -> list[dict]:
    """One spec per graph input (name, dtype, shape after the batch axis, vocab_size for ids that index an
    embedding), in the graph's order, which is the order the converted module takes them in."""
    import onnx

    initializers = {t.name for t in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
    if not graph_inputs or len(graph_inputs) > MAX_GRAPH_INPUTS or len(proto.graph.output) != 1:
        raise ArtifactError("onnx-signature", f"the model must have 1..{MAX_GRAPH_INPUTS} inputs (batches of examples) "
                            f"and one output (logits); it has {len(graph_inputs)} inputs and "
                            f"{len(proto.graph.output)} outputs")
    specs = []
    for graph_input in graph_inputs:
        tensor_type = graph_input.type.tensor_type
        dtype = _ONNX_INPUT_DTYPES.get(onnx.TensorProto.DataType.Name(tensor_type.elem_type)
                                       if tensor_type.elem_type in onnx.TensorProto.DataType.values() else "")
        if dtype is None:
            raise ArtifactError("onnx-signature", f"input {graph_input.name!r} must be a float, integer or bool tensor")
        dims = tensor_type.shape.dim
        if len(dims) < 2:
            raise ArtifactError("onnx-signature", f"input {graph_input.name!r} must have a batch axis and at least one "
                                "feature axis")
        shape = []
        for d in dims[1:]:
            if not d.HasField("dim_value") or d.dim_value <= 0:
                raise ArtifactError("onnx-signature", f"every axis of input {graph_input.name!r} after the batch axis "
                                    "must have a fixed size")
            shape.append(int(d.dim_value))
        spec = {"name": graph_input.name, "dtype": dtype, "shape": shape}
        if dtype not in FLOAT_DTYPES:
            vocab = _vocab_size(proto, graph_input.name)
            if vocab is not None:
                spec["vocab_size"] = vocab
        specs.append(spec)
    if len({spec["name"] for spec in specs}) != len(specs) or any(s["name"] == "labels" for s in specs):
        raise ArtifactError("onnx-signature", "graph input names must be distinct and not `labels`")
    return specs


# Inputs of ONNX operators that set the *size* of a tensor (by position). A size computed from the
# values of the data (rather than from the input's shape) lets one crafted example allocate without
# bound, or run a loop for as long as it likes. Operators whose output *count* follows the values
# (NonZero, Unique, NonMaxSuppression, ...) are here too: a Shape of their output would launder it.
SIZE_INPUTS = {
    "ConstantOfShape": (0,), "Range": (0, 1, 2), "Tile": (1,), "Expand": (1,), "Reshape": (1,),
    "Resize": (2, 3), "Upsample": (1,), "Pad": (1,), "Slice": (1, 2, 3, 4), "TopK": (1,), "OneHot": (1,),
    "Loop": (0, 1), "If": (0,), "NonZero": (0,), "Unique": (0,), "Compress": (1,), "Split": (1,),
    "MaxUnpool": (2,), "CenterCropPad": (1,), "Squeeze": (1,), "Unsqueeze": (1,),
    "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
    "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
    # converted by onnx2pytorch 0.6.0, each reading a size from a tensor's values (int(...)):
    "DFT": (1,), "STFT": (1, 3), "Col2Im": (1, 2), "SplitToSequence": (1,), "NonMaxSuppression": (0, 1, 2),
    "AffineGrid": (1,), "HannWindow": (0,), "HammingWindow": (0,), "BlackmanWindow": (0,),
    "MelWeightMatrix": (0, 1), "ImageDecoder": (0,),
}
# operators whose outputs depend only on their inputs' shapes, never on their values
SHAPE_ONLY = {"Shape", "Size"}


def _data_dependent(node, position: int, where: str) -> ArtifactError:
    name = node.name or node.output[0]
    return ArtifactError(
        "data-dependent-shape",
        f"node {name!r} ({node.op_type}){where} takes a tensor size from the values of the input data "
        f"(its input {position}, {node.input[position]!r}): one example could make it allocate "
        "or loop without bound. Export a model whose sizes depend only on the input's shape.")


def _subgraphs(node):
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def _tainted_body(node, body, tainted: set[str], where: str) -> set[str]:
    """Walk the body of a Loop, If, Scan (...) node; returns the names it taints. The body sees the outer
    scope's values (tainted ones stay tainted); its own inputs are tainted where the values fed to them
    are: for Loop, input i of the body receives the node's input i (i >= 1) and then, from the second
    iteration, the body's output i - 1, so the walk repeats until no carried value changes; a Loop
    body whose condition follows the data is refused (it loops for as long as the data says)."""
    own = {t.name for t in body.initializer} | {i.name for i in body.input}
    scope = tainted - own
    name = node.name or node.output[0]
    inner_where = f" in the body of {node.op_type} {name!r}{where}"
    if node.op_type != "Loop":
        fed = any(i in tainted for i in node.input if i)
        return _tainted_walk(body, scope | ({i.name for i in body.input} if fed else set()), inner_where)
    carried = {k for k in range(1, len(body.input)) if k < len(node.input) and node.input[k] in tainted}
    while True:
        inner = _tainted_walk(body, scope | {body.input[k].name for k in carried}, inner_where)
        if body.output and body.output[0].name in inner:
            raise ArtifactError(
                "data-dependent-shape",
                f"the condition of Loop {name!r}{where} follows the values of the input data (body output "
                f"{body.output[0].name!r}): one example could make it loop without bound. Export a model "
                "whose loops depend only on the input's shape.")
        more = {j + 1 for j in range(1, len(body.output)) if j + 1 < len(body.input)
                and body.output[j].name in inner} - carried
        if not more:
            return inner
        carried |= more


def _tainted_walk(graph, tainted: set[str], where: str = "") -> set[str]:
    tainted = set(tainted)
    for node in graph.node:
        for position in SIZE_INPUTS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] in tainted:
                raise _data_dependent(node, position, where)
        reached = any(i in tainted for i in node.input if i)
        for body in _subgraphs(node):
            inner = _tainted_body(node, body, tainted, where)
            reached = reached or any(output.name in inner for output in body.output)
        if node.op_type not in SHAPE_ONLY and reached:
            tainted.update(o for o in node.output if o)
    return tainted


def refuse_data_dependent_sizes(graph) -> None:
    """Raise ArtifactError naming the first node whose output size would follow the input data's values.
    Values flow from the graph inputs through every operator except Shape and Size (a dynamic batch
    size is fine: it comes from the input's shape, not from what it holds), into and out of the bodies
    of Loop, If and Scan (which read the outer scope's values by name)."""
    weights = {init.name for init in graph.initializer}
    _tainted_walk(graph, {i.name for i in graph.input if i.name not in weights})


def load_onnx(path: Path, external: dict[str, Path] | None = None, check_reference: bool = True) -> LoadedModel:
    """An ONNX model, with its external-data files (`external`: bare file name -> stored path) if any.
    check_reference=False skips the comparison with ONNX Runtime (a job converting stored bytes that
    passed it at upload)."""
    import onnx
    from onnx2pytorch import ConvertModel

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ArtifactError("invalid-onnx", f"the file is not a valid ONNX model: {exc}") from exc
    _inline_external_data(_external_references(proto, external or {}))
    # the graph as uploaded, for the reference run (before the rewrites below, which it also checks)
    reference = proto.SerializeToString() if check_reference and proto.ByteSize() <= REFERENCE_CHECK_BYTES else None
    try:
        # The checker serialises the proto, which protobuf caps at 2 GB: a model that only fits with
        # external data is checked by its conversion and smoke test alone.
        if proto.ByteSize() < 2**31 - 2**20:
            onnx.checker.check_model(proto)
    except Exception as exc:
        raise ArtifactError("invalid-onnx", f"the ONNX model failed validation: {exc}") from exc
    specs = _graph_input_specs(proto)
    refuse_data_dependent_sizes(proto.graph)  # before anything runs: a smoke test's inputs would not trip it
    _split_merged_initializers(proto)
    _constant_normalisation_inputs_as_initializers(proto)
    _drop_inference_batchnorm_mode(proto)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = ConvertModel(proto, experimental=True)
    except Exception as exc:
        raise ArtifactError("unsupported-onnx", f"the ONNX model could not be converted to PyTorch modules: {exc}") from exc
    try:
        _dotless_submodule_names(module)
        _learned_initializers_as_parameters(module, proto)
        _shared_weights_tied(module, proto)
        if len(specs) > 1 or specs[0]["dtype"] not in ("float32", "int64"):
            module = GraphInputs(module, specs)
        module.eval()
        num_parameters = _check_parameters(module)
    except ArtifactError:
        raise
    except Exception as exc:  # e.g. a converted module whose weights exist only once it runs (lazy modules)
        raise ArtifactError("unsupported-onnx", f"the ONNX model's converted weights could not be read: {exc}") from exc
    num_outputs = _smoke_test(module, specs)
    _check_against_onnx_runtime(reference, module, specs)
    del reference
    return LoadedModel(module, "onnx", num_parameters, list(specs[0]["shape"]), num_outputs, inputs=specs)


def read_safetensors_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ArtifactError("invalid-safetensors", "the file is too short to be safetensors")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > MAX_SAFETENSORS_HEADER or header_len + 8 > size:
            raise ArtifactError("invalid-safetensors", f"the safetensors header length {header_len} is implausible")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError("invalid-safetensors", f"the safetensors header is not valid JSON: {exc}") from exc
        except RecursionError:  # [[[[...]]]] nested past the parser's stack
            raise ArtifactError("invalid-safetensors", "the safetensors header nests too deeply to be a tensor "
                                "index") from None
    if not isinstance(header, dict):
        raise ArtifactError("invalid-safetensors", "the safetensors header must be a JSON object")
    data_len = size - 8 - header_len
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise ArtifactError("safetensors-dtype",
                                f"tensor {key!r} has dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r}; "
                                f"allowed: {', '.join(SAFETENSORS_DTYPES)}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise ArtifactError("invalid-safetensors", f"tensor {key!r} has an invalid shape or data range")
        item = torch.tensor([], dtype=SAFETENSORS_DTYPES[entry["dtype"]]).element_size()
        if math.prod(shape) * item != offsets[1] - offsets[0]:
            raise ArtifactError("invalid-safetensors", f"tensor {key!r}: shape and byte range disagree")
    return header


def load_safetensors(path: Path, architecture: dict | str | None) -> LoadedModel:
    from safetensors.torch import load_file

    if architecture is None or architecture == "":
        raise ArtifactError("architecture-required",
                            "a .safetensors upload needs an `architecture` form field, e.g. "
                            '{"type": "mlp", "input_size": 64, "hidden_sizes": [32], "num_classes": 10}')
    try:
        spec = architecture_adapter.validate_json(architecture) if isinstance(architecture, (str, bytes)) \
            else architecture_adapter.validate_python(architecture)
    except ValidationError as exc:
        raise ArtifactError("invalid-architecture", f"invalid architecture: {exc.errors(include_url=False)}") from exc
    header = read_safetensors_header(path)
    expected = spec.state_shapes()  # nothing is built until the file is known to hold exactly these tensors
    found = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    if expected.keys() != found.keys():
        missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        raise ArtifactError("weights-mismatch", f"weights do not match the architecture: missing {missing}, unexpected {extra}")
    wrong = {k: (found[k], expected[k]) for k in expected if found[k] != expected[k]}
    if wrong:
        raise ArtifactError("weights-mismatch",
                            "tensor shapes do not match the architecture: "
                            + ", ".join(f"{k} is {a}, expected {b}" for k, (a, b) in wrong.items()))
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ArtifactError("invalid-safetensors", f"could not read the tensors: {exc}") from exc
    module = spec.build()
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    module.eval()
    num_parameters = _check_parameters(module)
    input_shape = list(spec.input_shape)
    num_outputs = _smoke_test(module, single_input_spec(input_shape))
    return LoadedModel(module, "safetensors", num_parameters, input_shape, num_outputs,
                       architecture=spec.model_dump(), inputs=single_input_spec(input_shape))


def load_model(path: Path, fmt: str, architecture: dict | str | None = None,
               external: dict[str, Path] | None = None, check_reference: bool = True) -> LoadedModel:
    if external and fmt != "onnx":
        raise ArtifactError("external-data-not-onnx", "external_data parts belong to an ONNX model only")
    if fmt == "onnx":
        loaded = load_onnx(path, external, check_reference)
    elif fmt == "safetensors":
        loaded = load_safetensors(path, architecture)
    else:
        raise ArtifactError("unsupported-model-format", f"unknown model format {fmt!r}", status=415)
    if loaded.num_outputs == 1:
        # one logit: a binary classifier (sigmoid), audited as the two-class softmax it equals. The
        # record keeps saying 1 output; labels must be 0 and 1 (check_fit).
        loaded.module = SingleLogitAsTwoClasses(loaded.module).eval()
    return loaded


# --------------------------------------------------------------------------------------- datasets

def detect_dataset_format(filename: str, head: bytes) -> str:
    name = (filename or "").lower()
    if name.endswith((".pkl", ".pickle", ".npy", ".pt", ".pth", ".joblib")):
        raise ArtifactError("unsupported-dataset-format",
                            f"{filename!r}: upload an .npz with `inputs` and `labels` arrays, or a .csv with a "
                            "`label` column and numeric feature columns", status=415)
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise ArtifactError("unsupported-dataset-format",
                        f"unsupported dataset file {filename!r}: upload .npz (arrays `inputs`, `labels`), or .csv / "
                        ".parquet (a `label` column and numeric features)", status=415)


@dataclass
class DatasetLimits:
    max_examples: int = 5_000_000
    max_features: int = 10_000_000
    max_classes: int = 100_000
    max_uncompressed_bytes: int = 8 * 1024**3
    # feature columns of a CSV or Parquet table: parsing costs the API time per column and per row
    max_columns: int = 16_384


def _too_many_columns(kind: str, count: int, limits: DatasetLimits) -> ArtifactError:
    return ArtifactError("dataset-too-many-columns",
                         f"the {kind} has {count} feature columns; at most {limits.max_columns} are accepted "
                         "(PBRF_MAX_TABLE_COLUMNS). Store images and other wide examples as .npz: an `inputs` array "
                         "of shape (examples, ...) and a `labels` array")


def _finish_input(name: str, array: np.ndarray, n: int) -> np.ndarray:
    """Integers (and bools) stay integers, as int64: token ids must reach an embedding exactly. Everything
    else numeric becomes float32."""
    label = f"`{name}`"
    if array.dtype.kind not in "fiub":
        raise ArtifactError("dataset-dtype", f"{label} must be numeric, got dtype {array.dtype}")
    if array.ndim < 2:
        raise ArtifactError("dataset-shape", f"{label} must have shape (examples, features...), got {array.shape}")
    if array.shape[0] != n:
        raise ArtifactError("dataset-shape", f"{label} has {array.shape[0]} examples but `labels` has {n}")
    if array.dtype.kind in "iub":
        if array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
            raise ArtifactError("dataset-dtype", f"{label} holds integers beyond the int64 range")
        return np.ascontiguousarray(array.astype(np.int64, copy=False))
    array = array.astype(np.float32, copy=False)
    # checked a block of examples at a time: a mask of the whole array would take a quarter of its size more
    step = max(1, (16 * 1024**2) // max(1, math.prod(array.shape[1:])))
    for start in range(0, n, step):
        block = np.isfinite(array[start : start + step]).reshape(min(step, n - start), -1).all(1)
        if not block.all():
            bad = start + int((~block).argmax())
            raise ArtifactError("dataset-non-finite", f"{label} contains NaN or infinite values (first at example {bad})")
    return np.ascontiguousarray(array)


def _finish_dataset(arrays: dict[str, np.ndarray], labels: np.ndarray, fmt: str,
                    limits: DatasetLimits) -> LoadedDataset:
    """`arrays`: input name -> array with the examples along axis 0 (one named `inputs` for a single-input
    dataset, one per graph input name otherwise)."""
    if labels.ndim != 1:
        raise ArtifactError("dataset-shape", f"`labels` must be one-dimensional, got shape {labels.shape}")
    if labels.dtype.kind == "b":  # True/False: classes 1 and 0
        labels = labels.astype(np.int64)
    elif labels.dtype.kind == "f" and labels.size and bool(np.isfinite(labels).all()) \
            and bool((labels == np.round(labels)).all()) and float(np.abs(labels).max()) < 2**31:
        labels = labels.astype(np.int64)  # 0.0, 1.0, ...: what a pandas column often holds; the values are whole
    if labels.dtype.kind not in "iu":
        raise ArtifactError("labels-not-integers", f"`labels` must be integers 0..C-1 (or whole-valued floats), got "
                            f"dtype {labels.dtype}" + (" with fractional or non-finite values" if labels.dtype.kind == "f"
                                                       else ""))
    n = labels.shape[0]
    if n == 0:
        raise ArtifactError("dataset-empty", "the dataset has no examples")
    if n > limits.max_examples:
        raise ArtifactError("dataset-too-large", f"{n} examples exceed the limit of {limits.max_examples}", status=413)
    if sum(math.prod(a.shape[1:]) for a in arrays.values()) > limits.max_features:
        raise ArtifactError("dataset-too-large", f"each example has more than {limits.max_features} values", status=413)
    arrays = {name: _finish_input(name, array, n) for name, array in arrays.items()}
    if labels.min() < 0:
        raise ArtifactError("labels-out-of-range", f"labels must be in 0..C-1; found {int(labels.min())}")
    num_classes = int(labels.max()) + 1
    if num_classes > limits.max_classes:
        raise ArtifactError("labels-out-of-range", f"label {num_classes - 1} exceeds the limit of {limits.max_classes} classes")
    labels = labels.astype(np.int64, copy=False)
    counts = np.bincount(labels, minlength=num_classes).tolist()
    return LoadedDataset(arrays, labels, fmt, num_classes, counts)


def _npy_bytes_after_loading(path: Path, member: str) -> int:
    """Bytes an .npy member of the archive takes once read and converted (the read array and its
    int64/float32 copy together), from its header alone: nothing is inflated beyond the header."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ArtifactError("invalid-npz", f"`{member}` has an unsupported .npy format version {version}")
            shape, _, dtype = read_header(handle, max_header_size=10_000)
    except ArtifactError:
        raise
    except Exception as exc:  # a forged header: numpy reports it as ValueError/SyntaxError/..., all the file's fault
        raise ArtifactError("invalid-npz", f"`{member}` does not start with a readable .npy header") from exc
    if dtype.hasobject:
        raise ArtifactError("dataset-object-arrays", "object arrays are refused (they need pickle); store numeric arrays")
    count = math.prod(shape)
    return count * (dtype.itemsize + (8 if dtype.kind in "iub" else 4))


def load_npz(path: Path, limits: DatasetLimits) -> LoadedDataset:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArtifactError("invalid-npz", f"the file is not a valid .npz archive: {exc}") from exc
    members = [i.filename for i in infos]
    if "labels.npy" not in members:
        raise ArtifactError("invalid-npz", "the .npz must contain a `labels` array and an `inputs` array (or, for a "
                            "model with several inputs, one array per input name); found "
                            f"{sorted(m.removesuffix('.npy') for m in members)}")
    # `inputs` makes a single-input dataset (other arrays are ignored, as before); without it, every other
    # array is one named input of a multi-input model (input_ids, attention_mask, ...)
    if "inputs.npy" in members:
        input_names = [SINGLE_INPUT]
    else:
        input_names = [m.removesuffix(".npy") for m in members if m.endswith(".npy") and m != "labels.npy"]
        if not input_names:
            raise ArtifactError("invalid-npz", "the .npz holds `labels` but no input arrays: add `inputs` (or one "
                                "array per model input name)")
        if len(input_names) > MAX_GRAPH_INPUTS:
            raise ArtifactError("invalid-npz", f"the .npz holds {len(input_names)} input arrays; at most "
                                f"{MAX_GRAPH_INPUTS} are accepted")
    # The zip directory states each member's uncompressed size: refuse bombs before inflating anything.
    # All members count (numpy also resolves `inputs` to a member named plain "inputs").
    total = sum(i.file_size for i in infos)
    if total > limits.max_uncompressed_bytes:
        raise ArtifactError("dataset-too-large", f"the arrays would take {total} bytes uncompressed; the limit is "
                            f"{limits.max_uncompressed_bytes}", status=413)
    # ... and in the dtype they get here (int8 ids become int64: 8x), while both copies exist
    # (numpy reads a member named plain `inputs` in preference to `inputs.npy`: price the one it reads)
    converted = sum(_npy_bytes_after_loading(path, name if name in members else name + ".npy")
                    for name in (*input_names, "labels"))
    if converted > limits.max_uncompressed_bytes:
        raise ArtifactError("dataset-too-large", f"the arrays would take {converted} bytes in memory once loaded and "
                            f"converted (integers to int64, other numbers to float32); the limit is "
                            f"{limits.max_uncompressed_bytes}", status=413)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays, labels = {name: npz[name] for name in input_names}, npz["labels"]
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise ArtifactError("dataset-object-arrays", "object arrays are refused (they need pickle); store numeric arrays") from exc
        raise ArtifactError("invalid-npz", f"could not read the arrays: {exc}") from exc
    except MemoryError as exc:
        raise ArtifactError("dataset-too-large", "the arrays do not fit in memory", status=413) from exc
    except (OSError, zipfile.BadZipFile, EOFError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise ArtifactError("invalid-npz", f"could not read the arrays: {type(exc).__name__}: {exc}") from exc
    if not all(isinstance(a, np.ndarray) for a in (*arrays.values(), labels)):
        raise ArtifactError("invalid-npz", "every input and `labels` must be an .npy array inside the archive")
    return _finish_dataset(arrays, labels, "npz", limits)


def load_csv(path: Path, limits: DatasetLimits) -> LoadedDataset:
    """A header row with a `label` column of integers and numeric feature columns. The header is read
    with the csv module; the body is parsed by pyarrow in blocks straight into float32 columns (a
    Python list of floats would take about 16x the file's size in the API process)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        with open(path, "rb") as f:
            raw_line = f.readline(1 << 20)
            if len(raw_line) == 1 << 20 and not raw_line.endswith(b"\n"):
                raise ArtifactError("dataset-shape", "the CSV header row is longer than 1 MiB; store wide data as "
                                    ".npz or .parquet")
            first_line = raw_line.decode("utf-8").lstrip("\ufeff")  # a BOM is not part of the name
        header = next(csv.reader([first_line]), None)
    except UnicodeDecodeError as exc:
        raise ArtifactError("invalid-csv", f"the CSV header is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise ArtifactError("invalid-csv", f"the CSV header could not be parsed: {exc}") from exc
    header = [name.strip() for name in header or []]
    if len(header) - ("label" in header) > limits.max_columns:  # checked before any row is parsed
        raise _too_many_columns("CSV", len(header) - ("label" in header), limits)
    if "label" not in header:
        raise ArtifactError("csv-no-label", "the CSV needs a header row with a `label` column")
    if len(header) - 1 > limits.max_features or len(header) < 2:
        raise ArtifactError("dataset-shape", "the CSV needs a `label` column and 1.."
                            f"{limits.max_features} numeric feature columns")
    if len(set(header)) != len(header):
        raise ArtifactError("dataset-shape", "the CSV has duplicate column names")
    features = [name for name in header if name != "label"]
    types = {name: pa.float32() for name in features} | {"label": pa.int64()}
    blocks_x, blocks_y, rows = [], [], 0
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(column_names=header, skip_rows=1),
                                convert_options=pacsv.ConvertOptions(column_types=types))
        for batch in reader:
            rows += batch.num_rows
            if rows > limits.max_examples:
                raise ArtifactError("dataset-too-large", f"more than {limits.max_examples} rows", status=413)
            if any(column.null_count for column in batch.columns):
                raise ArtifactError("dataset-non-finite", "the CSV has empty or NaN values")
            blocks_x.append(np.column_stack([batch.column(name).to_numpy() for name in features]))
            blocks_y.append(batch.column("label").to_numpy())
    except pa.ArrowInvalid as exc:
        message = str(exc)
        if "column #" in message and "conversion error" in message:
            column = header[int(message.split("column #", 1)[1].split(":", 1)[0])]
            value = message.rsplit("invalid value", 1)[-1].strip()
            if "\ufffd" in value:  # pyarrow shows undecodable bytes as replacement characters
                raise ArtifactError("invalid-csv", f"column {column!r} holds bytes that are not UTF-8 text") from None
            if column == "label":
                raise ArtifactError("labels-not-integers", f"label {value} is not an integer (or out of range)") from None
            raise ArtifactError("dataset-dtype", f"column {column!r}: value {value} is not a number") from None
        if "Expected" in message and "columns" in message:
            raise ArtifactError("csv-ragged", f"a row does not have the header's {len(header)} fields ({message})") from None
        raise ArtifactError("invalid-csv", f"the CSV could not be parsed: {message}") from None
    except (pa.ArrowException, OSError) as exc:
        raise ArtifactError("invalid-csv", f"the CSV could not be parsed: {exc}") from exc
    if not rows:
        raise ArtifactError("dataset-empty", "the CSV has no data rows")
    return _finish_dataset({SINGLE_INPUT: np.concatenate(blocks_x)}, np.concatenate(blocks_y), "csv", limits)


PARQUET_GROUP_BYTES = 64 * 1024**2  # columns are read in groups whose copies in flight take about this much


def _arrow_width(kind) -> int:
    """Bytes per value of a numeric (or boolean) Arrow column, rounded up to a byte."""
    return max(1, kind.bit_width // 8)


def load_parquet(path: Path, limits: DatasetLimits) -> LoadedDataset:
    """A `label` column of integers and numeric feature columns, read with pyarrow (no pickle, no
    pandas metadata execution); the schema and row count are checked before any column is read.

    The columns are read a group at a time into one array preallocated in its final dtype (int64, or
    float32 when any column is a float), so the peak is that array plus one group's copies in flight,
    and that peak is priced, from the metadata, before anything is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ArtifactError("invalid-parquet", f"the file is not valid Parquet: {exc}") from exc
    schema = meta.schema_arrow
    if len(set(schema.names)) != len(schema.names):
        raise ArtifactError("dataset-shape", "the Parquet file has duplicate column names")
    if "label" not in schema.names:
        raise ArtifactError("csv-no-label", "the Parquet file needs a `label` column")
    rows = meta.metadata.num_rows
    if rows > limits.max_examples:
        raise ArtifactError("dataset-too-large", f"{rows} rows exceed the limit of {limits.max_examples}", status=413)
    features = [n for n in schema.names if n != "label"]
    if len(features) > limits.max_columns:
        raise _too_many_columns("Parquet file", len(features), limits)
    if not features or len(features) > limits.max_features:
        raise ArtifactError("dataset-shape", "the Parquet file needs a `label` column and 1.."
                            f"{limits.max_features} numeric feature columns")
    for name in features:
        kind = schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise ArtifactError("dataset-dtype", f"column {name!r} has type {kind}; features must be numeric")
    label_type = schema.field("label").type
    if not (pa.types.is_integer(label_type) or pa.types.is_floating(label_type) or pa.types.is_boolean(label_type)):
        raise ArtifactError("labels-not-integers", f"`label` has type {label_type}; it must be integers (or "
                            "whole-valued floats)")  # whole-valued floats and booleans: checked in _finish_dataset
    # all-integer feature columns (token ids, counts) stay integers; any float column makes them floats
    integer = all(pa.types.is_integer(schema.field(n).type) or pa.types.is_boolean(schema.field(n).type)
                  for n in features)
    dtype = np.dtype(np.int64 if integer else np.float32)  # what _finish_input keeps: no further copy

    # Parquet compresses well: bound what reading it allocates before reading it. Reading a column holds its
    # decoded pages (the column chunks' uncompressed size), its Arrow array and its NumPy copy.
    if meta.metadata.num_columns != len(schema.names):
        raise ArtifactError("dataset-shape", "the Parquet file must be a flat table of numeric columns")
    chunks = [0] * meta.metadata.num_columns
    for i in range(meta.metadata.num_row_groups):
        group = meta.metadata.row_group(i)
        for j in range(group.num_columns):
            chunks[j] += group.column(j).total_uncompressed_size
    in_flight = {name: chunks[j] + 2 * rows * _arrow_width(schema.field(name).type)
                 for j, name in enumerate(schema.names)}
    groups, current, size = [], [], 0
    for name in features:
        if current and size + in_flight[name] > PARQUET_GROUP_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += in_flight[name]
    groups.append(current)
    output = rows * len(features) * dtype.itemsize
    labels_bytes = in_flight["label"] + rows * 8  # the label column, and its int64 copy
    peak = output + labels_bytes + max(sum(in_flight[name] for name in group) for group in groups)
    if peak > limits.max_uncompressed_bytes:
        raise ArtifactError("dataset-too-large",
                            f"reading the table would take about {peak} bytes in memory ({rows} rows x "
                            f"{len(features)} feature columns as {dtype.name}: {output} bytes, plus the labels and the "
                            f"columns being converted); the limit is {limits.max_uncompressed_bytes} bytes "
                            "(PBRF_MAX_DATASET_BYTES)", status=413)

    def read(names: list[str]):
        try:
            table = meta.read(columns=names, use_threads=False)
        except (pa.ArrowException, OSError) as exc:
            raise ArtifactError("invalid-parquet", f"could not read the Parquet data: {exc}") from exc
        if table.num_rows != rows:
            raise ArtifactError("invalid-parquet", f"the Parquet file declares {rows} rows but holds {table.num_rows}")
        if any(table.column(n).null_count for n in names):
            raise ArtifactError("dataset-non-finite", "the Parquet file has missing values")
        return table

    labels = read(["label"]).column("label").to_numpy()
    inputs = np.empty((rows, len(features)), dtype)
    column = 0
    for group in groups:
        table = read(group)
        for name in group:
            inputs[:, column] = table.column(name).to_numpy()
            column += 1
        del table
    return _finish_dataset({SINGLE_INPUT: inputs}, labels, "parquet", limits)


def load_dataset(path: Path, fmt: str, limits: DatasetLimits | None = None) -> LoadedDataset:
    limits = limits or DatasetLimits()
    if fmt == "parquet":
        return load_parquet(path, limits)
    if fmt == "npz":
        return load_npz(path, limits)
    if fmt == "csv":
        return load_csv(path, limits)
    raise ArtifactError("unsupported-dataset-format", f"unknown dataset format {fmt!r}", status=415)


def match_inputs(model_inputs: list[dict], dataset_inputs: list[dict]) -> list[str]:
    """Check a dataset's input arrays against a model's graph inputs (specs as stored on both records) and
    return the dataset array to feed to each model input, in the model's order. A single input matches a
    single input whatever the names; several are matched by name. Raises ArtifactError naming the mismatch."""
    if len(model_inputs) == 1 and len(dataset_inputs) == 1:
        pairs = [(model_inputs[0], dataset_inputs[0])]
    else:
        model_names, data_names = [m["name"] for m in model_inputs], [d["name"] for d in dataset_inputs]
        missing = [name for name in model_names if name not in data_names]
        extra = [name for name in data_names if name not in model_names]
        if missing or extra:
            raise ArtifactError("dataset-inputs-mismatch",
                                f"the model takes {len(model_names)} input(s) {model_names} but the dataset holds "
                                f"{data_names}: upload an .npz with one array per model input name plus `labels` "
                                f"(missing: {missing}, unexpected: {extra})")
        by_name = {d["name"]: d for d in dataset_inputs}
        pairs = [(m, by_name[m["name"]]) for m in model_inputs]
    for model_input, data in pairs:
        what = f"the model's input {model_input['name']!r}"
        if list(model_input["shape"]) != list(data["shape"]):
            raise ArtifactError("model-dataset-mismatch",
                                f"{what} takes examples of shape {model_input['shape']} but the dataset's "
                                f"`{data['name']}` has examples of shape {data['shape']}")
        model_float, data_float = model_input["dtype"] in FLOAT_DTYPES, data["dtype"] in FLOAT_DTYPES
        if model_float and not data_float:
            raise ArtifactError("input-dtype-mismatch",
                                f"{what} is {model_input['dtype']} but the dataset's `{data['name']}` holds integers "
                                f"({data['dtype']}): store the values the model was trained on, as floats (for images "
                                "usually x.astype('float32') / 255 with the training normalisation)")
        if data_float and not model_float:
            raise ArtifactError("input-dtype-mismatch",
                                f"{what} takes integers ({model_input['dtype']}, e.g. token ids) but the dataset's "
                                f"`{data['name']}` holds floats ({data['dtype']}): store it as an integer array "
                                "(np.int64)")
        if not model_float and "range" in data:
            low, high = data["range"]
            bounds = {"bool": (0, 1), "uint8": (0, 255), "int8": (-128, 127), "int16": (-2**15, 2**15 - 1),
                      "int32": (-2**31, 2**31 - 1)}.get(model_input["dtype"], (-2**63, 2**63 - 1))
            if model_input.get("vocab_size") is not None:
                bounds = (0, model_input["vocab_size"] - 1)
            if low < bounds[0] or high > bounds[1]:
                reason = (f"indexes an embedding table of {model_input['vocab_size']} rows"
                          if model_input.get("vocab_size") is not None else f"is {model_input['dtype']}")
                raise ArtifactError("input-out-of-range",
                                    f"{what} {reason}, so its values must lie in {bounds[0]}..{bounds[1]}, but the "
                                    f"dataset's `{data['name']}` holds values {low}..{high}")
    return [data["name"] for _, data in pairs]


def pack_inputs(dataset: LoadedDataset, model_inputs: list[dict]) -> np.ndarray:
    """The dataset's inputs as the one array the model's module takes (see GraphInputs): a single input as
    it is; several flattened side by side in the model's order, in packed_dtype."""
    names = match_inputs(model_inputs, dataset.input_specs)
    if len(names) == 1:
        return dataset.arrays[names[0]]
    dtype = np.dtype(packed_dtype(model_inputs))
    if dtype == np.float64 and any(abs(bound) > 2**53 for spec in dataset.input_specs for bound in spec.get("range", ())):
        raise ArtifactError("input-out-of-range", "integer inputs beside float inputs must stay below 2**53 in size")
    n = dataset.num_examples
    return np.concatenate([dataset.arrays[name].reshape(n, -1).astype(dtype, copy=False) for name in names], axis=1)


def check_fit(model: LoadedModel, dataset: LoadedDataset) -> None:
    """The model's inputs and output size must fit the dataset (checked when an audit is created)."""
    match_inputs(model.inputs, dataset.input_specs)
    check_classes(model.num_outputs, dataset.num_classes)


def check_classes(num_outputs: int, num_classes: int, what: str = "dataset") -> None:
    """The model's outputs must cover the labels: one per class, or one logit for labels 0 and 1."""
    if num_outputs == 1 and num_classes > 2:
        raise ArtifactError("model-dataset-mismatch",
                            f"the model has one output, which is read as a binary classifier (the sigmoid of "
                            f"its logit, labels 0 and 1), but the {what} has labels up to {num_classes - 1}")
    if 1 < num_outputs < num_classes:
        raise ArtifactError("model-dataset-mismatch",
                            f"the {what} has labels up to {num_classes - 1} but the model has only "
                            f"{num_outputs} outputs")


# ------------------------------------------------------------------------------- reading some rows

def _finish_rows(array: np.ndarray) -> np.ndarray:
    """Rows in the dtype the audits see them in (as _finish_input converts: integers and bools to int64,
    other numbers to float32)."""
    return array.astype(np.int64 if array.dtype.kind in "iub" else np.float32, copy=False)


def _npy_rows(archive: zipfile.ZipFile, member: str, indices: list[int]) -> np.ndarray | None:
    """Rows `indices` (ascending, distinct) of one C-ordered .npy member, read by seeking within the member:
    a stored member seeks directly, a compressed one is inflated forward once in a small buffer, never as a
    whole array. None for a Fortran-ordered array (its rows are not contiguous)."""
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            return None
        shape, fortran, dtype = read_header(handle, max_header_size=10_000)
        if dtype.hasobject or (fortran and len(shape) > 1) or not shape:
            return None
        row_shape = tuple(shape[1:])
        row_bytes = math.prod(row_shape) * dtype.itemsize
        start = handle.tell()
        rows = []
        for index in indices:
            handle.seek(start + index * row_bytes)
            data = handle.read(row_bytes)
            if len(data) != row_bytes:
                raise ArtifactError("invalid-npz", f"`{member}` ends before example {index}")
            rows.append(np.frombuffer(data, dtype=dtype).reshape(row_shape))
    return _finish_rows(np.stack(rows) if rows else np.empty((0, *row_shape), dtype))


def read_rows(path: Path, fmt: str, input_names: list[str], indices: list[int],
              limits: DatasetLimits | None = None,
              whole=contextlib.nullcontext) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Examples `indices` (ascending, distinct, in range) of an accepted dataset: ({input name: rows}, labels),
    in the dtypes the audits see. An .npz is read row by row without loading its arrays; CSV and Parquet
    (whose rows have no fixed offsets) and Fortran-ordered arrays are loaded whole by load_dataset, inside
    the context `whole()` (the API's parsing slot)."""
    if fmt == "npz":
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())

            def member(name: str) -> str:  # numpy reads a member named plain `inputs` before `inputs.npy`
                return name if name in members else name + ".npy"

            arrays = {name: _npy_rows(archive, member(name), indices) for name in input_names}
            labels = _npy_rows(archive, member("labels"), indices)
        if labels is not None and all(rows is not None for rows in arrays.values()):
            return arrays, labels
    with whole():
        loaded = load_dataset(path, fmt, limits)
        return {name: loaded.arrays[name][indices] for name in input_names}, loaded.labels[indices]
