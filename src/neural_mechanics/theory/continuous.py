"""The paper's continuous-time predictions of the charges (docs/theory.md section 3), online and stable.

SGD + weight decay (beta = 0), modified gradient flow with time t = eta k:
    T(t) = e^{-lambda t} T(0),   S(t) = e^{-2 lambda t} S(0) + eta int_0^t e^{-2 lambda (t - s)} |g_A(s)|^2 ds
(R as S with |g_A1|^2 - |g_A2|^2). Discretised with the gradient of step k sitting at s = t_k, this is the
decayed running sum  S_{k+1} = e^{-2 lambda eta_k} (S_k + eta_k^2 <g_k, D g_k>).

Heavy-ball momentum, (h (1 + beta) / 2) theta'' + (1 - beta) theta' = -g - lambda theta with h = eta (1 - tau),
t = h k, gives S'' + 2 gamma S' + omega^2 S = 2 |theta'_A|^2 with gamma = (1 - beta) / (h (1 + beta)),
omega^2 = 4 lambda / (h (1 + beta)) (2 lambda / (h (1 + beta)) and no source for T), and
S(t) = chi(t) S(0) + 2 int G(t - s) |theta'(s)|^2 ds, theta' = -eta b / h. Rather than one running sum per
exponential mode we carry the equivalent state (S, S') and advance it by the exact 2x2 propagator of one step,

    [S, S'](t + h) = [[chi(h), G(h)], [chi'(h), G'(h)]] [S, S' + 2 h |theta'_k|^2],

i.e. the discretised integral with the velocity of step k at s = t_k (2 h |theta'|^2 = (2 eta / (1 - tau)) <b, D b>:
the prefactor this derivation gives; the reference code used 2 eta (1 - tau), selectable as prefactor="reference").
For constant coefficients this is the same sum as the modal accumulators, but it never forms exp(+gamma t),
needs no complex arithmetic, and all three regimes (under-, critically, over-damped) come out of one formula:
with c = gamma h = (1 - beta) / (1 + beta) and z = (omega^2 - gamma^2) h^2,

    chi(h) = e^{-c} (Cz + c Sz),   G(h) = h e^{-c} Sz,   chi'(h) = -omega^2 h e^{-c} Sz,   G'(h) = e^{-c} (Cz - c Sz),

where Cz = cos sqrt z, Sz = sin sqrt z / sqrt z for z > 0, cosh / sinh for z < 0, and their Taylor series near 0
(critical damping). All arguments are per-step quantities (c <= 1, |z| <= 1 + 4 lambda eta), so nothing overflows
in float32 over any number of steps, and eta_k = 0 (warmup from zero) is a harmless no-op on S.

Learning-rate schedules: time advances by the step's own eta_k (SGD) or h_k = eta_k (1 - tau) (momentum), and the
coefficients gamma, omega of each step are those of its own h_k (piecewise-constant coefficients), which is the
natural continuous model of a scheduled run; with a constant lr it is the paper's formula exactly.

Initial rate S'(0) = 0 (the paper's chi(t) S(0) term); pass `rate0` to start elsewhere. The paper model is derived
for heavy ball; for Nesterov the same formula is applied (it agrees to leading order in eta).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from neural_mechanics.theory.errors import TheoryError
from neural_mechanics.theory.hyper import Hyper

__all__ = ["PaperPrediction", "cos_sinc", "momentum_propagator"]

Prefactor = Literal["derived", "reference"]
Integrand = Literal["grad", "update"]


def cos_sinc(z: Tensor) -> tuple[Tensor, Tensor]:
    """(cos sqrt z, sin sqrt z / sqrt z) as entire functions of real z (cosh / sinh for z < 0, series near 0)."""
    small = z.abs() < 1e-3
    s = torch.sqrt(torch.where(small, torch.ones_like(z), z.abs()))
    pos = z > 0
    c_big = torch.where(pos, torch.cos(s), torch.cosh(s))
    s_big = torch.where(pos, torch.sin(s), torch.sinh(s)) / s
    c_ser = 1 - z / 2 * (1 - z / 12 * (1 - z / 30))
    s_ser = 1 - z / 6 * (1 - z / 20 * (1 - z / 42))
    return torch.where(small, c_ser, c_big), torch.where(small, s_ser, s_big)


def momentum_propagator(h: Tensor, momentum: Tensor, omega2_h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(chi(h), G(h), chi'(h), G'(h)) of y'' + 2 gamma y' + omega^2 y = 0 over one step of length h.

    gamma h = (1 - beta) / (1 + beta); `omega2_h` = omega^2 h (finite as h -> 0: 4 lambda / (1 + beta) for S).
    """
    c = (1 - momentum) / (1 + momentum)
    z = omega2_h * h - c * c
    cz, sz = cos_sinc(z)
    e = torch.exp(-c)
    return e * (cz + c * sz), h * e * sz, -omega2_h * e * sz, e * (cz - c * sz)


