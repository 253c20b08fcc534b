"""Model conversion and validation of uploads, at the loader level (no server)."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from app.artifacts.loaders import ArtifactError, load_onnx, load_safetensors
from app.influence import AuditConfig, run_audit
from tests.helpers import export_onnx
from tests.zoo import TextClassifier


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript-exporter"])
@pytest.mark.parametrize("build,shape", [(mlp, (8,)), (cnn, (1, 8, 8))], ids=["mlp", "cnn"])
def test_onnx_converts_to_real_modules_with_identical_outputs(tmp_path, build, shape, dynamo):
    model = build()
    path = export_onnx(model, torch.randn(2, *shape), tmp_path / "m.onnx", dynamo=dynamo)
    loaded = load_onnx(path)
    assert loaded.input_shape == list(shape) and loaded.num_outputs == 3
    assert loaded.num_parameters == sum(p.numel() for p in model.parameters())
    kinds = {type(m).__name__ for m in loaded.module.modules()}
    assert "Linear" in kinds and (build is mlp or "Conv2d" in kinds)
    x = torch.randn(5, *shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x), rtol=1e-5, atol=1e-5)


def test_onnx_fixed_batch_export_is_refused_with_advice(tmp_path):
    model = cnn()
    path = tmp_path / "fixed.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 1, 8, 8),), str(path), dynamo=True, external_data=False)
    with pytest.raises(ArtifactError) as err:
        load_onnx(path)
    assert err.value.slug in ("model-smoke-test-failed", "model-output-shape")
    assert "batch" in err.value.detail


def test_onnx_external_data_is_refused(tmp_path):
    """A location that is a path (absolute, with directories, or `..`) is refused before anything is read."""
    path = export_onnx(mlp(), torch.randn(2, 8), tmp_path / "m.onnx")
    for location in ("/etc/passwd", "../m.onnx.data", "sub/m.onnx.data", "C:m.onnx.data"):
        proto = onnx.load(str(path))
        tensor = proto.graph.initializer[0]
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", location
        evil = tmp_path / "evil.onnx"
        evil.write_bytes(proto.SerializeToString())
        with pytest.raises(ArtifactError) as err:
            load_onnx(evil, {"m.onnx.data": tmp_path / "m.onnx"})
        assert err.value.slug == "onnx-external-data-path", location


def test_onnx_default_export_with_external_data_loads_from_its_parts(tmp_path):
    """torch.onnx.export's default writes the weights to m.onnx.data; with that part the model converts
    to identical outputs, and every way the parts can disagree with the model is refused by name."""
    model = mlp()
    path = export_onnx(model, torch.randn(2, 8), tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    assert data.is_file() and data.stat().st_size > 0
    loaded = load_onnx(path, {"m.onnx.data": data})
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded.module(x), model(x), rtol=1e-5, atol=1e-6)
    assert loaded.num_parameters == sum(p.numel() for p in model.parameters())

    def slug(external):
        with pytest.raises(ArtifactError) as err:
            load_onnx(path, external)
        return err.value.slug

    assert slug({}) == "onnx-external-data-missing"
    assert slug({"other.data": data}) == "onnx-external-data-missing"
    truncated = tmp_path / "truncated.data"
    truncated.write_bytes(data.read_bytes()[:-4])
    assert slug({"m.onnx.data": truncated}) == "onnx-external-data-range"
    spare = tmp_path / "spare.data"
    spare.write_bytes(b"unused")
    assert slug({"m.onnx.data": data, "spare.data": spare}) == "onnx-external-data-unused"
    # an offset past the end of the part
    proto = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if len(t.external_data))
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(data.stat().st_size)
    if not any(e.key == "offset" for e in tensor.external_data):
        entry = tensor.external_data.add()
        entry.key, entry.value = "offset", str(data.stat().st_size)
    shifted = tmp_path / "shifted.onnx"
    shifted.write_bytes(proto.SerializeToString())
    with pytest.raises(ArtifactError) as err:
        load_onnx(shifted, {"m.onnx.data": data})
    assert err.value.slug == "onnx-external-data-range"


def test_safetensors_checks(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    arch = {"type": "mlp", "input_size": 4, "hidden_sizes": [3], "num_classes": 2}
    good = tmp_path / "good.safetensors"
    save_file(model.state_dict(), str(good))
    loaded = load_safetensors(good, json.dumps(arch))
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded.module(x), model(x))

    with pytest.raises(ArtifactError, match="missing|shape"):
        load_safetensors(good, json.dumps(arch | {"hidden_sizes": [5]}))
    with pytest.raises(ArtifactError) as err:
        load_safetensors(good, json.dumps({"type": "transformer"}))
    assert err.value.slug == "invalid-architecture"

    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ArtifactError, match="implausible"):
        load_safetensors(huge, json.dumps(arch))

    ints = tmp_path / "ints.safetensors"
    save_file({k: (v * 100).to(torch.int32) for k, v in model.state_dict().items()}, str(ints))
    with pytest.raises(ArtifactError) as err:
        load_safetensors(ints, json.dumps(arch))
    assert err.value.slug == "safetensors-dtype"

    nan = tmp_path / "nan.safetensors"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"][0, 0] = float("nan")
    save_file(state, str(nan))
    with pytest.raises(ArtifactError) as err:
        load_safetensors(nan, json.dumps(arch))
    assert err.value.slug == "model-non-finite-weights"

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-7])
    with pytest.raises(ArtifactError):
        load_safetensors(truncated, json.dumps(arch))


def test_tabular_datasets_parquet_and_csv(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.artifacts.loaders import DatasetLimits, load_dataset

    table = pa.table({"f1": [0.5, 1.5, 2.5], "f2": [1, 2, 3], "label": [0, 2, 1]})
    pq.write_table(table, tmp_path / "d.parquet")
    loaded = load_dataset(tmp_path / "d.parquet", "parquet", DatasetLimits())
    assert loaded.input_shape == [2] and loaded.num_classes == 3 and loaded.labels.tolist() == [0, 2, 1]
    np.testing.assert_allclose(loaded.inputs[:, 0], [0.5, 1.5, 2.5])
    (tmp_path / "d.csv").write_text("f1,label,f2\n0.5,0,1\n1.5,2,2\n2.5,1,3\n")
    csv_loaded = load_dataset(tmp_path / "d.csv", "csv", DatasetLimits())
    np.testing.assert_allclose(csv_loaded.inputs, loaded.inputs)

    for bad, slug in ((pa.table({"f1": ["a"], "label": [0]}), "dataset-dtype"),
                      (pa.table({"f1": [1.0], "label": [0.5]}), "labels-not-integers"),
                      (pa.table({"f1": [1.0, None], "label": [0, 1]}), "dataset-non-finite"),
                      (pa.table({"f1": [1.0]}), "csv-no-label")):
        pq.write_table(bad, tmp_path / "bad.parquet")
        with pytest.raises(ArtifactError) as err:
            load_dataset(tmp_path / "bad.parquet", "parquet", DatasetLimits())
        assert err.value.slug == slug
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ArtifactError) as err:
        load_dataset(tmp_path / "junk.parquet", "parquet", DatasetLimits())
    assert err.value.slug == "invalid-parquet"


def test_softmax_outputs_are_refused_but_log_softmax_is_fine(tmp_path):
    base = mlp()
    with pytest.raises(ArtifactError) as err:
        load_onnx(export_onnx(nn.Sequential(base, nn.Softmax(dim=1)), torch.randn(2, 8), tmp_path / "p.onnx"))
    assert err.value.slug == "model-outputs-probabilities"
    loaded = load_onnx(export_onnx(nn.Sequential(base, nn.LogSoftmax(dim=1)), torch.randn(2, 8), tmp_path / "l.onnx"))
    assert loaded.num_outputs == 3


def test_review_fixes_for_hostile_datasets_and_headers(tmp_path):
    import io
    import zipfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.artifacts.loaders import DatasetLimits, detect_model_format, load_dataset

    limits = DatasetLimits(max_uncompressed_bytes=100_000)
    # a member named plain "inputs" (numpy resolves it too) counts against the limit
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in (("inputs", np.zeros((100_000, 1), np.float32)), ("inputs.npy", np.zeros((2, 1), np.float32)),
                            ("labels.npy", np.zeros(2, np.int64))):
            member = io.BytesIO()
            np.save(member, array)
            archive.writestr(name, member.getvalue())
    (tmp_path / "sneaky.npz").write_bytes(buffer.getvalue())
    with pytest.raises(ArtifactError) as err:
        load_dataset(tmp_path / "sneaky.npz", "npz", limits)
    assert err.value.status == 413
    # a parquet file that compresses 800x is refused from its metadata
    pq.write_table(pa.table({"f": np.zeros(200_000), "label": np.zeros(200_000, np.int64)}), tmp_path / "bomb.parquet")
    with pytest.raises(ArtifactError) as err:
        load_dataset(tmp_path / "bomb.parquet", "parquet", limits)
    assert err.value.status == 413
    # a safetensors header length of 384 bytes starts with 0x80: still safetensors, not a pickle
    assert detect_model_format("w.safetensors", (384).to_bytes(8, "little")) == "safetensors"


def test_one_output_classifier_is_refused_readably():
    from app.influence import AuditConfig, EngineError, run_audit

    with pytest.raises(EngineError, match="at least 2 outputs"):
        run_audit(nn.Linear(3, 1), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), AuditConfig(method="exact"))


@pytest.mark.parametrize("text, slug", [
    (b"f1,label\n1.5,2\n\xff,1\n", "invalid-csv"),  # not UTF-8 past the header
    (b"f1,label\n1.5,2\nabc,1\n", "dataset-dtype"),
    (b"f1,label\n1,0.5\n", "labels-not-integers"),
    (b"f1,label\n1,99999999999999999999\n", "labels-not-integers"),
    (b"f1,label\n,0\n", "dataset-non-finite"),
    (b"f1,label\n1e39,0\n", "dataset-non-finite"),  # overflows float32
    (b"f1,label\n1,0\n2\n", "csv-ragged"),
    (b"f1,f1,label\n1,2,0\n", "dataset-shape"),
    (b"f1,label\n", "dataset-empty"),
    (b"f\xff1,label\n1,0\n", "invalid-csv"),
    (b",".join(b"feature_%d" % i for i in range(100_000)) + b",label\n", "dataset-shape"),  # a header over 1 MiB
])
def test_csv_errors_name_the_problem(tmp_path, text, slug):
    from app.artifacts.loaders import DatasetLimits, load_dataset

    (tmp_path / "d.csv").write_bytes(text)
    with pytest.raises(ArtifactError) as err:
        load_dataset(tmp_path / "d.csv", "csv", DatasetLimits())
    assert err.value.slug == slug and err.value.status == 422


def test_csv_tolerates_a_bom_crlf_spaces_and_blank_lines_and_counts_rows_while_streaming(tmp_path):
    from app.artifacts.loaders import DatasetLimits, load_dataset

    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbff1, label ,f2\r\n 1.5, 2 ,3\r\n\r\n4,0,5\r\n")
    loaded = load_dataset(tmp_path / "d.csv", "csv", DatasetLimits())
    assert loaded.inputs.tolist() == [[1.5, 3.0], [4.0, 5.0]] and loaded.labels.tolist() == [2, 0]
    (tmp_path / "big.csv").write_text("f1,label\n" + "1,0\n" * 5000)
    with pytest.raises(ArtifactError) as err:
        load_dataset(tmp_path / "big.csv", "csv", DatasetLimits(max_examples=4000))
    assert err.value.slug == "dataset-too-large" and err.value.status == 413


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.PReLU(), nn.Linear(8, 8), nn.LayerNorm(8),
                                      nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("dynamo, opset", [(True, None), (False, None), (False, 13)])
def test_onnx_nested_modules_and_normalisation_layers_keep_every_learned_weight(tmp_path, dynamo, opset):
    """TorchScript exports name nodes like `/features/features.0/Gemm` (a dot inside a submodule name),
    write BatchNormalization's training_mode attribute, and (before opset 17) spell LayerNorm out as
    elementwise ops; LayerNorm and PReLU weights arrive as initializers. All of it must load, and every
    learned weight must be a parameter the audit sees (BatchNorm's running statistics are not)."""
    from app.influence import AuditConfig, run_audit

    torch.manual_seed(0)
    model = _Block()
    model.features[1].running_mean.uniform_(-0.5, 0.5)
    model.features[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(40, 6)
    loaded = load_onnx(export_onnx(model, x[:2], tmp_path / "m.onnx", dynamo=dynamo, opset_version=opset))
    learned = sum(p.numel() for p in model.parameters())
    bn = model.features[1]
    # an exporter may fold the BatchNorm into the Linear before it: then its 16 affine weights are gone
    assert loaded.num_parameters in (learned, learned - bn.weight.numel() - bn.bias.numel())
    assert all("." not in name for name, _ in loaded.module.named_children())
    torch.testing.assert_close(loaded.module(x), model(x), atol=1e-5, rtol=1e-4)
    y = model(x).argmax(1)
    for method in ("ekfac", "lanczos", "exact"):
        result = run_audit(loaded.module, x, y, AuditConfig(method=method, lanczos_rank=8))
        assert torch.isfinite(result.scores).all()
        if method == "ekfac":  # LayerNorm/PReLU/BatchNorm weights: the documented diagonal fallback, listed
            fallback = [layer for layer in result.summary["estimator"]["layers"] if "fallback" in layer["treatment"]]
            assert fallback and fallback[0]["num_parameters"] == loaded.num_parameters - sum(
                m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.Linear))


def test_onnx_exported_in_training_mode_is_refused(tmp_path):
    import onnx

    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval()
    path = export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx", dynamo=False)
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            for attribute in node.attribute:
                if attribute.name == "training_mode":
                    attribute.i = 1
            if not any(a.name == "training_mode" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("training_mode", 1))
    onnx.save(proto, str(path))
    with pytest.raises(ArtifactError) as err:
        load_onnx(path)
    assert err.value.slug == "onnx-training-mode"


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript-exporter"])
def test_onnx_exported_with_dropout_active_is_refused_saying_so(tmp_path, dynamo):
    """A model exported without model.eval(): its Dropout stays active (random outputs). The answer says
    that, not the smoke test's generic advice about batch axes."""
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (torch.randn(2, 6),), str(path), dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:
            torch.onnx.export(model, (torch.randn(2, 6),), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}}, training=torch.onnx.TrainingMode.TRAINING)
    with pytest.raises(ArtifactError) as err:
        load_onnx(path, {p.name: p for p in tmp_path.glob("*.data")})
    assert err.value.slug == "onnx-training-mode" and "model.eval()" in err.value.detail


