"""Blockwise curvature for nn.Linear and nn.Conv2d layers: `diagonal`, `kfac` and `ekfac`.

For a layer with (bias-augmented) inputs a and output gradients s, an example's weight gradient is
G_n = sum_t s_t a_t^T over the positions t where the layer is applied (one position for an MLP layer,
H x W for a convolution, several for a shared layer). Per layer:

- kfac:  G ~ A (x) S with A = E[a a^T] (per position), S = E[sum_t s s^T]; eigenvalues a_i s_o.
- ekfac: same eigenbases Q_A, Q_S (eigh of the float64 sums; see _eigh), eigenvalues refit as Lambda = E[(Q_S^T G_n Q_A)^2]
         (George et al. 2018), which is the diagonal of G in that basis.
- diagonal: Q = I, Lambda = E[G_n^2] (the diagonal GGN).

s comes from labels *sampled from the model* (the true Fisher, equal to the GGN for matching losses),
seeded, never from the given labels. Self-influence per example is sum_layers <G~_n^2, 1/(Lambda+lambda)>
with G~_n = Q_S^T G_n Q_A from the given label's gradient.

Speed comes from structure: when a layer sits at one position, G_n = s_n a_n^T is rank one, so
G~_n^2 = u_n v_n^T with u = (Q_S^T s)^2, v = (Q_A^T a)^2, Lambda = U^T V / N is one matrix product and
the score is ((U R) * V).sum(1) with R = 1/(Lambda + lambda): no per-example gradient is ever formed.
Multi-position layers form G~_n with batched matrix products in chunks of the batch, each side rotated
where it costs fewer multiply-adds: the inputs once per batch on the T positions (T d^2), or each
formed gradient (o d^2; the output side likewise, T o^2 or o^2 d). A convolution's patches are written,
once per batch and pass, into a reused buffer as a (d_in, B*T) matrix (one strided copy per kernel
offset, any stride), which gives A as one matrix product, Q_A^T times the patches as
another, and each example's (d_in, T) block as a view. What every set of output gradients of a batch
shares (patches, rotated inputs) is computed once per batch. Eigendecompositions skip coordinates
that are always zero (a kernel offset that only ever sees padding): their unit vectors are eigenvectors.

Plans (chosen in `prepare`): one pass when every layer sits at one position (each example's a and s
kept; one label draw serves both statistics). Otherwise one pass per stage, drawing labels exactly as
streaming does; when the scores' per-example state fits the cache budget, the last stage's pass also
backpropagates the given labels and keeps it (T=1 layers: u and v; a linear layer over few positions:
its rotated inputs and output gradients; others: the d_out x d_in squared rotated gradient; the
fallback's part is scored in that pass once its curvature is known), so the audit needs no scoring
pass. The first pass's forward also gives the audit its predictions.

Parameters outside tracked layers (norm layers, embeddings, grouped convolutions, ...) get the
diagonal GGN from per-example gradients; the summary lists which layer got what. BatchNorm (eval mode,
running statistics), LayerNorm and Embedding modules (also a table looked up without a batch axis and
added across the batch, such as position embeddings) give theirs from their recorded input and output
gradient in the same backward, once a probe on two examples has shown that this equals torch.func's
per-example gradients for that model; everything else uses torch.func (vmap over examples). A layer
whose output the model then modifies in place (ReLU(inplace=True), +=) hands the model a copy, so the
recorded output's gradient stays that of the layer's own output. Each tracked layer's example layout
is probed once too (_probe_layouts): exported attention runs its projections sequence-first, on
(L, B, d) and (L*B, d) rows, which are reordered to (B, T, d) as they are recorded.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from .base import EngineError, Estimator, FittedCurvature, Partial
from .functional import flatten, map_examples

CHUNK_ELEMENTS = 1 << 24  # cap on B x d_out x d_in floats formed at once for multi-position layers


def _trackable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return False


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied weights: an embedding table reused as the
    output layer). A module's hooks see only its own use of such a weight, so it leaves the Kronecker
    blocks for the fallback, whose per-example gradients (torch.func) sum every use. One module called
    several times is not sharing: its calls are positions of one layer."""
    owners: dict[int, int] = {}
    for module in model.modules():  # each module object once
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {key for key, count in owners.items() if count > 1}


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal up to the rounding of one example computed at another place in its batch."""
    if x.shape != y.shape:
        return False
    scale = float(torch.maximum(x.abs().max(), y.abs().max())) if x.numel() else 0.0
    return bool(((x - y).abs() <= 1e-4 * scale + 1e-30).all())


def _example_stride(layer, x3: list[torch.Tensor], g3: list[torch.Tensor], x2: list[torch.Tensor],
                    g2: list[torch.Tensor]) -> int | None | bool:
    """The layout of a layer's examples from its inputs and output gradients on the batches [a, b, a]
    and [b, a] (one tensor per call): None for batch-first, an int for a sequence-first linear map's
    row stride, False when neither fits. The layouts tried must give every copy of an example the same
    rows in both batches."""
    if len(x3) != len(x2) or not x3:
        return False  # never called: its weight is used some other way (F.linear on it), which hooks miss

    def examples(t: torch.Tensor, batch: int, stride: int | None) -> list[torch.Tensor] | None:
        if layer.is_conv or t.dim() < 2:
            return list(t) if t.shape[0] == batch else None
        rows = t.reshape(-1, t.shape[-1])
        step = stride if stride is not None else rows.shape[0] // batch
        if rows.shape[0] % batch or step == 0 or rows.shape[0] % (batch * step):
            return None
        return list(rows.view(-1, batch, step, rows.shape[-1]).transpose(0, 1))

    def fits(stride: int | None) -> bool:
        for t3, t2 in list(zip(x3, x2)) + list(zip(g3, g2)):
            e3, e2 = examples(t3, 3, stride), examples(t2, 2, stride)
            if e3 is None or e2 is None:
                return False
            if not (_close(e3[0], e3[2]) and _close(e3[0], e2[1]) and _close(e3[1], e2[0])):
                return False
        return True

    if fits(None):
        return None
    if layer.is_conv or x3[0].dim() < 2:
        return False
    rows = x3[0].reshape(-1, x3[0].shape[-1]).shape[0]
    if rows % 3:
        return False
    per_example = rows // 3
    for stride in range(1, per_example):
        if per_example % stride == 0 and fits(stride):
            return stride
    return False


def _augmented_covariance(aa: torch.Tensor, colsum: torch.Tensor | None, count: int) -> torch.Tensor:
    """sum a a^T of the inputs with a ones column appended (the bias), from sum a a^T, sum a, count."""
    if colsum is None:
        return aa.double()
    d = aa.shape[0]
    out = aa.new_empty(d + 1, d + 1, dtype=torch.float64)
    out[:d, :d] = aa
    out[:d, d] = colsum
    out[d, :d] = colsum
    out[d, d] = count
    return out


# Factors of this order and above are decomposed in float32 (the sums stay float64). The cubic
# decomposition is then about half as long (a 2,049-square factor: 0.75 s against 1.65 s on 2 cores;
# ResNet-18's 4,608-square ones ~10x that), and nothing downstream needs more: the eigenvalues' error
# (~1e-7 of the largest) is far below the damping (0.1 x the mean eigenvalue), EK-FAC refits its
# eigenvalues in whatever orthonormal basis it gets, and the inputs are rotated in float32 anyway.
# Measured on bench/speed.py's CNN (N=10,000): ekfac self-influence within 1.5e-3 relative of the
# float64 decomposition, Spearman 0.9999997; kfac within 2e-4. Smaller factors cost little in float64.
EIGH_FLOAT32_FROM = 1024


def _eigh_dense(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if M.shape[0] < EIGH_FLOAT32_FROM:
        return torch.linalg.eigh(M)
    values, vectors = torch.linalg.eigh(M.float())
    return values.double(), vectors.double()


def _eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a covariance (PSD, float64). A coordinate whose diagonal entry is exactly
    zero is a feature that is always zero (a kernel offset that only ever sees padding, a dead unit): its
    row and column are zero and its unit vector is an eigenvector of eigenvalue 0, so only the other
    coordinates are decomposed. That is faster (a ResNet's 3x3 convolutions at 1x1 resolution keep one
    ninth of their inputs) and spares LAPACK the exactly repeated zeros it can fail to converge on."""
    live = M.diagonal() != 0
    k = int(live.sum())
    if k == M.shape[0]:
        return _eigh_dense(M)
    n = M.shape[0]
    index = live.nonzero().squeeze(1)
    dead = (~live).nonzero().squeeze(1)
    values = M.new_zeros(n)
    vectors = M.new_zeros(n, n)
    vectors[dead, torch.arange(n - k, device=M.device)] = 1
    if k:
        values[n - k :], vectors[index.unsqueeze(1), torch.arange(n - k, n, device=M.device)] = \
            _eigh_dense(M[index.unsqueeze(1), index])
    order = torch.argsort(values, stable=True)  # ascending, as eigh returns them
    return values[order], vectors[:, order]


