"""Flags against K-fold cross-validation: our out-of-sample methods beside cleanlab, the loss and k-NN.

For each model kind, noise type and seed: a training set with 10% of its labels flipped, a model trained
until it fits them (memorises the flips), then in the same run
- `folds` (fold unlearning, app/influence/unlearning.py), `loo` (one Gauss-Newton removal step,
  EK-FAC curvature) and `ekfac` (self-influence; flags its top 10%) through run_audit's defaults;
- the per-example loss at the trained weights;
- k-NN label disagreement in input space (no model; the baseline of DESIGN.md section 4: 10 nearest
  neighbours of the standardised inputs, bag of tokens for token ids);
- cleanlab (find_label_issues, self-confidence ranking) on 5-fold out-of-fold probabilities from
  retraining the model 5 times with its own recipe.

Noise: `symmetric` moves a label to any other class; `pairs` moves it to a confusable partner
(digits 0<->6, 1<->7, 2<->5, 3<->8, 4<->9; the 3-class token task cycles c -> c+1).
Models: MLPs on digits (64-128-10 without and with weight decay 1e-3, a deeper 64-64-64-64-10), a
small CNN on the 8x8 digit images, and (ONNX-exported with torch's defaults, loaded by the service's
loaders) bench/quality_models.py's residual CNN with BatchNorm and transformer on token ids.

    .venv/bin/python bench/detection.py [--kinds mlp mlp-wd mlp-deep cnn residual-cnn transformer]
        [--noise symmetric pairs] [--seeds 0 1 2] [--tag TAG]
Writes bench/results/detection[-TAG].md.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import Timer, cleanlab_out_of_fold, environment, metrics, table, write_result
from quality_models import export_and_load, fit
from app.influence import AuditConfig, run_audit
from app.influence.loo import confident_learning
from tests.digits import noisy_digits, train_mlp
from tests.zoo import ResidualCNN, TinyTransformer, TorchEncoderClassifier, token_classification

NOISE = 0.1
DIGIT_PARTNERS = np.array([6, 7, 5, 8, 9, 2, 0, 1, 3, 4])  # 0<->6, 1<->7, 2<->5, 3<->8, 4<->9


def flip(labels: np.ndarray, classes: int, noise_type: str, seed: int):
    """10% of the labels moved to another class; returns (noisy labels, flipped mask)."""
    rng = np.random.default_rng(20_000 + seed)
    n = len(labels)
    chosen = rng.choice(n, size=int(round(NOISE * n)), replace=False)
    noisy = labels.copy()
    if noise_type == "symmetric":
        noisy[chosen] = (labels[chosen] + rng.integers(1, classes, size=chosen.shape[0])) % classes
    elif classes == 10:
        noisy[chosen] = DIGIT_PARTNERS[labels[chosen]]
    else:
        noisy[chosen] = (labels[chosen] + 1) % classes
    flipped = np.zeros(n, dtype=bool)
    flipped[chosen] = True
    return noisy.astype(np.int64), flipped


def digits(seed: int):
    """The 1500 standardised training digits of tests.digits (seeded split), clean labels: ((x,), y)."""
    x, y, _, _, _, _ = noisy_digits(seed=seed, noise=0.0)
    return (x,), y


class SmallCNN(nn.Module):
    """Two convolutions on the 8x8 digit image, a linear head (about 25k parameters)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        return self.head(self.body(x.reshape(-1, 1, 8, 8)))


def mlp_kind(hidden, weight_decay):
    return dict(data=lambda seed: (digits(seed), 10),
                train=lambda xs, y, seed: train_mlp(xs[0], y, hidden=hidden, epochs=300, seed=seed,
                                                    weight_decay=weight_decay),
                weight_decay=weight_decay, onnx=False,
                title=f"MLP 64-{'-'.join(map(str, hidden))}-10 (tanh) on digits, full-batch Adam 300 epochs, "
                      f"weight decay {weight_decay}")