class _BakedScaling(nn.Module):
    """Input standardisation stored as buffers (x * scale + shift): constants, not weights."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 6))
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 6))
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x * self.scale + self.shift)


@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_constants_a_model_multiplies_by_are_not_audited_as_weights(tmp_path, dynamo):
    model = _BakedScaling().eval()
    loaded = load_onnx(export_onnx(model, torch.randn(2, 6), tmp_path / "m.onnx", dynamo=dynamo))
    assert loaded.num_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript-exporter"])
def test_onnx_embedding_tables_are_audited_weights(tmp_path, dynamo):
    """Token embeddings (Gather on a weight) and position embeddings (looked up with constant positions,
    which both exporters fold into the table added to the token embeddings) are learned weights: the
    audited parameter count equals the model's, and every method scores them."""
    torch.manual_seed(0)
    model = TextClassifier().eval()
    ids = torch.randint(0, 50, (40, 12)).float()
    loaded = load_onnx(export_onnx(model, ids[:2], tmp_path / "text.onnx", dynamo=dynamo))
    assert loaded.num_parameters == sum(p.numel() for p in model.parameters()) == 1075
    torch.testing.assert_close(loaded.module(ids), model(ids), rtol=1e-5, atol=1e-6)
    result = run_audit(loaded.module, ids, torch.randint(0, 3, (40,)), AuditConfig(method="ekfac"))
    assert bool(torch.isfinite(result.scores).all())
    fallback = [layer for layer in result.summary["estimator"]["layers"] if "fallback" in layer["treatment"]]
    assert "tokens_weight" in fallback[0]["layer"]


