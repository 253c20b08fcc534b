"""The estimator interface every curvature back end implements.

An estimator sees the training data only through *stages*: a stage is one streaming pass whose
result is a sum over examples (a covariance, a GGN, an eigenvalue correction). `accumulate` takes one
batch (or a whole shard) and returns a partial sum; partial sums from different shards add; `finish`
turns the total into the estimator's state. That is what lets a large dataset be split across workers
and reduced by summation. After all stages, `self_influence` scores batches.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .functional import ParamDict, num_parameters, per_example_loss_grads, trainable_parameters

Partial = dict[str, torch.Tensor]
GRAD_CHUNK_ELEMENTS = 1 << 25  # cap on B x P floats of per-example gradients formed at once


class BatchSource:
    """Re-iterable batches of (inputs, targets) on the compute device: `for x, y in source(): ...`."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, device: torch.device,
                 offset: int = 0):
        self.inputs, self.targets, self.batch_size, self.device = inputs, targets, batch_size, device
        self.offset = offset  # index of the first row in the whole training set (a shard's start)
        self.num_examples = int(inputs.shape[0])
        self.num_batches = max(1, math.ceil(self.num_examples / batch_size))

    def first_example(self, batch_index: int) -> int:
        """Index in the whole training set of a batch's first row."""
        return self.offset + batch_index * self.batch_size

    def __call__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_examples, self.batch_size):
            yield (self.inputs[start : start + self.batch_size].to(self.device, non_blocking=True),
                   self.targets[start : start + self.batch_size].to(self.device, non_blocking=True))


class EngineError(ValueError):
    """A problem with the request or model that the user can fix (shown to them verbatim)."""


@dataclass
class EstimatorOptions:
    damping: float | None = None  # None: 0.1 x mean eigenvalue of the curvature (per layer where blockwise)
    weight_decay: float = 0.0  # training L2 strength, added to the curvature as (G + wd I)
    fisher_samples: int = 1  # sampled labels per example for Fisher statistics; 0 = exact expectation
    seed: int = 0
    max_exact_parameters: int = 12_000
    lanczos_rank: int = 64
    # Blockwise estimators may keep per-example layer inputs/output-gradients (N x layer widths, never
    # N x P) to finish in one pass over the data; above this many bytes they stream instead.
    cache_bytes: int = 512 * 1024**2
    extra: dict = field(default_factory=dict)


