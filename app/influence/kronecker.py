"""Blockwise curvature for nn.Linear and nn.Conv2d layers: `diagonal`, `kfac` and `ekfac`.

For a layer with (bias-augmented) inputs a and output gradients s, an example's weight gradient is
G_n = sum_t s_t a_t^T over the positions t where the layer is applied (one position for an MLP layer,
H x W for a convolution, several for a shared layer). Per layer:

- kfac:  G ~ A (x) S with A = E[a a^T] (per position), S = E[sum_t s s^T]; eigenvalues a_i s_o.
- ekfac: same eigenbases Q_A, Q_S (float64 eigh), eigenvalues refit as Lambda = E[(Q_S^T G_n Q_A)^2]
         (George et al. 2018), which is the diagonal of G in that basis.
- diagonal: Q = I, Lambda = E[G_n^2] (the diagonal GGN).

s comes from labels *sampled from the model* (the true Fisher, equal to the GGN for matching losses),
seeded, never from the given labels. Self-influence per example is sum_layers <G~_n^2, 1/(Lambda+lambda)>
with G~_n = Q_S^T G_n Q_A from the given label's gradient.

Speed comes from structure: when a layer sits at one position, G_n = s_n a_n^T is rank one, so
G~_n^2 = u_n v_n^T with u = (Q_S^T s)^2, v = (Q_A^T a)^2, Lambda = U^T V / N is one matrix product and
the score is ((U R) * V).sum(1) with R = 1/(Lambda + lambda): no per-example gradient is ever formed.
Multi-position layers form G~_n in chunks of the batch.

Parameters outside tracked layers (norm layers, embeddings, grouped convolutions, ...) get the
diagonal GGN from per-example gradients (torch.func); the summary lists which layer got what.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Estimator, Partial
from .functional import flatten

CHUNK_ELEMENTS = 1 << 24  # cap on B x d_out x d_in floats formed at once for multi-position layers


def _trackable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return False


class _Layer:
    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.has_bias = module.bias is not None
        if isinstance(module, nn.Linear):
            self.d_in = module.in_features + int(self.has_bias)
            self.d_out = module.out_features
        else:
            k = module.kernel_size
            self.d_in = module.in_channels * k[0] * k[1] + int(self.has_bias)
            self.d_out = module.out_channels
        prefix = f"{name}." if name else ""  # the model itself may be the layer
        self.param_names = [f"{prefix}weight"] + ([f"{prefix}bias"] if self.has_bias else [])

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Layer input -> (B, T, d_in) with a ones column for the bias."""
        m = self.module
        if isinstance(m, nn.Linear):
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        else:
            if isinstance(m.padding, str):  # "same"/"valid": apply the module's own padding first
                x = F.pad(x, m._reversed_padding_repeated_twice)
                padding = 0
            else:
                padding = m.padding
            a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride).transpose(1, 2)
        if self.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=-1)
        return a

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the layer output -> (B, T, d_out)."""
        if isinstance(self.module, nn.Linear):
            return g.reshape(g.shape[0], -1, g.shape[-1])
        return g.flatten(2).transpose(1, 2)


def _cat_positions(parts: list[torch.Tensor]) -> torch.Tensor:
    # most layers are called once: no copy then
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _Capture:
    """Forward hooks that record each tracked layer's (augmented) inputs and outputs for one batch."""

    def __init__(self, layers: list[_Layer]):
        self.layers = layers
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        self.recording = True

    def __enter__(self):
        for layer in self.layers:
            self.inputs[layer.name], self.outputs[layer.name] = [], []

            def hook(module, args, output, layer=layer):
                if not self.recording:  # e.g. the fallback's own functional forward
                    return
                self.inputs[layer.name].append(layer.activations(args[0].detach()))
                self.outputs[layer.name].append(output)

            self.handles.append(layer.module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def flat_outputs(self) -> list[torch.Tensor]:
        return [o for layer in self.layers for o in self.outputs[layer.name]]

    def per_layer(self, grads: tuple[torch.Tensor, ...]):
        """Pair each layer's activations with the gradients of its outputs; repeated calls of a shared
        layer are positions of the same weight, so they concatenate along T."""
        offset = 0
        for layer in self.layers:
            calls = len(self.outputs[layer.name])
            if calls == 0:
                continue
            a = _cat_positions(self.inputs[layer.name])
            s = _cat_positions([layer.output_grads(g) for g in grads[offset : offset + calls]])
            offset += calls
            yield layer, a, s


class KroneckerEstimator(Estimator):
    name = "ekfac"
    rotate = True  # eigenbases from the Kronecker factors (False: diagonal)
    refit_eigenvalues = True  # EK-FAC's correction (False: K-FAC's a_i * s_o)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model.eval()
        self.layers = [_Layer(n, m) for n, m in self.model.named_modules() if _trackable(m)]
        covered = {p for layer in self.layers for p in layer.param_names}
        self.fallback_names = [n for n in self.params if n not in covered]
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.layer_damping: dict[str, float] = {}
        if self.rotate and self.refit_eigenvalues:
            self.stages = ("covariance", "eigenvalues")
        elif self.rotate:
            self.stages = ("covariance",)
        else:
            self.stages = ("eigenvalues",)

    # ------------------------------------------------------------------ one-pass plan
    one_pass = False

    def prepare(self, data) -> None:
        """One pass over the data when every tracked layer sits at one position per example, no
        parameter needs the fallback, and the per-example state fits the cache budget: each example's
        layer inputs a and output gradients s (sampled and given labels) are kept, which is
        N x (d_in + 2 d_out) floats per layer, never N x P. Otherwise stream, one pass per stage."""
        self.one_pass = False
        if self.fallback_names or self.options.cache_bytes <= 0 or not self.layers:
            return
        x, y = next(iter(data()))
        x = x[:1]
        with _Capture(self.layers) as capture, torch.no_grad():
            self.model(x)
        positions = {name: sum(a.shape[1] for a in acts) for name, acts in capture.inputs.items()}
        if any(positions.get(layer.name, 0) != 1 for layer in self.layers):
            return
        samples = max(1, self.options.fisher_samples) if self.options.fisher_samples else 0
        if samples == 0:
            return  # the exact expectation keeps C gradients per example: stream instead
        per_example = sum(layer.d_in + (samples + 1) * layer.d_out for layer in self.layers) * 4
        self.one_pass = per_example * data.num_examples <= self.options.cache_bytes

    @property
    def num_passes(self) -> int:
        return 1 if self.one_pass else len(self.stages)

    def captured_bytes_per_example(self, example: torch.Tensor) -> int:
        """Bytes of layer inputs (unfolded patches for convolutions) and output gradients one example
        contributes to a batch's captured state: sum over layers of T x (d_in + d_out) floats."""
        with _Capture(self.layers) as capture, torch.no_grad():
            self.model(example[:1])
        total = 0
        for layer in self.layers:
            positions = sum(a.shape[1] for a in capture.inputs[layer.name])
            total += positions * (layer.d_in + layer.d_out) * 4
        return total

    def fit(self, data, report):
        if not self.one_pass:
            return super().fit(data, report)
        cache: list[dict[str, tuple]] = []
        totals: dict[str, torch.Tensor] = {}
        k = self.options.fisher_samples
        self.batch_outputs = []  # the forward's outputs, so the audit needs no separate prediction pass

        def vectors(outputs, y):
            self.batch_outputs.append(outputs)
            return self._fisher_vectors(outputs) + self._given_vectors(y)(outputs)

        for b, (x, y) in enumerate(data()):
            sets = list(self._layer_grads(x, lambda outputs: vectors(outputs, y)))
            entry = {}
            for li, layer in enumerate(self.layers):
                a = sets[0][0][li][1][:, 0].float()
                s_sampled = sets[0][0][li][2][:, 0].float().unsqueeze(0) if k == 1 else torch.stack(
                    [pairs[li][2][:, 0].float() for pairs, _, _ in sets[:-1]])  # (k, B, d_out)
                s_given = sets[-1][0][li][2][:, 0].float()
                if self.rotate:
                    totals[f"{layer.name}.A"] = totals.get(f"{layer.name}.A", 0) + (a.T @ a).double()
                    flat = s_sampled.reshape(-1, s_sampled.shape[-1])
                    totals[f"{layer.name}.S"] = totals.get(f"{layer.name}.S", 0) + (flat.T @ flat).double() / k
                entry[layer.name] = (a, s_sampled, s_given)
            cache.append(entry)
            report("one pass", (b + 1) / data.num_batches)
        n = data.num_examples
        if self.rotate:
            self.finish("covariance", totals, n)
        # the rotated, squared inputs v = (Q_A^T a)^2 serve both Lambda and the scores: compute once
        for entry in cache:
            for layer in self.layers:
                a, s_sampled, s_given = entry[layer.name]
                v = (a @ self.state[layer.name]["QA"]).pow_(2) if self.rotate else a.pow(2)
                entry[layer.name] = (v, s_sampled, s_given)
        if self.refit_eigenvalues or not self.rotate:
            lam = {}
            for entry in cache:
                for layer in self.layers:
                    v, s_sampled, _ = entry[layer.name]
                    u = (s_sampled @ self.state[layer.name]["QS"]).pow_(2) if self.rotate else s_sampled.pow(2)
                    lam[f"{layer.name}.L"] = lam.get(f"{layer.name}.L", 0) + (u.sum(0).T @ v).double() / k
            self.finish("eigenvalues", lam, n)
        scores = []
        for entry in cache:
            part = 0
            for layer in self.layers:
                v, _, s_given = entry[layer.name]
                st = self.state[layer.name]
                u = (s_given @ st["QS"]).pow_(2) if self.rotate else s_given.pow(2)
                part = part + ((u @ st["R"]) * v).sum(1).double()
            scores.append(part.cpu())
        self.precomputed_scores = torch.cat(scores)

    # ------------------------------------------------------------------ passes over the data
    def _layer_grads(self, inputs: torch.Tensor, vectors_fn):
        """One forward; for each (B, C) set of output-gradient vectors from vectors_fn(outputs), the
        per-layer (a, s) pairs backpropagated from them. Each row is that example's own gradient."""
        for p in self.model.parameters():
            p.requires_grad_(True)
        try:
            with _Capture(self.layers) as capture, torch.enable_grad():
                outputs = self.model(inputs)
                capture.recording = False
                vector_sets = vectors_fn(outputs.detach())
                flat = capture.flat_outputs()
                for i, (vectors, targets) in enumerate(vector_sets):
                    grads = torch.autograd.grad(outputs, flat, grad_outputs=vectors.to(outputs.dtype),
                                                retain_graph=i + 1 < len(vector_sets), allow_unused=True)
                    grads = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(flat, grads))
                    yield list(capture.per_layer(grads)), vectors, targets
        finally:
            for p in self.model.parameters():
                p.requires_grad_(False)

    def _fisher_vectors(self, outputs):
        """Output gradients whose outer products average to the output Hessian H (so that the
        statistics are the GGN): labels sampled from the model (seeded), or with fisher_samples=0
        the exact expectation, the C rows of R with R^T R = H."""
        if self.options.fisher_samples == 0:
            root = self.loss.hessian_sqrt(outputs)  # (B, C, C)
            return [(root[:, c, :], None) for c in range(root.shape[1])]
        sets = []
        for _ in range(self.options.fisher_samples):
            targets = self.loss.sample_targets(outputs, self.generator)
            sets.append((self.loss.residual(outputs, targets), targets))
        return sets

    def _given_vectors(self, targets):
        return lambda outputs: [(self.loss.residual(outputs, targets), targets)]

    def _fallback_grads(self, inputs, vectors) -> torch.Tensor | None:
        """Per-example gradients of <f(x_n), v_n> for the parameters no tracked layer covers."""
        if not self.fallback_names:
            return None
        from torch.func import functional_call, grad, vmap

        frozen = {k: v for k, v in self.params.items() if k not in self.fallback_names}
        free = {k: self.params[k] for k in self.fallback_names}

        def example_value(p, x, v):
            out = functional_call(self.model, {**frozen, **p}, (x.unsqueeze(0),))
            return (out.reshape(-1) * v).sum()

        return flatten(vmap(grad(example_value), in_dims=(None, 0, 0))(free, inputs, vectors.detach()), batch_dims=1)

    def _rotated(self, layer: _Layer, a: torch.Tensor, s: torch.Tensor):
        st = self.state.get(layer.name, {})
        if self.rotate:
            a = a @ st["QA"]
            s = s @ st["QS"]
        return a, s

    def _squared_rotated_grads(self, layer, a, s):
        """Squared rotated gradients, as (start, "rank1", u (B, d_out), v (B, d_in)) for one-position
        layers, or (start, "full", G~^2 (b, d_out, d_in), None) in chunks of the batch."""
        T = a.shape[1]
        if T == 1:
            a, s = self._rotated(layer, a, s)
            yield 0, "rank1", s[:, 0].pow(2), a[:, 0].pow(2)
            return
        # G~ = Q_S^T (sum_t s_t a_t^T) Q_A: rotating the T positions first costs T (d_in^2 + d_out^2) per
        # example, rotating the formed gradient d_out d_in (d_in + d_out); convolutions usually have
        # T > d_out, where forming first is several times cheaper.
        d_in, d_out = a.shape[2], s.shape[2]
        form_first = self.rotate and T * (d_in * d_in + d_out * d_out) > d_out * d_in * (d_in + d_out)
        if not form_first:
            a, s = self._rotated(layer, a, s)
        step = max(1, CHUNK_ELEMENTS // (layer.d_out * layer.d_in))
        for start in range(0, a.shape[0], step):
            g = torch.einsum("bto,bti->boi", s[start : start + step], a[start : start + step])
            if form_first:
                st = self.state[layer.name]
                g = st["QS"].T @ g @ st["QA"]
            yield start, "full", g.pow_(2), None

    def accumulate(self, stage, inputs, targets, partial: Partial | None) -> Partial:
        out: Partial = {}
        count = 0
        for pairs, vectors, _ in self._layer_grads(inputs, self._fisher_vectors):
            count += 1
            for layer, a, s in pairs:
                a, s = a.float(), s.float()
                if stage == "covariance":
                    T = a.shape[1]
                    A = torch.einsum("bti,btj->ij", a, a).double() / T
                    S = torch.einsum("bto,btp->op", s, s).double()
                    out[f"{layer.name}.A"] = out.get(f"{layer.name}.A", 0) + A
                    out[f"{layer.name}.S"] = out.get(f"{layer.name}.S", 0) + S
                else:
                    lam = out.get(f"{layer.name}.L", 0)
                    for _, kind, g2, v in self._squared_rotated_grads(layer, a, s):
                        lam = lam + ((g2.T @ v) if kind == "rank1" else g2.sum(0)).double()
                    out[f"{layer.name}.L"] = lam
            if self.fallback_names and stage == self.stages[0]:
                fb = self._fallback_grads(inputs, vectors)
                out["fallback.diag"] = out.get("fallback.diag", 0) + fb.double().pow(2).sum(0)
        # several sampled label sets per example average; the exact expectation's rows already sum to H
        scale = 1.0 if self.options.fisher_samples == 0 else 1.0 / count
        return {k: v * scale for k, v in out.items()}

    def finish(self, stage, total, num_examples):
        n = num_examples
        if "fallback.diag" in total:
            self.state["__fallback__"] = {"L": total["fallback.diag"] / n}
        if stage == "covariance":
            for layer in self.layers:
                A = total[f"{layer.name}.A"] / n
                S = total[f"{layer.name}.S"] / n
                a_eig, QA = torch.linalg.eigh(A)
                s_eig, QS = torch.linalg.eigh(S)
                st = {"QA": QA.float(), "QS": QS.float()}
                if not self.refit_eigenvalues:
                    st["L"] = torch.outer(s_eig.clamp_min(0), a_eig.clamp_min(0))
                self.state[layer.name] = st
        else:
            for layer in self.layers:
                self.state.setdefault(layer.name, {})["L"] = total[f"{layer.name}.L"] / n
        if stage == self.stages[-1] or (stage == "eigenvalues" and self.one_pass):
            self._set_damping()

    def _set_damping(self):
        if self.options.weight_decay:
            for st in self.state.values():
                st["L"] = st["L"] + self.options.weight_decay
        # heuristic: 0.1 x the mean eigenvalue of each block (kronfluence / EK-FAC practice)
        weighted, count = 0.0, 0
        for key, st in self.state.items():
            lam = self.options.damping if self.options.damping is not None else 0.1 * float(st["L"].mean())
            lam = max(lam, 1e-12)
            self.layer_damping[key] = lam
            st["R"] = (1.0 / (st["L"] + lam)).float()
            weighted += lam * st["L"].numel()
            count += st["L"].numel()
        self.damping = self.options.damping if self.options.damping is not None else weighted / max(count, 1)

    # ----------------------------------------------------------------------------- scoring
    def self_influence(self, inputs, targets):
        scores = torch.zeros(inputs.shape[0], dtype=torch.float64, device=inputs.device)
        given = None
        for pairs, vectors, _ in self._layer_grads(inputs, self._given_vectors(targets)):
            given = vectors
            for layer, a, s in pairs:
                R = self.state[layer.name]["R"]
                for start, kind, g2, v in self._squared_rotated_grads(layer, a.float(), s.float()):
                    if kind == "rank1":
                        scores += ((g2 @ R) * v).sum(1).double()
                    else:
                        scores[start : start + g2.shape[0]] += (g2 * R).sum((1, 2)).double()
        if self.fallback_names:
            g = self._fallback_grads(inputs, given).double()
            fb = self.state["__fallback__"]
            scores += (g.pow(2) / (fb["L"] + self.layer_damping["__fallback__"])).sum(1)
        return scores

    def leverage(self, inputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """J_c (G + lambda I)^-1 J_c'^T for the logits `classes` (B, K) of each example: (B, K, K).

        One backward per selected logit (one-hot output gradients); for a one-position layer the logit
        gradients are s_c a^T, so the entry is sum_o s~_c,o s~_c',o (R v)_o with v = (Q_A^T a)^2."""
        B, K = classes.shape

        def one_hot_sets(outputs):
            return [(torch.zeros_like(outputs).scatter_(1, classes[:, k : k + 1], 1.0), None) for k in range(K)]

        out = torch.zeros(B, K, K, dtype=torch.float64, device=inputs.device)
        per_logit: list[dict] = []
        logit_vectors = []
        for pairs, vectors, _ in self._layer_grads(inputs, one_hot_sets):
            per_logit.append({layer.name: (a, s) for layer, a, s in pairs})
            logit_vectors.append(vectors)
        for layer in self.layers:
            if layer.name not in per_logit[0]:
                continue
            R = self.state[layer.name]["R"]
            a = per_logit[0][layer.name][0].float()
            s_all = torch.stack([entry[layer.name][1].float() for entry in per_logit], dim=1)  # (B, K, T, d_out)
            if self.rotate:
                a = a @ self.state[layer.name]["QA"]
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
        if self.fallback_names:
            fb = self.state["__fallback__"]
            inv = 1.0 / (fb["L"] + self.layer_damping["__fallback__"])
            grads = torch.stack([self._fallback_grads(inputs, v).double() for v in logit_vectors], dim=1)  # (B, K, P)
            out += torch.einsum("bcp,bdp,p->bcd", grads, grads, inv)
        return out

    def describe(self):
        layers = [{"layer": l.name, "type": type(l.module).__name__, "treatment": self.name,
                   "shape": [l.d_out, l.d_in], "num_parameters": l.d_out * l.d_in,
                   "damping": self.layer_damping.get(l.name)} for l in self.layers]
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
        self.one_pass = False

    @property
    def num_passes(self) -> int:
        return 0

    def fit(self, data, report) -> None:
        """Nothing to fit: there is no curvature."""

    def describe(self):
        return {"estimator": self.name, "num_parameters": self.num_parameters, "damping": None,
                "note": "squared norm of the per-example loss gradient; no curvature"}
