from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from app.core.timeutil import as_utc

AuditStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")
Verdict = Literal["mislabeled", "correct", "unsure"]


class AuditCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: uuid.UUID
    dataset_id: uuid.UUID
    method: str = Field("folds", max_length=32, description=(
        "Influence estimator (see GET /v1/methods); the default, folds, predicts every example from a copy of "
        "the model that unlearned its fold and flags by confident learning, with suggested labels"))
    damping: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False, description="lambda; null = 0.1 x mean eigenvalue of the curvature")
    weight_decay: float = Field(0.0, ge=0, le=1e3, allow_inf_nan=False, description="L2 strength used in training; added to the curvature")
    batch_size: int | None = Field(None, ge=1, le=8192, description="Examples per batch; null = chosen from the model size")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for sampled-label Fisher statistics")
    fisher_samples: int = Field(1, ge=0, le=64, description=(
        "Labels sampled from the model per example for the Fisher statistics; 0 = exact expectation over classes"))
    lanczos_rank: int = Field(64, ge=1, le=2048, description="Eigenpairs kept by the lanczos method")
    verify_top_k: int = Field(0, ge=0, le=200, description=(
        "Solve the PBRF objective directly for this many top flags and report estimate-vs-PBRF agreement"))
    pbrf_epsilon: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False, description=(
        "eps of the PBRF solved by verify_top_k; null = removal, -1/N. A smaller |eps| checks the first-order "
        "regime where removal is ill-posed (the verification summary says when)"))
    flag_fraction: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description=(
        "Fraction of examples flagged, most suspicious first; null = the method's rule "
        "(loo: confident learning's estimated number of label issues; others: 10%)"))
    curvature: Literal["auto", "exact", "ekfac", "kfac", "diagonal", "lanczos"] = Field("auto", description=(
        "Curvature back end of the loo method; auto = ekfac (exact is the slower reference)"))
    folds: int = Field(5, ge=2, le=20, description=(
        "Method folds: how many folds are unlearned (each example is predicted by a copy trained without its fold)"))
    fold_epochs: int = Field(15, ge=1, le=100, description=(
        "Method folds: the most epochs each fold's copy trains (it stops 3 epochs after its held-back loss "
        "last fell, and predicts with its best epoch)"))
    fold_shrink: float = Field(0.5, gt=0, le=1, allow_inf_nan=False, description=(
        "Method folds: every weight but the re-initialised output layer is multiplied by this before a fold "
        "trains, so that features that only memorised examples hold up are rebuilt from the retained data "
        "(1 = fine-tune from the trained weights unchanged)"))
    shard_size: int | None = Field(None, ge=1, le=10**9, description=(
        "Training examples per shard: an audit over more examples is split into shards that every worker "
        "may take (blockwise methods ekfac, kfac, diagonal; rounded to a multiple of the batch size); "
        "null = the server's PBRF_SHARD_SIZE. Recorded in params and in summary.shards"))
    name: str | None = Field(None, max_length=255)

    @field_validator("pbrf_epsilon")
    @classmethod
    def _nonzero_epsilon(cls, value: float | None) -> float | None:
        if value == 0:
            raise ValueError("pbrf_epsilon must be non-zero (the response is a difference quotient in eps)")
        return value


class _JobOut(BaseModel):
    """What every job (audit, attribution) reports of its life, timestamps in UTC."""

    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    id: uuid.UUID
    status: AuditStatus
    progress: float
    stage: str | None
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @field_validator("created_at", "started_at", "finished_at", mode="after")
    @classmethod
    def _utc(cls, value):
        return as_utc(value)


class AuditOut(_JobOut):

    method: str
    damping: float | None = Field(description="The damping used (the requested one until the run computes it)")
    damping_requested: float | None
    model_id: uuid.UUID
    dataset_id: uuid.UUID
    params: dict
    worker: str | None = Field(None, description="host:pid of the worker process on the latest attempt")
    summary: dict | None


class AuditList(BaseModel):
    items: list[AuditOut]


