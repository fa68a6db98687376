"""The toy pictures of the paper: gradient constraints and conserved surfaces of tiny explicit losses.

Three losses with exactly one symmetry each, in any dimension n (the figure uses n = 2 and n = 3):

- translation: softmax cross-entropy of logits w against a fixed target distribution p,
  L(w) = -sum_y p_y log softmax(w)_y; grad = softmax(w) - p, so <grad, 1> = 0 and
  T = sum_i w_i is conserved: gradient flow stays on a line (2-D) / plane (3-D).
- scale: a loss of the direction only, L(w) = 1 - <w / |w|, u> for a unit vector u;
  grad = -(I - w w^T / |w|^2) u / |w|, so <grad, w> = 0 and S = |w|^2 is conserved: circle / sphere.
- rescale: a one-hidden-unit linear network, L(a, b) = 1/2 sum_i (a b_i - y_i)^2 with input weight a
  (A1) and output weights b (A2); <grad, (a, -b)> = 0 and R = a^2 - |b|^2 is conserved: hyperbola /
  hyperboloid.

`gradient_flow` integrates d x / d t = -grad L(x) with classical Runge-Kutta (4th order), which keeps
the charge constant to ~1e-9 relative on these problems, so the drawn trajectories really lie on the
drawn surfaces. This figure needs no run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import NDArray

from neural_mechanics.plots.style import KIND_COLORS, new_figure, style

Array = NDArray[np.float64]


@dataclass(frozen=True)
class ToyProblem:
    """A loss with one symmetry: its gradient, generator xi(x) and charge, all in closed form."""

    kind: str
    loss: Callable[[Array], float]
    grad: Callable[[Array], Array]
    generator: Callable[[Array], Array]
    charge: Callable[[Array], float]
    start: dict[int, tuple[float, ...]]
    """A starting point per dimension (2 and 3) for the pictures."""
    extent: float
    """Half-width of the plotted square/cube."""
    t_end: float
    """Flow time after which the trajectory is (nearly) at a minimum."""


def _softmax(w: Array) -> Array:
    e = np.exp(w - w.max())
    return e / e.sum()


def _target(n: int) -> Array:
    return np.array([0.6, 0.3, 0.1]) if n == 3 else np.array([0.75, 0.25]) if n == 2 else np.full(n, 1.0 / n)


def _direction(n: int) -> Array:
    u = np.array([1.0, 0.6, 0.9])[:n] if n <= 3 else np.ones(n)
    return u / np.linalg.norm(u)


def _labels(n: int) -> Array:
    return np.array([1.0, -0.6])[: n - 1] if n <= 3 else np.ones(n - 1)


TRANSLATION = ToyProblem(
    kind="translation",
    loss=lambda w: float(-(_target(len(w)) * np.log(_softmax(w))).sum()),
    grad=lambda w: _softmax(w) - _target(len(w)),
    generator=lambda w: np.ones_like(w),
    charge=lambda w: float(w.sum()),
    start={2: (-1.5, 2.5), 3: (-1.5, 2.0, 0.5)},
    extent=3.0,
    t_end=25.0,
)

SCALE = ToyProblem(
    kind="scale",
    loss=lambda w: float(1.0 - w @ _direction(len(w)) / np.linalg.norm(w)),
    grad=lambda w: -(_direction(len(w)) - (w @ _direction(len(w))) * w / (w @ w)) / np.linalg.norm(w),
    generator=lambda w: w.copy(),
    charge=lambda w: float(w @ w),
    start={2: (-0.75, -0.8), 3: (-0.2, -0.9, 0.4)},
    extent=1.6,
    t_end=12.0,
)

RESCALE = ToyProblem(
    kind="rescale",
    loss=lambda x: float(0.5 * ((x[0] * x[1:] - _labels(len(x))) ** 2).sum()),
    grad=lambda x: np.concatenate((
        [((x[0] * x[1:] - _labels(len(x))) * x[1:]).sum()],
        (x[0] * x[1:] - _labels(len(x))) * x[0],
    )),
    generator=lambda x: np.concatenate(([x[0]], -x[1:])),
    charge=lambda x: float(x[0] ** 2 - (x[1:] ** 2).sum()),
    start={2: (1.9, -1.1), 3: (0.2, 0.9, 0.25)},
    extent=2.4,
    t_end=10.0,
)

TOY_PROBLEMS: dict[str, ToyProblem] = {p.kind: p for p in (TRANSLATION, SCALE, RESCALE)}


def gradient_flow(problem: ToyProblem, x0: Array | tuple[float, ...], t_end: float | None = None,
                  n_steps: int = 2000) -> Array:
    """Points x(t_k), t_k = k t_end / n_steps, of d x/d t = -grad L(x) from x0 (RK4); shape (n_steps + 1, n)."""
    x = np.asarray(x0, dtype=np.float64).copy()
    dt = (problem.t_end if t_end is None else t_end) / n_steps
    out = np.empty((n_steps + 1, x.size))
    out[0] = x
    f = problem.grad
    for k in range(n_steps):
        k1 = -f(x)
        k2 = -f(x + 0.5 * dt * k1)
        k3 = -f(x + 0.5 * dt * k2)
        k4 = -f(x + dt * k3)
        x = x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        out[k + 1] = x
    return out


def _grid(extent: float, n: int = 121) -> tuple[Array, Array]:
    # an even number of cells keeps 0 off the grid (the scale loss is undefined at the origin)
    g = np.linspace(-extent, extent, n) + extent / (2 * (n - 1))
    return np.meshgrid(g, g)


def _level_set_2d(ax, problem: ToyProblem, c0: float, extent: float) -> None:
    """The conserved curve {x : charge(x) = c0}: a line, a circle or a hyperbola."""
    s = np.linspace(-extent, extent, 400)
    style_kw = {"color": "black", "lw": 1.4, "linestyle": "--"}
    if problem.kind == "translation":
        ax.plot(s, c0 - s, label="conserved: w₁ + w₂ = T₀", **style_kw)
    elif problem.kind == "scale":
        phi = np.linspace(0, 2 * np.pi, 400)
        r = np.sqrt(c0)
        ax.plot(r * np.cos(phi), r * np.sin(phi), label="conserved: |w|² = S₀", **style_kw)
    else:
        if c0 < 0:  # a^2 - b^2 = c0 < 0: b = +-sqrt(a^2 - c0), over a
            b = np.sqrt(s**2 - c0)
            ax.plot(s, b, label="conserved: a² − b² = R₀", **style_kw)
            ax.plot(s, -b, **style_kw)
        else:
            a = np.sqrt(s**2 + c0)
            ax.plot(a, s, label="conserved: a² − b² = R₀", **style_kw)
            ax.plot(-a, s, **style_kw)


def _surface_3d(ax, problem: ToyProblem, c0: float, x0: Array) -> None:
    """The conserved surface through x0: plane, sphere or hyperboloid, drawn translucent."""
    color = KIND_COLORS[problem.kind]
    e = problem.extent
    if problem.kind == "translation":
        u, v = np.meshgrid(np.linspace(-e, e, 25), np.linspace(-e, e, 25))
        x, y, z = u, v, c0 - u - v
        z = np.where(np.abs(z) <= 1.5 * e, z, np.nan)
    elif problem.kind == "scale":
        r = np.sqrt(c0)
        th, ph = np.meshgrid(np.linspace(0, np.pi, 30), np.linspace(0, 2 * np.pi, 40))
        x, y, z = r * np.sin(th) * np.cos(ph), r * np.sin(th) * np.sin(ph), r * np.cos(th)
    else:
        ph, a = np.meshgrid(np.linspace(0, 2 * np.pi, 40), np.linspace(-1.2, 1.2, 25))
        if c0 < 0:  # one sheet: |b| = sqrt(a^2 - c0)
            rb = np.sqrt(a**2 - c0)
            x, y, z = a, rb * np.cos(ph), rb * np.sin(ph)
        else:  # the sheet of the starting point: a = sign(a0) sqrt(c0 + |b|^2)
            rad = np.linspace(0, 1.5, 25)[:, None] * np.ones_like(ph)
            x = np.sign(x0[0]) * np.sqrt(c0 + rad**2)
            y, z = rad * np.cos(ph), rad * np.sin(ph)
    ax.plot_surface(x, y, z, color=color, alpha=0.22, linewidth=0.3, edgecolor=color, antialiased=True)


_TITLES = {
    "translation": ("translation: softmax CE of logits", "⟨∇L, 1⟩ = 0  →  plane Σ wᵢ = T₀"),
    "scale": ("scale: L(w) = 1 − ⟨w/|w|, u⟩", "⟨∇L, w⟩ = 0  →  sphere |w|² = S₀"),
    "rescale": ("rescale: L = ½ Σ (a bᵢ − yᵢ)²", "⟨∇L, (a, −b)⟩ = 0  →  hyperboloid a² − |b|² = R₀"),
}
_AXES = {"translation": ("w₁", "w₂", "w₃"), "scale": ("w₁", "w₂", "w₃"), "rescale": ("a", "b₁", "b₂")}


def fig_conserved_surfaces(n_steps: int = 2000) -> Figure:
    """Top row, 2-D: loss contours, the negative-gradient field (arrows, tangent to the conserved curve by
    the gradient constraint), the conserved curve through the start (dashed) and the gradient-flow
    trajectory (on it). Bottom row, 3-D: the conserved surface and the trajectory lying on it."""
    with style():
        fig = new_figure(ncols=3, nrows=2, width=3.9, height=3.6)
        for col, problem in enumerate(TOY_PROBLEMS.values()):
            color = KIND_COLORS[problem.kind]
            # ---- 2-D
            ax = fig.add_subplot(2, 3, col + 1)
            e = problem.extent
            xx, yy = _grid(e)
            pts = np.stack([xx.ravel(), yy.ravel()], axis=1)
            zz = np.array([problem.loss(p) for p in pts]).reshape(xx.shape)
            ax.contourf(xx, yy, zz, levels=18, cmap="Greys", alpha=0.55)
            ax.contour(xx, yy, zz, levels=18, colors="grey", linewidths=0.4, alpha=0.6)
            qx, qy = _grid(e, 13)
            qpts = np.stack([qx.ravel(), qy.ravel()], axis=1)
            q = -np.array([problem.grad(p) for p in qpts])
            qn = np.linalg.norm(q, axis=1, keepdims=True)
            q = q / np.maximum(qn, 1e-12) * np.minimum(qn, np.percentile(qn, 90)) / max(np.percentile(qn, 90), 1e-12)
            ax.quiver(qpts[:, 0], qpts[:, 1], q[:, 0], q[:, 1], color="#555555", alpha=0.7, scale=22, width=0.004)
            x0 = np.asarray(problem.start[2], dtype=np.float64)
            c0 = problem.charge(x0)
            _level_set_2d(ax, problem, c0, e)
            traj = gradient_flow(problem, x0, n_steps=n_steps)
            ax.plot(traj[:, 0], traj[:, 1], color=color, lw=2.4, label="gradient flow")
            ax.plot(*traj[0], "o", color=color, ms=6)
            ax.plot(*traj[-1], "*", color=color, ms=11, mec="black", mew=0.6)
            ax.set_xlim(-e, e)
            ax.set_ylim(-e, e)
            ax.set_aspect("equal")
            ax.set_xlabel(_AXES[problem.kind][0])
            ax.set_ylabel(_AXES[problem.kind][1])
            ax.set_title(_TITLES[problem.kind][0])
            ax.legend(loc="lower left", fontsize=7)
            ax.grid(False)
            # ---- 3-D
            ax3 = fig.add_subplot(2, 3, col + 4, projection="3d")
            x0 = np.asarray(problem.start[3], dtype=np.float64)
            c0 = problem.charge(x0)
            _surface_3d(ax3, problem, c0, x0)
            traj = gradient_flow(problem, x0, n_steps=n_steps)
            ax3.plot(traj[:, 0], traj[:, 1], traj[:, 2], color="black", lw=2.0, zorder=10)
            ax3.scatter(*traj[0], color=color, s=30, depthshade=False, zorder=11)
            ax3.scatter(*traj[-1], color=color, marker="*", s=90, edgecolor="black", depthshade=False, zorder=11)
            names = _AXES[problem.kind]
            ax3.set_xlabel(names[0], labelpad=-6)
            ax3.set_ylabel(names[1], labelpad=-6)
            ax3.set_zlabel(names[2], labelpad=-6)
            ax3.tick_params(labelsize=6, pad=-2)
            for axis in (ax3.xaxis, ax3.yaxis, ax3.zaxis):
                axis.set_major_locator(MaxNLocator(5))
            ax3.set_title(_TITLES[problem.kind][1], fontsize=9)
            ax3.view_init(elev=22, azim=-58)
        fig.suptitle("Symmetry → gradient constraint → conserved surface (o start, ★ end of gradient flow)")
    return fig
