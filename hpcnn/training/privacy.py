"""Private training (``--dp-sgd``): the privacy accountant and the private step's clipping and noise.

A private step (DP-SGD) is a normal step with three changes (``hpcnn.core.privacy`` has the math):

- **sampling**: each row is in a batch with probability ``q = batch_size / rows``, independently
  (Poisson sampling, ``io.datasets.PoissonSampler``); the loss gradient is scaled by ``1 /
  (q * rows)``, the *expected* batch size, whatever a batch's size;
- **clipping** (``Clipping``, called by the pipeline between the last backward and the weight
  gradients): every layer's examples' squared gradient norms, summed over the layers of every stage
  of the replica (one ``Allgatherv`` of a tensors x rows array over the stages), clip factors
  ``min(1, C / norm)``, and each weight gradient formed once from the scaled output-gradient rows;
- **noise** (``add_noise``, after the replicas' gradient sum): ``N(0, (sigma C)^2)`` per parameter,
  scaled like the gradient, drawn from a generator keyed by (seed, step, tensor): every replica adds
  the same numbers to the same sum, so the noise is added once, and every layout adds the same.

The accountant (``Accountant``) is Google's ``dp-accounting`` (RDP or PLD): it composes ``steps``
Poisson-sampled Gaussian mechanisms per ``(q, sigma)`` segment (a run resumed with other settings
adds a segment) and reports epsilon at ``delta``. The segments are in every checkpoint.
"""

import functools
import math
import warnings

import numpy as np

from hpcnn.core.layers import Layer
from hpcnn.core.privacy import clip_factors, gaussian_noise, total_sq_norms
from hpcnn.errors import UserError


def default_delta(rows: int) -> float:
    """``1 / rows`` rounded down to a power of ten (1,438 rows: 1e-4)."""
    return 10.0 ** math.floor(math.log10(1.0 / rows))


def _dp():
    with warnings.catch_warnings():  # its dependencies' import-time deprecations are not the user's
        warnings.simplefilter("ignore")
        import dp_accounting
        from absl import logging
        from dp_accounting import pld, rdp

    # its accountants log convergence notes per order (absl, to stderr): not the user's concern
    logging.set_verbosity(logging.ERROR)
    return dp_accounting, rdp, pld


def _event(rate: float, sigma: float, steps: int):
    dp, _, _ = _dp()
    mechanism = dp.PoissonSampledDpEvent(rate, dp.GaussianDpEvent(sigma))
    return dp.SelfComposedDpEvent(mechanism, int(steps))


def _fresh(kind: str):
    _, rdp, pld = _dp()
    return rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()


@functools.lru_cache(maxsize=16)
def _step_rdp(rate: float, sigma: float):
    """``(orders, RDP of one step)`` of RDP's accountant, or ``None`` where the library keeps them
    elsewhere. The per-order RDP of a Poisson-sampled Gaussian costs ~0.3 s (its fractional orders);
    ``k`` steps are ``k`` times it, exactly as the library composes them, so it is computed once."""
    accountant = _fresh("rdp")
    accountant.compose(_event(rate, sigma, 1))
    orders, rdp = getattr(accountant, "_orders", None), getattr(accountant, "_rdp", None)
    return None if orders is None or rdp is None else (orders, np.array(rdp, dtype=float))


def epsilon(kind: str, segments, delta: float) -> float:
    """Epsilon at ``delta`` after ``segments``, ``[(q, sigma, steps), ...]``, composed in order."""
    if not any(s for *_, s in segments):
        return 0.0
    cached = [_step_rdp(q, sigma) for q, sigma, steps in segments if steps] if kind == "rdp" else [None]
    if all(c is not None for c in cached):  # the library's sum of per-step RDP, then its conversion
        _, rdp, _ = _dp()
        steps = [s for *_, s in segments if s]
        total = sum(k * c[1] for k, c in zip(steps, cached, strict=True))
        return float(rdp.compute_epsilon(cached[0][0], total, delta)[0])
    accountant = _fresh(kind)
    for rate, sigma, steps in segments:
        if steps:
            accountant.compose(_event(rate, sigma, steps))
    return float(accountant.get_epsilon(delta))


def noise_for(kind: str, rate: float, steps: int, target: float, delta: float, spent=()) -> float:
    """The noise multiplier that spends exactly ``target`` epsilon at ``delta`` in ``steps`` more
    steps (after the ``spent`` segments)."""
    dp, _, _ = _dp()

    def make(sigma):
        return dp.ComposedDpEvent([*(_event(*s) for s in spent if s[2]), _event(rate, sigma, steps)])

    if epsilon(kind, spent, delta) >= target:
        raise UserError(f"target_epsilon = {target}: already spent by the run resumed from")
    try:
        sigma = dp.calibrate_dp_mechanism(
            lambda: _fresh(kind), make, target, delta, dp.ExplicitBracketInterval(1e-2, 1e3)
        )
    except ValueError:  # the library: no noise in its bracket reaches the target
        raise UserError(
            f"target_epsilon = {target} at target_delta = {delta:g}: no noise multiplier in [0.01, 1000] "
            f"reaches it in {steps} steps of sampling rate {rate:.4g}"
        ) from None
    return float(sigma)