def torch_fit(make, epochs, lr, batch_size, schedule):
    def train(xs, y, seed):
        torch.manual_seed(seed)
        return fit(make(), tuple(torch.from_numpy(a) for a in xs), torch.from_numpy(y), epochs=epochs, lr=lr,
                   batch_size=batch_size, schedule=schedule, seed=seed)
    return train


def digit_images(seed: int, size: int = 16):
    (x,), y = digits(seed)
    images = nn.functional.interpolate(torch.from_numpy(x).reshape(-1, 1, 8, 8), size=(size, size), mode="bilinear",
                                       align_corners=False)
    return (images.repeat(1, 3, 1, 1).contiguous().numpy(),), y


def tokens(seed: int):
    ids, mask, labels = token_classification(2000, length=16, vocab=64, classes=3, seed=seed)
    return (ids, mask), labels


KINDS = {
    "mlp": mlp_kind([128], 0.0),
    "mlp-wd": mlp_kind([128], 1e-3),
    "mlp-deep": mlp_kind([64, 64, 64], 0.0),
    "cnn": dict(data=lambda seed: (digits(seed), 10), train=torch_fit(SmallCNN, 60, 3e-3, 64, "constant"),
                weight_decay=0.0, onnx=False,
                title="SmallCNN (conv 16, conv 32 stride 2, linear) on 8x8 digits, Adam 3e-3 batch 64, 60 epochs"),
    "residual-cnn": dict(data=lambda seed: (digit_images(seed), 10),
                         train=torch_fit(lambda: ResidualCNN(classes=10, width=8), 30, 3e-3, 128, "constant"),
                         weight_decay=0.0, onnx=True, names=("inputs",),
                         title="ResidualCNN(width=8) with BatchNorm on digits upsampled to 3x16x16, Adam 3e-3 batch "
                               "128, 30 epochs; ONNX-exported (torch defaults) and loaded by the service's loaders"),
    "transformer": dict(data=lambda seed: (tokens(seed), 3),
                        train=torch_fit(lambda: TinyTransformer(vocab=64, length=16, dim=32, heads=2, layers=1,
                                                                classes=3), 60, 3e-3, 64, "cosine"),
                        weight_decay=0.0, onnx=True, names=("input_ids", "attention_mask"),
                        title="TinyTransformer (1 block, dim 32) on 2000 token sequences (ids + mask), 3 classes, "
                              "Adam 3e-3 cosine, batch 64, 60 epochs; ONNX-exported and loaded by the service"),
    # torch's own nn.TransformerEncoderLayer: its exported attention runs sequence-first (kronecker._probe_layouts)
    "torch-transformer": dict(data=lambda seed: (((tokens(seed)[0][0],), tokens(seed)[1]), 3),
                              train=torch_fit(lambda: TorchEncoderClassifier(vocab=64, length=16, dim=32, heads=2,
                                                                             classes=3), 60, 3e-3, 64, "cosine"),
                              weight_decay=0.0, onnx=True, names=("inputs",),
                              title="torch's nn.TransformerEncoder (1 layer, dim 32, GELU, dropout 0.1; mean pooling, no "
                                    "mask) on the same token sequences' ids, Adam 3e-3 cosine, batch 64, 60 epochs; "
                                    "ONNX-exported and loaded by the service"),
}


def knn_probabilities(xs: tuple[np.ndarray, ...], labels: np.ndarray, classes: int, k: int = 10) -> np.ndarray:
    """Label frequencies among each example's k nearest other examples in input space (+ a small prior)."""
    from sklearn.neighbors import NearestNeighbors

    if xs[0].dtype.kind in "iu":  # token ids (+ mask): a bag of tokens
        ids, mask = xs[0], xs[1] if len(xs) > 1 else np.ones_like(xs[0])
        features = np.zeros((len(ids), int(ids.max()) + 1))
        np.add.at(features, (np.repeat(np.arange(len(ids)), ids.shape[1]), ids.ravel()), mask.ravel())
    else:
        features = xs[0].reshape(len(labels), -1)
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    _, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    votes = np.zeros((len(labels), classes))
    for column in neighbours[:, 1:].T:
        votes[np.arange(len(labels)), labels[column]] += 1
    return (votes + 0.1) / (votes.sum(1, keepdims=True) + 0.1 * classes)


