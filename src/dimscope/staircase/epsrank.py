"""Function-space ε-rank of a layer (Yang, Zhao & Zhu, arXiv 2412.05144) and its quadrature.

Definition (dimscope's operational choice, stated once here and in the README)
------------------------------------------------------------------------------
Let φ_1, …, φ_n be the neuron functions of a layer: φ_j(x) is the j-th output of the layer when the
network's input is x ∈ Ω (a layer output of any shape is flattened per input, so "neurons" are all
its entries). With quadrature points x_1, …, x_N and weights w_1, …, w_N approximating ∫_Ω · dx,

    Φ_kj = φ_j(x_k)          (N × n)
    M    = Φᵀ W Φ,  W = diag(w)          M_ij ≈ ∫_Ω φ_i(x) φ_j(x) dx     (uncentered Gram matrix)
    ε-rank = #{ eigenvalues of M  > ε }   (absolute threshold, default ε = 1e-3)

* The weights integrate against **Lebesgue measure on Ω**: trapezoid and Gauss–Legendre weights and
  the Monte-Carlo weights |Ω|/N all sum to |Ω| (2 on [-1, 1], 4 on [-1, 1]²). User weights are used
  as given. When no weights are given for a bare tensor of points, each point gets 1/N ("uniform":
  the probability measure on the points, Σw = 1).
* ``normalize=True`` rescales every neuron to unit L²_W norm first (φ_j / ‖φ_j‖_W, neurons with zero
  norm are left at 0), so M has a unit diagonal and the count no longer depends on the neurons' scale.
* No centering: the constant function is a legitimate neuron function.

The count moves with ε, the quadrature and the normalisation, so each :class:`EpsRank` carries all
three, and the Tracker extension writes them into the run's manifest and the convention name.
The eigen-decomposition is the foundation's (:func:`dimscope.spectrum.spectrum_from_gram`, float64).
This is a different quantity from the covariance metric :func:`dimscope.metrics.eps_rank`, which
thresholds a *centered* sample covariance *relative* to its top eigenvalue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_choice, check_float, check_int
from ..capture import capture, pick_tensor, resolve_layers
from ..spectrum import Spectrum, spectrum_from_gram
from ..tracker import Tracker, TrackerExtension

__all__ = [
    "EpsRank",
    "Quadrature",
    "trapezoid",
    "gauss_legendre",
    "monte_carlo",
    "quadrature",
    "gram_eigenvalues",
    "layer_functions",
    "eps_rank_function_space",
    "FunctionSpaceEpsRank",
    "convention_name",
]

Box = Sequence[tuple[float, float]]


# -- quadrature ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quadrature:
    """Quadrature points (N × d float tensor) and weights (N, float64) on a box domain.

    ``kind`` is "trapezoid", "gauss", "monte_carlo", "uniform" or "user"; ``domain`` the box
    [(a_1, b_1), …, (a_d, b_d)] (None for user points). The weights sum to |Ω| except for "uniform"
    (Σw = 1) and "user" (as given).
    """

    points: torch.Tensor
    weights: np.ndarray
    kind: str
    domain: tuple[tuple[float, float], ...] | None = None
    shape: tuple[int, ...] = field(default=())

    @property
    def n_points(self) -> int:
        return int(self.points.shape[0])

    @property
    def volume(self) -> float:
        """Σ w (|Ω| for the box rules)."""
        return float(self.weights.sum())

    def integrate(self, values: Any) -> np.ndarray:
        """Σ_k w_k f(x_k) for values of shape (N,) or (N, m)."""
        v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
        return np.tensordot(self.weights, v, axes=(0, 0))

    def info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n_points": self.n_points,
            "dim": int(self.points.shape[1]) if self.points.ndim == 2 else 1,
            "domain": [list(b) for b in self.domain] if self.domain is not None else None,
            "shape": list(self.shape),
            "weight_sum": self.volume,
        }


def _check_box(domain: Any, owner: str) -> tuple[tuple[float, float], ...]:
    """Accept (a, b) for an interval or [(a1, b1), (a2, b2), …] for a box."""
    try:
        if len(domain) == 2 and all(np.ndim(v) == 0 for v in domain):
            box = ((float(domain[0]), float(domain[1])),)
        else:
            box = tuple((float(a), float(b)) for a, b in domain)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"The 'domain' parameter of {owner} must be an interval (a, b) or a box [(a1, b1), (a2, b2), ...]. Got {domain!r} instead."
        ) from e
    if not box or any(not (np.isfinite(a) and np.isfinite(b) and b > a) for a, b in box):
        raise ValueError(f"The 'domain' parameter of {owner} must have finite bounds with a < b on every axis. Got {domain!r} instead.")
    return box


def _tensor_product(nodes: list[np.ndarray], weights: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    grids = np.meshgrid(*nodes, indexing="ij")
    pts = np.stack([g.reshape(-1) for g in grids], axis=1)
    w = weights[0]
    for wi in weights[1:]:
        w = np.multiply.outer(w, wi)
    return pts, w.reshape(-1)


def _per_axis(n: int | Sequence[int], dim: int, owner: str) -> list[int]:
    ns = [n] * dim if isinstance(n, (int, np.integer)) and not isinstance(n, bool) else list(n)  # type: ignore[arg-type]
    if len(ns) != dim:
        raise ValueError(f"The 'n' parameter of {owner} must be an int or one int per axis ({dim}). Got {n!r} instead.")
    return [check_int(k, "n", min_value=2, owner=owner) for k in ns]


def trapezoid(domain: Any, n: int | Sequence[int], dtype: torch.dtype = torch.float32) -> Quadrature:
    """Composite trapezoid rule on a uniform grid of ``n`` points per axis (tensor product on a box).

    1-D weights are h·(½, 1, …, 1, ½) with h = (b − a)/(n − 1); on a box they are the products of the
    per-axis weights. Error O(h²) for smooth integrands; spectrally accurate for smooth periodic ones.
    """
    box = _check_box(domain, "trapezoid")
    ns = _per_axis(n, len(box), "trapezoid")
    nodes, ws = [], []
    for (a, b), k in zip(box, ns):
        x = np.linspace(a, b, k)
        w = np.full(k, (b - a) / (k - 1))
        w[0] *= 0.5
        w[-1] *= 0.5
        nodes.append(x)
        ws.append(w)
    pts, w = _tensor_product(nodes, ws)
    return Quadrature(torch.tensor(pts, dtype=dtype), w, "trapezoid", box, tuple(ns))


def gauss_legendre(domain: Any, n: int | Sequence[int], dtype: torch.dtype = torch.float32) -> Quadrature:
    """Gauss–Legendre rule with ``n`` nodes per axis (numpy's ``leggauss``), exact for polynomials of
    degree ≤ 2n − 1 per axis; tensor product on a box."""
    box = _check_box(domain, "gauss_legendre")
    ns = _per_axis(n, len(box), "gauss_legendre")
    nodes, ws = [], []
    for (a, b), k in zip(box, ns):
        t, w = np.polynomial.legendre.leggauss(k)
        nodes.append(0.5 * (b - a) * t + 0.5 * (a + b))
        ws.append(0.5 * (b - a) * w)
    pts, w = _tensor_product(nodes, ws)
    return Quadrature(torch.tensor(pts, dtype=dtype), w, "gauss", box, tuple(ns))


def monte_carlo(domain: Any, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Quadrature:
    """``n`` points drawn uniformly on the box with a fixed seed, each weighted |Ω|/n (error ~ n^-½)."""
    box = _check_box(domain, "monte_carlo")
    n = check_int(n, "n", min_value=1, owner="monte_carlo")
    rng = np.random.default_rng(seed)
    lo = np.array([a for a, _ in box])
    hi = np.array([b for _, b in box])
    pts = lo + (hi - lo) * rng.random((n, len(box)))
    vol = float(np.prod(hi - lo))
    return Quadrature(torch.tensor(pts, dtype=dtype), np.full(n, vol / n), "monte_carlo", box, (n,))


def quadrature(domain: Any, n: int | Sequence[int], kind: str = "trapezoid", seed: int = 0) -> Quadrature:
    """One entry point: ``kind`` in "trapezoid", "gauss", "monte_carlo"."""
    check_choice(kind, "kind", ("trapezoid", "gauss", "monte_carlo"), owner="quadrature")
    if kind == "trapezoid":
        return trapezoid(domain, n)
    if kind == "gauss":
        return gauss_legendre(domain, n)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
        n = int(np.prod(list(n)))  # type: ignore[arg-type]
    return monte_carlo(domain, int(n), seed=seed)


def _as_quadrature(points: Any, weights: Any, owner: str) -> Quadrature:
    """Points (tensor, array or Quadrature) and optional weights → a Quadrature."""
    if isinstance(points, Quadrature):
        if weights is None:
            return points
        q_points = points.points
    else:
        if isinstance(points, np.ndarray):
            points = torch.from_numpy(points)
        if not isinstance(points, torch.Tensor):
            raise TypeError(f"The 'points' parameter of {owner} must be a Quadrature, a torch.Tensor or a numpy array. Got {type(points).__name__} instead.")
        if points.ndim == 0:
            raise ValueError(f"The 'points' parameter of {owner} must have a batch dimension (N points first). Got a scalar.")
        q_points = points
    n = int(q_points.shape[0])
    if n < 1:
        raise ValueError(f"The 'points' parameter of {owner} must hold at least 1 point. Got 0.")
    if weights is None:
        return Quadrature(q_points, np.full(n, 1.0 / n), "uniform", None, (n,))
    w = np.asarray(weights.detach().cpu() if isinstance(weights, torch.Tensor) else weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"The 'weights' parameter of {owner} must have one weight per point ({n}). Got {w.shape[0]} weights instead.")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"The 'weights' parameter of {owner} must be finite and >= 0. Got min {np.nanmin(w)!r}.")
    domain = points.domain if isinstance(points, Quadrature) else None
    return Quadrature(q_points, w, "user", domain, (n,))


# -- the Gram matrix and its eigenvalues ---------------------------------------------------------
@dataclass(frozen=True)
class EpsRank:
    """The function-space ε-rank of one layer, with everything it depends on.

    ``count`` = #{λ > ε} over ``eigenvalues`` (of M = ΦᵀWΦ, descending, float64); ``weights`` the
    quadrature kind; ``weight_sum`` Σw; ``normalize`` whether neurons were scaled to unit L²_W norm.
    """

    count: int
    eigenvalues: np.ndarray
    eps: float
    weights: str
    normalize: bool
    n_points: int
    n_neurons: int
    weight_sum: float
    layer: str | None = None

    def at(self, eps: float) -> int:
        """The count at another absolute threshold (same eigenvalues)."""
        return int(np.count_nonzero(self.eigenvalues > check_float(eps, "eps", low=0.0, owner="EpsRank.at")))

    def info(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "weights": self.weights,
            "normalize": self.normalize,
            "n_points": self.n_points,
            "n_neurons": self.n_neurons,
            "weight_sum": self.weight_sum,
            "definition": "#{eigenvalues of M = Phi^T W Phi > eps} (absolute, uncentered)",
        }

    def __int__(self) -> int:
        return self.count


def gram_eigenvalues(phi: Any, weights: Any, normalize: bool = False) -> np.ndarray:
    """Eigenvalues (descending, float64) of M = ΦᵀWΦ for Φ (N points × n neurons) and weights (N,).

    With ``normalize`` each column is first divided by its L²_W norm √(Σ_k w_k Φ_kj²) (zero columns
    stay zero). Precision-sensitive: upcasts to float64; uses the foundation's eigendecomposition.
    """
    P = torch.as_tensor(np.asarray(phi) if not isinstance(phi, torch.Tensor) else phi).detach().to(torch.float64).cpu()
    if P.ndim == 1:
        P = P.reshape(-1, 1)
    if P.ndim != 2:
        raise ValueError(f"The 'phi' parameter of gram_eigenvalues must be 2-D (points x neurons). Got shape {tuple(P.shape)}.")
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64)).reshape(-1)
    if w.shape[0] != P.shape[0]:
        raise ValueError(f"The 'weights' parameter of gram_eigenvalues must have one weight per point ({P.shape[0]}). Got {w.shape[0]}.")
    if normalize:
        norms = torch.sqrt((w[:, None] * P * P).sum(0))
        P = P / torch.where(norms > 0, norms, torch.ones_like(norms))
    M = P.T @ (w[:, None] * P)
    s: Spectrum = spectrum_from_gram(M, int(P.shape[0]), int(P.shape[1]), centered=False, normalized=True)
    return s.values


def layer_functions(model: nn.Module, layer: str, points: torch.Tensor) -> torch.Tensor:
    """Φ: the layer's outputs at the points (N × n_neurons, flattened per point), computed under
    no_grad in eval mode; the model's train/eval flags and grad mode are restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"The 'model' parameter of layer_functions must be a torch.nn.Module. Got {type(model).__name__} instead.")
    names = resolve_layers(model, layer)
    if len(names) != 1:
        raise ValueError(f"The 'layer' parameter of layer_functions must name exactly one module. Got {layer!r}, which matches {names}.")
    phis = _functions_of_layers(model, names, points)
    if names[0] not in phis:
        raise ValueError(f"Layer {names[0]!r} produced no tensor output for the points.")
    return phis[names[0]]


def eps_rank_function_space(
    model: nn.Module,
    layer: str,
    points: Any,
    weights: Any = None,
    eps: float = 1e-3,
    normalize: bool = False,
) -> EpsRank:
    """The function-space ε-rank of ``layer``: #{eigenvalues of M = ΦᵀWΦ > ε} (module docstring).

    Parameters
    ----------
    model, layer:
        The network and one module path (its output gives the neuron functions).
    points:
        A :class:`Quadrature` (its weights are used unless ``weights`` is given), or a tensor of N
        inputs (then ``weights`` are user weights, or 1/N each when None).
    weights:
        Optional quadrature weights, one per point (≥ 0).
    eps:
        Absolute threshold on the eigenvalues of M.
    normalize:
        Scale each neuron to unit L²_W norm before forming M.
    """
    eps = check_float(eps, "eps", low=0.0, owner="eps_rank_function_space")
    q = _as_quadrature(points, weights, "eps_rank_function_space")
    name = resolve_layers(model, layer)
    phi = layer_functions(model, layer, q.points)
    ev = gram_eigenvalues(phi, q.weights, normalize=bool(normalize))
    return EpsRank(
        count=int(np.count_nonzero(ev > eps)),
        eigenvalues=ev,
        eps=eps,
        weights=q.kind,
        normalize=bool(normalize),
        n_points=q.n_points,
        n_neurons=int(phi.shape[1]),
        weight_sum=q.volume,
        layer=name[0],
    )


def convention_name(eps: float, normalize: bool = False) -> str:
    """The scalars' convention for a function-space ε-rank: ``function/eps=1e-3`` (``/normalized``)."""
    s = np.format_float_scientific(float(eps), trim="-", exp_digits=1) if eps > 0 else "0"
    return f"function/eps={s}" + ("/normalized" if normalize else "")


# -- the Tracker extension -----------------------------------------------------------------------
class FunctionSpaceEpsRank(TrackerExtension):
    """Track the function-space ε-rank of layers every ``every`` optimizer steps on a fixed quadrature.

    Writes, per layer and per ε, a scalar row (metric ``"eps_rank"``, space ``"activation"``,
    convention ``"function/eps=1e-3"`` — with ``"/normalized"`` appended when ``normalize``), and
    the eigenvalues of M as a spectrum (convention ``"function"`` or ``"function/normalized"``,
    uncentered) so any other ε can be recomputed later with
    ``run.recompute("eps_rank", convention="function", eps=..., relative=False)``. The quadrature,
    ε values and normalisation go into the manifest under ``"function_eps_rank"``.

    The layers' forward on the quadrature points runs on the training thread; the eigenvalues and the
    writes on the Tracker's measurement thread. ``history`` keeps every (step, layer, eps, count)
    also when the Tracker has no run directory.
    """

    name = "function_eps_rank"
    runs_own_forward = True  # the layers' forward on the quadrature points

    def __init__(
        self,
        points: Any,
        *,
        layers: Any = None,
        every: int | None = None,
        eps: float | Sequence[float] = 1e-3,
        weights: Any = None,
        normalize: bool = False,
        store_spectra: bool = True,
    ) -> None:
        self.points = points
        self.layers = layers
        self.every = every
        self.eps = eps
        self.weights = weights
        self.normalize = normalize
        self.store_spectra = store_spectra
        self.history: list[dict[str, Any]] = []

    def setup(self, tracker: Tracker) -> None:
        self.quadrature_ = _as_quadrature(self.points, self.weights, "FunctionSpaceEpsRank")
        eps_list = [self.eps] if isinstance(self.eps, (int, float)) else list(self.eps)
        if not eps_list:
            raise ValueError("The 'eps' parameter of FunctionSpaceEpsRank must hold at least one value. Got [].")
        self.eps_ = [check_float(e, "eps", low=0.0, owner="FunctionSpaceEpsRank") for e in eps_list]
        self.every_ = tracker.every if self.every is None else check_int(self.every, "every", min_value=1, owner="FunctionSpaceEpsRank")
        self.layers_ = tracker.layers if self.layers is None else resolve_layers(tracker.model, self.layers)
        self.normalize_ = bool(self.normalize)
        if tracker.store is not None:
            tracker.store.set_manifest(
                {
                    "function_eps_rank": {
                        "layers": self.layers_,
                        "every": self.every_,
                        "eps": self.eps_,
                        "normalize": self.normalize_,
                        "quadrature": self.quadrature_.info(),
                        "conventions": [convention_name(e, self.normalize_) for e in self.eps_],
                        "spectrum_convention": self.spectrum_convention,
                        "definition": "eps_rank = #{eigenvalues of M = Phi^T W Phi > eps}, absolute, uncentered; "
                        "W = quadrature weights (sum = |Omega| for trapezoid/gauss/monte_carlo)",
                    }
                }
            )

    @property
    def spectrum_convention(self) -> str:
        return "function/normalized" if self.normalize else "function"

    def measure(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Φ for every tracked layer at the quadrature points (training thread)."""
        return _functions_of_layers(model, self.layers_, self.quadrature_.points)

    def on_step(self, tracker: Tracker, step: int, measuring: bool) -> None:
        if step % self.every_ != 0:
            return
        phis = self.measure(tracker.model)
        now = time.time()
        job = self._job(tracker, step, now, phis)
        if tracker._worker is None:  # noqa: SLF001 - synchronous Tracker
            job()
        else:
            tracker._submit(job)  # noqa: SLF001 - run on the measurement thread, in order

    def _job(self, tracker: Tracker, step: int, now: float, phis: dict[str, torch.Tensor]) -> Callable[[], None]:
        q = self.quadrature_

        def job() -> None:
            rows, measured = [], []
            for layer, phi in phis.items():
                if not torch.isfinite(phi).all():
                    ev = None
                else:
                    ev = gram_eigenvalues(phi, q.weights, normalize=self.normalize_)
                for e in self.eps_:
                    count = float("nan") if ev is None else float(np.count_nonzero(ev > e))
                    rows.append((step, now, layer, "eps_rank", count, "activation", convention_name(e, self.normalize_)))
                    # n: quadrature points, d: neurons; ε is absolute, on the weighted Gram matrix
                    measured.append((step, now, layer, "activation", convention_name(e, self.normalize_), q.n_points, int(phi.shape[1]), False,
                                     {"eps_rank": {"eps": e, "relative": False, "normalize": self.normalize_}}))
                    self.history.append({"step": step, "layer": layer, "eps": e, "normalize": self.normalize_, "eps_rank": count})
                if ev is not None and tracker.store is not None and self.store_spectra:
                    spec = Spectrum(ev, q.n_points, int(phi.shape[1]), centered=False)
                    tracker.store.add_spectrum(step, now, layer, spec, space="activation", convention=self.spectrum_convention)
            if tracker.store is not None:
                tracker.store.add_scalars(rows)
                tracker.store.add_measured(measured)

        return job


def _functions_of_layers(model: nn.Module, layers: Sequence[str], points: torch.Tensor) -> dict[str, torch.Tensor]:
    flags = [(m, m.training) for m in model.modules()]
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None and points.is_floating_point():
        points = points.to(device=param.device, dtype=param.dtype)  # the inputs follow the model
    out: dict[str, torch.Tensor] = {}
    model.eval()
    try:
        with torch.no_grad(), capture(model, list(layers)) as cap:
            model(points)
            for name in layers:
                t = pick_tensor(cap.outputs.get(name))
                if t is not None:
                    out[name] = t.reshape(t.shape[0], -1).detach().cpu()
    finally:
        for m, was in flags:
            m.training = was
    return out
