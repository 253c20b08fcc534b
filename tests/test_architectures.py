"""The architecture sweep: every model shape users bring, exported by both of torch's exporters (the
dynamo one with external data, torch's default), converts with identical outputs, has every learned
weight of the exported graph audited, and gets EK-FAC scores. Also the contract for models with integer
and several graph inputs: what the model record says, how a dataset is matched and packed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from app.artifacts.loaders import (ArtifactError, LoadedDataset, load_onnx, match_inputs, pack_inputs)
from app.influence import AuditConfig, run_audit
from tests.helpers import export_onnx
from tests.zoo import (ResidualCNN, SharedBlockMLP, SharedKernelTwoDilations, TextClassifier, TiedTokenModel,
                       TinyTransformer, TorchEncoderClassifier, distinct_weights, exported_learned_parameters)


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _depthwise_groupnorm():
    # GroupNorm reaches ONNX as Reshape -> InstanceNormalization (constant scale) -> Reshape -> Mul -> Add
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.GroupNorm(2, 8), nn.GELU(), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _ids(n, length=12, vocab=50, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _mask(n, length=16):
    mask = torch.ones(n, length, dtype=torch.int64)
    mask[n // 2 :, length - 5 :] = 0  # half of the examples padded at the end
    return mask


# name -> (builder, batch of n examples as the model's positional inputs)
SWEEP = {
    "mlp": (_mlp, lambda n: (torch.randn(n, 8),)),
    "cnn": (_cnn, lambda n: (torch.randn(n, 1, 8, 8),)),
    "residual-cnn-batchnorm": (lambda: ResidualCNN(classes=5, width=4), lambda n: (torch.randn(n, 3, 16, 16),)),
    "cnn-depthwise-groupnorm": (_depthwise_groupnorm, lambda n: (torch.randn(n, 3, 8, 8),)),
    "text-classifier-token-ids": (TextClassifier, lambda n: (_ids(n),)),
    "transformer-two-inputs": (lambda: TinyTransformer(layers=2), lambda n: (_ids(n, 16, 64), _mask(n))),
    # torch's own nn.TransformerEncoderLayer: its exported attention runs sequence-first
    "text-torch-transformer-encoder": (TorchEncoderClassifier, lambda n: (_ids(n),)),
    # one weight read in two places: counted and audited once
    "mlp-block-applied-twice": (SharedBlockMLP, lambda n: (torch.randn(n, 8),)),
    "text-tied-embedding-output": (TiedTokenModel, lambda n: (_ids(n, 6, 20),)),
}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-external-data", "torchscript-exporter"])
@pytest.mark.parametrize("name", list(SWEEP))
def test_every_learned_weight_of_every_architecture_is_audited(tmp_path, name, dynamo):
    build, batch = SWEEP[name]
    torch.manual_seed(0)
    model = distinct_weights(build())
    path = export_onnx(model, batch(2), tmp_path / "m.onnx", dynamo=dynamo, external_data=dynamo,
                       input_names=None if dynamo else (["input_ids", "attention_mask"] if len(batch(1)) == 2 else None))
    external = {p.name: p for p in tmp_path.glob("*.data")}
    loaded = load_onnx(path, external)
    proto = onnx.load(str(path), load_external_data=False)
    folded = not any(node.op_type == "BatchNormalization" for node in proto.graph.node)
    assert loaded.num_parameters == exported_learned_parameters(model, folded), (
        f"{name}: audited {loaded.num_parameters} learned values, the exported graph has "
        f"{exported_learned_parameters(model, folded)}")

    inputs = batch(24)
    packed = inputs[0] if len(inputs) == 1 else torch.cat([t.reshape(24, -1) for t in inputs], dim=1)
    assert packed.dtype == (torch.int64 if name.startswith(("text", "transformer")) else torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(packed), model(*inputs), rtol=1e-4, atol=1e-5)
    labels = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(1))
    result = run_audit(loaded.module, packed, labels, AuditConfig(method="ekfac"))
    assert bool(torch.isfinite(result.scores).all())
    layers = result.summary["estimator"]["layers"]
    # every parameter is in exactly one layer's treatment: the linear maps and convolutions (with any
    # BatchNorm folded into them) get EK-FAC, embeddings and normalisation weights the diagonal fallback
    assert sum(layer["num_parameters"] for layer in layers) == loaded.num_parameters
    others = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm, nn.GroupNorm))
                 or (isinstance(m, nn.BatchNorm2d) and not folded) or (isinstance(m, nn.Conv2d) and m.groups > 1)
                 for p in m.parameters(recurse=False))
    assert sum(layer["num_parameters"] for layer in layers if layer["treatment"] == "ekfac") == \
        loaded.num_parameters - others


def test_token_ids_and_a_padding_mask_are_two_integer_inputs(tmp_path):
    """The record of a two-input model names both inputs, their dtypes and shapes, and the embedding's
    vocabulary; a dataset of two int64 arrays packs into one int64 tensor the model's module unpacks."""
    torch.manual_seed(0)
    model = distinct_weights(TinyTransformer())
    path = export_onnx(model, (_ids(2, 16, 64), _mask(2)), tmp_path / "t.onnx", external_data=True)
    loaded = load_onnx(path, {"t.onnx.data": tmp_path / "t.onnx.data"})
    assert loaded.inputs == [{"name": "input_ids", "dtype": "int64", "shape": [16], "vocab_size": 64},
                             {"name": "attention_mask", "dtype": "int64", "shape": [16]}]
    ids, mask = _ids(10, 16, 64).numpy(), _mask(10).numpy()
    labels = np.arange(10) % 3
    dataset = LoadedDataset({"attention_mask": mask, "input_ids": ids}, labels, "npz", 3)  # any array order
    packed = pack_inputs(dataset, loaded.inputs)
    assert packed.dtype == np.int64 and packed.shape == (10, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(torch.from_numpy(packed)),
                                   model(torch.from_numpy(ids), torch.from_numpy(mask)), rtol=1e-4, atol=1e-5)


