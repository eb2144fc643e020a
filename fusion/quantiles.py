"""Quantiles from noisy histograms over public bins: a posterior over each cell's histogram, its post-processed
(non-negative, consistent) histogram, and per quantile an estimate and a 95% interval.

Each cell has B noisy bin counts y_j = h_j + e_j, a noisy count N = n + e_0 and (optionally) a noisy centred sum,
every slot with independent noise of known SD (Skellam, normal to a very good approximation). Reading a quantile
off the raw noisy CDF lets the noise of every empty bin pile up on the way to it: with 24 readings a cell and a
bin SD of 3 readings, p10 (2.4 readings) was dragged six bins towards the empty end of the range. Consistency and
non-negativity alone (a least-squares projection) still leave a few readings of spurious mass spread over the
empty bins, enough to move a tail quantile. Readings of a cell occupy a contiguous run of bins (their support),
so the posterior here averages over supports:

- a support S = [a, b] has a uniform prior; given S and the total n, every composition of n readings over S's
  bins is equally likely (Dirichlet(1): the Occam factor (L - 1)! / n^(L - 1) for L bins); bins outside S hold 0;
- inside S each bin's likelihood is approximated by its truncated normal (h_j >= 0, flat prior), and the count
  and centred-sum slots are linear observations of h (the sum's: bin midpoints, with a within-bin term of up to
  n w / 2 modelled as uniform), folded in by Gaussian conditioning; the same algebra gives each support's
  evidence, so the weights and every cumulative count's posterior come from prefix sums (O(1) per support);
- the quantile x_q is at most x exactly when (readings below x) - q n >= 0, a linear function of h once the
  share of x's bin below x is fixed; its posterior probability, summed over supports, is the CDF of x_q.

Within a bin the readings' positions are unknown. Inside the support they are taken to spread like a random
sample of the bin's readings around a linear density (tilted towards the fuller neighbour: the share below a
fraction f of the bin is Beta-distributed around f - s f (1 - f), with concentration the bin's count); in the
support's first and last bin the distribution's own edge lies somewhere inside the bin (uniform), readings filling
the bin from there. The estimate is the posterior median, the interval the central 95% of the posterior. A bin at
the clamp range's end can hold a pile of clamped readings exactly at the bound, so an interval that reaches into
it extends to the bound. Without noise (test mode) the counts are exact and the interval is the whole bin (or
bins, where q n falls on a bin edge) that holds the quantile.

A cell whose histogram is mostly noise (fewer than MIN_READINGS_PER_BIN_SD readings per bin per bin noise SD)
releases no quantile (NaN): there the posterior is driven by its prior, and simulations showed intervals that
cover less than they claim.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.special import gammaln, log_ndtr, ndtr, ndtri

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054

#: The quantiles every histogram release reports, and their column names in `releases`.
QUANTILES: tuple[tuple[str, float], ...] = (("p10", 0.10), ("median", 0.50), ("p90", 0.90))

#: A quantile is released only where the histogram carries at least this many readings per bin (at the count's
#: lower 95% bound) for each bin noise SD: below it the posterior is driven by its prior, and on real hourly
#: weather data (24 readings a cell, 32 bins, epsilon 4) its intervals covered as little as 67-93%.
MIN_READINGS_PER_BIN_SD = 0.4
#: Posterior mass of the reported interval (central).
INTERVAL_MASS = 0.95
#: Points per bin at which each quantile's posterior CDF is evaluated (linear in between).
SUBDIVISIONS = 4
#: Supports kept per cell: the most probable, until they hold all but this share of the posterior.
NEGLIGIBLE_SHARE = 1e-4
#: (support, cell) pairs per block in the evidence computation (bounds memory).
_BLOCK_ENTRIES = 1 << 20
#: Where the distribution's edge lies inside the support's first or last bin (fractions of the bin, uniform).
_EDGES = (np.arange(8) + 0.5) / 8
#: Quadrature of the share of a bin's readings below a point (normal scores of the sample's spread).
_SHARES = (np.arange(6) + 0.5) / 6
#: A noise SD of zero (noise off, test mode) is treated as this many readings, which pins the exact histogram.
_TINY_SD = 1e-6


@dataclass(frozen=True)
class HistogramPosterior:
    """The posterior over each cell's histogram, as its probable supports: one entry per (support, cell) pair.

    Bin-wise arrays are (B, C); entry arrays (E) list each cell's supports, most probable first.
    """

    mean: np.ndarray  # (B, C) each bin's truncated-normal mean (h >= 0), before the observations
    var: np.ndarray  # (B, C) and its variance
    rows: np.ndarray  # (d, B, C) the linear observations' coefficients (count, then centred sum)
    cell: np.ndarray  # (E,) the entry's cell
    first: np.ndarray  # (E,) first bin of its support
    last: np.ndarray  # (E,) last bin
    weight: np.ndarray  # (E,) posterior probability (a cell's entries sum to 1)
    gain: np.ndarray  # (E, d) K^-1 (observations - predicted): what the observations add, per support
    inverse: np.ndarray  # (E, d, d) K^-1, the observations' predictive precision, per support
    histogram: np.ndarray  # (B, C) the post-processed histogram: posterior mean, non-negative

    @property
    def bins(self) -> int:
        return self.mean.shape[0]

    @property
    def cells(self) -> int:
        return self.mean.shape[1]


def _prefix(values: np.ndarray) -> np.ndarray:
    """Prefix sums along the bins axis (second to last): index k holds the sum over bins 0..k-1."""
    zero = np.zeros((*values.shape[:-2], 1, *values.shape[-1:]))
    return np.concatenate([zero, np.cumsum(values, axis=-2)], axis=-2)


def histogram_posterior(
    histogram: np.ndarray,
    *,
    bin_sd: np.ndarray,
    count: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    centred_sum: np.ndarray | None = None,
    centred_sd: np.ndarray | None = None,
    centre: np.ndarray | None = None,
) -> HistogramPosterior:
    """The posterior over each cell's histogram given its noisy bins, count and (optionally) centred sum.

    histogram: noisy bin counts in readings, shape (B, C); bin_sd: the SD of one bin's (and the count's) noise in
    readings, per cell; count: the noisy count; lower/upper: the clamp range; centred_sum, centred_sd, centre: the
    noisy sum of (value - centre) in value units, its SD and the centre (all or none).
    """
    bins, cells = histogram.shape
    sd = np.maximum(np.asarray(bin_sd, dtype=float), _TINY_SD)[None, :]
    t = histogram / sd
    log_cdf = log_ndtr(t)
    ratio = np.exp(-0.5 * t**2 - 0.5 * np.log(2 * np.pi) - log_cdf)  # phi(t) / Phi(t)
    mean = histogram + sd * ratio
    var = sd**2 * np.clip(1.0 - ratio * (ratio + t), 1e-9, 1.0)
    log_empty = -0.5 * t**2 - np.log(sd * np.sqrt(2 * np.pi))  # the bin's likelihood if it holds nothing

    width = (upper - lower) / bins
    rows = [np.ones((bins, cells))]
    observed = [np.asarray(count, dtype=float)]
    noise = [sd[0] ** 2]
    if centred_sum is not None:
        assert centred_sd is not None and centre is not None
        half = (upper - lower) / 2  # the sum is observed in units of half the range, to keep K well scaled
        midpoints = lower[None, :] + (np.arange(bins)[:, None] + 0.5) * width[None, :]
        rows.append((midpoints - centre[None, :]) / half[None, :])
        observed.append(centred_sum / half)
        # Readings sit anywhere in their bin: the sum differs from sum_j h_j m_j by up to n w / 2 (uniform).
        spread = np.maximum(count, sd[0]) * width / half
        noise.append((np.asarray(centred_sd, dtype=float) / half) ** 2 + spread**2 / 12 + 1e-12)
    g = np.stack(rows)  # (d, B, C)
    obs = np.stack(observed)
    obs_var = np.stack(noise)
    d = g.shape[0]

    a_all, b_all = np.triu_indices(bins)
    length = (b_all - a_all + 1)[:, None]
    total = np.maximum((bins * count + histogram.sum(axis=0)) / (bins + 1), sd[0])  # the BLUE of n, >= sd

    pieces: list[tuple[np.ndarray, ...]] = []
    block = max(1, _BLOCK_ENTRIES // a_all.size)
    for start in range(0, cells, block):
        c = slice(start, min(cells, start + block))
        p_empty, p_in = _prefix(log_empty[:, c]), _prefix(log_cdf[:, c])
        p_gmu = _prefix(g[:, :, c] * mean[None, :, c])
        p_ggv = _prefix(g[:, None, :, c] * g[None, :, :, c] * var[None, None, :, c])

        def over(p: np.ndarray) -> np.ndarray:
            return p[..., b_all + 1, :] - p[..., a_all, :]

        k_matrix = np.moveaxis(over(p_ggv), (0, 1), (-2, -1)) + np.einsum("ij,jc->cij", np.eye(d), obs_var[:, c])
        k_inverse = np.linalg.inv(k_matrix)  # (S, c, d, d)
        _, log_det = np.linalg.slogdet(k_matrix)
        residual = np.moveaxis(obs[:, None, c] - over(p_gmu), 0, -1)  # (S, c, d)
        k_gain = np.einsum("scij,scj->sci", k_inverse, residual)
        evidence = (
            (p_empty[-1][None, :] - over(p_empty))
            + over(p_in)
            + gammaln(length)
            - (length - 1) * np.log(total[None, c])
            - 0.5 * np.einsum("sci,sci->sc", residual, k_gain)
            - 0.5 * log_det
        )
        share = np.exp(evidence - evidence.max(axis=0, keepdims=True))
        share /= share.sum(axis=0, keepdims=True)
        order = np.argsort(-share, axis=0, kind="stable")
        columns = np.arange(c.stop - c.start)[None, :]
        ranked = share[order, columns]
        keep = np.cumsum(ranked, axis=0) - ranked < 1.0 - NEGLIGIBLE_SHARE  # (S, c): until all but a sliver
        support, column = order[keep], np.broadcast_to(columns, keep.shape)[keep]
        kept_share = ranked[keep]
        pieces.append(
            (column + start, a_all[support], b_all[support], kept_share, k_gain[support, column],
             k_inverse[support, column])
        )
    cell, first, last, weight, gain, inverse = (np.concatenate(parts) for parts in zip(*pieces, strict=True))
    weight = weight / np.bincount(cell, weights=weight, minlength=cells)[cell]

    posterior_mean = np.zeros((bins, cells))
    for j in range(bins):
        # Each support's posterior mean of bin j (zero outside it), clipped at 0 like the truncation.
        conditioned = mean[j, cell] + np.einsum("er,er->e", (g[:, j] * var[j][None, :])[:, cell].T, gain)
        inside = (first <= j) & (j <= last)
        posterior_mean[j] = np.bincount(
            cell, weights=weight * np.where(inside, np.maximum(conditioned, 0.0), 0.0), minlength=cells
        )
    return HistogramPosterior(mean, var, g, cell, first, last, weight, gain, inverse, posterior_mean)


@lru_cache(maxsize=1024)
def _single_bin_cdf(q: float, fraction: float) -> float:
    """P(u0 + q (u1 - u0) <= fraction) for the sorted pair (u0, u1) of two uniform edges: where the q-quantile of
    readings filling an unknown sub-interval of one bin lies."""
    grid = (np.arange(200) + 0.5) / 200
    low, high = np.minimum.outer(grid, grid), np.maximum.outer(grid, grid)
    return float(np.mean(low + q * (high - low) <= fraction))


def quantile_cdf(posterior: HistogramPosterior, q: float) -> np.ndarray:
    """The posterior CDF of each cell's q-quantile at the points lower + (k + i / SUBDIVISIONS) * width, k over
    bins and i over subdivisions, then the upper bound: shape (B * SUBDIVISIONS + 1, C), monotone, ending at 1."""
    bins, cells = posterior.bins, posterior.cells
    cell, first, last, weight = posterior.cell, posterior.first, posterior.last, posterior.weight
    gain, inverse = posterior.gain, posterior.inverse
    p_mu, p_v = _prefix(posterior.mean), _prefix(posterior.var)
    gv = posterior.rows * posterior.var[None]  # (d, B, C)
    p_gv = _prefix(gv)
    # Within-bin tilt from the post-processed histogram (frequency polygon: the density rises towards the fuller
    # neighbour; the range's ends reflect).
    padded = np.vstack([posterior.histogram[:1], posterior.histogram, posterior.histogram[-1:]])
    tilt = (padded[2:] - padded[:-2]) / np.maximum(padded[:-2] + 2 * padded[1:-1] + padded[2:], 1e-12)
    # The share of a bin's readings below a fraction f of it: around the tilted line, with the spread of a random
    # sample of the bin's readings (binomial: variance m (1 - m) / (count + 1)).
    spread_z = ndtri(_SHARES)[:, None]
    concentration = np.maximum(posterior.histogram, 1.0)
    # Counts are whole: the quantile is at most x exactly when (readings below x) >= ceil(q n), i.e. when
    # (readings below x) - q n + 1/2 - (ceil(q n) - q n) >= 0 with a continuity correction, n the posterior total.
    # Without noise that settles ties (q n whole, the quantile the last reading of its bin); with noise the shift
    # (within half a reading) is as good as random and averages out.
    total = posterior.histogram.sum(axis=0)
    continuity = 0.5 - (np.ceil(q * total - 1e-3) - q * total)

    def quadratic_parts(k: int, e: np.ndarray) -> tuple[np.ndarray, ...]:
        """For entries e with bin k in their support: (readings below x) - q n = sum_j c_j h_j, c_j = 1 - q below
        bin k, s - q in it (s: the share of its readings below x), -q above it. Its posterior is normal with mean
        a0 + c a1 and variance b0 + c b1 + c^2 b2 for c = s - q."""
        ce, fe, le = cell[e], first[e], last[e]
        low_mu = p_mu[k, ce] - p_mu[fe, ce]  # bins first..k-1
        high_mu = p_mu[le + 1, ce] - p_mu[k + 1, ce]  # bins k+1..last
        low_v = p_v[k, ce] - p_v[fe, ce]
        high_v = p_v[le + 1, ce] - p_v[k + 1, ce]
        u = ((1 - q) * (p_gv[:, k, ce] - p_gv[:, fe, ce]) - q * (p_gv[:, le + 1, ce] - p_gv[:, k + 1, ce])).T
        gk = gv[:, k, ce].T  # (e, d)
        g_e, inv_e = gain[e], inverse[e]
        a0 = (1 - q) * low_mu - q * high_mu + np.einsum("ei,ei->e", u, g_e) + continuity[ce]
        a1 = posterior.mean[k, ce] + np.einsum("ei,ei->e", gk, g_e)
        b0 = (1 - q) ** 2 * low_v + q**2 * high_v - np.einsum("ei,eij,ej->e", u, inv_e, u)
        b1 = -2 * np.einsum("ei,eij,ej->e", gk, inv_e, u)
        b2 = posterior.var[k, ce] - np.einsum("ei,eij,ej->e", gk, inv_e, gk)
        return a0, a1, b0, b1, b2

    def probability(parts: tuple[np.ndarray, ...], share: np.ndarray | float) -> np.ndarray:
        a0, a1, b0, b1, b2 = parts
        c = share - q
        spread = np.maximum(b0 + c * b1 + c**2 * b2, 1e-12 * np.maximum(b0 + b2, 1e-12))
        return ndtr((a0 + c * a1) / np.sqrt(spread))

    cdf = np.zeros((bins * SUBDIVISIONS + 1, cells))
    cdf[-1] = 1.0
    for k in range(bins):
        below = np.flatnonzero(last < k)  # the whole support is below bin k: the quantile certainly is too
        interior = np.flatnonzero((first < k) & (k < last))
        opens = np.flatnonzero((first == k) & (k < last))
        closes = np.flatnonzero((first < k) & (k == last))
        alone = np.flatnonzero((first == k) & (k == last))
        parts = {name: quadratic_parts(k, e) for name, e in (("interior", interior), ("opens", opens),
                                                              ("closes", closes))}
        for i in range(SUBDIVISIONS):
            f = i / SUBDIVISIONS
            mass = np.bincount(cell[below], weights=weight[below], minlength=cells).astype(float)
            if interior.size:
                mid = (f - tilt[k] * f * (1 - f))[cell[interior]]
                kappa = concentration[k, cell[interior]]
                shares = np.clip(mid + spread_z * np.sqrt(mid * (1 - mid) / (kappa + 1)), 0.0, 1.0)
                p = np.mean([probability(parts["interior"], s) for s in shares], axis=0)
                mass += np.bincount(cell[interior], weights=weight[interior] * p, minlength=cells)
            if opens.size:  # the distribution starts at an unknown edge x0 inside the bin, filling [x0, 1]
                p = np.mean([probability(parts["opens"], min(max((f - x0) / (1 - x0), 0.0), 1.0)) for x0 in _EDGES],
                            axis=0)
                mass += np.bincount(cell[opens], weights=weight[opens] * p, minlength=cells)
            if closes.size:  # the distribution ends at an unknown edge x1 inside the bin, filling [0, x1]
                p = np.mean([probability(parts["closes"], min(f / x1, 1.0)) for x1 in _EDGES], axis=0)
                mass += np.bincount(cell[closes], weights=weight[closes] * p, minlength=cells)
            if alone.size:  # both edges inside the one bin
                mass += np.bincount(cell[alone], weights=weight[alone] * _single_bin_cdf(q, f), minlength=cells)
            cdf[k * SUBDIVISIONS + i] = mass
    return np.maximum.accumulate(np.clip(cdf, 0.0, 1.0), axis=0)


def invert_cdf(cdf: np.ndarray, p: float, *, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """The point where each cell's CDF (from quantile_cdf) reaches p, linear between the evaluation points."""
    points, cells = cdf.shape
    step = (upper - lower) / (points - 1)
    j = np.maximum(np.argmax(cdf >= p - 1e-12, axis=0), 1)
    columns = np.arange(cells)
    before, after = cdf[j - 1, columns], cdf[j, columns]
    rise = after - before
    fraction = np.where(rise > 0, (p - before) / np.where(rise > 0, rise, 1.0), 0.5)
    return lower + (j - 1 + np.clip(fraction, 0.0, 1.0)) * step


