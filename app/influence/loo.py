"""Out-of-sample predictions from one trained model: a Gauss-Newton step on the PBRF removal objective.

With A = sum_j J_j^T H_j J_j + N (lambda + wd) I = N (G + lambda I) the damped summed GGN, example i's
C x C leverage M_i = J_i A^-1 J_i^T, its residual r_i = dL/df (softmax: p - onehot(y)) and output
Hessian H_i = R_i^T R_i, one Gauss-Newton step on the PBRF objective with example i removed gives

    f_(-i) = f_i + M_i (I - H_i M_i)^-1 r_i
           = f_i + M_i r_i + M_i R_i^T (I - K_i)^-1 R_i M_i r_i,   K_i = R_i M_i R_i^T

(Woodbury on A - J_i^T H_i J_i, no inverse of the singular H_i). With the exact A, K_i has eigenvalues in
[0, 1); the first-order influence is f_i + M_i r_i, and the (I - K)^-1 factor restores what memorised
examples would look like to a model that never saw them.

Approximate curvature (EK-FAC, K-FAC, diagonal, Lanczos) averages every example into shared factors,
so it does not hold example i's own rank-C term J_i^T H_i J_i in i's own direction (measured: the
exact formula's K_i then exceeds 1 for a third of the digits examples). The step therefore adds that
term explicitly, A~ = A_approx + J_i^T H_i J_i, and removes it again by the same Woodbury identity,
which gives exactly f_(-i) = f_i + M~_i r_i with M~_i = J_i A_approx^-1 J_i^T: stable by construction.

From p_(-i) = softmax(f_(-i)): the self-confidence p_(-i)[y_i] ranks, argmax p_(-i) suggests a label,
and confident learning (Northcutt et al. 2021) on the approximate out-of-sample probabilities counts
the label issues: per-class thresholds t_j = mean p_(-i)[j] over examples labelled j, the confident
joint, calibrated to the label counts; its off-diagonal mass is how many examples are flagged.
"""

from __future__ import annotations

import torch

from .base import EngineError, Estimator

EIGEN_CLIP = 1.0 - 1e-3
MAX_DIRECT_CLASSES = 100
TOP_CLASSES = 20


def select_classes(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """All classes when C <= 100; otherwise the given label plus the top classes by probability."""
    C = outputs.shape[1]
    if C <= MAX_DIRECT_CLASSES:
        return torch.arange(C, device=outputs.device).expand(outputs.shape[0], C)
    top = outputs.topk(TOP_CLASSES, dim=1).indices
    given = targets.long().unsqueeze(1)
    missing = ~(top == given).any(1, keepdim=True)
    # replace the weakest top class with the given label where it is missing
    top[:, -1:] = torch.where(missing, given, top[:, -1:])
    return top


def out_of_sample_logits(estimator: Estimator, loss, inputs, targets, num_examples: int):
    """For a batch: f_(-i) over the selected classes, the classes (B, K), the first-order
    self-influence N r^T M r, and how many examples needed eigenvalue clipping."""
    if not hasattr(estimator, "leverage"):
        raise EngineError(f"the '{estimator.name}' curvature cannot give leverages; use exact, ekfac, kfac, "
                          "diagonal or lanczos")
    with torch.no_grad():
        outputs = estimator.model(inputs).double()
    classes = select_classes(outputs, targets)
    f = outputs.gather(1, classes)
    # restricted to the selected classes, the softmax output Hessian/residual are those of the
    # renormalised distribution over them (exactly the full ones when all classes are kept)
    local_targets = (classes == targets.long().unsqueeze(1)).double().argmax(1)
    M = estimator.leverage(inputs, classes).double() / num_examples
    r = loss.residual(f, local_targets).double()
    R = loss.hessian_sqrt(f).double()
    Mr = torch.einsum("bcd,bd->bc", M, r)
    self_influence = num_examples * (r * Mr).sum(1)
    if estimator.name != "exact":
        return f + Mr, classes, self_influence, 0
    K = R @ M @ R.transpose(1, 2)
    K = 0.5 * (K + K.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(K)
    clipped = int((evals > EIGEN_CLIP).any(1).sum())
    inv = evecs @ torch.diag_embed(1.0 / (1.0 - evals.clamp(max=EIGEN_CLIP))) @ evecs.transpose(1, 2)
    correction = torch.einsum("bcd,bd->bc", M @ R.transpose(1, 2) @ inv, torch.einsum("bcd,bd->bc", R, Mr))
    return f + Mr + correction, classes, self_influence, clipped


def confident_learning(probs: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class thresholds, the calibrated confident joint, and the estimated number of label issues.

    probs: (N, C) out-of-sample probabilities. Returns (num_issues, thresholds, joint (C, C))."""
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes).double()
    given = probs.double().gather(1, labels.unsqueeze(1)).squeeze(1)
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, given)
    thresholds = torch.full((num_classes,), float("inf"), dtype=torch.float64)
    present = counts > 0
    thresholds[present] = sums[present] / counts[present]
    above = probs.double() >= thresholds.unsqueeze(0)
    masked = torch.where(above, probs.double(), torch.full_like(probs.double(), -1.0))
    guess = masked.argmax(1)
    confident = above.any(1)
    joint = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    joint.index_put_((labels[confident], guess[confident]), torch.ones(int(confident.sum()), dtype=torch.float64),
                     accumulate=True)
    # calibrate rows to the observed label counts (cleanlab's calibrate_confident_joint)
    row = joint.sum(1, keepdim=True)
    calibrated = torch.where(row > 0, joint / row.clamp_min(1) * counts.unsqueeze(1), joint)
    off_diagonal = calibrated.sum() - torch.diagonal(calibrated).sum()
    return int(round(float(off_diagonal))), thresholds, calibrated
