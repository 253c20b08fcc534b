"""Probe (not a method): how short can a fold's training be, and what does ranking by the out-of-fold
score weighted by the training-loss rank add? Same models, flips and seeds as bench/detection.py; the
cost is reported against training the model once (cleanlab's 5-fold retraining costs about 4 times that:
5 trainings on 80% of the data; detection.py measures it directly).

    cd bench && ../.venv/bin/python fold_budget_probe.py --kinds residual-cnn cnn transformer --seeds 0 1 2
"""
import argparse, copy, dataclasses, sys, tempfile, time
from pathlib import Path
import numpy as np, torch
from scipy.stats import rankdata
sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import detection as D
from app.influence import AuditConfig
from app.influence.audit import conclude_fold_audit, set_up_fold_audit, unlearn_one_fold

parser = argparse.ArgumentParser()
parser.add_argument("--kinds", nargs="+", default=["residual-cnn", "cnn", "transformer"])
parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
parser.add_argument("--noise", nargs="+", default=["symmetric", "pairs"])
parser.add_argument("--budgets", nargs="+", default=["15x64", "6x64", "6x128", "4x128"],
                    help="EPOCHSxBATCH[xLR[xSHRINK[xFOLDS]]] of a fold's training (defaults: lr 1e-3, shrink 0.5, 5 folds)")
args = parser.parse_args()
print(f"# {' '.join(sys.argv)}\n# torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
out = {}
for name in args.kinds:
    for noise in args.noise:
        for seed in args.seeds:
            kind = D.KINDS[name]
            (xs, y_true), classes = kind["data"](seed)
            y_noisy, flipped = D.flip(y_true, classes, noise, seed)
            t0 = time.perf_counter()
            model = kind["train"](xs, y_noisy, seed)
            train_s = time.perf_counter() - t0
            if kind["onnx"]:
                with tempfile.TemporaryDirectory() as tmp:
                    loaded, inputs, labels, _ = D.export_and_load(model, dict(zip(kind["names"], xs)), y_noisy, Path(tmp))
                audited = loaded.module
            else:
                audited, inputs, labels = model, torch.from_numpy(xs[0]), torch.from_numpy(y_noisy)
            row = {}
            for budget in args.budgets:
                parts = budget.split("x")
                epochs, batch = int(parts[0]), int(parts[1])
                lr = float(parts[2]) if len(parts) > 2 else 1e-3
                shrink = float(parts[3]) if len(parts) > 3 else 0.5
                folds = int(parts[4]) if len(parts) > 4 else 5
                config = AuditConfig(method="folds", seed=seed, weight_decay=kind["weight_decay"], fold_epochs=epochs,
                                     fold_shrink=shrink, folds=folds)
                t0 = time.perf_counter()
                setup = set_up_fold_audit(copy.deepcopy(audited), inputs, labels, config)
                setup.settings = dataclasses.replace(setup.settings, batch_size=batch, learning_rate=lr)
                outcomes = [unlearn_one_fold(setup, inputs, labels, f) for f in range(config.folds)]
                result = conclude_fold_audit(config, setup, inputs, labels, outcomes, {}, t0)
                seconds = time.perf_counter() - t0
                fs, ls = result.scores.numpy(), result.losses.numpy()
                combined = fs * (1 + rankdata(ls) / len(fs))
                suggested = result.extras["suggested_label"].numpy()
                for key, value in ((f"{budget} AP", D.metrics(fs, flipped)["AP"]),
                                   (f"{budget} AP x loss", D.metrics(combined, flipped)["AP"]),
                                   (f"{budget} suggested", float((suggested[flipped] == y_true[flipped]).mean())),
                                   (f"{budget} cost/train", seconds / train_s)):
                    out.setdefault((name, noise, key), []).append(value)
                    row[key] = round(value, 3)
                row[f"{budget} best epochs"] = [f["best_epoch"] for f in result.summary["out_of_sample"]["per_fold"]]
                row[f"{budget} held-back loss"] = round(float(np.mean([min(f["held_back_losses"]) for f in
                                                                     result.summary["out_of_sample"]["per_fold"]])), 3)
            print(name, noise, seed, f"train {train_s:.1f}s", row, flush=True)
for (name, noise, key), values in out.items():
    print(f"{name:13s} {noise:9s} {key:22s} {np.mean(values):.3f}")