class Accountant:
    """The privacy spent so far: ``(q, sigma, steps)`` segments, epsilon at ``delta``."""

    def __init__(self, kind: str, delta: float, segments=()):
        self.kind, self.delta = kind, delta
        self.segments = [list(s) for s in segments]

    def add(self, rate: float, sigma: float, steps: int = 1) -> None:
        if self.segments and self.segments[-1][:2] == [rate, sigma]:
            self.segments[-1][2] += steps
        else:
            self.segments.append([rate, sigma, steps])

    @property
    def steps(self) -> int:
        return sum(s[2] for s in self.segments)

    def epsilon(self, extra_steps: int = 0, rate: float = 0.0, sigma: float = 0.0) -> float:
        """Epsilon spent, or that would be after ``extra_steps`` more steps at ``(rate, sigma)``."""
        segments = self.segments + ([[rate, sigma, extra_steps]] if extra_steps else [])
        return epsilon(self.kind, segments, self.delta)

    def state(self) -> dict:
        """What a checkpoint stores (``from_state`` reads it back)."""
        return {"accountant": self.kind, "delta": self.delta, "segments": self.segments}

    @classmethod
    def from_state(cls, state: dict) -> "Accountant":
        return cls(state["accountant"], state["delta"], state["segments"])


def check(cfg, layers) -> None:
    """``UserError`` for a private run hpcnn cannot make private as asked."""
    if not cfg.dp_sgd:
        return
    from hpcnn.core.norm import BatchNorm

    mixing = [layer for layer in layers if isinstance(layer, BatchNorm)]
    if mixing:
        raise UserError(
            f"dp_sgd: {mixing[0]!r} mixes the examples of a batch (its statistics), so no example has a "
            "gradient of its own to clip; use LayerNorm, or train without dp_sgd"
        )
    # no per-example rule: BatchNorm has none on purpose (no example has a gradient of its own)
    missing = [
        layer
        for layer in layers
        if layer.param_specs() and type(layer).example_sq_norms is Layer.example_sq_norms
    ]
    if missing:
        raise UserError(
            f"dp_sgd: layer {missing[0]!r} has parameters but no per-example gradient norm "
            f"({type(missing[0]).__name__}.example_sq_norms); Dense, Conv2D and LayerNorm have one"
        )


class Clipping:
    """Each example's gradient clipped to ``max_norm`` (the pipeline calls it once per step, after
    the last backward, before the weight gradients): returns the rows' factors."""

    def __init__(self, model, pipe, max_norm: float, scale: float):
        self.model, self.pipe, self.max_norm, self.scale = model, pipe, max_norm, scale
        self.tensors = sum(len(layer.param_specs()) for layer in model.layers)
        # tensors per stage: the widths of the stages' parts of the per-tensor norms
        self.counts = pipe.allgather(self.tensors) if pipe is not None else [self.tensors]
        self.clipped = 0  # examples clipped in the last step (factor < 1)

    def __call__(self, rows: int):
        model = self.model
        mine = [
            column
            for i, layer in enumerate(model.layers)
            for column in layer.example_sq_norms(model.stack(i), rows)
        ]
        parts = np.array(mine, np.float64).reshape(self.tensors, rows)
        if self.pipe is not None:  # every stage's tensors, in model order (stage order)
            every = np.empty((sum(self.counts), rows))
            self.pipe.Allgatherv(parts, [every, [c * rows for c in self.counts]])
            parts = every
        factors = clip_factors(total_sq_norms(parts, rows), self.max_norm, self.scale)
        self.clipped = int(np.count_nonzero(factors < 1.0))
        return factors


def add_noise(params, seed: int, step: int, first_tensor: int, std: float) -> None:
    """Add ``N(0, std^2)`` to every gradient value of ``params`` (a stage's ``FlatParams``; tensor
    ``j`` of it is tensor ``first_tensor + j`` of the whole model, the noise's key)."""
    grad = params.grad
    for j, s in enumerate(params.slots):
        view = grad[s.offset : s.offset + s.size]
        view += gaussian_noise(seed, step, first_tensor + j, s.size, std, grad.dtype)


def sampling_rate(cfg, rows: int) -> float:
    return min(1.0, cfg.batch_size / rows)