MODEL_INPUTS = [{"name": "input_ids", "dtype": "int64", "shape": [16], "vocab_size": 64},
                {"name": "attention_mask", "dtype": "int64", "shape": [16]}]


@pytest.mark.parametrize("model_inputs, dataset_inputs, slug, words", [
    (MODEL_INPUTS, [{"name": "inputs", "dtype": "int64", "shape": [16], "range": [0, 5]}],
     "dataset-inputs-mismatch", "input_ids"),
    (MODEL_INPUTS, [{"name": "input_ids", "dtype": "int64", "shape": [16], "range": [0, 5]},
                    {"name": "mask", "dtype": "int64", "shape": [16], "range": [0, 1]}],
     "dataset-inputs-mismatch", "attention_mask"),
    (MODEL_INPUTS, [{"name": "input_ids", "dtype": "float32", "shape": [16]},
                    {"name": "attention_mask", "dtype": "int64", "shape": [16], "range": [0, 1]}],
     "input-dtype-mismatch", "integer"),
    (MODEL_INPUTS, [{"name": "input_ids", "dtype": "int64", "shape": [16], "range": [0, 64]},
                    {"name": "attention_mask", "dtype": "int64", "shape": [16], "range": [0, 1]}],
     "input-out-of-range", "0..63"),
    (MODEL_INPUTS, [{"name": "input_ids", "dtype": "int64", "shape": [16], "range": [-1, 3]},
                    {"name": "attention_mask", "dtype": "int64", "shape": [16], "range": [0, 1]}],
     "input-out-of-range", "-1..3"),
    (MODEL_INPUTS, [{"name": "input_ids", "dtype": "int64", "shape": [12], "range": [0, 3]},
                    {"name": "attention_mask", "dtype": "int64", "shape": [16], "range": [0, 1]}],
     "model-dataset-mismatch", "[12]"),
    ([{"name": "x", "dtype": "float32", "shape": [8]}], [{"name": "inputs", "dtype": "int64", "shape": [8],
                                                         "range": [0, 255]}],
     "input-dtype-mismatch", "floats"),
])
def test_a_dataset_that_does_not_fit_the_model_inputs_is_named(model_inputs, dataset_inputs, slug, words):
    with pytest.raises(ArtifactError) as err:
        match_inputs(model_inputs, dataset_inputs)
    assert err.value.slug == slug and err.value.status == 422 and words in err.value.detail


def test_single_inputs_match_whatever_their_names_and_keep_their_dtype():
    assert match_inputs([{"name": "x", "dtype": "float32", "shape": [8]}],
                        [{"name": "inputs", "dtype": "float32", "shape": [8]}]) == ["inputs"]
    dataset = LoadedDataset({"inputs": np.arange(12).reshape(3, 4)}, np.array([0, 1, 0]), "npz", 2)
    assert dataset.input_specs == [{"name": "inputs", "dtype": "int64", "shape": [4], "range": [0, 11]}]
    packed = pack_inputs(dataset, [{"name": "ids", "dtype": "int64", "shape": [4], "vocab_size": 12}])
    assert packed.dtype == np.int64


