"""Regenerates the hostile upload corpus in this folder (the files are committed; run this only to
change them): python tests/corpus/make_corpus.py. manifest.json says what the server must answer."""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch

HERE = Path(__file__).resolve().parent
MARKER = "/tmp/pbrf-corpus-pwned"


class RunsCode:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {MARKER}",))


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def onnx_mlp() -> bytes:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    path = HERE / "_tmp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 4),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    data = path.read_bytes()
    path.unlink()
    return data


def data_dependent_range() -> bytes:
    """The red team's time bomb: sizes computed from the input's values (ReduceMax of the input ->
    Relu(x - 100) * 2.5e9 -> Range), multiplied by 0 and added to the logits. Zeros and random normals
    (what a smoke test feeds) make it harmless; one input value over 100 makes it allocate gigabytes."""
    from onnx import TensorProto, helper, numpy_helper

    constants = [numpy_helper.from_array(np.ones((4, 3), np.float32), "W"),
                 numpy_helper.from_array(np.array(100.0, np.float32), "threshold"),
                 numpy_helper.from_array(np.array(2.5e9, np.float32), "scale"),
                 numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"]),
             helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
             helper.make_node("Sub", ["peak", "threshold"], ["over"]),
             helper.make_node("Relu", ["over"], ["excess"]),
             helper.make_node("Mul", ["excess", "scale"], ["limit"]),
             helper.make_node("Range", ["zero", "limit", "scale"], ["values"], name="bomb"),
             helper.make_node("ReduceSum", ["values"], ["total"], keepdims=0),
             helper.make_node("Mul", ["total", "zero"], ["nothing"]),
             helper.make_node("Add", ["logits", "nothing"], ["y"])]
    graph = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main() -> None:
    manifest = []

    def add(name, kind, content, status, slug, note):
        (HERE / name).write_bytes(content)
        manifest.append({"file": name, "kind": kind, "status": status, "slug": slug, "note": note})

    add("pickle-rce.pt", "model", pickle.dumps(RunsCode()), 415, "pickle-model-refused",
        "a pickle whose loading would run a shell command")
    add("torchscript-like.pt2", "model", b"PK\x03\x04" + b"\0" * 64, 415, "pickle-model-refused",
        "a zip archive named like torch.export output")
    add("pickle-rce.pkl", "dataset", pickle.dumps(RunsCode()), 415, "unsupported-dataset-format",
        "a pickled dataset that would run a shell command")
    good = onnx_mlp()
    add("truncated.onnx", "model", good[: len(good) // 2], 422, "invalid-onnx", "an ONNX file cut in half")
    proto = onnx.load_from_string(good)
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "/etc/passwd"), ("offset", "0"), ("length", "48")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    add("external-data-passwd.onnx", "model", proto.SerializeToString(), 422, "onnx-external-data-path",
        "an initializer whose bytes live in /etc/passwd")
    add("huge-header.safetensors", "model", struct.pack("<Q", 2**62) + b"{}", 422, "invalid-safetensors",
        "a safetensors header claiming 4 EiB")
    add("not-json-header.safetensors", "model", struct.pack("<Q", 4) + b"\xff\xfe\x00{", 422, "invalid-safetensors",
        "a safetensors header that is not JSON")
    bomb = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float32)) | {"shape": (80 * 1024**2, 1)}
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("inputs.npy", "w", force_zip64=True) as f:
            f.write(b"\x93NUMPY\x01\x00\x76\x00" + repr(header).encode().ljust(117) + b"\n")
            for _ in range(5):
                f.write(b"\0" * (64 * 1024**2))
        archive.writestr("labels.npy", npz(labels=np.zeros(1, np.int64)))
    add("zip-bomb.npz", "dataset", bomb.getvalue(), 413, "dataset-too-large",
        "320 MB of zeros declared in a ~300 KB .npz (the test services allow 256 MB)")
    widening = io.BytesIO()
    with zipfile.ZipFile(widening, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("inputs.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|i1", "fortran_order": False, "shape": (1024, 200_000)})
            for _ in range(1024):
                f.write(b"\0" * 200_000)
        with archive.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(1024, np.int64))
    add("data-dependent-range.onnx", "model", data_dependent_range(), 422, "data-dependent-shape",
        "a Range whose length is computed from the input's values (harmless on zeros, gigabytes on a value over 100)")
    add("int8-widening.npz", "dataset", widening.getvalue(), 413, "dataset-too-large",
        "205 MB of int8 ids in a ~200 KB .npz, under the raw-size guard; as int64 they would take 1.6 GB")
    add("labels-only.npz", "dataset", npz(labels=np.zeros(3, np.int64)), 422, "invalid-npz",
        "labels and no input array")
    add("ragged-named-inputs.npz", "dataset", npz(input_ids=np.zeros((4, 5), np.int64),
                                                  attention_mask=np.ones((3, 5), np.int64),
                                                  labels=np.zeros(4, np.int64)), 422, "dataset-shape",
        "two named inputs of a multi-input model that disagree on the number of examples")
    add("object-array.npz", "dataset", npz(inputs=np.array([{"x": 1}, None], dtype=object), labels=np.array([0, 1])),
        422, "dataset-object-arrays", "object arrays, which only pickle can load")
    add("truncated.npz", "dataset", npz(inputs=np.zeros((50, 4), np.float32), labels=np.zeros(50, np.int64))[:300],
        422, "invalid-npz", "an .npz cut short")
    add("nan.npz", "dataset", npz(inputs=np.array([[0.0, np.inf]], np.float32), labels=np.array([0])), 422,
        "dataset-non-finite", "an infinite feature value")
    add("ragged.csv", "dataset", b"a,b,label\n1,2,0\n3\n", 422, "csv-ragged", "a CSV row with missing fields")
    add("binary.csv", "dataset", b"a,label\n\xff\xfe,1\n", 422, "invalid-csv", "a CSV that is not UTF-8")
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(manifest)} files to {HERE}")


if __name__ == "__main__":
    sys.exit(main())