def test_npz_priced_in_the_dtype_it_is_converted_to_before_inflating(tmp_path):
    """int8 token ids become int64 (8x): a 0.4 MB archive declaring 0.4 GB of int8 zeros is refused from
    its .npy header, against its converted size, before any array is read."""
    import zipfile

    import numpy as np

    from app.artifacts.loaders import DatasetLimits, load_npz

    path = tmp_path / "int8.npz"
    shape = (1024, 400_000)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("inputs.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|i1", "fortran_order": False, "shape": shape})
            for _ in range(shape[0]):
                f.write(bytes(shape[1]))
        with archive.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(shape[0], np.int64))
    limits = DatasetLimits(max_uncompressed_bytes=1024**3)  # the raw 0.4 GB passes, 3.7 GB converted does not
    with pytest.raises(ArtifactError) as err:
        load_npz(path, limits)
    assert err.value.slug == "dataset-too-large" and err.value.status == 413 and "converted" in err.value.detail
    # a forged header is the file's fault, named as such, not a crash
    forged = tmp_path / "forged.npz"
    with zipfile.ZipFile(forged, "w") as archive:
        archive.writestr("inputs.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': 1+1}   \n")
        archive.writestr("labels.npy", b"")
    with pytest.raises(ArtifactError) as err:
        load_npz(forged, limits)
    assert err.value.slug == "invalid-npz"