class FlagOut(BaseModel):
    rank: int = Field(description="1 = most suspicious")
    index: int = Field(description="Position of the example in the uploaded dataset")
    given_label: int
    predicted_label: int
    score: float = Field(description="Higher = more suspicious")
    loss: float
    given_label_probability: float
    suggested_label: int | None = Field(None, description="loo: the most likely label had the model not seen it")
    suggested_label_probability: float | None = None
    out_of_sample_given_probability: float | None = Field(None, description="loo: p(given label) without the example")
    # the tenant's verdict on this example, made on any audit of the same dataset content (null: none yet)
    verdict: Verdict | None = Field(None, description="The tenant's review of this example (PUT .../verdict)")
    corrected_label: int | None = Field(None, description="The label a `mislabeled` verdict gives the example")
    verdict_by: str | None = Field(None, description="Name of the API key that gave the verdict (null in open mode)")
    verdict_at: datetime | None = None

    @field_validator("verdict_at", mode="after")
    @classmethod
    def _utc(cls, value):
        return as_utc(value)


class VerdictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdict: Verdict
    corrected_label: StrictInt | None = Field(None, description=(
        "mislabeled only: the right label, a class of the audit's model (0..num_outputs-1); null takes the flag's "
        "suggested_label where the method gives one (loo), else its predicted_label"))

    @model_validator(mode="after")
    def _label_only_when_mislabeled(self) -> VerdictIn:
        if self.corrected_label is not None and self.verdict != "mislabeled":
            raise ValueError("corrected_label goes with the verdict `mislabeled` only")
        return self


class VerdictOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    # the stored row's attribute, or the JSON the API sends (so that the Python client reads it with this class)
    index: int = Field(validation_alias=AliasChoices("example_index", "index"),
                       description="Position of the example in the dataset")
    verdict: Verdict
    corrected_label: int | None = Field(description="Set exactly when the verdict is `mislabeled`")
    verdict_by: str | None = Field(description="Name of the API key that gave the verdict (null in open mode)")
    verdict_at: datetime

    @field_validator("verdict_at", mode="after")
    @classmethod
    def _utc(cls, value):
        return as_utc(value)


class LabelChange(BaseModel):
    index: int
    label: int = Field(description="The corrected label")
    original_label: int = Field(description="The label in the uploaded dataset")
    verdict_by: str | None
    verdict_at: datetime

    @field_validator("verdict_at", mode="after")
    @classmethod
    def _utc(cls, value):
        return as_utc(value)


class LabelChanges(BaseModel):
    num_examples: int
    corrected: bool = Field(description="Whether the accepted corrections were applied (the `corrected` parameter)")
    changes: list[LabelChange] = Field(description="The examples whose label the corrections change, by index")


class FlagPage(BaseModel):
    items: list[FlagOut]
    next_cursor: str | None


class ScoreOut(BaseModel):
    index: int
    score: float
    given_label: int
    predicted_label: int
    loss: float
    given_label_probability: float
    self_influence: float | None = Field(None, description="Raw g^T (G + damping I)^-1 g where the method has one")
    suggested_label: int | None = None
    suggested_label_probability: float | None = None
    out_of_sample_given_probability: float | None = None


class ScorePage(BaseModel):
    items: list[ScoreOut]
    next_cursor: str | None


class ScoreHistogram(BaseModel):
    num_examples: int
    scale: Literal["linear", "log"] = Field(description="How the bins divide the scores: equal widths of the score, "
                                            "or of log10(score)")
    edges: list[float] = Field(description="bins + 1 bin edges, in score units (also for scale=log)")
    counts: list[int] = Field(description="Examples per bin; the last bin includes its upper edge")
    excluded: int = Field(description="Scores outside the bins: not finite, or not positive with scale=log")
    num_flagged: int = Field(description="Flag rows of the audit")
    flagged_min_score: float | None = Field(description="The lowest score among the flags: flagged examples lie at "
                                            "or above it (null without flags)")


class MethodsOut(BaseModel):
    methods: list[str]
    default: str


class AttributionOut(_JobOut):
    audit_id: uuid.UUID
    top_k: int
    num_queries: int


class InfluentialExample(BaseModel):
    index: int = Field(description="Position of the training example in the audit's dataset")
    score: float = Field(description=(
        "g_train^T (G + damping I)^-1 g_query: the first-order fall of the query's loss when the training "
        "example is upweighted (positive: it helped the query's label; negative: it pulled against it)"))


class QueryAttribution(BaseModel):
    query_index: int = Field(description="Position of the example in the uploaded query set")
    helpful: list[InfluentialExample] = Field(description="largest score first")
    harmful: list[InfluentialExample] = Field(description="most negative score first")


class QueryPage(BaseModel):
    items: list[QueryAttribution]
    next_cursor: str | None
