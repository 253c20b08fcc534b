"""Shared pieces of the benchmarks: metrics, peers (kronfluence, cleanlab), timing, tables."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def metrics(scores: np.ndarray, flipped: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    order = np.argsort(-scores, kind="stable")
    out = {"AUROC": roc_auc_score(flipped, scores), "AP": average_precision_score(flipped, scores)}
    for fraction in (0.1, 0.2):
        k = int(round(fraction * len(scores)))
        out[f"R@{int(fraction * 100)}%"] = flipped[order[:k]].sum() / flipped.sum()
    return out


def kronfluence_self_influence(model: nn.Module, x: np.ndarray | tuple[np.ndarray, ...], y: np.ndarray,
                               strategy: str = "ekfac", damping: float | None = None, batch_size: int = 256,
                               workdir: str = "/tmp/kronfluence") -> np.ndarray:
    """kronfluence 1.0.1's self-influence scores with its own pipeline (factors, then self scores), CPU.
    `x` is one input array, or a tuple of arrays for a model that takes several (input_ids, attention_mask):
    the model is called as model(*inputs). kronfluence covers the model's Linear and Conv2d layers."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    logging.getLogger("kronfluence").setLevel(logging.ERROR)

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            *inputs, labels = batch
            logits = model(*inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return nn.functional.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            *inputs, labels = batch
            return nn.functional.cross_entropy(model(*inputs), labels, reduction="sum")

    xs = x if isinstance(x, tuple) else (x,)
    dataset = torch.utils.data.TensorDataset(*(torch.from_numpy(a) for a in xs), torch.from_numpy(y))
    task = ClassificationTask()
    import copy

    wrapped = prepare_model(copy.deepcopy(model).eval(), task)
    analyzer = Analyzer(analysis_name=f"bench-{os.getpid()}-{time.time_ns()}", model=wrapped, task=task, cpu=True,
                        disable_tqdm=True, output_dir=workdir)
    analyzer.fit_all_factors(factors_name="f", dataset=dataset, per_device_batch_size=batch_size,
                             factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
    analyzer.compute_self_scores(scores_name="s", factors_name="f", train_dataset=dataset,
                                 per_device_train_batch_size=batch_size,
                                 score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
    return analyzer.load_self_scores("s")["all_modules"].double().numpy()


def cleanlab_out_of_fold(x: np.ndarray | tuple[np.ndarray, ...], y: np.ndarray, train_fn, folds: int = 5,
                         seed: int = 0):
    """cleanlab on 5-fold out-of-fold probabilities from retraining the same model: returns
    (score for every example, higher = more suspicious; flagged indices from find_label_issues).
    `x` is one input array, or a tuple of arrays for a model that takes several; train_fn gets the
    training part in the same form and returns a model called as model(*inputs)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    xs = x if isinstance(x, tuple) else (x,)
    probs = np.zeros((len(y), int(y.max()) + 1))
    for train_idx, held_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        part = tuple(a[train_idx] for a in xs)
        model = train_fn(part if isinstance(x, tuple) else part[0], y[train_idx])
        with torch.no_grad():
            logits = model(*(torch.from_numpy(a[held_idx]) for a in xs))
            probs[held_idx] = torch.softmax(logits.double(), -1).numpy()
    quality = get_label_quality_scores(y, probs, method="self_confidence")
    issues = find_label_issues(y, probs, return_indices_ranked_by="self_confidence")
    return 1.0 - quality, issues, probs


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def summary_row(method: str, runs: list[dict], seconds: list[float]) -> dict:
    """One table row: each detection metric as mean ± std over seeds, and the mean wall time."""
    row = {"method": method}
    for key in ("AUROC", "AP", "R@10%", "R@20%"):
        values = np.array([r[key] for r in runs], dtype=float)
        row[key] = f"{values.mean():.3f} ± {values.std():.3f}"
    row["seconds"] = float(np.mean(seconds))
    return row


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_result(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    return path


def environment() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"device {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