def _gram(a: torch.Tensor) -> torch.Tensor:
    """a^T a (float32) for a (n, d): for large d from the blocks on and below the diagonal, mirrored
    (5/8 of the multiply-adds with four blocks)."""
    d = a.shape[1]
    if d < 1024:
        return a.T @ a
    k = 4 if d >= 2048 else 2
    edges = [round(i * d / k) for i in range(k + 1)]
    out = a.new_empty(d, d)
    for i in range(k):
        rows = a[:, edges[i] : edges[i + 1]]
        for j in range(i + 1):
            block = rows.T @ a[:, edges[j] : edges[j + 1]]
            out[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = block
            if i != j:
                out[edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = block.T
    return out


def _output_covariance(layer, gs: list[torch.Tensor]) -> torch.Tensor:
    """sum over examples and positions of s s^T of one set of output gradients, float64."""
    total = 0
    for g in gs:
        g = g.float()
        s = g.transpose(0, 1).reshape(g.shape[1], -1) if layer.is_conv else g.reshape(-1, g.shape[-1]).T
        total = total + s @ s.T
    return total.double()


class _Layer:
    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.has_bias = module.bias is not None
        self.is_conv = isinstance(module, nn.Conv2d)
        if self.is_conv:
            k = module.kernel_size
            self.d_in = module.in_channels * k[0] * k[1] + int(self.has_bias)
            self.d_out = module.out_channels
            # "same"/"valid": the recorded input carries the module's own padding
            self.padding = (0, 0) if isinstance(module.padding, str) else tuple(module.padding)
        else:
            self.d_in = module.in_features + int(self.has_bias)
            self.d_out = module.out_features
        prefix = f"{name}." if name else ""  # the model itself may be the layer
        self.param_names = [f"{prefix}weight"] + ([f"{prefix}bias"] if self.has_bias else [])
        self.workspace: dict[str, torch.Tensor] = {}
        self.clone_output = False  # the model modifies the output in place (ReLU(inplace=True), +=)
        # Where a linear map's input rows (its leading axes flattened) keep their examples: None when
        # the batch axis leads (row r belongs to example r // T); else the stride s of a sequence-first
        # layout, row r belonging to example (r // s) % B, as in nn.MultiheadAttention's exported
        # (L, B, d) projections and its (L*B, d) output projection. Set by the estimator's probe.
        self.example_stride: int | None = None

    # ----------------------------------------------------------------- what a forward hook keeps
    def batch_first(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """A linear map's input or output gradient (..., d) in this layer's example layout -> (B, T, d)."""
        if self.example_stride is None:
            return t.reshape(t.shape[0], -1, t.shape[-1])
        d, stride = t.shape[-1], self.example_stride
        rows = t.reshape(-1, d)
        if rows.shape[0] % (batch * stride):
            raise EngineError(f"layer '{self.name}': {rows.shape[0]} rows do not split into {batch} examples of "
                              f"stride {stride}; the model lays out its batch differently for this batch size")
        return rows.view(-1, batch, stride, d).transpose(0, 1).reshape(batch, -1, d)

    def record(self, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Layer input -> what is kept: (B, T, d) for a linear map, the (padded) image for a convolution."""
        if not self.is_conv:
            return self.batch_first(x, batch if batch is not None else x.shape[0])
        if isinstance(self.module.padding, str):
            x = F.pad(x, self.module._reversed_padding_repeated_twice)
        return x

    def out_size(self, x: torch.Tensor) -> tuple[int, int]:
        m = self.module
        return tuple((x.shape[2 + i] + 2 * self.padding[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1)
                     // m.stride[i] + 1 for i in range(2))

    def positions(self, x: torch.Tensor) -> int:
        if not self.is_conv:
            return x.shape[1]
        h, w = self.out_size(x)
        return h * w

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the layer output -> (B, T, d_out)."""
        if not self.is_conv:
            return g.reshape(g.shape[0], -1, g.shape[-1])
        return g.flatten(2).transpose(1, 2)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Recorded input -> (B, T, d_in) with a ones column for the bias."""
        if self.is_conv:
            m = self.module
            a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=self.padding, stride=m.stride).transpose(1, 2)
        else:
            a = x
        if self.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=-1)
        return a

    # ------------------------------------------------------------------------------ statistics
    def _buffer(self, key: str, shape: tuple[int, ...], like: torch.Tensor, zero: bool = False) -> torch.Tensor:
        """A workspace reused across batches (fresh large allocations cost page faults on every batch): the
        leading part of a flat buffer, grown when needed. `zero`: the buffer is zero-filled when made."""
        size = 1
        for n in shape:
            size *= n
        buf = self.workspace.get(key)
        if buf is None or buf.dtype != like.dtype or buf.device != like.device or buf.numel() < size:
            buf = self.workspace[key] = (like.new_zeros if zero else like.new_empty)(size)
        return buf[:size].view(shape)

    def patch_matrix(self, x: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """A convolution's unfolded, bias-augmented patches as a (d_in, B*T) matrix, rows in the weight's
        (C, kh, kw) order then the ones row, columns example-major, in a reused buffer (`slot`: one per
        call of the layer in a batch). Example b's (d_in, T) patch matrix is view(d_in, B, T)[:, b].
        One strided copy per kernel offset from the padded image, whatever the stride (for stride 2 this
        measured 25% faster than im2col followed by the transposing copy it needs)."""
        m = self.module
        B, C, H, W = x.shape
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, self.padding
        ho, wo = self.out_size(x)
        d = C * kh * kw
        out = self._buffer(f"patches{slot}", (self.d_in, B, ho, wo), x)
        if ph or pw:
            # the borders stay zero: only the interior is ever written (a new image size re-makes it)
            key = f"padded{slot}:{C}x{H}x{W}"
            if key not in self.workspace:
                for old in [k for k in self.workspace if k.startswith(f"padded{slot}:")]:
                    del self.workspace[old]
            padded = self._buffer(key, (B, C, H + 2 * ph, W + 2 * pw), x, zero=True)
            padded[:, :, ph : ph + H, pw : pw + W].copy_(x)
        else:
            padded = x
        weights = out[:d].view(C, kh, kw, B, ho, wo)
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + (ho - 1) * sh + 1, sh)
                columns = slice(j * dw, j * dw + (wo - 1) * sw + 1, sw)
                weights[:, i, j].copy_(padded[:, :, rows, columns].transpose(0, 1))
        if self.has_bias:
            out[-1].fill_(1)
        return out.view(self.d_in, B * ho * wo)


def _path(layer: _Layer, T: int, rotate: bool, num_sets: int) -> str:
    """How a layer's squared rotated gradients are formed: "rank1" at one position; otherwise by
    multiply-adds per example for num_sets sets of output gradients, rotating the inputs once on the
    positions ("positions"), or rotating each formed gradient ("formed")."""
    if T == 1:
        return "rank1"
    o, d = layer.d_out, layer.d_in
    positions = (T * d * d if rotate else 0) + num_sets * (T * o * d + (T * o * o if rotate else 0))
    formed = num_sets * (T * o * d + (min(T * o * o, o * o * d) + o * d * d if rotate else 0))
    return "positions" if positions <= formed else "formed"


def _keeps_factors(layer: _Layer, T: int, path: str) -> bool:
    """Whether the scores keep a multi-position linear layer's rotated inputs and output gradients
    (T (d_in + d_out) floats per example) rather than its squared rotated gradient (d_out d_in)."""
    return path == "positions" and not layer.is_conv and T * (layer.d_in + layer.d_out) < layer.d_in * layer.d_out


class _LayerBatch:
    """One tracked layer's recorded inputs in one batch, and what every set of output gradients of that
    batch shares (patches, rotated inputs), computed once."""

    def __init__(self, layer: _Layer, xs: list[torch.Tensor], QA: torch.Tensor | None, QS: torch.Tensor | None,
                 num_sets: int):
        self.layer, self.xs, self.QA, self.QS = layer, [x.float() for x in xs], QA, QS
        self.batch = xs[0].shape[0]
        self.T = sum(layer.positions(x) for x in self.xs)
        self.path = _path(layer, self.T, QA is not None, num_sets)
        self._mats = None
        self._rotated = None
        self._inputs = None
        self._v = None

    # convolutions: per call, the (d_in, B*T) patch matrix and its rotation Q_A^T M
    def mats(self) -> list[torch.Tensor]:
        if self._mats is None:
            self._mats = [self.layer.patch_matrix(x, slot) for slot, x in enumerate(self.xs)]
        return self._mats

    def rotated_mats(self) -> list[torch.Tensor]:
        if self._rotated is None:
            if self.QA is None:
                self._rotated = self.mats()
            else:
                self._rotated = [torch.mm(self.QA.T, m, out=self.layer._buffer(f"rotated{slot}", m.shape, m))
                                 for slot, m in enumerate(self.mats())]
        return self._rotated

    def _per_example(self, mat: torch.Tensor) -> torch.Tensor:
        """(d_in, B*T) -> (B, d_in, T) view."""
        return mat.view(mat.shape[0], self.batch, -1).permute(1, 0, 2)

    def covariance(self) -> torch.Tensor:
        """sum over examples and positions of a a^T (bias-augmented), float64."""
        layer = self.layer
        if layer.is_conv:
            total = None
            for m in self.mats():
                total = _gram(m.T) if total is None else total.add_(_gram(m.T))
            return total.double()
        aa, colsum, count = None, 0, 0
        for x in self.xs:
            a = x.reshape(-1, x.shape[-1])
            aa = _gram(a) if aa is None else aa.add_(_gram(a))
            colsum = colsum + a.sum(0)
            count += a.shape[0]
        return _augmented_covariance(aa, colsum if layer.has_bias else None, count)

    def inputs(self) -> torch.Tensor:
        """(B, T, d_in): the bias-augmented inputs (patches), rotated by Q_A."""
        if self._inputs is None:
            layer, QA = self.layer, self.QA
            if layer.is_conv:
                parts = [self._per_example(m).transpose(1, 2) for m in self.rotated_mats()]
                self._inputs = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
            elif QA is None or not layer.has_bias:
                a = torch.cat([layer.patches(x) for x in self.xs], 1) if len(self.xs) > 1 else layer.patches(self.xs[0])
                self._inputs = a @ QA if QA is not None else a
            else:  # [a, 1] Q_A = a Q_A[:-1] + Q_A[-1], without forming [a, 1]
                a = torch.cat(self.xs, 1) if len(self.xs) > 1 else self.xs[0]
                flat = a.reshape(-1, a.shape[-1])
                # one position: only v = (.)^2 is kept, so a reused buffer serves (the scores keep a
                # multi-position layer's rotated inputs themselves)
                out = layer._buffer("rotated", (flat.shape[0], QA.shape[1]), flat) if self.T == 1 else None
                self._inputs = torch.mm(flat, QA[:-1], out=out).add_(QA[-1]).view(*a.shape[:2], -1)
        return self._inputs

    def squared_inputs(self) -> torch.Tensor:
        """v = (Q_A^T a)^2 of a one-position layer, (B, d_in)."""
        if self._v is None:
            self._v = self.inputs()[:, 0].pow(2)
        return self._v

    def _output_side(self, g: torch.Tensor, left: torch.Tensor | None) -> torch.Tensor:
        """Output gradients of one call as (B, d_out, T), rotated to left^T s when `left` is given."""
        layer = self.layer
        if layer.is_conv:
            s = g.reshape(g.shape[0], layer.d_out, -1)
            return torch.matmul(left.T, s) if left is not None else s
        s = layer.output_grads(g)  # (B, T, d_out)
        if left is not None:
            s = s @ left
        return s.transpose(1, 2)

    def _formed(self, gs: list[torch.Tensor], start: int, stop: int, left: torch.Tensor | None) -> torch.Tensor:
        """Per-example gradients (b, d_out, d_in) = sum_t s_t a_t^T of examples start:stop (bias column
        last), with s rotated to left^T s when `left` is given."""
        layer = self.layer
        total = None
        for slot, (x, g) in enumerate(zip(self.xs, gs)):
            s = self._output_side(g[start:stop], left)
            if layer.is_conv:
                grad = torch.bmm(s, self._per_example(self.mats()[slot])[start:stop].transpose(1, 2))
            else:
                grad = torch.bmm(s, x[start:stop])
                if layer.has_bias:
                    grad = torch.cat([grad, s.sum(2, keepdim=True)], dim=2)
            total = grad if total is None else total.add_(grad)
        return total

    def rotated(self, gs: list[torch.Tensor]):
        """Rotated per-example gradients G~ = Q_S^T G Q_A for one set of output gradients (one per call
        of the layer), as (start, "rank1", Q_S^T s (B, d_out), Q_A^T a (B, d_in)) for one-position layers
        (G~ = their outer product), or (start, "full", G~ (b, d_out, d_in), None) in chunks of the batch,
        each chunk a fresh tensor."""
        layer, QA, QS = self.layer, self.QA, self.QS
        gs = [g.float() for g in gs]
        if self.path == "rank1":
            s = layer.output_grads(gs[0])[:, 0]
            if QS is not None:
                s = s @ QS
            yield 0, "rank1", s, self.inputs()[:, 0]
            return
        o, d, B = layer.d_out, layer.d_in, self.batch
        step = max(1, CHUNK_ELEMENTS // (o * d))
        if self.path == "positions":
            if layer.is_conv:
                rotated = [self._per_example(m) for m in self.rotated_mats()]  # (B, d_in, T) each
            else:
                a = self.inputs()
            for start in range(0, B, step):
                stop = start + step
                if layer.is_conv:
                    g = None
                    for slot, grad in enumerate(gs):
                        part = torch.bmm(self._output_side(grad[start:stop], QS), rotated[slot][start:stop].transpose(1, 2))
                        g = part if g is None else g.add_(part)
                else:
                    s = torch.cat([layer.output_grads(grad[start:stop]) for grad in gs], 1)
                    if QS is not None:
                        s = s @ QS
                    g = torch.bmm(s.transpose(1, 2), a[start:stop])
                yield start, "full", g, None
            return
        left = QS if QS is not None and self.T < d else None  # rotate the output side on the positions
        for start in range(0, B, step):
            g = self._formed(gs, start, start + step, left)
            if QS is not None and left is None:
                g = torch.matmul(QS.T, g)
            if QA is not None:
                g = (g.reshape(-1, d) @ QA).view(g.shape[0], o, d)
            yield start, "full", g, None

    def squares(self, gs: list[torch.Tensor]):
        """The squared rotated gradients: (start, "rank1", u = (Q_S^T s)^2 (B, d_out), v = (Q_A^T a)^2
        (B, d_in)) for one-position layers, or (start, "full", G~^2 (b, d_out, d_in), None) in chunks."""
        for start, kind, g, _ in self.rotated(gs):
            if kind == "rank1":
                yield start, kind, g.pow(2), self.squared_inputs()
            else:
                yield start, kind, g.pow_(2), None


class _DiagModule:
    """A BatchNorm (eval mode, running statistics), LayerNorm or Embedding whose parameters' per-example
    gradients come from its recorded input and output gradient (used once a probe has confirmed them)."""

    def __init__(self, name: str, module: nn.Module, names: dict[str, str]):
        self.name, self.module, self.names = name, module, names  # names: attribute -> parameter name
        # an Embedding looked up without a batch axis (position ids) whose output the model broadcasts
        # over the batch: the hook expands its output to (B, ...) so each example gets its own gradient
        self.broadcast = False
        self.clone_output = False

    @staticmethod
    def supports(module: nn.Module) -> bool:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return module.running_mean is not None and module.running_var is not None
        if isinstance(module, nn.LayerNorm):
            return True
        if isinstance(module, nn.Embedding):
            return module.max_norm is None and not module.scale_grad_by_freq
        return False

    def record(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def grads(self, xs: list[torch.Tensor], gs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameter name -> (B, *shape) per-example gradients, summed over the module's calls."""
        m = self.module
        out: dict[str, torch.Tensor] = {}

        def add(attr, value):
            if attr in self.names:
                name = self.names[attr]
                out[name] = out[name] + value if name in out else value

        for x, g in zip(xs, gs):
            g = g.float()
            B = g.shape[0]
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.training:
                    raise RuntimeError("batch statistics")
                # d/dweight = sum over positions of g (x - mean) / sqrt(var + eps)
                C = g.shape[1]
                gs, xs_ = g.reshape(B, C, -1), x.float().reshape(B, C, -1)
                bias = gs.sum(2)
                gx = torch.matmul(gs.unsqueeze(2), xs_.unsqueeze(3)).view(B, C)
                add("weight", (gx - bias * m.running_mean.float()) * torch.rsqrt(m.running_var.float() + m.eps))
                add("bias", bias)
            elif isinstance(m, nn.LayerNorm):
                xhat = F.layer_norm(x.float(), m.normalized_shape, None, None, m.eps)
                dims = tuple(range(1, g.dim() - len(m.normalized_shape)))
                add("weight", (g * xhat).sum(dims) if dims else g * xhat)
                add("bias", g.sum(dims) if dims else g)
            else:  # Embedding: each example's rows of the table get the output gradients of its ids
                ids = (x.reshape(1, -1).expand(B, -1) if self.broadcast else x.reshape(B, -1)).long()
                rows = g.reshape(B, ids.shape[1], -1)
                if m.padding_idx is not None:
                    rows = rows * (ids != m.padding_idx).unsqueeze(-1)
                table = rows.new_zeros(B, m.num_embeddings, rows.shape[-1])
                example = torch.arange(B, device=ids.device).unsqueeze(1).expand_as(ids)
                table.index_put_((example, ids), rows, accumulate=True)
                add("weight", table)
        return out


class _Table:
    """An embedding table (an nn.Embedding whose hook gradients the probe confirmed) treated as what it
    is, a linear map W^T on one-hot inputs: an example's gradient is G_n = sum_t s_t e_(id_t)^T, so
    A = E[a a^T] is diagonal (token counts per position) and its eigenbasis is the identity, S = E[sum_t
    s s^T] is the usual (D, D) output factor, and EK-FAC's eigenvalues are, per table row v,
    E[(Q_S^T sum_(t: id_t = v) s_t)^2]. Nothing V x V or B x V x D is formed: each example's lookups are
    summed per distinct id, which is at most T rows of D floats. L and R are kept as (V, D)."""

    def __init__(self, dm: _DiagModule):
        self.dm, self.name, self.module = dm, dm.name, dm.module
        self.param_name = dm.names["weight"]
        self.rows, self.width = self.module.num_embeddings, self.module.embedding_dim

    def lookups(self, xs: list[torch.Tensor], gs: list[torch.Tensor]):
        """(example (M,), id (M,), output gradient (M, D), ids per example) over every lookup of the batch
        (all calls of the table; a padding id's row gets no gradient and is left out)."""
        examples, ids, grads, per_example = [], [], [], 0
        for x, g in zip(xs, gs):
            B = g.shape[0]
            index = (x.reshape(1, -1).expand(B, -1) if self.dm.broadcast else x.reshape(B, -1)).long()
            per_example += index.shape[1]
            examples.append(torch.arange(B, device=index.device).unsqueeze(1).expand_as(index).reshape(-1))
            ids.append(index.reshape(-1))
            grads.append(g.float().reshape(-1, self.width))
        example, ids, grads = (torch.cat(t) if len(t) > 1 else t[0] for t in (examples, ids, grads))
        if self.module.padding_idx is not None:
            keep = ids != self.module.padding_idx
            example, ids, grads = example[keep], ids[keep], grads[keep]
        return example, ids, grads, per_example

    def grouped(self, example: torch.Tensor, ids: torch.Tensor):
        """The distinct (example, id) pairs: (their example, their id, inverse index of each lookup)."""
        pairs, inverse = torch.unique(example * self.rows + ids, return_inverse=True)
        return pairs // self.rows, pairs % self.rows, inverse

    @staticmethod
    def summed(inverse: torch.Tensor, count: int, h: torch.Tensor) -> torch.Tensor:
        """Rows of h (M, D) summed per distinct pair: (count, D)."""
        return h.new_zeros(count, h.shape[-1]).index_add_(0, inverse, h)


class _Capture:
    """Forward hooks that record each tracked layer's inputs and outputs for one batch."""

    def __init__(self, layers: list):
        self.layers = layers
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        self.recording = True
        self.batch = None  # the batch size, for modules whose output is broadcast over the batch
        self.versions: dict[str, list[int]] = {}

    def __enter__(self):
        for layer in self.layers:
            self.inputs[layer.name], self.outputs[layer.name], self.versions[layer.name] = [], [], []

            def hook(module, args, output, layer=layer):
                if not self.recording:  # e.g. the fallback's own functional forward
                    return None
                x = args[0].detach()
                self.inputs[layer.name].append(layer.record(x, self.batch) if isinstance(layer, _Layer)
                                               else layer.record(x))
                if getattr(layer, "broadcast", False):
                    output = output.unsqueeze(0).expand(self.batch, *output.shape)
                self.outputs[layer.name].append(output)
                self.versions[layer.name].append(output._version)
                if layer.clone_output:
                    # the model goes on with a copy, which it may modify in place: the gradient with
                    # respect to the recorded output stays the gradient with respect to the layer's output
                    return output.clone()
                return output if getattr(layer, "broadcast", False) else None

            self.handles.append(layer.module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def flat_outputs(self) -> list[torch.Tensor]:
        return [o for layer in self.layers for o in self.outputs[layer.name]]

    def split(self, grads: tuple[torch.Tensor, ...]) -> dict[str, list[torch.Tensor]]:
        """Gradients of flat_outputs() -> per layer, one per call (repeated calls of a shared layer are
        positions of the same weight)."""
        out, offset = {}, 0
        for layer in self.layers:
            calls = len(self.outputs[layer.name])
            out[layer.name] = list(grads[offset : offset + calls])
            if getattr(layer, "example_stride", None) is not None:
                out[layer.name] = [layer.batch_first(g, self.batch) for g in out[layer.name]]
            offset += calls
        return out


class _GradientSet:
    """One set of output-gradient vectors backpropagated through a batch: per tracked layer its
    _LayerBatch and the gradients of its outputs; the fallback parameters' per-example gradients on demand."""

    def __init__(self, estimator, inputs, blocks, grads, vectors, targets):
        self.estimator, self.inputs, self.blocks, self.grads = estimator, inputs, blocks, grads
        self.vectors, self.targets = vectors, targets

    def pairs(self):
        for block in self.blocks:
            yield block, self.grads[block.layer.name]

    def table_sums(self, table: _Table, QS: torch.Tensor | None):
        """(example, id, rotated row sums (U, D)) of each distinct (example, id) pair, and the number of
        lookups per example."""
        example, ids, g, per_example = table.lookups(self.estimator._table_inputs[table.name], self.grads[table.name])
        examples, rows, inverse = table.grouped(example, ids)
        h = g @ QS if QS is not None else g
        return examples, rows, _Table.summed(inverse, rows.shape[0], h), per_example

    def table_squares(self, table: _Table, QS: torch.Tensor | None):
        """As table_sums, the row sums squared."""
        examples, rows, sums, per_example = self.table_sums(table, QS)
        return examples, rows, sums.pow_(2), per_example

    def fallback(self) -> torch.Tensor | None:
        """(B, P_fallback) per-example gradients of the parameters no tracked layer covers, in
        fallback_names order."""
        est = self.estimator
        if not est.fallback_names:
            return None
        parts: dict[str, torch.Tensor] = {}
        B = self.inputs.shape[0]
        for dm in est.diag_modules:
            xs = est._diag_inputs[dm.name]
            if not xs:
                continue
            for name, value in dm.grads(xs, self.grads[dm.name]).items():
                parts[name] = value.reshape(B, -1)
        if est.vmap_names:
            parts.update(est._vmap_grads(self.inputs, self.vectors, est.vmap_names))
        return torch.cat([parts[n] if n in parts else self.inputs.new_zeros(B, est.params[n].numel(), dtype=torch.float32)
                          for n in est.fallback_names], dim=1)


class _Queries:
    """Preconditioned query gradients (KroneckerEstimator.precondition_queries). A table's part is
    sparse: (query, row, vector) for each row a query looks up, indexed by row (CSR) so that a training
    example meets only the queries that share one of its rows."""

    def __init__(self, count: int):
        self.count = count
        self.layers: dict[str, torch.Tensor] = {}
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.fallback: torch.Tensor | None = None

    def add_table(self, table: _Table, queries: torch.Tensor, rows: torch.Tensor, vectors: torch.Tensor) -> None:
        order = torch.argsort(rows, stable=True)
        starts = torch.zeros(table.rows + 1, dtype=torch.long, device=rows.device)
        starts[1:] = torch.cumsum(torch.bincount(rows, minlength=table.rows), 0)
        self.tables[table.name] = (starts, queries[order], vectors[order])

    def table_products(self, table: _Table, examples: torch.Tensor, rows: torch.Tensor, sums: torch.Tensor,
                       batch: int) -> torch.Tensor:
        """(B, Q) sum over shared rows of a training example's rotated row sum times a query's vector."""
        starts, queries, vectors = self.tables[table.name]
        out = torch.zeros(batch, self.count, dtype=torch.float64, device=sums.device)
        counts = starts[rows + 1] - starts[rows]
        if int(counts.sum()) == 0:
            return out
        pair = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), counts)
        # the position of each matched query pair inside its row's run: start of the run + offset
        offsets = torch.arange(pair.shape[0], device=rows.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)
        match = starts[rows[pair]] + offsets
        products = (sums[pair] * vectors[match]).sum(1).double()
        return out.index_put_((examples[pair], queries[match]), products, accumulate=True)


class KroneckerEstimator(Estimator):
    name = "ekfac"
    stores_curvature = True
    rotate = True  # eigenbases from the Kronecker factors (False: diagonal)
    refit_eigenvalues = True  # EK-FAC's correction (False: K-FAC's a_i * s_o)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model.eval()
        shared = _shared_parameters(self.model)
        self.layers = [_Layer(n, m) for n, m in self.model.named_modules()
                       if _trackable(m) and not any(id(p) in shared for p in m.parameters(recurse=False))]
        covered = {p for layer in self.layers for p in layer.param_names}
        self.fallback_names = [n for n in self.params if n not in covered]
        # fallback parameters of BatchNorm/LayerNorm/Embedding modules: per-example gradients from hooks
        # once the probe (first batch) confirms them; the rest, and all until then, by torch.func
        self._diag_candidates = []
        fallback = set(self.fallback_names)
        for n, m in self.model.named_modules():
            if _DiagModule.supports(m):
                prefix = f"{n}." if n else ""
                names = {attr: f"{prefix}{attr}" for attr, p in m.named_parameters(recurse=False)}
                if names and all(v in fallback for v in names.values()):
                    self._diag_candidates.append(_DiagModule(n, m, names))
        self.diag_modules: list[_DiagModule] = []
        self.tables: list[_Table] = []  # embedding tables with their own Kronecker treatment (after the probe)
        self._table_inputs: dict[str, list[torch.Tensor]] = {}
        self.vmap_names = list(self.fallback_names)
        self._probed = False
        self._layouts_decided = False
        self._diag_inputs: dict[str, list[torch.Tensor]] = {}
        self._last_outputs = None
        self._fallback_denominator = None
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.layer_damping: dict[str, float] = {}
        if self.rotate and self.refit_eigenvalues:
            self.stages = ("covariance", "eigenvalues")
        elif self.rotate:
            self.stages = ("covariance",)
        else:
            self.stages = ("eigenvalues",)

    # ------------------------------------------------------------------ plans
    one_pass = False  # every layer at one position: one pass, each example's a and s kept
    scores_in_fit = False  # the fit also computes every example's score (no scoring pass)
    predictions_in_fit = False  # the fit keeps the first pass's outputs for the audit's predictions

    def prepare(self, data) -> None:
        """One pass over the data when every tracked layer sits at one position per example, no
        parameter needs the fallback, and the per-example state fits the cache budget: each example's
        layer inputs a and output gradients s (sampled and given labels) are kept, which is
        N x (d_in + 2 d_out) floats per layer, never N x P. Otherwise one pass per stage (the first one
        also keeps the outputs for the audit's predictions); the last one also scores when what the
        scores need of each example fits the budget: T=1 layers d_in + d_out floats, a linear layer over
        T < d_in d_out / (d_in + d_out) positions T (d_in + d_out), other layers d_out x d_in, and the
        fallback parameters when their curvature comes from that same pass."""
        self.one_pass = self.scores_in_fit = self.predictions_in_fit = False
        if not self.layers or not self.stages:
            return
        self.predictions_in_fit = True
        if self.options.cache_bytes <= 0:
            return
        x, y = next(iter(data()))
        self._probe(x)
        with _Capture(self.layers) as capture, torch.no_grad():
            capture.batch = 1
            self.model(x[:1])
        positions = {layer.name: sum(layer.positions(a) for a in capture.inputs[layer.name]) for layer in self.layers}
        samples = max(1, self.options.fisher_samples) if self.options.fisher_samples else 0
        if not self.fallback_names and not self.tables and samples and \
                all(positions[layer.name] == 1 for layer in self.layers):
            per_example = sum(layer.d_in + (len(self.stages) * samples + 1) * layer.d_out for layer in self.layers) * 4
            if per_example * data.num_examples <= self.options.cache_bytes:
                self.one_pass = self.scores_in_fit = True
                return
        if "eigenvalues" not in self.stages:
            return  # K-FAC's scores need the eigenbases of its only stage: a scoring pass
        num_sets = (samples or self._num_classes(x)) + 1
        kept = 0
        for layer in self.layers:
            T = positions[layer.name]
            path = _path(layer, T, self.rotate, num_sets)
            if T == 1:
                kept += layer.d_in + layer.d_out
            elif T > 1:
                kept += T * (layer.d_in + layer.d_out) if _keeps_factors(layer, T, path) else layer.d_in * layer.d_out
        kept += sum(self._lookups_per_example(x[:1], t) * t.width for t in self.tables)
        if len(self.stages) == 1:  # the fallback's curvature comes from the same pass: keep its gradients
            kept += sum(self.params[n].numel() for n in self.fallback_names)
        self.scores_in_fit = kept * 4 * data.num_examples <= self.options.cache_bytes

    @property
    def num_passes(self) -> int:
        return 1 if self.one_pass else len(self.stages)

    def _num_classes(self, x: torch.Tensor) -> int:
        with torch.no_grad():
            return int(self.model(x[:1]).shape[-1])

    def captured_bytes_per_example(self, example: torch.Tensor) -> int:
        """Bytes of layer inputs (unfolded patches for convolutions) and output gradients one example
        contributes to a batch's captured state: sum over layers of T x (d_in + d_out) floats, and for an
        embedding table its lookups' gradients, their rotations and sums (3 T x D floats). Given two
        examples, the probe decides first which modules take which treatment."""
        self._probe(example)
        with _Capture(self.layers) as capture, torch.no_grad():
            capture.batch = 1
            self.model(example[:1])
        total = 0
        for layer in self.layers:
            positions = sum(layer.positions(a) for a in capture.inputs[layer.name])
            total += positions * (layer.d_in + layer.d_out) * 4
        total += sum(3 * self._lookups_per_example(example[:1], t) * t.width * 4 for t in self.tables)
        return total

    def _lookups_per_example(self, example: torch.Tensor, table: _Table) -> int:
        with _Capture([table.dm]) as capture, torch.no_grad():
            capture.batch = 1
            self.model(example[:1])
        return sum(x.numel() for x in capture.inputs[table.name])

    def fit(self, data, report):
        if self.one_pass:
            return self._fit_one_pass(data, report)
        n = data.num_examples
        self.batch_outputs = [] if self.predictions_in_fit else None
        cache = []
        for index, stage in enumerate(self.stages):
            total = None
            score = self.scores_in_fit and index == len(self.stages) - 1
            for b, (x, y) in enumerate(data()):
                self.draw_for_batch(data.first_example(b))
                partial, kept = self._accumulate(stage, x, y, keep_outputs=self.predictions_in_fit and index == 0,
                                                 score_targets=y if score else None)
                if total is None:
                    total = partial
                else:  # in place: the partials are this loop's own
                    for key, value in partial.items():
                        total[key] += value
                if score:
                    cache.append(kept)
                report(stage, (b + 1) / data.num_batches)
            self.finish(stage, total, n)
            if self.fallback_names and index == 0 and len(self.stages) > 1:
                # the fallback's curvature is complete: the scoring pass scores its part directly
                L, lam = self._damped("__fallback__")
                self._fallback_denominator = L + lam
        self._fallback_denominator = None
        if self.scores_in_fit:
            self.precomputed_scores = torch.cat([self._cached_scores(kept) for kept in cache])
        self._release()

    def _fit_one_pass(self, data, report):
        cache: list[dict[str, tuple]] = []
        totals: dict[str, torch.Tensor] = {}
        k = self.options.fisher_samples
        self.batch_outputs = []  # the forward's outputs, so the audit needs no separate prediction pass

        def vectors(outputs, y):
            # each stage its own labels, as in a pass per stage: the eigenvalue correction is then not
            # measured on the very samples its eigenbasis was fitted to
            self.batch_outputs.append(outputs)
            sampled = [v for stage in self.stages for v in self._fisher_vectors(outputs, stage)]
            return sampled + self._given_vectors(y)(outputs)

        last = len(self.stages) - 1  # index of the stage whose draws the eigenvalues use
        for b, (x, y) in enumerate(data()):
            self.draw_for_batch(data.first_example(b))
            sets = list(self._layer_grads(x, lambda outputs: vectors(outputs, y)))
            entry = {}
            for block, _ in sets[0].pairs():
                layer = block.layer
                a = block.xs[0][:, 0]  # (B, d_in without the bias column)
                per_stage = [torch.stack([gs.grads[layer.name][0].reshape(a.shape[0], -1).float()
                                          for gs in sets[i * k:(i + 1) * k]]) for i in range(len(self.stages))]
                s_given = sets[-1].grads[layer.name][0].reshape(a.shape[0], -1).float()
                if self.rotate:
                    totals[f"{layer.name}.A"] = totals.get(f"{layer.name}.A", 0) + block.covariance()
                    flat = per_stage[0].reshape(-1, per_stage[0].shape[-1])
                    totals[f"{layer.name}.S"] = totals.get(f"{layer.name}.S", 0) + (flat.T @ flat).double() / k
                entry[layer.name] = (block, per_stage[last], s_given)
            cache.append(entry)
            report("one pass", (b + 1) / data.num_batches)
        n = data.num_examples
        if self.rotate:
            self.finish("covariance", totals, n)
        # the rotated, squared inputs v = (Q_A^T a)^2 serve both Lambda and the scores: compute once
        for entry in cache:
            for name, (block, s_sampled, s_given) in entry.items():
                block.QA = self.state[name]["QA"] if self.rotate else None
                entry[name] = (block.squared_inputs(), s_sampled, s_given)
                block.xs = block._inputs = None
        if self.refit_eigenvalues or not self.rotate:
            lam = {}
            for entry in cache:
                for name, (v, s_sampled, _) in entry.items():
                    u = (s_sampled @ self.state[name]["QS"]).pow_(2) if self.rotate else s_sampled.pow(2)
                    lam[f"{name}.L"] = lam.get(f"{name}.L", 0) + (u.sum(0).T @ v).double() / k
            self.finish("eigenvalues", lam, n)
        scores = []
        for entry in cache:
            part = 0
            for name, (v, _, s_given) in entry.items():
                st = self.state[name]
                u = (s_given @ st["QS"]).pow_(2) if self.rotate else s_given.pow(2)
                part = part + ((u @ st["R"]) * v).sum(1).double()
            scores.append(part.cpu())
        self.precomputed_scores = torch.cat(scores)
        self._release()

    def _release(self):
        for layer in self.layers:
            layer.workspace.clear()

    # ------------------------------------------------------------------ passes over the data
    def probe(self, example: torch.Tensor) -> None:
        self._probe(example)

    def _probe(self, inputs: torch.Tensor) -> None:
        """Decide once which BatchNorm/LayerNorm/Embedding modules give their per-example gradients from
        hooks: those whose hook gradients on two examples equal torch.func's. A table looked up without a
        batch axis is tried again with its output broadcast over the batch (position embeddings), which
        must leave the model's outputs as they were. Anything else (a table also used elsewhere, a
        module the model applies across examples, ...) stays with torch.func."""
        if self._probed:
            if not self._layouts_decided:  # the earlier inputs held no two different examples
                self._layouts_decided = self._probe_layouts(inputs)
            return
        self._probed = True
        # outputs the model modifies in place (a ReLU(inplace=True) after the layer) would otherwise be
        # differentiated after the modification: such layers hand the model a copy
        watched = self.layers + self._diag_candidates
        with _Capture(watched) as capture, torch.no_grad():
            capture.batch = inputs[:2].shape[0]
            self.model(inputs[:2])
        for module in watched:
            module.clone_output = any(o._version != v for o, v in zip(capture.outputs[module.name],
                                                                     capture.versions[module.name]))
        self._layouts_decided = self._probe_layouts(inputs)
        if inputs.shape[0] < 2 or not self._diag_candidates:
            return
        x = inputs[:2]
        generator = torch.Generator(device="cpu").manual_seed(12345)  # not the estimator's: draws stay put
        with torch.no_grad():
            out = self.model(x)
        vectors = torch.randn(out.shape, generator=generator).to(out.device, out.dtype)
        names = [n for dm in self._diag_candidates for n in dm.names.values()]
        reference = self._vmap_grads(x, vectors, names)
        confirmed = self._probe_round(x, out, vectors, reference, self._diag_candidates)
        retry = [dm for dm in self._diag_candidates if dm not in confirmed and isinstance(dm.module, nn.Embedding)]
        for dm in retry:
            dm.broadcast = True
        again = self._probe_round(x, out, vectors, reference, retry) if retry else []
        for dm in retry:
            dm.broadcast = dm in again
        self.diag_modules = confirmed + again
        hooked = {n for dm in self.diag_modules for n in dm.names.values()}
        self.vmap_names = [n for n in self.fallback_names if n not in hooked]
        if self.uses_curvature:  # confirmed embedding tables leave the diagonal fallback for their own blocks
            self.tables = [_Table(dm) for dm in self.diag_modules if isinstance(dm.module, nn.Embedding)]
            self.diag_modules = [dm for dm in self.diag_modules if not isinstance(dm.module, nn.Embedding)]
            tabled = {t.param_name for t in self.tables}
            self.fallback_names = [n for n in self.fallback_names if n not in tabled]

    def _probe_layouts(self, inputs: torch.Tensor) -> bool:
        """Decide where each tracked layer keeps its examples. The model runs on the batches [a, b, a]
        and [b, a] of two different examples, with the same output-gradient vector for every copy of an
        example; in the right layout, an example's input rows and output gradients are the same
        wherever it sits. Batch-first is tried first; a linear map may also be sequence-first (rows
        strided by example, see _Layer.example_stride). A layer that fits no layout (its rows do not
        grow with the batch, or mix examples) leaves the Kronecker blocks for the fallback, whose
        per-example gradients (torch.func) are right whatever the layout. Returns False when `inputs` hold
        no two different examples to tell layouts apart by (the next batch is tried; batch-first until then)."""
        if not self.layers:
            return True
        others = [i for i in range(1, inputs.shape[0]) if not torch.equal(inputs[i], inputs[0])]
        if not others:
            return False
        a, b = inputs[0:1], inputs[others[0]:others[0] + 1]
        generator = torch.Generator(device="cpu").manual_seed(54321)  # not the estimator's: draws stay put
        seen: dict[int, dict[str, tuple[list, list]]] = {}
        vectors = None  # one output-gradient vector for a, one for b
        for p in self.model.parameters():
            p.requires_grad_(True)
        try:
            for x in (torch.cat([a, b, a]), torch.cat([b, a])):
                with _Capture(self.layers) as capture, torch.enable_grad():
                    capture.batch = x.shape[0]
                    out = self.model(x)
                    if vectors is None:
                        vectors = torch.randn((2, *out.shape[1:]), generator=generator).to(out.device, out.dtype)
                    order = [0, 1, 0] if x.shape[0] == 3 else [1, 0]
                    flat = capture.flat_outputs()
                    grads = torch.autograd.grad(out, flat, grad_outputs=vectors[order], allow_unused=True)
                    grads = tuple(torch.zeros_like(o) if g is None else g.detach() for o, g in zip(flat, grads))
                    split = capture.split(grads)
                    seen[x.shape[0]] = {l.name: (capture.inputs[l.name], split[l.name]) for l in self.layers}
        except Exception:  # noqa: BLE001 - the model does not run on these batches: layouts stay batch-first
            return True
        finally:
            for p in self.model.parameters():
                p.requires_grad_(False)
        moved = []
        for layer in self.layers:
            (x3, g3), (x2, g2) = seen[3][layer.name], seen[2][layer.name]
            stride = _example_stride(layer, x3, g3, x2, g2)
            if stride is False:
                moved.append(layer)
            else:
                layer.example_stride = stride
        for layer in moved:
            self.layers.remove(layer)
            self.fallback_names += layer.param_names
            self.vmap_names += layer.param_names
        return True

    def _probe_round(self, x, out, vectors, reference, candidates) -> list:
        saved = self.diag_modules, self.vmap_names
        self.diag_modules, self.vmap_names = candidates, []
        confirmed = []
        try:
            (gset,) = self._layer_grads(x, lambda outputs: [(vectors, None)])
            if self._last_outputs.shape != out.shape or not torch.allclose(self._last_outputs, out,
                                                                         rtol=1e-5, atol=1e-6):
                return []
            for dm in candidates:
                xs = self._diag_inputs[dm.name]
                try:
                    got = dm.grads(xs, gset.grads[dm.name]) if xs else {}
                except Exception:  # noqa: BLE001 - any failure means: not for hooks
                    continue
                ok = set(got) == set(dm.names.values())
                for name in dm.names.values():
                    if not ok:
                        break
                    want = reference[name]
                    have = got[name]
                    scale = float(want.abs().max()) + 1e-12
                    ok = have.shape[0] == 2 and have[0].numel() == want.shape[1] and bool(
                        ((have.reshape(2, -1) - want).abs() <= 1e-4 * scale).all())
                if ok:
                    confirmed.append(dm)
        except Exception:  # noqa: BLE001 - the model does not run with these hooks: torch.func for all
            confirmed = []
        finally:
            self.diag_modules, self.vmap_names = saved
            self._diag_inputs = {}
            self._last_outputs = None
        return confirmed

    def _layer_grads(self, inputs: torch.Tensor, vectors_fn):
        """One forward; for each (B, C) set of output-gradient vectors from vectors_fn(outputs), a
        _GradientSet: per layer the batch's inputs and the gradients of the layer's outputs. Each row is
        that example's own gradient."""
        self._probe(inputs)
        for p in self.model.parameters():
            p.requires_grad_(True)
        try:
            with _Capture(self.layers + self.diag_modules + [t.dm for t in self.tables]) as capture, \
                    torch.enable_grad():
                capture.batch = inputs.shape[0]
                outputs = self.model(inputs)
                self._last_outputs = outputs.detach()
                capture.recording = False
                vector_sets = vectors_fn(outputs.detach())
                self._diag_inputs = {dm.name: capture.inputs[dm.name] for dm in self.diag_modules}
                self._table_inputs = {t.name: capture.inputs[t.name] for t in self.tables}
                blocks = []
                for layer in self.layers:
                    if capture.outputs[layer.name]:
                        st = self.state.get(layer.name, {})
                        QA, QS = (st.get("QA"), st.get("QS")) if self.rotate else (None, None)
                        blocks.append(_LayerBatch(layer, capture.inputs[layer.name], QA, QS, len(vector_sets)))
                flat = capture.flat_outputs()
                for i, (vectors, targets) in enumerate(vector_sets):
                    grads = torch.autograd.grad(outputs, flat, grad_outputs=vectors.to(outputs.dtype),
                                                retain_graph=i + 1 < len(vector_sets), allow_unused=True)
                    grads = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(flat, grads))
                    yield _GradientSet(self, inputs, blocks, capture.split(grads), vectors, targets)
        finally:
            for p in self.model.parameters():
                p.requires_grad_(False)

    def _fisher_vectors(self, outputs, stage: str):
        """Output gradients whose outer products average to the output Hessian H (so that the
        statistics are the GGN): labels sampled from the model (seeded), or with fisher_samples=0
        the exact expectation, the C rows of R with R^T R = H."""
        if self.options.fisher_samples == 0:
            root = self.loss.hessian_sqrt(outputs)  # (B, C, C)
            return [(root[:, c, :], None) for c in range(root.shape[1])]
        sets = []
        for sample in range(self.options.fisher_samples):
            targets = self.sampled_targets(outputs, sample, stage)
            sets.append((self.loss.residual(outputs, targets), targets))
        return sets

    def _given_vectors(self, targets):
        return lambda outputs: [(self.loss.residual(outputs, targets), targets)]

    def _vmap_grads(self, inputs, vectors, names) -> dict[str, torch.Tensor]:
        """Per-example gradients (B, numel) of <f(x_n), v_n> for the named parameters, by torch.func."""
        if not names:
            return {}
        from torch.func import functional_call, grad

        frozen = {k: v for k, v in self.params.items() if k not in names}
        free = {k: self.params[k] for k in names}

        def example_value(p, x, v):
            out = functional_call(self.model, {**frozen, **p}, (x.unsqueeze(0),))
            return (out.reshape(-1) * v).sum()

        grads = map_examples(grad(example_value), (None, 0, 0), free, inputs, vectors.detach())
        return {k: g.reshape(g.shape[0], -1) for k, g in grads.items()}

    def _fallback_grads(self, inputs, vectors) -> torch.Tensor | None:
        """Per-example gradients of <f(x_n), v_n> for the parameters no tracked layer covers (torch.func)."""
        if not self.fallback_names:
            return None
        return flatten(self._vmap_grads(inputs, vectors, self.fallback_names), batch_dims=1)

    def _accumulate(self, stage, inputs, targets, keep_outputs=False, score_targets=None):
        """One batch of a stage: its partial sums, and with score_targets also the given labels' squared
        rotated gradients (the scores' per-example state, for _cached_scores)."""
        out: Partial = {}
        kept = None
        exact = self.options.fisher_samples == 0

        def vectors_fn(outputs):
            if keep_outputs:
                self.batch_outputs.append(outputs)
            sets = self._fisher_vectors(outputs, stage) if stage in ("covariance", "eigenvalues") else []
            return sets + (self._given_vectors(score_targets)(outputs) if score_targets is not None else [])

        sets = self._layer_grads(inputs, vectors_fn)
        count = 0
        for gset in sets:
            given = score_targets is not None and gset.targets is score_targets
            if given:
                kept = self._score_state(gset)
                continue
            count += 1
            for block, gs in gset.pairs():
                name = block.layer.name
                if stage == "covariance":
                    if count == 1:
                        A = block.covariance()
                        out[f"{name}.A"] = A / block.T if block.T != 1 else A
                    out[f"{name}.S"] = out.get(f"{name}.S", 0) + _output_covariance(block.layer, gs)
                else:
                    lam = out.get(f"{name}.L", 0)
                    for _, kind, g2, v in block.squares(gs):
                        lam = lam + ((g2.T @ v) if kind == "rank1" else g2.sum(0)).double()
                    out[f"{name}.L"] = lam
            for table in self.tables:
                name = table.name
                if stage == "covariance":
                    example, ids, g, per_example = table.lookups(self._table_inputs[name], gset.grads[name])
                    if count == 1:  # the diagonal input factor: lookups of each row, per position
                        counts = torch.bincount(ids, minlength=table.rows).double()
                        out[f"{name}.A"] = counts / per_example
                    out[f"{name}.S"] = out.get(f"{name}.S", 0) + (g.T @ g).double()
                else:
                    QS = self.state.get(name, {}).get("QS") if self.rotate else None
                    _, rows, squares, _ = gset.table_squares(table, QS)
                    lam = out.get(f"{name}.L")
                    if lam is None:
                        lam = out[f"{name}.L"] = squares.new_zeros(table.rows, table.width, dtype=torch.float64)
                    lam.index_add_(0, rows, squares.double())
            if self.fallback_names and stage == self.stages[0]:
                fb = gset.fallback()
                out["fallback.diag"] = out.get("fallback.diag", 0) + fb.double().pow(2).sum(0)
        # several sampled label sets per example average; the exact expectation's rows already sum to H
        # (A does not depend on the output vectors: it is summed once per batch and never scaled)
        for key in list(out):
            if not key.endswith(".A") and not exact and count != 1:
                out[key] *= 1.0 / count
        return out, kept

    def accumulate(self, stage, inputs, targets, partial: Partial | None) -> Partial:
        return self._accumulate(stage, inputs, targets)[0]

    def _score_state(self, gset):
        """What the scores need of one batch's given-label gradients before R is known: per layer the
        squared rotated gradients (T=1: u and v), or a linear layer's rotated inputs and output gradients
        when those are smaller; the fallback's part of the score when its curvature is already known,
        else its squared gradients."""
        kept = []
        for block, gs in gset.pairs():
            layer = block.layer
            if _keeps_factors(layer, block.T, block.path):
                s = torch.cat([layer.output_grads(g.float()) for g in gs], 1)
                if block.QS is not None:
                    s = s @ block.QS
                kept.append((layer.name, 0, "factors", s, block.inputs()))
                continue
            for start, kind, g2, v in block.squares(gs):
                kept.append((layer.name, start, kind, g2, v))
        for table in self.tables:
            examples, rows, squares, _ = gset.table_squares(table, self.state[table.name].get("QS") if self.rotate else None)
            kept.append((table.name, 0, "table", squares, (examples, rows)))
        fb = None
        if self.fallback_names:
            fb = gset.fallback().double().pow(2)
            if self._fallback_denominator is not None:
                fb = (fb / self._fallback_denominator).sum(1)
        return kept, fb, gset.inputs.shape[0]

    def _cached_scores(self, kept) -> torch.Tensor:
        entries, fb, batch = kept
        scores = torch.zeros(batch, dtype=torch.float64, device=self.device)
        for name, start, kind, g2, v in entries:
            R = self.state[name]["R"]
            if kind == "rank1":
                scores += ((g2 @ R) * v).sum(1).double()
            elif kind == "table":  # g2: squared row sums (U, D); v: their (example, row)
                examples, rows = v
                scores.index_add_(0, examples, (g2 * R[rows]).sum(1).double())
            elif kind == "factors":  # g2: rotated output gradients (B, T, d_out), v: rotated inputs (B, T, d_in)
                step = max(1, CHUNK_ELEMENTS // R.numel())
                for first in range(0, batch, step):
                    g = torch.bmm(g2[first : first + step].transpose(1, 2), v[first : first + step])
                    scores[first : first + g.shape[0]] += (g.pow_(2).flatten(1) @ R.reshape(-1)).double()
            else:
                scores[start : start + g2.shape[0]] += (g2.flatten(1) @ R.reshape(-1)).double()
        if fb is not None:
            if fb.dim() == 1:
                scores += fb
            else:
                L = self.state["__fallback__"]["L"]
                scores += (fb / (L + self.layer_damping["__fallback__"])).sum(1)
        return scores.cpu()

    def finish(self, stage, total, num_examples):
        n = num_examples
        if "fallback.diag" in total:
            self.state["__fallback__"] = {"L": total["fallback.diag"] / n}
        if stage == "covariance":
            for layer in self.layers:
                A = total[f"{layer.name}.A"] / n
                S = total[f"{layer.name}.S"] / n
                a_eig, QA = _eigh(A)
                s_eig, QS = _eigh(S)
                st = {"QA": QA.float(), "QS": QS.float()}
                if not self.refit_eigenvalues:
                    st["L"] = torch.outer(s_eig.clamp_min(0), a_eig.clamp_min(0))
                self.state[layer.name] = st
            for table in self.tables:
                s_eig, QS = _eigh(total[f"{table.name}.S"] / n)
                st = {"QS": QS.float()}
                if not self.refit_eigenvalues:  # the input factor's eigenvalues are its diagonal
                    st["L"] = torch.outer((total[f"{table.name}.A"] / n).clamp_min(0), s_eig.clamp_min(0))
                self.state[table.name] = st
        else:
            for layer in self.layers:
                self.state.setdefault(layer.name, {})["L"] = total[f"{layer.name}.L"] / n
            for table in self.tables:
                self.state.setdefault(table.name, {})["L"] = total[f"{table.name}.L"] / n
        if stage == self.stages[-1] or (stage == "eigenvalues" and self.one_pass):
            self._set_damping()

    def _damped(self, key: str) -> tuple[torch.Tensor, float]:
        """A block's eigenvalues with the weight decay added, and its damping: the explicit one, or
        0.1 x the mean eigenvalue of the block (kronfluence / EK-FAC practice)."""
        L = self.state[key]["L"]
        if self.options.weight_decay:
            L = L + self.options.weight_decay
        lam = self.options.damping if self.options.damping is not None else 0.1 * float(L.mean())
        return L, max(lam, 1e-12)

    def _set_damping(self):
        weighted, count = 0.0, 0
        for key, st in self.state.items():
            st["L"], lam = self._damped(key)
            self.layer_damping[key] = lam
            st["R"] = (1.0 / (st["L"] + lam)).float()
            weighted += lam * st["L"].numel()
            count += st["L"].numel()
        self.damping = self.options.damping if self.options.damping is not None else weighted / max(count, 1)

    # ------------------------------------------------------------------ a fit stored and loaded
    def _structure(self) -> dict:
        """Which parameters each block covers, in the order the state refers to them."""
        return {"layers": [[l.name, l.d_out, l.d_in] for l in self.layers],
                "tables": [[t.name, t.rows, t.width] for t in self.tables],
                "fallback": list(self.fallback_names)}

    def fitted_curvature(self, complete: bool = True) -> FittedCurvature:
        """complete=False also exports the state between stages (EK-FAC's eigenbases before the
        eigenvalue correction): what a sharded fit hands to the next stage's shards."""
        if not self.stages or (complete and not self.layer_damping):
            raise EngineError(f"the '{self.name}' estimator has no fitted curvature to store")
        tensors = {f"{key}/{field}": value for key, st in self.state.items() for field, value in st.items()}
        metadata = {"estimator": self.name, "format": "pbrf-audit blockwise curvature v1",
                    "structure": json.dumps(self._structure()), "damping": json.dumps(self.damping),
                    "layer_damping": json.dumps(self.layer_damping),
                    "options": json.dumps({"damping": self.options.damping, "weight_decay": self.options.weight_decay,
                                           "fisher_samples": self.options.fisher_samples, "seed": self.options.seed})}
        return FittedCurvature(tensors, metadata)

    def load_curvature(self, curvature: FittedCurvature, example: torch.Tensor) -> None:
        meta = curvature.metadata
        if meta.get("estimator") != self.name:
            raise EngineError(f"stored curvature is '{meta.get('estimator')}', not '{self.name}'")
        self._probe(example)  # decides which modules are tables and which parameters fall back
        if json.loads(meta["structure"]) != self._structure():
            raise EngineError("the stored curvature was fitted on a model of another structure")
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in curvature.tensors.items():
            block, _, field = key.rpartition("/")
            state.setdefault(block, {})[field] = value.to(self.device)
        self.state = state
        self.layer_damping = {k: float(v) for k, v in json.loads(meta["layer_damping"]).items()}
        self.damping = json.loads(meta["damping"])
        self.one_pass = self.scores_in_fit = self.predictions_in_fit = False

    # ----------------------------------------------------------------------------- scoring
    def self_influence(self, inputs, targets):
        scores = torch.zeros(inputs.shape[0], dtype=torch.float64, device=inputs.device)
        for gset in self._layer_grads(inputs, self._given_vectors(targets)):
            for block, gs in gset.pairs():
                R = self.state[block.layer.name]["R"]
                for start, kind, g2, v in block.squares(gs):
                    if kind == "rank1":
                        scores += ((g2 @ R) * v).sum(1).double()
                    else:
                        scores[start : start + g2.shape[0]] += (g2.flatten(1) @ R.reshape(-1)).double()
            for table in self.tables:
                st = self.state[table.name]
                examples, rows, squares, _ = gset.table_squares(table, st.get("QS") if self.rotate else None)
                scores.index_add_(0, examples, (squares * st["R"][rows]).sum(1).double())
            if self.fallback_names:
                g = gset.fallback().double()
                fb = self.state["__fallback__"]
                scores += (g.pow(2) / (fb["L"] + self.layer_damping["__fallback__"])).sum(1)
        return scores

    # ------------------------------------------------------------------ train-to-query attribution
    def precondition_queries(self, inputs: torch.Tensor, targets: torch.Tensor) -> _Queries:
        """(G + lambda I)^-1 g_q of each query example's loss gradient, kept blockwise in the rotated
        bases: per tracked layer (Q, d_out, d_in) = G~_q / (L + lambda); per table the query's rotated
        row sums over (L + lambda) of their rows (sparse: only the rows it looks up); the fallback's
        (Q, P_fallback) over its diagonal. Q x (parameters) floats: callers bound Q."""
        queries = _Queries(inputs.shape[0])
        for gset in self._layer_grads(inputs, self._given_vectors(targets)):
            for block, gs in gset.pairs():
                name = block.layer.name
                R = self.state[name]["R"]
                full = R.new_empty(queries.count, *R.shape)
                for start, kind, g, a in block.rotated(gs):
                    if kind == "rank1":
                        torch.mul(g.unsqueeze(2), a.unsqueeze(1), out=full)
                    else:
                        full[start : start + g.shape[0]] = g
                queries.layers[name] = full.mul_(R)
            for table in self.tables:
                st = self.state[table.name]
                examples, rows, sums, _ = gset.table_sums(table, st.get("QS") if self.rotate else None)
                queries.add_table(table, examples, rows, sums.mul_(st["R"][rows]))
            if self.fallback_names:
                fb = self.state["__fallback__"]
                queries.fallback = gset.fallback().double() / (fb["L"] + self.layer_damping["__fallback__"])
        return queries

    def cross_influence(self, inputs: torch.Tensor, targets: torch.Tensor, queries: _Queries) -> torch.Tensor:
        """(B, Q): g_i^T (G + lambda I)^-1 g_q for each training example i of the batch and each query q
        (positive: training on i lowers q's loss). Its diagonal, for the batch as its own queries, is
        the self-influence."""
        out = torch.zeros(inputs.shape[0], queries.count, dtype=torch.float64, device=inputs.device)
        for gset in self._layer_grads(inputs, self._given_vectors(targets)):
            for block, gs in gset.pairs():
                P = queries.layers[block.layer.name]  # (Q, d_out, d_in)
                for start, kind, g, a in block.rotated(gs):
                    if kind == "rank1":  # sum_oi s_o P[q, o, i] a_i
                        out += torch.einsum("bo,qoi,bi->bq", g, P, a).double()
                    else:
                        out[start : start + g.shape[0]] += (g.flatten(1) @ P.flatten(1).T).double()
            for table in self.tables:
                st = self.state[table.name]
                examples, rows, sums, _ = gset.table_sums(table, st.get("QS") if self.rotate else None)
                out += queries.table_products(table, examples, rows, sums, inputs.shape[0])
            if self.fallback_names:
                out += gset.fallback().double() @ queries.fallback.T
        return out

    def leverage(self, inputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """J_c (G + lambda I)^-1 J_c'^T for the logits `classes` (B, K) of each example: (B, K, K).

        One backward per selected logit (one-hot output gradients); for a one-position layer the logit
        gradients are s_c a^T, so the entry is sum_o s~_c,o s~_c',o (R v)_o with v = (Q_A^T a)^2."""
        B, K = classes.shape

        def one_hot_sets(outputs):
            return [(torch.zeros_like(outputs).scatter_(1, classes[:, k : k + 1], 1.0), None) for k in range(K)]

        out = torch.zeros(B, K, K, dtype=torch.float64, device=inputs.device)
        sets = list(self._layer_grads(inputs, one_hot_sets))
        for block, _ in sets[0].pairs():
            layer = block.layer
            R = self.state[layer.name]["R"]
            a = block.inputs()  # (B, T, d_in), rotated by Q_A when rotating
            s_all = torch.stack([torch.cat([layer.output_grads(g.float()) for g in gset.grads[layer.name]], 1)
                                 for gset in sets], dim=1)  # (B, K, T, d_out)
            if self.rotate:
                s_all = s_all @ self.state[layer.name]["QS"]
            if a.shape[1] == 1:
                w = a[:, 0].pow(2) @ R.T  # (B, d_out): sum_k R[o, k] v_k
                s1 = s_all[:, :, 0]  # (B, K, d_out)
                out += torch.einsum("bco,bdo,bo->bcd", s1, s1, w).double()
            else:
                step = max(1, CHUNK_ELEMENTS // (K * layer.d_out * layer.d_in))
                for start in range(0, B, step):
                    g = torch.einsum("bkto,bti->bkoi", s_all[start : start + step], a[start : start + step])
                    out[start : start + step] += torch.einsum("bcoi,bdoi,oi->bcd", g, g, R).double()
        for table in self.tables:
            st = self.state[table.name]
            QS = st.get("QS") if self.rotate else None
            example, ids, _, _ = table.lookups(self._table_inputs[table.name], sets[0].grads[table.name])
            examples, rows, inverse = table.grouped(example, ids)
            sums = []
            for gset in sets:  # the same lookups under each logit's output gradients
                g = table.lookups(self._table_inputs[table.name], gset.grads[table.name])[2]
                sums.append(_Table.summed(inverse, rows.shape[0], g @ QS if QS is not None else g))
            h = torch.stack(sums, 1)  # (U, K, D)
            out.index_add_(0, examples, torch.einsum("ucd,ued,ud->uce", h, h, st["R"][rows]).double())
        if self.fallback_names:
            fb = self.state["__fallback__"]
            inv = 1.0 / (fb["L"] + self.layer_damping["__fallback__"])
            grads = torch.stack([gset.fallback().double() for gset in sets], dim=1)  # (B, K, P)
            out += torch.einsum("bcp,bdp,p->bcd", grads, grads, inv)
        return out

    def describe(self):
        layers = [{"layer": l.name, "type": type(l.module).__name__, "treatment": self.name,
                   "shape": [l.d_out, l.d_in], "num_parameters": l.d_out * l.d_in,
                   "damping": self.layer_damping.get(l.name)} for l in self.layers]
        layers += [{"layer": t.name, "type": "Embedding", "treatment": f"{self.name} (one-hot inputs: diagonal input "
                    "factor of row counts)", "shape": [t.width, t.rows], "num_parameters": t.rows * t.width,
                    "damping": self.layer_damping.get(t.name)} for t in self.tables]
        if self.fallback_names:
            layers.append({"layer": ", ".join(self.fallback_names), "type": "other parameters",
                           "treatment": "diagonal GGN (fallback)",
                           "num_parameters": sum(self.params[n].numel() for n in self.fallback_names),
                           "damping": self.layer_damping.get("__fallback__")})
        return {"estimator": self.name, "num_parameters": self.num_parameters, "damping": self.damping,
                "damping_rule": "explicit" if self.options.damping is not None
                else "0.1 x mean eigenvalue per layer; `damping` is their parameter-weighted mean",
                "fisher": "exact expectation over classes" if self.options.fisher_samples == 0 else
                f"labels sampled from the model, {self.options.fisher_samples} per example, seed {self.options.seed}",
                "layers": layers}


class EKFACEstimator(KroneckerEstimator):
    name = "ekfac"


class KFACEstimator(KroneckerEstimator):
    name = "kfac"
    refit_eigenvalues = False


class DiagonalEstimator(KroneckerEstimator):
    name = "diagonal"
    rotate = False


class IdentityEstimator(KroneckerEstimator):
    """Squared gradient norm ||g_i||^2: self-influence with G replaced by the identity (the cheap
    baseline). Uses the same layer structure: for a one-position layer ||s a^T||^2 = ||s||^2 ||a||^2,
    so no per-example gradient is formed; other parameters use per-example gradients."""

    name = "identity"
    rotate = False
    uses_curvature = False
    stores_curvature = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stages = ()
        self.damping = None
        for layer in self.layers:
            self.state[layer.name] = {"R": torch.ones(layer.d_out, layer.d_in, device=self.device)}
        if self.fallback_names:
            self.state["__fallback__"] = {"L": torch.zeros(1, dtype=torch.float64, device=self.device)}
            self.layer_damping["__fallback__"] = 1.0

    def prepare(self, data) -> None:
        self.one_pass = self.scores_in_fit = self.predictions_in_fit = False

    @property
    def num_passes(self) -> int:
        return 0

    def fit(self, data, report) -> None:
        """Nothing to fit: there is no curvature."""

    def describe(self):
        return {"estimator": self.name, "num_parameters": self.num_parameters, "damping": None,
                "note": "squared norm of the per-example loss gradient; no curvature"}
