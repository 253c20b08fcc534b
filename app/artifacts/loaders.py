"""Validation and loading of untrusted model and dataset files. No FastAPI, no database.

Nothing here unpickles: ONNX is parsed as protobuf and converted to torch.nn modules (onnx2pytorch),
safetensors headers are read and checked before any tensor, `.npz` goes through
np.load(allow_pickle=False) after its zip directory is checked, CSV is parsed as text.
Every rejection is an ArtifactError with a stable slug that the API turns into a 4xx problem.
"""

from __future__ import annotations

import csv
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


@dataclass
class LoadedModel:
    module: nn.Module
    format: str
    num_parameters: int
    input_shape: list[int]
    num_outputs: int
    architecture: dict | None = None


@dataclass
class LoadedDataset:
    inputs: np.ndarray  # float32 (N, *input_shape)
    labels: np.ndarray  # int64 (N,)
    format: str
    num_classes: int
    label_counts: list[int] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def input_shape(self) -> list[int]:
        return [int(d) for d in self.inputs.shape[1:]]


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


def _smoke_test(module: nn.Module, input_shape: list[int]) -> int:
    """Run the model on small batches of two sizes; returns the output size."""
    sizes = []
    with torch.no_grad():
        for batch in (2, 3):
            try:
                out = module(torch.zeros(batch, *input_shape))
            except Exception as exc:
                raise ArtifactError(
                    "model-smoke-test-failed",
                    f"the model failed a forward pass on a batch of {batch} inputs of shape {input_shape}: {exc}. "
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
        probe = module(torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0)))
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

    scale_nodes = set()  # ids of Mul nodes that scale a normalised tensor
    for node in proto.graph.node:
        positions = _LEARNED_INPUTS.get(node.op_type, ())
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
                    if div is not None and len(div.input) == 2 and made_by(div.input[1], "Sqrt") is not None:
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