def test_parquet_and_npz_integer_columns_stay_int64_and_float_ones_make_floats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.artifacts.loaders import DatasetLimits, load_dataset

    ids = np.array([[3, 1], [0, 2], [7, 5]])
    pq.write_table(pa.table({"t0": ids[:, 0], "t1": ids[:, 1], "label": [0, 1, 0]}), tmp_path / "ids.parquet")
    loaded = load_dataset(tmp_path / "ids.parquet", "parquet", DatasetLimits())
    assert loaded.inputs.dtype == np.int64 and loaded.inputs.tolist() == ids.tolist()
    assert loaded.input_specs[0]["range"] == [0, 7]
    pq.write_table(pa.table({"t0": ids[:, 0], "x": [0.5, 1.0, 2.0], "label": [0, 1, 0]}), tmp_path / "mixed.parquet")
    assert load_dataset(tmp_path / "mixed.parquet", "parquet", DatasetLimits()).inputs.dtype == np.float32
    np.savez(tmp_path / "two.npz", input_ids=ids.astype(np.int32), attention_mask=np.ones((3, 2), bool),
             labels=np.array([0, 1, 0]))
    two = load_dataset(tmp_path / "two.npz", "npz", DatasetLimits())
    assert [(s["name"], s["dtype"], s["range"]) for s in two.input_specs] == [
        ("input_ids", "int64", [0, 7]), ("attention_mask", "int64", [1, 1])]


def _exported(tmp_path, name: str, dynamo: bool):
    """A SWEEP model with trained-like weights, exported (external data with dynamo) and loaded back:
    (model, batch builder, loaded model)."""
    build, batch = SWEEP[name]
    torch.manual_seed(0)
    model = distinct_weights(build())
    path = export_onnx(model, batch(2), tmp_path / "m.onnx", dynamo=dynamo, external_data=dynamo)
    return model, batch, load_onnx(path, {p.name: p for p in tmp_path.glob("*.data")})


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-external-data", "torchscript-exporter"])
@pytest.mark.parametrize("name", ["mlp-block-applied-twice", "text-tied-embedding-output"])
def test_a_weight_used_twice_is_scored_as_one_weight(tmp_path, name, dynamo):
    """Scores of the converted model live in the original model's parameter space: the exact damped
    self-influence equals the PyTorch model's (its gradient with respect to the shared weight is the sum
    over both uses), and the block applied twice stays one EK-FAC layer over both calls."""
    model, batch, loaded = _exported(tmp_path, name, dynamo)
    (inputs,) = batch(40)
    labels = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))
    config = AuditConfig(method="exact", damping=1e-3)
    want = run_audit(model, inputs, labels, config).scores
    got = run_audit(loaded.module, inputs, labels, config).scores
    # float32 gradients of two op orders (Gemm vs addmm), through a solve damped at 1e-3
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6 * float(want.abs().max()))
    layers = run_audit(loaded.module, inputs, labels, AuditConfig(method="ekfac")).summary["estimator"]["layers"]
    if name == "mlp-block-applied-twice":
        assert sorted(layer["num_parameters"] for layer in layers if layer["treatment"] == "ekfac") == [51, 144, 272]
    else:  # the table (also the output layer) in the fallback, the mixing layer in EK-FAC
        assert sorted((layer["treatment"], layer["num_parameters"]) for layer in layers) == \
            [("diagonal GGN (fallback)", 320), ("ekfac", 272)]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-external-data", "torchscript-exporter"])