def histogram_quantiles(
    histogram: np.ndarray,
    *,
    bin_sd: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    count: np.ndarray,
    centred_sum: np.ndarray | None = None,
    centred_sd: np.ndarray | None = None,
    centre: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Quantile estimates (posterior medians) and 95% intervals per cell.

    histogram: noisy counts, shape (bins, cells); bin_sd: the noise SD of one bin's count, per cell; count: the
    noisy count; lower/upper: the clamp range per cell; centred_sum, centred_sd, centre: see histogram_posterior.
    Returns {name, name_ci_low, name_ci_high} arrays; NaN where the count is not positive or the histogram is
    mostly noise (MIN_READINGS_PER_BIN_SD).
    """
    bins, cells = histogram.shape
    bin_sd = np.broadcast_to(np.asarray(bin_sd, dtype=float), (cells,))
    count = np.asarray(count, dtype=float)
    # The count's lower 95% bound, not the count itself: a cell just short of the limit whose noise lifted its
    # count over it would be selected for that noise (simulated: such cells' intervals covered 67-73%).
    released = (count - Z95 * bin_sd) / bins >= MIN_READINGS_PER_BIN_SD * np.maximum(bin_sd, 0.0)
    released &= count > 0
    out = {f"{name}{suffix}": np.full(cells, np.nan) for name, _ in QUANTILES for suffix in ("", "_ci_low", "_ci_high")}
    if not released.any():
        return out
    r = released

    def sel(values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else np.broadcast_to(values, (cells,))[r]

    posterior = histogram_posterior(
        histogram[:, r],
        bin_sd=bin_sd[r],
        count=count[r],
        lower=lower[r],
        upper=upper[r],
        centred_sum=sel(centred_sum),
        centred_sd=sel(centred_sd),
        centre=sel(centre),
    )
    low_end, high_end = lower[r], upper[r]
    estimates, lows, highs = [], [], []
    for _, q in QUANTILES:
        cdf = quantile_cdf(posterior, q)
        estimates.append(invert_cdf(cdf, 0.5, lower=low_end, upper=high_end))
        tail = (1 - INTERVAL_MASS) / 2
        low = invert_cdf(cdf, tail, lower=low_end, upper=high_end)
        high = invert_cdf(cdf, 1 - tail, lower=low_end, upper=high_end)
        # Clamped readings pile up exactly at a bound: an interval reaching into an end bin reaches the bound.
        at_first_edge = cdf[SUBDIVISIONS]  # P(quantile <= lower + width)
        at_last_edge = cdf[-1 - SUBDIVISIONS]  # P(quantile <= upper - width)
        lows.append(np.where(at_first_edge >= tail, low_end, low))
        highs.append(np.where(at_last_edge <= 1 - tail, high_end, high))
    ordered = np.sort(np.stack(estimates), axis=0)  # rearrangement: p10 <= median <= p90 in every cell
    width = (high_end - low_end) / bins
    exact = bin_sd[r] == 0  # noise off (test mode): the counts are exact, only the place inside a bin is unknown
    for (name, _), estimate, low, high in zip(QUANTILES, ordered, lows, highs, strict=True):
        low = np.where(exact, low_end + np.floor((low - low_end) / width + 1e-9) * width, low)
        high = np.where(exact, low_end + np.ceil((high - low_end) / width - 1e-9) * width, high)
        out[name][r] = estimate
        out[f"{name}_ci_low"][r] = np.minimum(low, estimate)
        out[f"{name}_ci_high"][r] = np.maximum(high, estimate)
    return out