def plan(cfg, rows: int, steps: int, spent: Accountant | None) -> tuple[float, Accountant]:
    """``(sigma, accountant)`` of a private run of ``steps`` steps over ``rows`` training rows:
    the noise multiplier given, or the one that spends ``target_epsilon`` by the last step."""
    delta = cfg.target_delta or default_delta(rows)
    accountant = spent or Accountant(cfg.accountant, delta)
    if spent is not None and (spent.kind, spent.delta) != (cfg.accountant, delta):
        raise UserError(
            f"dp_sgd: the checkpoint's privacy was accounted with {spent.kind} at delta "
            f"{spent.delta:g}; this run asks for {cfg.accountant} at delta {delta:g} (set accountant and "
            "target_delta to match)"
        )
    rate = sampling_rate(cfg, rows)
    if cfg.noise_multiplier:
        return cfg.noise_multiplier, accountant
    remaining = steps - accountant.steps
    return noise_for(
        cfg.accountant, rate, remaining, cfg.target_epsilon, delta, accountant.segments
    ), accountant


def affordable(accountant: Accountant, rate: float, sigma: float, target: float) -> int:
    """The most further steps at ``(rate, sigma)`` that keep epsilon at or below ``target`` (a
    bisection over the accountant, whose epsilon grows with the steps)."""
    if accountant.epsilon(1, rate, sigma) > target:
        return 0
    low, high = 1, 2
    while accountant.epsilon(high, rate, sigma) <= target:
        low, high = high, 2 * high
        if high > 1 << 40:
            return high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if accountant.epsilon(mid, rate, sigma) <= target else (low, mid)
    return low


def describe(cfg, sigma: float, accountant: Accountant, rate: float, rows: int, steps: int) -> str:
    """Rank 0's start-up line of a private run."""
    how = "given" if cfg.noise_multiplier else f"solved for epsilon {cfg.target_epsilon:g} by step {steps}"
    text = (
        f"dp-sgd: per-example gradients clipped to {cfg.max_grad_norm:g}, noise multiplier {sigma:.4g} "
        f"({how}), {cfg.sampling} sampling at q = {rate:.4g} (expected batch {rate * rows:.1f} of "
        f"{rows} rows), {accountant.kind} accountant at delta {accountant.delta:g}"
    )
    if cfg.target_epsilon and cfg.noise_multiplier:
        text += f"; the budget epsilon {cfg.target_epsilon:g} lasts to step {steps}"
    if cfg.sampling == "shuffle":
        text += (
            "\ndp-sgd: warning: shuffled fixed-size batches are not the Poisson sampling the accountant "
            "assumes: the epsilon reported is not a guarantee for this run"
        )
    return text


class PrivateRun:
    """A private run's state on this rank: the noise multiplier, the accountant, the step budget,
    the loss scale; it installs the per-example clipping on the pipeline and adds the noise.

    ``at`` is where the run starts (a checkpoint's position carries the accountant); ``steps`` the
    planned steps. The noise multiplier is solved on rank 0 (``comm.root_decides``) and its error,
    if any, is every rank's."""

    def __init__(self, cfg, comm, rows: int, steps: int, at, layers, bounds, grid, pipe):
        if at.step and not at.privacy:
            raise UserError(
                f"dp_sgd: the checkpoint resumed from is {at.step} steps into a run that was not private; "
                "no accountant can say what those steps spent: train privately from the start"
            )
        spent = Accountant.from_state(at.privacy) if at.privacy else None
        self.cfg, self.rate = cfg, sampling_rate(cfg, rows)

        def decide():
            sigma, accountant = plan(cfg, rows, steps, spent)
            budget = steps
            if cfg.target_epsilon:  # the steps the budget allows, from the step resumed at
                budget = min(budget, at.step + affordable(accountant, self.rate, sigma, cfg.target_epsilon))
            return sigma, accountant, budget

        self.sigma, self.accountant, self.steps = comm.root_decides(decide, cfg.debug)
        self.budget_steps = self.steps if self.steps < steps else None  # the budget ends training early
        self.loss_scale = 1.0 / (self.rate * rows)  # one over the expected batch size
        self.noise_std = self.sigma * cfg.max_grad_norm * self.loss_scale
        self.first_tensor = sum(len(layer.param_specs()) for layer in layers[: bounds[grid.stage]])
        pipe.clipping = Clipping(
            pipe.model, grid.pipe if grid.stages > 1 else None, cfg.max_grad_norm, self.loss_scale
        )
        self.description = describe(cfg, self.sigma, self.accountant, self.rate, rows, self.steps)

    def add_noise(self, params, step: int) -> None:
        """After the gradient reduction of ``step``: the noise, and the step accounted for."""
        add_noise(params, self.cfg.seed, step, self.first_tensor, self.noise_std)
        self.accountant.add(self.rate, self.sigma)

    def spent(self, comm) -> dict:
        """Epsilon spent so far (computed on rank 0, the same on every rank) and how."""
        eps = comm.bcast(self.accountant.epsilon() if comm.is_root else None)
        a = self.accountant
        return {
            "epsilon": eps, "delta": a.delta, "noise_multiplier": self.sigma, "sampling_rate": self.rate,
            "max_grad_norm": self.cfg.max_grad_norm, "steps": a.steps, "accountant": a.kind,
        }  # fmt: skip