def load_onnx(path: Path, external: dict[str, Path] | None = None) -> LoadedModel:
    """An ONNX model, with its external-data files (`external`: bare file name -> stored path) if any."""
    import onnx
    from onnx2pytorch import ConvertModel

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ArtifactError("invalid-onnx", f"the file is not a valid ONNX model: {exc}") from exc
    _inline_external_data(_external_references(proto, external or {}))
    try:
        # The checker serialises the proto, which protobuf caps at 2 GB: a model that only fits with
        # external data is checked by its conversion and smoke test alone.
        if proto.ByteSize() < 2**31 - 2**20:
            onnx.checker.check_model(proto)
    except Exception as exc:
        raise ArtifactError("invalid-onnx", f"the ONNX model failed validation: {exc}") from exc
    initializers = {t.name for t in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(graph_inputs) != 1 or len(proto.graph.output) != 1:
        raise ArtifactError("onnx-signature", "the model must have exactly one input (a batch of examples) and one output")
    dims = graph_inputs[0].type.tensor_type.shape.dim
    if len(dims) < 2:
        raise ArtifactError("onnx-signature", "the model input must have a batch axis and at least one feature axis")
    input_shape = []
    for d in dims[1:]:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            raise ArtifactError("onnx-signature", "every input axis after the batch axis must have a fixed size")
        input_shape.append(int(d.dim_value))
    _drop_inference_batchnorm_mode(proto)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = ConvertModel(proto, experimental=True)
    except Exception as exc:
        raise ArtifactError("unsupported-onnx", f"the ONNX model could not be converted to PyTorch modules: {exc}") from exc
    _dotless_submodule_names(module)
    _learned_initializers_as_parameters(module, proto)
    module.eval()
    num_parameters = _check_parameters(module)
    num_outputs = _smoke_test(module, input_shape)
    return LoadedModel(module, "onnx", num_parameters, input_shape, num_outputs)


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
    module = spec.build()
    expected = {k: list(v.shape) for k, v in module.state_dict().items()}
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
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    module.eval()
    num_parameters = _check_parameters(module)
    input_shape = list(spec.input_shape)
    num_outputs = _smoke_test(module, input_shape)
    return LoadedModel(module, "safetensors", num_parameters, input_shape, num_outputs,
                       architecture=spec.model_dump())


def load_model(path: Path, fmt: str, architecture: dict | str | None = None,
               external: dict[str, Path] | None = None) -> LoadedModel:
    if external and fmt != "onnx":
        raise ArtifactError("external-data-not-onnx", "external_data parts belong to an ONNX model only")
    if fmt == "onnx":
        return load_onnx(path, external)
    if fmt == "safetensors":
        return load_safetensors(path, architecture)
    raise ArtifactError("unsupported-model-format", f"unknown model format {fmt!r}", status=415)


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


def _finish_dataset(inputs: np.ndarray, labels: np.ndarray, fmt: str, limits: DatasetLimits) -> LoadedDataset:
    if inputs.dtype.kind not in "fiub":
        raise ArtifactError("dataset-dtype", f"`inputs` must be numeric, got dtype {inputs.dtype}")
    if inputs.ndim < 2:
        raise ArtifactError("dataset-shape", f"`inputs` must have shape (examples, features...), got {inputs.shape}")
    if labels.ndim != 1:
        raise ArtifactError("dataset-shape", f"`labels` must be one-dimensional, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ArtifactError("labels-not-integers", f"`labels` must be integers 0..C-1, got dtype {labels.dtype}")
    n = inputs.shape[0]
    if labels.shape[0] != n:
        raise ArtifactError("dataset-shape", f"`inputs` has {n} examples but `labels` has {labels.shape[0]}")
    if n == 0:
        raise ArtifactError("dataset-empty", "the dataset has no examples")
    if n > limits.max_examples:
        raise ArtifactError("dataset-too-large", f"{n} examples exceed the limit of {limits.max_examples}", status=413)
    if math.prod(inputs.shape[1:]) > limits.max_features:
        raise ArtifactError("dataset-too-large", f"each example has more than {limits.max_features} values", status=413)
    inputs = inputs.astype(np.float32, copy=False)
    if not np.isfinite(inputs).all():
        bad = int((~np.isfinite(inputs)).reshape(n, -1).any(1).argmax())
        raise ArtifactError("dataset-non-finite", f"`inputs` contains NaN or infinite values (first at example {bad})")
    if labels.min() < 0:
        raise ArtifactError("labels-out-of-range", f"labels must be in 0..C-1; found {int(labels.min())}")
    num_classes = int(labels.max()) + 1
    if num_classes > limits.max_classes:
        raise ArtifactError("labels-out-of-range", f"label {num_classes - 1} exceeds the limit of {limits.max_classes} classes")
    labels = labels.astype(np.int64, copy=False)
    counts = np.bincount(labels, minlength=num_classes).tolist()
    return LoadedDataset(np.ascontiguousarray(inputs), labels, fmt, num_classes, counts)


def load_npz(path: Path, limits: DatasetLimits) -> LoadedDataset:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArtifactError("invalid-npz", f"the file is not a valid .npz archive: {exc}") from exc
    names = {i.filename for i in infos}
    for required in ("inputs.npy", "labels.npy"):
        if required not in names:
            raise ArtifactError("invalid-npz", f"the .npz must contain arrays `inputs` and `labels`; found {sorted(n.removesuffix('.npy') for n in names)}")
    # The zip directory states each member's uncompressed size: refuse bombs before inflating anything.
    # All members count (numpy also resolves `inputs` to a member named plain "inputs").
    total = sum(i.file_size for i in infos)
    if total > limits.max_uncompressed_bytes:
        raise ArtifactError("dataset-too-large", f"the arrays would take {total} bytes uncompressed; the limit is "
                            f"{limits.max_uncompressed_bytes}", status=413)
    try:
        with np.load(path, allow_pickle=False) as npz:
            inputs, labels = npz["inputs"], npz["labels"]
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise ArtifactError("dataset-object-arrays", "object arrays are refused (they need pickle); store numeric arrays") from exc
        raise ArtifactError("invalid-npz", f"could not read the arrays: {exc}") from exc
    except MemoryError as exc:
        raise ArtifactError("dataset-too-large", "the arrays do not fit in memory", status=413) from exc
    except (OSError, zipfile.BadZipFile, EOFError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise ArtifactError("invalid-npz", f"could not read the arrays: {type(exc).__name__}: {exc}") from exc
    if not isinstance(inputs, np.ndarray) or not isinstance(labels, np.ndarray):
        raise ArtifactError("invalid-npz", "`inputs` and `labels` must be .npy arrays inside the archive")
    return _finish_dataset(inputs, labels, "npz", limits)


def load_csv(path: Path, limits: DatasetLimits) -> LoadedDataset:
    """A header row with a `label` column of integers and numeric feature columns. The header is read
    with the csv module; the body is parsed by pyarrow in blocks straight into float32 columns (a
    Python list of floats would take about 16x the file's size in the API process)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        with open(path, "rb") as f:
            first_line = f.readline(1 << 20).decode("utf-8").lstrip("\ufeff")  # a BOM is not part of the name
        header = next(csv.reader([first_line]), None)
    except UnicodeDecodeError as exc:
        raise ArtifactError("invalid-csv", f"the CSV header is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise ArtifactError("invalid-csv", f"the CSV header could not be parsed: {exc}") from exc
    header = [name.strip() for name in header or []]
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
    return _finish_dataset(np.concatenate(blocks_x), np.concatenate(blocks_y), "csv", limits)


def load_parquet(path: Path, limits: DatasetLimits) -> LoadedDataset:
    """A `label` column of integers and numeric feature columns, read with pyarrow (no pickle, no
    pandas metadata execution); the schema and row count are checked before any column is read."""
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
    # Parquet compresses well: bound what reading it would allocate before reading it.
    uncompressed = sum(meta.metadata.row_group(i).total_byte_size for i in range(meta.metadata.num_row_groups))
    if max(uncompressed, rows * len(schema.names) * 8) > limits.max_uncompressed_bytes:
        raise ArtifactError("dataset-too-large", f"the table would take more than {limits.max_uncompressed_bytes} bytes "
                            "in memory", status=413)
    if not features or len(features) > limits.max_features:
        raise ArtifactError("dataset-shape", "the Parquet file needs a `label` column and 1.."
                            f"{limits.max_features} numeric feature columns")
    for name in features:
        kind = schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise ArtifactError("dataset-dtype", f"column {name!r} has type {kind}; features must be numeric")
    if not pa.types.is_integer(schema.field("label").type):
        raise ArtifactError("labels-not-integers", f"`label` has type {schema.field('label').type}; it must be integers")
    try:
        table = meta.read()
    except (pa.ArrowException, OSError) as exc:
        raise ArtifactError("invalid-parquet", f"could not read the Parquet data: {exc}") from exc
    if any(table.column(n).null_count for n in table.column_names):
        raise ArtifactError("dataset-non-finite", "the Parquet file has missing values")
    inputs = np.column_stack([table.column(n).to_numpy().astype(np.float64) for n in features])
    labels = table.column("label").to_numpy()
    return _finish_dataset(inputs, labels, "parquet", limits)


def load_dataset(path: Path, fmt: str, limits: DatasetLimits | None = None) -> LoadedDataset:
    limits = limits or DatasetLimits()
    if fmt == "parquet":
        return load_parquet(path, limits)
    if fmt == "npz":
        return load_npz(path, limits)
    if fmt == "csv":
        return load_csv(path, limits)
    raise ArtifactError("unsupported-dataset-format", f"unknown dataset format {fmt!r}", status=415)


def check_fit(model: LoadedModel, dataset: LoadedDataset) -> None:
    """The model's input shape and output size must fit the dataset (checked when an audit is created)."""
    if list(model.input_shape) != list(dataset.input_shape):
        raise ArtifactError("model-dataset-mismatch",
                            f"the model takes inputs of shape {model.input_shape} but the dataset's examples have shape "
                            f"{dataset.input_shape}")
    if model.num_outputs < dataset.num_classes:
        raise ArtifactError("model-dataset-mismatch",
                            f"the dataset has labels up to {dataset.num_classes - 1} but the model has only "
                            f"{model.num_outputs} outputs")
