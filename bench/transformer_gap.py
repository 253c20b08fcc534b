"""Where the transformer's `ekfac` AP gap to kronfluence comes from (issue #9's target: ekfac AP at
least kronfluence's). The same trained and ONNX-exported models as bench/quality_models.py's
transformer rows, scored in one run by:
- ours, every learned weight (the default: token and position tables, LayerNorm and attention
  included), one Fisher label sampled per example (the default, `fisher_samples=1`);
- the same with another Fisher seed (how much the sampled labels alone move the AP);
- the same with the exact Fisher expectation over the classes (`fisher_samples=0`);
- ours on only the layers kronfluence covers (Linear maps: the other parameters are turned into
  buffers of the loaded module), sampled and exact Fisher;
- kronfluence 1.0.1 EK-FAC on the torch model, and the plain loss.

    cd bench && ../.venv/bin/python transformer_gap.py [--seeds 0 1 2]
Writes bench/results/transformer-gap.md.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from common import Timer, environment, kronfluence_self_influence, metrics, table, write_result
from quality_models import KINDS, export_and_load, token_data, train_kind
from app.influence import AuditConfig, run_audit


def kronfluence_layers_only(module: nn.Module, covered: set[str]) -> nn.Module:
    """A copy whose parameters outside the `covered` layers are buffers: the audit leaves them out."""
    module = copy.deepcopy(module)
    for name, sub in module.named_modules():
        if name in covered:
            continue
        for key, p in list(sub.named_parameters(recurse=False)):
            delattr(sub, key)
            sub.register_buffer(key, p.detach().clone())
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    kind = KINDS["transformer"]
    runs: dict[str, list[float]] = {}
    parameters: dict[str, int] = {}
    seconds: dict[str, list[float]] = {}

    def record(name: str, scores: np.ndarray, flipped: np.ndarray, t: float, num_parameters: int | None = None):
        runs.setdefault(name, []).append(metrics(scores, flipped)["AP"])
        seconds.setdefault(name, []).append(t)
        if num_parameters is not None:
            parameters[name] = num_parameters

    for seed in args.seeds:
        arrays, y_noisy, flipped = token_data(seed, args.n, 3)
        xs = tuple(arrays.values())
        model = train_kind(kind, xs, y_noisy, seed, 1.0)
        with tempfile.TemporaryDirectory() as tmp:
            loaded, inputs, labels, _ = export_and_load(model, arrays, y_noisy, Path(tmp))

        def audit(module, **options):
            with Timer() as t:
                result = run_audit(copy.deepcopy(module), inputs, labels,
                                   AuditConfig(method="ekfac", weight_decay=0.0, **({"seed": seed} | options)))
            return result, t.seconds

        full, t = audit(loaded.module)
        record("ours, every weight, 1 sampled Fisher label (default)", full.scores.numpy(), flipped, t,
               full.summary["estimator"]["num_parameters"])
        record("loss (peer baseline)", full.losses.numpy(), flipped, 0.0)
        other, t = audit(loaded.module, seed=seed + 100)
        record("ours, every weight, another Fisher seed", other.scores.numpy(), flipped, t)
        exact, t = audit(loaded.module, fisher_samples=0)
        record("ours, every weight, exact Fisher expectation", exact.scores.numpy(), flipped, t)
        covered = {layer["layer"] for layer in full.summary["estimator"]["layers"]
                   if layer["treatment"] == "ekfac" and layer["type"] != "Embedding"}
        linear = kronfluence_layers_only(loaded.module, covered)
        part, t = audit(linear)
        record("ours, kronfluence's layers only, 1 sampled Fisher label", part.scores.numpy(), flipped, t,
               part.summary["estimator"]["num_parameters"])
        part_exact, t = audit(linear, fisher_samples=0)
        record("ours, kronfluence's layers only, exact Fisher expectation", part_exact.scores.numpy(), flipped, t)
        with Timer() as t:
            peer = kronfluence_self_influence(model, xs, y_noisy, strategy="ekfac")
        record("kronfluence EK-FAC (peer, Linear layers, sampled labels)", peer, flipped, t.seconds)
        print(f"seed {seed} done", flush=True)

    rows = [{"scores": name, "parameters": parameters.get(name, ""), "AP (mean)": float(np.mean(values)),
             "AP per seed": ", ".join(f"{v:.4f}" for v in values), "seconds": float(np.mean(seconds[name]))}
            for name, values in runs.items()]
    text = (f"# Transformer: our EK-FAC against kronfluence's, taken apart\n\n"
            f"{kind['title']}; {args.n} examples, 10% of labels flipped, trained to memorise them, exported with "
            f"torch's defaults (bench/quality_models.py). Seeds {args.seeds}.\n"
            f"Environment: {environment()}\n\n"
            + table(rows, ["scores", "parameters", "AP (mean)", "AP per seed", "seconds"]) + "\n")
    print(text)
    print("written to", write_result("transformer-gap.md", text))


if __name__ == "__main__":
    main()
