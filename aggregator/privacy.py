"""Differential privacy of the scalars, the aggregator's side: calibration,
central noise and the accountant.

See :mod:`fwdllm.core.dp` for the unit of privacy (one example) and what a
device does.  Here:

* **Calibration.**  The noise multiplier ``sigma`` is chosen at the first
  round (when the devices' example counts are known) so that ``rounds``
  rounds of the Poisson-subsampled Gaussian mechanism at that round's
  sampling rate ``q`` spend exactly the budget
  ``(epsilon, delta)`` (``dp_accounting.calibrate_dp_mechanism`` over an RDP
  accountant).
* **Where the noise goes.**  Central by default: the aggregator adds
  ``N(0, (sigma * clip)^2)`` to each seed's summed scalar, and the devices
  trust it with their clipped sums.  Under ``--secagg`` the aggregator sees
  only the sum, so each of the n participants adds ``N(0, (sigma * clip)^2 / t)``
  (``t`` = the secure-aggregation threshold, the fewest survivors a round
  accepts) and the sum carries at least the full variance (distributed DP).
  Central noise holds up with few clients; distributed noise needs no
  trusted server, and costs ``n / t`` times the variance (<= 2x at the
  default majority threshold).
* **Accounting.**  Every committed round composes one
  ``PoissonSampledDpEvent(q_r, GaussianDpEvent(sigma))`` where ``q_r`` is the
  largest sampling rate of that round's participants (``batch_size /
  n_examples``: a device with fewer examples samples each more often).  The
  epsilon spent so far goes into ``metrics.jsonl`` as ``dp_epsilon_spent``;
  when the next round would pass the budget the run stops or warns, as
  ``--dp-on-spent`` says.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import dp_accounting
from dp_accounting import rdp

ON_SPENT = ("stop", "warn")


@dataclass(frozen=True)
class DPSpec:
    """A run's privacy settings (in run.json)."""

    epsilon: float
    delta: float
    clip: float = 1.0  # L2 bound of one example's per-seed scalars
    sample_rate: float = 0.01  # planned Poisson rate q (batch_size / examples per device)
    rounds: int = 1
    on_spent: str = "stop"
    sigma: float = 0.0  # noise multiplier; 0 = calibrate from the budget

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and 0 < self.delta < 1 and self.clip > 0 and 0 < self.sample_rate <= 1):
            raise ValueError("--dp-epsilon and --dp-clip must be positive, --dp-delta in (0, 1), "
                             f"the sampling rate in (0, 1]; got {self}")
        if self.on_spent not in ON_SPENT:
            raise ValueError(f"--dp-on-spent must be one of {ON_SPENT}")

    def calibrated(self) -> "DPSpec":
        """This spec with ``sigma`` set so ``rounds`` rounds spend the budget."""
        if self.sigma > 0 or math.isinf(self.epsilon):
            return self
        sigma = dp_accounting.calibrate_dp_mechanism(
            _accountant, lambda s: _rounds_event(self.sample_rate, s, self.rounds), self.epsilon, self.delta,
            dp_accounting.LowerEndpointAndGuess(1e-2, 1.0), tol=1e-4)
        return DPSpec(**{**asdict(self), "sigma": float(sigma)})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DPSpec":
        return cls(**d)


def _accountant() -> rdp.RdpAccountant:
    return rdp.RdpAccountant()


def round_event(q: float, sigma: float) -> dp_accounting.DpEvent:
    """One round's mechanism: each example sampled with rate ``q``, its
    clipped contribution summed, Gaussian noise of ``sigma`` times the clip."""
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def _rounds_event(q: float, sigma: float, rounds: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(round_event(q, sigma), rounds)


@dataclass
class Ledger:
    """The sampling rates of the rounds released so far (JSON-able: it lives in
    the checkpoint, so a resumed run keeps counting)."""

    spec: DPSpec
    rates: list[float] = field(default_factory=list)

    def epsilon(self, extra_rate: float | None = None) -> float:
        """Epsilon spent at the run's delta (after one more round at ``extra_rate``)."""
        rates = self.rates + ([extra_rate] if extra_rate is not None else [])
        if not rates:
            return 0.0
        acc = _accountant()
        # rounds at one rate compose as one self-composed event (fast for long runs)
        for q in sorted(set(rates)):
            acc.compose(_rounds_event(q, self.spec.sigma, rates.count(q)))
        return float(acc.get_epsilon(self.spec.delta))

    def would_exceed(self, rate: float) -> bool:
        return self.epsilon(rate) > self.spec.epsilon * (1 + 1e-6)

    def record(self, rate: float) -> float:
        self.rates.append(float(rate))
        return self.epsilon()

    def calibrate(self, rate: float) -> None:
        """Fix ``sigma`` at the first round, from the sampling rate the devices
        that came report (their example counts are unknown before they join)."""
        if self.spec.sigma <= 0:
            self.spec = DPSpec.from_dict({**self.spec.to_dict(), "sample_rate": rate}).calibrated()

    def state_dict(self) -> dict:
        return {"sigma": self.spec.sigma, "sample_rate": self.spec.sample_rate, "rates": list(self.rates)}

    def load_state_dict(self, d: dict) -> None:
        self.rates = [float(q) for q in d.get("rates", [])]
        if d.get("sigma"):
            self.spec = DPSpec.from_dict({**self.spec.to_dict(), "sigma": float(d["sigma"]),
                                          "sample_rate": float(d["sample_rate"])})