class PaperPrediction:
    """The paper's continuous prediction of T, S or R for G groups, advanced one optimizer step at a time.

    quadratic: bool tensor [G] (True for scale / rescale, False for translation) or one bool for all.
    step(hp, grad_sq, velocity_sq) -> predicted charge at t_{k+1}, with grad_sq = <g_k, D g_k> (used when beta = 0)
    and velocity_sq = <b_k, D b_k> (used when beta != 0); both ignored for translation groups (None allowed).
    prefactor: "derived" (2 eta / (1 - tau), correct: see tests) or "reference" (2 eta (1 - tau)).
    integrand: "grad" (the paper, |g_A|^2) or "update" (the reference code, |d_A|^2 = |g_A|^2 + lambda^2 S, an
    O(eta lambda^2) difference).
    """

    def __init__(self, quadratic: Tensor | bool, charge0: Tensor, *, prefactor: Prefactor = "derived",
                 integrand: Integrand = "grad", rate0: Tensor | None = None):
        if prefactor not in ("derived", "reference"):
            raise TheoryError(f"unknown prefactor {prefactor!r}", "use 'derived' or 'reference'")
        if integrand not in ("grad", "update"):
            raise TheoryError(f"unknown integrand {integrand!r}", "use 'grad' or 'update'")
        charge0 = torch.as_tensor(charge0)
        self.charge: Tensor = (charge0 if charge0.is_floating_point() else charge0.double()).clone()
        """Predicted charge at the current time t_k."""
        self.quadratic: Tensor = (quadratic.to(device=self.charge.device, dtype=torch.bool)
                                  if isinstance(quadratic, Tensor)  # a flag by fill: no host-to-device copy on CUDA
                                  else torch.full((), bool(quadratic), dtype=torch.bool, device=self.charge.device))
        self.quadratic = self.quadratic.expand_as(self.charge).clone()
        self.rate: Tensor = torch.zeros_like(self.charge) if rate0 is None else rate0.to(self.charge).clone()
        """d charge / dt (momentum model only)."""
        self.time: Tensor = torch.zeros_like(self.charge)
        """Model time t_k = sum of eta_j (SGD) or h_j = eta_j (1 - tau) (momentum)."""
        self.prefactor: Prefactor = prefactor
        self.integrand: Integrand = integrand

    def step(self, hp: Hyper, grad_sq: Tensor | None = None, velocity_sq: Tensor | None = None) -> Tensor:
        """Advance t_k -> t_{k+1} and return the predicted charge there (tensor [G])."""
        S = self.charge
        r = hp.resolved(S)
        eta, beta, tau, lam = r.lr, r.momentum, r.dampening, r.weight_decay
        zero = torch.zeros_like(S)
        quad = self.quadratic
        k = torch.where(quad, 2.0, 1.0).to(S.dtype)          # S decays twice as fast as T
        # SGD: S_{k+1} = e^{-2 lambda eta} (S_k + eta^2 |g_A|^2)
        gsq = zero if grad_sq is None else grad_sq.to(S.dtype)
        src = eta * eta * gsq
        if self.integrand == "update":
            src = src + eta * eta * lam * lam * S
        sgd = torch.exp(-k * lam * eta) * (S + torch.where(quad, src, zero))
        # heavy ball: exact propagator of the damped oscillator over h, kick 2 h |theta'|^2 into S'
        h = eta * (1 - tau)
        vsq = zero if velocity_sq is None else velocity_sq.to(S.dtype)
        pref = 2 * eta / (1 - tau) if self.prefactor == "derived" else 2 * eta * (1 - tau)
        kick = torch.where(quad, pref * vsq, zero)
        chi, g, dchi, dg = momentum_propagator(h, beta, 2 * k * lam / (1 + beta))
        rate = self.rate + kick
        mom = chi * S + g * rate
        mom_rate = dchi * S + dg * rate
        buffered = beta != 0
        self.charge = torch.where(buffered, mom, sgd)
        self.rate = torch.where(buffered, mom_rate, zero)
        self.time = self.time + torch.where(buffered, h, eta)
        return self.charge

    def state_dict(self) -> dict[str, Any]:
        return {"charge": self.charge.clone(), "rate": self.rate.clone(), "time": self.time.clone(),
                "quadratic": self.quadratic.clone(), "prefactor": self.prefactor, "integrand": self.integrand}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        dev = self.charge.device
        self.charge = d["charge"].to(dev).clone()
        self.rate = d["rate"].to(device=dev, dtype=self.charge.dtype).clone()
        self.time = d["time"].to(device=dev, dtype=self.charge.dtype).clone()
        self.quadratic = d["quadratic"].to(dev).clone()
        self.prefactor = d.get("prefactor", self.prefactor)
        self.integrand = d.get("integrand", self.integrand)