def test_safetensors_architecture_is_strict_and_compared_before_anything_is_built(tmp_path):
    """An architecture of 4.3 billion weights with a tiny weights file is refused from the header alone
    (building it first took 17 GB); a quoted number or an unknown field is refused, not guessed at."""
    import resource
    import time

    path = tmp_path / "tiny.safetensors"
    save_file({"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)}, str(path))
    huge = {"type": "mlp", "input_size": 65_536, "hidden_sizes": [65_536], "num_classes": 3}
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(ArtifactError) as err:
        load_safetensors(path, json.dumps(huge))
    assert err.value.slug == "weights-mismatch" and time.perf_counter() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: nothing near 17 GB
    for bad in ({"type": "mlp", "input_size": "2", "num_classes": 2}, {"type": "mlp", "input_size": 2, "num_classes": 2,
                                                                        "dropout": 0.5}):
        with pytest.raises(ArtifactError) as err:
            load_safetensors(path, json.dumps(bad))
        assert err.value.slug == "invalid-architecture"
    loaded = load_safetensors(path, json.dumps({"type": "mlp", "input_size": 2, "num_classes": 2}))
    assert loaded.num_parameters == 6


def test_a_tensor_size_computed_from_the_input_values_is_refused_before_anything_runs():
    """The red team's time bomb (a Range whose length follows ReduceMax of the input) passed validation,
    which feeds zeros and random normals; it is refused by reading the graph, naming the node. Sizes
    that follow the input's *shape* (a dynamic batch, position ids) are fine: the architecture sweep
    loads every exporter's graphs of them."""
    corpus = Path(__file__).resolve().parent / "corpus" / "data-dependent-range.onnx"
    with pytest.raises(ArtifactError) as err:
        load_onnx(corpus)
    assert err.value.slug == "data-dependent-shape" and "'bomb' (Range)" in err.value.detail


def test_parquet_is_priced_at_its_conversion_peak_and_read_within_it(tmp_path):
    """A table of boolean columns becomes int64 (8 bytes a value from 1 bit): the reading used to hold a
    list of int64 copies and their column_stack (16 bytes a value) beside the table, while the budget
    counted 8. 5,000 rows x 106 bool columns against a thousandth of the 4 GiB default mirrors 5M x 106
    against the default (which took 8.5 GB): refused with the estimate. Under a limit at the estimate it
    loads, and what NumPy allocates on the way stays within it."""
    import re
    import tracemalloc

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.artifacts.loaders import DatasetLimits, load_parquet

    rows, columns = 5_000, 106
    rng = np.random.default_rng(0)
    table = pa.table({f"f{j}": rng.random(rows) < 0.5 for j in range(columns)} | {"label": rng.integers(0, 3, rows)})
    pq.write_table(table, tmp_path / "bools.parquet")
    limit = 4 * 1024**3 // 1000
    assert rows * (columns + 1) * 8 <= limit  # what the old check priced: it passed
    with pytest.raises(ArtifactError) as err:
        load_parquet(tmp_path / "bools.parquet", DatasetLimits(max_uncompressed_bytes=limit))
    assert err.value.slug == "dataset-too-large" and err.value.status == 413
    assert str(limit) in err.value.detail and "PBRF_MAX_DATASET_BYTES" in err.value.detail
    estimate = int(re.search(r"about (\d+) bytes", err.value.detail).group(1))
    assert estimate > limit and estimate >= rows * columns * 8

    tracemalloc.start()
    try:
        loaded = load_parquet(tmp_path / "bools.parquet", DatasetLimits(max_uncompressed_bytes=estimate))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= estimate, (peak, estimate)
    assert loaded.inputs.dtype == np.int64 and loaded.inputs.shape == (rows, columns)
    np.testing.assert_array_equal(loaded.inputs[:, 7], table.column("f7").to_numpy().astype(np.int64))
    np.testing.assert_array_equal(loaded.labels, table.column("label").to_numpy())
    # a float column makes every column float32, converted in place
    pq.write_table(pa.table({"a": [1, 2, 3], "b": np.array([0.5, 1.5, 2.5], np.float32), "c": [True, False, True],
                             "label": [0, 1, 0]}), tmp_path / "mixed.parquet")
    mixed = load_parquet(tmp_path / "mixed.parquet", DatasetLimits())
    assert mixed.inputs.dtype == np.float32
    np.testing.assert_array_equal(mixed.inputs, [[1, 0.5, 1], [2, 1.5, 0], [3, 2.5, 1]])


def test_wide_tables_are_refused_from_their_header_before_any_row_is_parsed(tmp_path):
    """100,000 CSV columns took the API 160 s per 60 MB: the column count is capped (16,384 by default,
    PBRF_MAX_TABLE_COLUMNS) from the header alone, with advice to use .npz; Parquet from its schema."""
    import time

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.artifacts.loaders import DatasetLimits, load_dataset

    header = ",".join(f"c{i}" for i in range(100_000)) + ",label\n"  # well under the 1 MiB header cap
    row = ",".join("0" for _ in range(100_000)) + ",0\n"
    (tmp_path / "wide.csv").write_text(header + row * 20)
    started = time.perf_counter()
    with pytest.raises(ArtifactError) as err:
        load_dataset(tmp_path / "wide.csv", "csv", DatasetLimits())
    assert time.perf_counter() - started < 2
    assert err.value.slug == "dataset-too-many-columns" and err.value.status == 422
    assert "100000" in err.value.detail and "16384" in err.value.detail
    assert "PBRF_MAX_TABLE_COLUMNS" in err.value.detail and ".npz" in err.value.detail
    # refused from the header: rows that would fail to parse are never reached
    (tmp_path / "four.csv").write_text("a,b,c,d,label\nx,y,z,w,0\n")
    with pytest.raises(ArtifactError) as err:
        load_dataset(tmp_path / "four.csv", "csv", DatasetLimits(max_columns=3))
    assert err.value.slug == "dataset-too-many-columns"
    (tmp_path / "three.csv").write_text("a,b,c,label\n1,2,3,0\n")
    assert load_dataset(tmp_path / "three.csv", "csv", DatasetLimits(max_columns=3)).input_shape == [3]
    pq.write_table(pa.table({f"f{j}": np.zeros(2) for j in range(4)} | {"label": [0, 1]}), tmp_path / "four.parquet")
    with pytest.raises(ArtifactError) as err:
        load_dataset(tmp_path / "four.parquet", "parquet", DatasetLimits(max_columns=3))
    assert err.value.slug == "dataset-too-many-columns" and "Parquet" in err.value.detail


def _control_flow_model(body_nodes, kind: str, body_inputs=(), body_outputs=None, carried_init=None):
    """x (batch, 4) -> logits (batch, 3), with a Loop (trip count 2, condition true) or an If (condition a
    constant) whose body holds `body_nodes`; the body reads the outer scope's `n1`, an int64 [1] computed
    from the *values* of x (ReduceMax), and `s1`, the same from x's *shape*."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def float_info(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

    outer = [helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
             helper.make_node("Cast", ["peak"], ["n0"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["n0", "one"], ["n1"]),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape", "one", "two"], ["s1"])]
    if kind == "If":
        body = helper.make_graph(body_nodes, "then", [], body_outputs or [float_info("z")])
        other = helper.make_graph([helper.make_node("Constant", [], ["z0"], value=numpy_helper.from_array(
            np.zeros(1, np.float32)))], "else", [], [float_info("z0")])
        outer.append(helper.make_node("If", ["yes"], ["z_out"], then_branch=body, else_branch=other, name="branch"))
    else:
        inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                  helper.make_tensor_value_info("c", TensorProto.BOOL, []), *body_inputs]
        body = helper.make_graph(body_nodes, "body", inputs, body_outputs)
        outer.append(helper.make_node("Loop", ["trips", "yes", *(carried_init or [])],
                                      [*(["carried_out"] if carried_init else []), "z_out"], body=body, name="loop"))
    outer += [helper.make_node("ReduceSum", ["z_out"], ["total"], keepdims=0),
              helper.make_node("MatMul", ["x", "W"], ["xw"]),
              helper.make_node("Add", ["xw", "total"], ["y"])]
    initializers = [numpy_helper.from_array(np.array([1], np.int64), "one"),
                    numpy_helper.from_array(np.array([2], np.int64), "two"),
                    numpy_helper.from_array(np.array(2, np.int64), "trips"),
                    numpy_helper.from_array(np.array(True), "yes"),
                    numpy_helper.from_array(np.array([0], np.int64), "zero_size"),
                    numpy_helper.from_array(np.ones((4, 3), np.float32), "W")]
    graph = helper.make_graph(outer, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sizes_from_the_input_values_inside_loop_and_if_bodies_are_refused(tmp_path):
    """A Loop or If body is a graph of its own that reads the outer scope by name: a ConstantOfShape in
    it fed by the input's values (through the outer scope, or carried from one iteration to the next)
    is refused like one outside, as is a Loop whose condition follows the data, and a DFT whose length
    does; sizes from the input's shape stay fine inside a body."""
    import onnx
    from onnx import TensorProto, helper

    from app.artifacts.loaders import refuse_data_dependent_sizes

    def float_info(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

    def int_info(name):
        return helper.make_tensor_value_info(name, TensorProto.INT64, [1])

    bomb = [helper.make_node("ConstantOfShape", ["n1"], ["z"], name="bomb")]
    cond = helper.make_node("Identity", ["c"], ["c_out"])
    for kind, model in (
        ("If", _control_flow_model(bomb, "If")),
        ("Loop", _control_flow_model([cond, *bomb], "Loop", body_outputs=[helper.make_tensor_value_info(
            "c_out", TensorProto.BOOL, []), float_info("z")])),
    ):
        onnx.checker.check_model(model)
        path = tmp_path / f"{kind}.onnx"
        onnx.save(model, str(path))
        with pytest.raises(ArtifactError) as err:
            load_onnx(path)
        assert err.value.slug == "data-dependent-shape", err.value.detail
        assert "'bomb' (ConstantOfShape)" in err.value.detail and f"body of {kind}" in err.value.detail

    # a carried value that starts as a constant and takes the data's values in the first iteration
    carried = _control_flow_model(
        [cond, helper.make_node("ConstantOfShape", ["k"], ["z"], name="late"),
         helper.make_node("Add", ["k", "n1"], ["k_next"])],
        "Loop", body_inputs=[int_info("k")], carried_init=["zero_size"],
        body_outputs=[helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), int_info("k_next"), float_info("z")])
    with pytest.raises(ArtifactError) as err:
        refuse_data_dependent_sizes(carried.graph)
    assert "'late' (ConstantOfShape)" in err.value.detail
    # a loop that runs for as long as the data says
    endless = _control_flow_model(
        [helper.make_node("Cast", ["n1"], ["flag"], to=TensorProto.BOOL),
         helper.make_node("Squeeze", ["flag"], ["c_out"]), helper.make_node("ConstantOfShape", ["s1"], ["z"])],
        "Loop", body_outputs=[helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), float_info("z")])
    with pytest.raises(ArtifactError) as err:
        refuse_data_dependent_sizes(endless.graph)
    assert "condition of Loop 'loop'" in err.value.detail
    # an FFT length read from the data
    dft = _control_flow_model([helper.make_node("DFT", ["x3", "n0"], ["z"], name="fft"),
                               helper.make_node("Unsqueeze", ["x", "two"], ["x3"])], "If")
    with pytest.raises(ArtifactError) as err:
        refuse_data_dependent_sizes(dft.graph)
    assert "'fft' (DFT)" in err.value.detail
    # sizes from the input's shape, inside bodies, are fine
    for model in (_control_flow_model([helper.make_node("ConstantOfShape", ["s1"], ["z"])], "If"),
                  _control_flow_model([cond, helper.make_node("ConstantOfShape", ["s1"], ["z"])], "Loop",
                                      body_outputs=[helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
                                                    float_info("z")])):
        refuse_data_dependent_sizes(model.graph)


def test_npz_labels_as_whole_floats_or_booleans_become_class_ids(tmp_path):
    """What a pandas column often holds: 0.0/1.0/2.0 floats, or True/False. Whole values are class ids;
    a fractional or NaN label is still refused."""
    from app.artifacts.loaders import DatasetLimits, load_dataset

    inputs = np.zeros((4, 2), np.float32)
    for labels, expected in ((np.array([0.0, 2.0, 1.0, 2.0], np.float32), [0, 2, 1, 2]),
                             (np.array([True, False, True, True]), [1, 0, 1, 1])):
        np.savez(tmp_path / "d.npz", inputs=inputs, labels=labels)
        loaded = load_dataset(tmp_path / "d.npz", "npz", DatasetLimits())
        assert loaded.labels.dtype == np.int64 and loaded.labels.tolist() == expected
    for labels in (np.array([0.0, 0.5, 1.0, 1.0]), np.array([0.0, np.nan, 1.0, 1.0])):
        np.savez(tmp_path / "d.npz", inputs=inputs, labels=labels)
        with pytest.raises(ArtifactError) as err:
            load_dataset(tmp_path / "d.npz", "npz", DatasetLimits())
        assert err.value.slug == "labels-not-integers"
    # a Parquet label column of whole floats (pandas writes float64 once a column held a NaN) likewise
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"f1": [0.5, 1.5, 2.5], "label": [0.0, 2.0, 1.0]}), tmp_path / "d.parquet")
    assert load_dataset(tmp_path / "d.parquet", "parquet", DatasetLimits()).labels.tolist() == [0, 2, 1]