def detection(scores, flipped, suggested=None, true=None, flags=None) -> dict:
    out = metrics(np.asarray(scores, dtype=float), flipped)
    if suggested is not None:
        out["suggested"] = float((suggested[flipped] == true[flipped]).mean())
    if flags is not None:
        out["flagged"] = len(flags)
        out["precision"] = float(flipped[flags].mean()) if len(flags) else 0.0
    return out


def run_case(name: str, noise_type: str, seed: int) -> tuple[dict, dict, dict]:
    kind = KINDS[name]
    (xs, y_true), classes = kind["data"](seed)
    y_noisy, flipped = flip(y_true, classes, noise_type, seed)
    results, seconds, facts = {}, {}, {}
    with Timer() as t:
        model = kind["train"](xs, y_noisy, seed)
    seconds["training once"] = t.seconds
    if kind["onnx"]:
        with tempfile.TemporaryDirectory() as tmp:
            loaded, inputs, labels, _ = export_and_load(model, dict(zip(kind["names"], xs)), y_noisy, Path(tmp))
        audited = loaded.module
    else:
        audited, inputs, labels = model, torch.from_numpy(xs[0]), torch.from_numpy(y_noisy)
    for method in ("folds", "loo", "ekfac"):
        with Timer() as t:
            result = run_audit(copy.deepcopy(audited), inputs, labels,
                               AuditConfig(method=method, seed=seed, weight_decay=kind["weight_decay"]))
        seconds[method] = t.seconds
        suggested = result.extras.get("suggested_label")  # self-influence methods suggest no label
        results[method] = detection(result.scores.numpy(), flipped, None if suggested is None else suggested.numpy(),
                                    y_true, result.flagged.numpy())
        if method == "folds":
            # the folds ranking without the trained model's loss rank (unlearning.fold_scores), same run
            alone = 1 - result.extras["out_of_sample_given_probability"].numpy()
            results["folds, 1 - p_oof alone"] = detection(alone, flipped)
            results["loss"] = detection(result.losses.numpy(), flipped)
            facts["training accuracy"] = float((result.predicted.numpy() == y_noisy).mean())
            facts["flips fitted"] = float((result.predicted.numpy()[flipped] == y_noisy[flipped]).mean())
    with Timer() as t:
        probs = knn_probabilities(xs, y_noisy, classes)
        issues, _, _ = confident_learning(torch.from_numpy(probs).float(), torch.from_numpy(y_noisy), classes)
        knn_scores = 1 - probs[np.arange(len(y_noisy)), y_noisy]
        knn_flags = np.argsort(-knn_scores, kind="stable")[:issues]
    seconds["k-NN"] = t.seconds
    results["k-NN"] = detection(knn_scores, flipped, probs.argmax(1), y_true, knn_flags)
    with Timer() as t:
        score, issues, oof = cleanlab_out_of_fold(xs if len(xs) > 1 else xs[0], y_noisy,
                                                  lambda part, ys: kind["train"](part if isinstance(part, tuple)
                                                                                 else (part,), ys, seed), seed=seed)
    seconds["cleanlab 5-fold"] = t.seconds
    results["cleanlab 5-fold"] = detection(score, flipped, oof.argmax(1), y_true, np.asarray(issues))
    return results, seconds, facts


ROWS = ["folds", "folds, 1 - p_oof alone", "loo", "ekfac", "loss", "k-NN", "cleanlab 5-fold"]


def mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def section(name: str, noise_type: str, runs: list[tuple[dict, dict, dict]]) -> tuple[str, list[str]]:
    rows = []
    for method in ROWS:
        per_seed = [r[method] for r, _, _ in runs]
        row = {"method": method, **{k: mean_std([p[k] for p in per_seed]) for k in ("AP", "AUROC", "R@10%", "R@20%")}}
        if "suggested" in per_seed[0]:
            row["suggested = true (flipped)"] = mean_std([p["suggested"] for p in per_seed])
        if "flagged" in per_seed[0]:
            row["flagged (precision)"] = (f"{np.mean([p['flagged'] for p in per_seed]):.0f} "
                                          f"({np.mean([p['precision'] for p in per_seed]):.3f})")
        row["seconds"] = float(np.mean([s.get(method, 0.0) for _, s, _ in runs]))
        rows.append(row)
    rows.append({"method": "(training the model once)", "seconds": float(np.mean([s["training once"] for _, s, _ in runs]))})
    facts = "; ".join(f"{k} {mean_std([f[k] for _, _, f in runs])}" for k in runs[0][2])
    ap = {m: [r[m]["AP"] for r, _, _ in runs] for m in ROWS}
    cost = np.mean([s["folds"] / s["cleanlab 5-fold"] for _, s, _ in runs])
    verdicts = [
        f"- {name}/{noise_type}: folds AP {np.mean(ap['folds']):.3f} vs cleanlab {np.mean(ap['cleanlab 5-fold']):.3f} "
        f"({'met' if np.mean(ap['folds']) >= np.mean(ap['cleanlab 5-fold']) else 'NOT met'}; without the loss rank "
        f"{np.mean(ap['folds, 1 - p_oof alone']):.3f}), ekfac "
        f"{np.mean(ap['ekfac']):.3f}, loo {np.mean(ap['loo']):.3f}, k-NN {np.mean(ap['k-NN']):.3f}; "
        f"below loss in {sum(a < b for a, b in zip(ap['folds'], ap['loss']))} of {len(runs)} seeds; "
        f"suggested {np.mean([r['folds']['suggested'] for r, _, _ in runs]):.3f} vs cleanlab "
        f"{np.mean([r['cleanlab 5-fold']['suggested'] for r, _, _ in runs]):.3f}; "
        f"cost {cost:.3f} of cleanlab's ({'met' if cost <= 0.2 else 'NOT met'}, target 0.2)"]
    text = (f"### {name}, {noise_type} flips\n\n{KINDS[name]['title']}. {facts}.\n\n"
            + table(rows, ["method", "AP", "AUROC", "R@10%", "R@20%", "suggested = true (flipped)",
                           "flagged (precision)", "seconds"]) + "\n")
    return text, verdicts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--noise", nargs="+", choices=["symmetric", "pairs"], default=["symmetric", "pairs"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    sections, verdicts = [], []
    with Timer() as total:
        for name in args.kinds:
            for noise_type in args.noise:
                runs = []
                for seed in args.seeds:
                    runs.append(run_case(name, noise_type, seed))
                    print(f"{name}/{noise_type}: seed {seed} done", flush=True)
                text, checks = section(name, noise_type, runs)
                print(text + "\n".join(checks), flush=True)
                sections.append(text)
                verdicts += checks
    text = (f"# Flags against 5-fold cross-validation ({NOISE:.0%} of labels flipped, seeds {args.seeds})\n\n"
            "Every row of a table is measured on the same trained model and data in the same run. AP/AUROC/recall: "
            "ranking of the flipped examples by each method's score (1 - out-of-sample probability of the given "
            "label for loo, k-NN and cleanlab; for folds that times (1 + rank of the trained model's loss / N) / 2, "
            "and the row below it without the loss; self-influence for ekfac; the loss for `loss`). 'suggested = true (flipped)': on the flipped examples, how often the "
            "method's most likely label is the true one. 'flagged (precision)': how many examples each method's "
            "own rule flags (confident learning for folds, loo and k-NN; cleanlab's find_label_issues) and the "
            "fraction of them flipped. Seconds: mean wall time per run on this 2-core machine (ratios within a "
            "run are what to read).\n"
            f"Environment: {environment()}; whole run {total.seconds / 60:.1f} min.\n\n"
            + "\n".join(sections) + "\n## Targets\n\n" + "\n".join(verdicts) + "\n")
    path = write_result(f"detection{'-' + args.tag if args.tag else ''}.md", text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