@dataclass
class FittedCurvature:
    """A fitted curvature as named tensors plus string metadata (what safetensors stores): enough to
    score with it later without refitting, on the same model. `metadata["structure"]` says which
    parameters each block covers; loading it into an estimator whose structure differs is refused."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}, metadata=self.metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> FittedCurvature:
        from safetensors.torch import load

        # the metadata sits in the JSON header after its 8-byte length (safetensors' format)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
        return cls(tensors=load(data), metadata=dict(metadata))


class Estimator:
    name = "base"
    stages: tuple[str, ...] = ()
    # True when self_influence values are g^T (G + lambda I)^-1 g for some approximation of G.
    uses_curvature = True
    # True when a fit can be exported as a FittedCurvature and loaded again instead of refitting.
    stores_curvature = False

    def __init__(self, model: nn.Module, loss, options: EstimatorOptions, device: torch.device):
        self.model = model
        self.loss = loss
        self.options = options
        self.device = device
        self.params: ParamDict = trainable_parameters(model)
        self.num_parameters = num_parameters(self.params)
        self.damping: float | None = options.damping
        self.generator = torch.Generator().manual_seed(options.seed)  # random starts (Lanczos), never labels
        self._first_example = 0

    def draw_for_batch(self, first_example: int) -> None:
        """Say where the next batch starts in the whole training set: its Fisher labels are drawn from
        (seed, stage, sample number, example index) alone, so that every fit plan (one pass or one per
        stage), every batch size and every sharding draws the same labels for the same example, and
        each stage draws its own (independent of the other stages', as kronfluence's passes do)."""
        self._first_example = first_example

    def sampled_targets(self, outputs: torch.Tensor, sample: int, stage: str) -> torch.Tensor:
        """Labels drawn from the model's output distribution for the current batch (draw_for_batch)."""
        count = self.loss.uniforms_per_draw(outputs.shape[-1])
        stream = zlib.crc32(f"{stage}:{sample}".encode())
        uniforms = example_uniforms(self.options.seed, stream, self._first_example, outputs.shape[0], count)
        return self.loss.sample_targets(outputs, uniforms)

    # Set by estimators that produce every example's score while fitting (one-pass mode).
    precomputed_scores: torch.Tensor | None = None
    # Set by a fit that ran the model forward on every batch in order: the (detached) outputs at
    # theta_s, which the audit then reuses instead of a separate prediction pass.
    batch_outputs: list[torch.Tensor] | None = None

    def probe(self, example: torch.Tensor) -> None:
        """Decide from two inputs whatever the estimator decides from the model before fitting (which
        modules get which treatment), as a fit's first batch would (default: nothing to decide)."""

    def prepare(self, data: "BatchSource") -> None:
        """Choose a plan for this data before `num_passes` is read (default: nothing to choose)."""

    def fit(self, data: "BatchSource", report: Callable[[str, float], None]) -> None:
        """Run every stage as one streaming pass over the data (a sum of per-batch partials)."""
        for stage in self.stages:
            total = None
            for b, (x, y) in enumerate(data()):
                self.draw_for_batch(data.first_example(b))
                total = add_partials(total, self.accumulate(stage, x, y, None))
                report(stage, (b + 1) / data.num_batches)
            self.finish(stage, total, data.num_examples)

    @property
    def num_passes(self) -> int:
        """How many passes over the data `fit` makes (for progress reporting)."""
        return len(self.stages)

    def accumulate(self, stage: str, inputs: torch.Tensor, targets: torch.Tensor, partial: Partial | None) -> Partial:
        raise NotImplementedError

    def finish(self, stage: str, total: Partial, num_examples: int) -> None:
        raise NotImplementedError

    def self_influence(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def partial_bytes(self) -> int:
        """Size of one shard's partial sums for a stage at most (0: small, as blockwise factors are)."""
        return 0

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """(G + lambda I)^-1 v for each row of `vectors` (R, P), float64: the fitted curvature as a
        preconditioner, through which self-influence, the removal step and attribution are read."""
        raise EngineError(f"the '{self.name}' curvature cannot precondition gradients; attribute with an audit "
                          "of method ekfac, kfac, diagonal, exact or lanczos")

    def loss_gradients(self, inputs: torch.Tensor, targets: torch.Tensor) -> Iterator[torch.Tensor]:
        """Per-example loss gradients (b, P) at theta_s, in chunks of at most GRAD_CHUNK_ELEMENTS floats."""
        step = max(1, GRAD_CHUNK_ELEMENTS // max(1, self.num_parameters))
        for start in range(0, inputs.shape[0], step):
            yield per_example_loss_grads(self.model, self.params, self.loss, inputs[start : start + step],
                                         targets[start : start + step])

    def precondition_queries(self, inputs: torch.Tensor, targets: torch.Tensor):
        """(G + lambda I)^-1 g_q of each query's loss gradient, for cross_influence: here (Q, P) float64
        by `solve` (the blockwise estimators keep theirs per block, without forming P-vectors)."""
        return torch.cat([self.solve(g.double()) for g in self.loss_gradients(inputs, targets)])

    def cross_influence(self, inputs: torch.Tensor, targets: torch.Tensor, queries) -> torch.Tensor:
        """(B, Q): g_i^T (G + lambda I)^-1 g_q for each training example i of the batch and each query."""
        return torch.cat([g.double() @ queries.T for g in self.loss_gradients(inputs, targets)])

    def structure(self) -> list:
        """The trainable parameters' names and shapes, in the order of the parameter vector: a stored
        full-vector curvature (exact, lanczos) only loads into a model that has the same."""
        return [[name, list(p.shape)] for name, p in self.params.items()]

    def _check_stored(self, curvature: FittedCurvature) -> dict:
        meta = curvature.metadata
        if meta.get("estimator") != self.name:
            raise EngineError(f"stored curvature is '{meta.get('estimator')}', not '{self.name}'")
        if json.loads(meta.get("structure", "null")) != self.structure():
            raise EngineError("the stored curvature was fitted on a model of another structure")
        return meta

    def fitted_curvature(self, complete: bool = True) -> FittedCurvature:
        """The fitted state, for storing (estimators with stores_curvature)."""
        raise EngineError(f"the '{self.name}' curvature cannot be stored")

    def load_curvature(self, curvature: FittedCurvature, example: torch.Tensor) -> None:
        """Take a stored fit instead of fitting (estimators with stores_curvature). `example`: two
        inputs, for whatever the estimator decides from the model before fitting."""
        raise EngineError(f"the '{self.name}' curvature cannot be loaded")

    def describe(self) -> dict:
        """What the summary should say about how the curvature was treated."""
        return {"estimator": self.name, "num_parameters": self.num_parameters, "damping": self.damping}


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash (Steele et al.'s SplitMix64 finaliser); uint64 arithmetic wraps."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def example_uniforms(seed: int, stream: int, first_example: int, batch: int, count: int) -> torch.Tensor:
    """(batch, count) float64 uniforms in (0, 1), a pure function of (seed, stream, example index, j):
    counter-based like Philox, so no generator state is carried from batch to batch or shard to shard."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed], dtype=np.uint64) * np.uint64(0x100000001B3) + np.uint64(stream))
        examples = np.arange(first_example, first_example + batch, dtype=np.uint64)[:, None]
        counters = examples * np.uint64(count) + np.arange(count, dtype=np.uint64)[None, :]
        bits = _splitmix64(counters ^ key)
    return torch.from_numpy(((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53)


def add_partials(a: Partial | None, b: Partial) -> Partial:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in b}