def test_one_kernel_at_two_dilations_stays_two_operations_on_one_weight(tmp_path, dynamo):
    """Two Conv nodes reading one kernel with different attributes are different operations: they keep
    their own modules (their outputs are unchanged), their weight is one parameter, and the exact scores
    equal the PyTorch model's."""
    torch.manual_seed(0)
    model = SharedKernelTwoDilations().eval()
    path = export_onnx(model, (torch.randn(2, 2, 8, 8),), tmp_path / "m.onnx", dynamo=dynamo, external_data=dynamo)
    loaded = load_onnx(path, {p.name: p for p in tmp_path.glob("*.data")})
    assert loaded.num_parameters == sum(p.numel() for p in model.parameters())
    inputs = torch.randn(40, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(inputs), model(inputs), rtol=1e-4, atol=1e-5)
    labels = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))
    config = AuditConfig(method="exact", damping=1e-3)
    want = run_audit(model, inputs, labels, config).scores
    torch.testing.assert_close(run_audit(loaded.module, inputs, labels, config).scores, want,
                               rtol=1e-3, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-external-data", "torchscript-exporter"])
def test_torchs_transformer_encoder_gets_each_examples_own_gradient(tmp_path, dynamo):
    """nn.TransformerEncoderLayer exports its attention sequence-first; each example's squared gradient
    norm (the `identity` method, which uses the same per-layer capture as EK-FAC) through the converted
    model equals the PyTorch model's, and its linear maps keep their EK-FAC blocks."""
    model, batch, loaded = _exported(tmp_path, "text-torch-transformer-encoder", dynamo)
    (inputs,) = batch(20)
    labels = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(1))
    want = run_audit(model, inputs, labels, AuditConfig(method="identity")).scores
    got = run_audit(loaded.module, inputs, labels, AuditConfig(method="identity")).scores
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6 * float(want.abs().max()))
    layers = run_audit(loaded.module, inputs, labels, AuditConfig(method="ekfac")).summary["estimator"]["layers"]
    linear = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False))
    attention_in = sum(m.in_proj_weight.numel() + m.in_proj_bias.numel() for m in model.modules()
                       if isinstance(m, nn.MultiheadAttention))
    assert sum(layer["num_parameters"] for layer in layers if layer["treatment"] == "ekfac") == linear + attention_in


@pytest.mark.parametrize("name", ["cnn-batchnorm", "mlp-batchnorm"])
def test_untrained_equal_weights_that_the_torchscript_exporter_merged_stay_separate(tmp_path, name):
    """The TorchScript exporter merges initializers with equal values (an untrained BatchNorm's unit
    scale and running variance, the zero biases of BatchNorm-folded convolutions) behind Identity nodes;
    the converted model must still compute the model's outputs (a merged running statistic used to be
    read as a runtime input: wrong outputs from batch statistics, or a Conv that would not run)."""
    torch.manual_seed(0)
    if name == "cnn-batchnorm":
        model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 4 * 4, 3)).eval()
        inputs = torch.randn(6, 3, 8, 8)
    else:
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8),
                              nn.Linear(8, 3)).eval()
        inputs = torch.randn(6, 5)
    path = export_onnx(model, inputs[:2], tmp_path / "m.onnx", dynamo=False)
    proto = onnx.load(str(path))
    assert any(node.op_type == "Identity" for node in proto.graph.node)  # the merge this is about
    loaded = load_onnx(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(inputs), model(inputs), rtol=1e-4, atol=1e-5)
    folded = not any(node.op_type == "BatchNormalization" for node in proto.graph.node)
    assert loaded.num_parameters == exported_learned_parameters(model, folded)
    result = run_audit(loaded.module, inputs, torch.tensor([0, 1, 2, 0, 1, 2]), AuditConfig(method="ekfac"))
    assert bool(torch.isfinite(result.scores).all())


def test_a_conversion_that_computes_another_model_is_refused(tmp_path, monkeypatch):
    """ONNX Runtime runs the uploaded graph as the standard defines it; converted logits that differ are
    a 422 onnx-conversion-mismatch, not an audit of another model. Shown with the merged-BatchNorm
    rewrite switched off (the converter then normalises with batch statistics) and with a converted
    weight changed after the fact."""
    import app.artifacts.loaders as loaders

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    path = export_onnx(model, torch.randn(2, 5), tmp_path / "m.onnx", dynamo=False)
    loaded = load_onnx(path)  # the real pipeline: faithful, so the check passes
    proto = onnx.load(str(path))
    loaders._check_against_onnx_runtime(proto.SerializeToString(), loaded.module, loaded.inputs)
    with torch.no_grad():
        next(loaded.module.parameters()).mul_(1.01)
    with pytest.raises(ArtifactError) as changed:
        loaders._check_against_onnx_runtime(proto.SerializeToString(), loaded.module, loaded.inputs)
    assert changed.value.slug == "onnx-conversion-mismatch"
    monkeypatch.setattr(loaders, "_split_merged_initializers", lambda proto: None)
    with pytest.raises(ArtifactError) as unfaithful:
        load_onnx(path)
    assert unfaithful.value.slug == "onnx-conversion-mismatch", unfaithful.value.detail
