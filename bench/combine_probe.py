"""Probe (not yet a method): does ranking the folds flags by combining the out-of-fold score with the
model's own per-example loss or self-influence beat the folds score alone? Same models, flips and seeds as
bench/detection.py (no cleanlab, no k-NN: see detection.md for them).

    cd bench && ../.venv/bin/python combine_probe.py mlp mlp-wd mlp-deep cnn residual-cnn transformer
Prints per case and the means; the run of 2026-12-06 is in bench/results/combine-probe.txt.
"""
import copy, sys, tempfile
from pathlib import Path
import numpy as np, torch
from scipy.stats import rankdata
sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import detection as D
from app.influence import AuditConfig, run_audit
out = {}
for name in sys.argv[1:]:
  for noise in ("symmetric", "pairs"):
    for seed in (0, 1, 2):
        kind = D.KINDS[name]
        (xs, y_true), classes = kind["data"](seed)
        y_noisy, flipped = D.flip(y_true, classes, noise, seed)
        model = kind["train"](xs, y_noisy, seed)
        if kind["onnx"]:
            with tempfile.TemporaryDirectory() as tmp:
                loaded, inputs, labels, _ = D.export_and_load(model, dict(zip(kind["names"], xs)), y_noisy, Path(tmp))
            audited = loaded.module
        else:
            audited, inputs, labels = model, torch.from_numpy(xs[0]), torch.from_numpy(y_noisy)
        f = run_audit(copy.deepcopy(audited), inputs, labels, AuditConfig(method="folds", seed=seed, weight_decay=kind["weight_decay"]))
        e = run_audit(copy.deepcopy(audited), inputs, labels, AuditConfig(method="ekfac", seed=seed, weight_decay=kind["weight_decay"]))
        fs, es, ls = f.scores.numpy(), e.scores.numpy(), f.losses.numpy()
        n = len(fs)
        variants = {"folds": fs, "ekfac": es,
                    "rank-mean folds+ekfac": rankdata(fs) + rankdata(es),
                    "folds x (1+ekfac rank)": fs * (1 + rankdata(es) / n),
                    "folds x (1+loss rank)": fs * (1 + rankdata(ls) / n)}
        for k, v in variants.items():
            out.setdefault((name, noise, k), []).append(D.metrics(np.asarray(v, float), flipped)["AP"])
        print(name, noise, seed, {k: round(out[(name, noise, k)][-1], 4) for k in variants}, flush=True)
for k, v in out.items():
    print(k, round(float(np.mean(v)), 4))
