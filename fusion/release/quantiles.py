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
  cells is equally likely (Dirichlet(1): the Occam factor (L - 1)! / n^(L - 1) for L cells); bins outside S hold
  0. A bin at an end of the clamp range is two cells: the readings exactly at the bound (clamped ones, night-time
  irradiance, calm wind) and the rest, so that it may hold a pile; its count's prior density is then h (the sum of
  two flat cells) instead of flat;
- inside S each bin's likelihood is approximated by its truncated normal (h_j >= 0; t N(y; t, sd^2) for a bound's
  bin), and the count and centred-sum slots are linear observations of h (the sum's: bin midpoints, with a
  within-bin term of up to n w / 2 modelled as uniform), folded in by Gaussian conditioning; the same algebra gives
  each support's evidence, so the weights and every cumulative count's posterior come from prefix sums (O(1) per
  support);
- the quantile x_q is at most x exactly when (readings below x) - q n >= 0, a linear function of h once the
  share of x's bin below x is fixed; its posterior probability, summed over supports, is the CDF of x_q.

Within a bin the readings' positions are unknown. Inside the support they are taken to spread like a random
sample of the bin's readings around a linear density (tilted towards the fuller neighbour: the share below a
fraction f of the bin is Beta-distributed around f - s f (1 - f), with concentration the bin's count); in the
support's first and last bin the distribution's own edge lies somewhere inside the bin (uniform), readings filling
the bin from there. How a bound's bin splits between the bound and the rest is not observed (the centred sum is far
too noisy to tell): the estimate is the posterior median with the split uniform (its prior), and the interval
holds both extremes, from the 2.5% point with every reading of the lower bound's bin at the bound to the 97.5%
point with every reading of the upper bound's bin at that bound. So a quantile that sits at a bound (p10 of
irradiance at night, zero) is estimated there, and its interval reaches the bound whenever the posterior puts
2.5% on the quantile's being in that bin. Without noise (test mode) the counts are exact and the interval is the
whole bin (or bins, where q n falls on a bin edge) that holds the quantile.

Calibration, and what it cannot reach. Interval mass is not tuned to any data set. On real hourly weather (24
readings a cell, 16 bins, epsilon 4, three noise seeds; the test's two TMY3 stations and, not used by the tests,
Miami's TMY2 file and the TMY3 stations' direct-normal irradiance and dew point) every quantile covers at least
95%, but not 93-97% with misses balanced:

- about half of the p10 truths are exactly a clamp bound (irradiance at night, calm wind). Whether a bound's bin
  holds its readings at the bound is not observed, so an honest interval reaches the bound whenever the quantile
  may be in that bin, and covers those cells by construction: p10 covers 98.6-99.2% over all cells, 96-98% over
  the cells whose interval reaches neither bound (misses mostly above);
- uniform compositions find a thin tail as likely as a thick one. Temperature, dew point and wind days sit in one
  to three bins, and noise that looks like a few readings in an empty neighbour bin moves their tail quantiles
  outwards (misses of p10 above, of p90 below); irradiance has a long thin daylight tail above the pile at zero,
  which the posterior overfills near the pile, so a median just above the pile misses below. Medians cover
  96.7-98.4% with 74-94% of misses below, p90 96.0-97.7% (66-86% of misses below on the test's data, balanced on
  the others). Counting a bound's pile as cells of its own moved irradiance p90 from 90-94% (direct-normal
  86-90%), misses nearly all above, to 96-98% (92-95%). Against an exact dynamic-programming posterior of the same
  discrete model (whole counts, no centred sum) the bin-edge CDFs agree for p10 and medians (99th percentile of
  the difference 0.09 and 0.2); for irradiance p90 this approximation sits higher (p99 0.3), which adds to the
  misses below on the test's data. The posterior mean histograms show where the misses come from, and that the
  prior, not the approximation, puts them there (40 day-cells each of Miami's TMY2 file, noise seed 2026, mean
  posterior minus true readings a bin): GHI's bin 0 (the night pile) -1.31 exact, -1.60 here, its next two bins
  +0.68 / +0.71 exact, +0.71 / +0.75 here; air temperature's two bins just below its days +0.62 / +0.47 exact,
  +0.68 / +0.56 here. The approximation adds total mass (GHI +2.2 readings a cell against +0.4 exact, air
  temperature +2.2 against +1.5), not the shape. Other priors (Dirichlet(1/2), the Dirichlet's dependence on n,
  support lengths fitted to each release by empirical Bayes, a more exact Occam factor) moved misses from one
  quantile or data set to another without balancing them.

Empirical Bayes across a release's cells of one metric (post-processing of the released slots: no budget) was
measured too, with intervals the posterior's central 95% (split integrated, not its extremes), and none kept:

- a Dirichlet(alpha) composition, alpha fitted by marginal likelihood. Its sites h^(alpha - 1) N(y; h, sd^2) are far
  from normal where a bin is empty, and for alpha > 1 Gaussian conditioning then finds the whole range the most
  probable support (evidence thousands of nats too high); restricted to alpha <= 1 the fit picks 0.3 for
  temperature, dew point and wind and 1 for irradiance, and medians then cover 93.5% (the test's data, 104 of 115
  misses below, all of irradiance's) and 88.7% (the other data, 277 of 287 below);
- the share of a bound's bin exactly at the bound (Beta(2 rho, 2 (1 - rho)), rho = 1/2 being the uniform split),
  rho fitted per metric and bound by the marginal likelihood of the centred sums, the only slot that sees it.
  With noise-free histograms the sums identify it (residual 40-90 W/m2 a day at the true rho against the noise's
  ~2,000), but through the posterior they also carry its overfilled near tail (irradiance's bins 1-5 hold 0.2-0.45
  readings too many on average, bin 0 0.4 too few), and the fit lands far off: rho 0.1-0.4 for irradiance (true
  0.70-0.86), 0.02 for wind (true 0.03-0.14); with alpha 1/2, irradiance medians then cover 26-86% and wind's p10
  66% (all misses below). Even with the true rho (0.8 irradiance, 0.12 wind, given by hand) and alpha 1/2, p10
  covers 99.1%, medians 97.1% (78-88% of misses below), p90 97.3-98.1%: the rest is how readings sit inside their
  bins, which no slot but the sum observes (an edge bin's density rising to the core instead of flat raised
  coverage, misses on the same sides). Most remaining misses are a fraction of a bin (median 0.15-0.4) inside the
  bin that holds the interval's near end. Taking how far the distribution reaches into its first or last bin from
  that bin's count against its neighbour's (instead of uniform) left tail quantiles covering 85-95%, misses on
  the same sides, or (with extents a half of that and less) covering more;
- a nonparametric prior over whole histograms (NPMLE, Kiefer-Wolfowitz), fitted per metric: a library of
  candidates (each cell's post-processed histogram in whole readings, the same with bins under 0.75, 1.5 or 3
  readings emptied, each also shifted a bin either way; a cell's own candidates left out of its posterior), weights
  fitted by EM on the exact normal likelihood of every cell's noisy bins and count; a quantile's CDF is the
  posterior mixture of the candidates' (readings uniform in their bin, from an edge inside it in the support's end
  bins, a bound's pile share uniform), the interval its central 95%. Over a year of day-cells (730 a metric, seeds
  2026, 1, 2) medians balance (96.3-97.9%, 52-59% of misses on one side), but p10 covers 97.4-98.7% (54-87% of
  misses above; irradiance's p10 is the bound, which any honest interval holds) and p90 93.8-97.8% (64-74% below):
  irradiance's p90 covers 92-94% (direct-normal 91%), misses on both sides, even with the other days' true
  histograms as the library (a finite library has no near neighbour for a day's spread daylight tail). Moving a
  reading to a neighbouring bin in the fitted candidates, or sparser candidates, took it to 85-92%, and fitted on
  100 or 24 cells (a day's release: 24 a metric and region) p90 covers 89-92% or 79-84%.

(Measured on the test's cells and on Miami's TMY2 file and the TMY3 stations' direct-normal irradiance and dew
point, noise seed 2026.)

A quantile exactly at the upper bound (humidity at 100%) was estimated short of it and its interval stopped a
fortieth of a subdivision below it: the CDF just left of the bound counted the bound's pile as below it. Fixed;
at epsilon 16 (humidity's histograms release there) p90 of humidity covers 90.7% (was 83.6%, half its misses that
hair), and over the test's cells (three seeds) at epsilon 8 / 16 p10 covers 98.6-98.7% / 98.2-98.5%, medians
96.3-96.7% / 94.8-95.2%, p90 96.8-97.4% / 95.1-95.5% (was 95.0-95.7% / 93.3-93.8%); 65-74% of p90's misses above:
irradiance's thin daylight tail is read as noise. At epsilon 4 nothing changed.

Calibration by simulation, measured and not kept: per release and metric, each cell's post-processed histogram
made a plausible one in whole readings (bins under 0.6 bin noise SDs emptied; readings placed inside their bins as
the posterior places them: placed uniformly the simulation pushed the wrong way, temperature p10 89%), re-released
with the cell's own noise (2-8 replicates, seeded from the public histograms) and decoded by the same posterior;
where each interval end is read off its extreme CDF was then fitted per side on the pooled simulated truths off the
clamp bounds (shrunk towards 2.5% / 97.5%). Over a year of day-cells at epsilon 4 (three seeds; A the test's data,
B Miami's TMY2 file and the stations' direct-normal irradiance and dew point), coverage (share of misses on the
larger side) p10 A 99.0% (87%) -> 98.7% (59%), B 98.9% (81%) -> 98.8% (51%); medians A 97.5% (80%) -> 96.9% (76%),
B 97.3% (78%) -> 96.3% (75%); p90 A 97.6% (79%) -> 97.8% (66%), B 96.4% (65%) -> 96.5% (59%). Irradiance medians
just above the night-time pile still missed only below (a posterior that rules them out yields plausible
histograms that never hold them), and with less noise (epsilon 8 / 16) tail misses grew more one-sided (p10 64 ->
76% / 60 -> 79%, p90 68 -> 77% / 71 -> 76%). Not kept: the target stays unmet (medians), higher epsilons get
worse, and a release's quantile decode costs about three times as much (300 cells: 0.36 -> 0.80 s), which a
stream's burst and every release pay.

A prior that charges each support a fixed factor per bin (log prior -lambda * length, on top of the uniform
compositions' Occam factor), measured at epsilon 4 over the test's and the other data (two seeds): it balances the
compact metrics' tail misses (air temperature p10 26 above / 5 below at lambda 0, 10 / 19 at 0.5, 6 / 37 at 1)
but leaves their coverage at 97-99% (their intervals are wide inside the bin that holds the quantile, where only
the noisy sum could tell positions apart), and no single lambda suits irradiance: its p90 falls to 73-74% at 0.5
and 45-48% at 1 (its long daylight tails need long supports). Not kept.

A cell whose histogram is mostly noise (fewer than MIN_READINGS_PER_BIN_SD readings per bin per bin noise SD)
releases no quantile (NaN): there the posterior is driven by its prior, and simulations showed intervals that
cover less than they claim.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

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
#: Where a bound's bin splits between the readings exactly at the bound and the rest (uniform quadrature).
_PILE = tuple((np.arange(4) + 0.5) / 4)
#: A noise SD of zero (noise off, test mode) is treated as this many readings, which pins the exact histogram.
_TINY_SD = 1e-6


@dataclass(frozen=True)
class HistogramPosterior:
    """The posterior over each cell's histogram, as its probable supports: one entry per (support, cell) pair.

    Bin-wise arrays are (B, C); entry arrays (E) list each cell's supports, most probable first.
    """

    mean: np.ndarray  # (B, C) each bin's site mean (truncated normal, h >= 0), before the observations
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


def _bound_site(y: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, variance and log evidence of the site t N(y; t, sd^2), t >= 0: a bin whose count t is the sum of two
    cells of the composition, each flat (the prior density of their sum is t). With X the normal truncated to
    X >= 0 and z = y / sd: the site's moments are E[X^2] / E[X] and E[X^3] / E[X] - mean^2, its evidence
    Phi(z) E[X]."""
    z = y / sd
    zc = np.clip(z, -6.0, 8.0)  # below -6 the bin carries no weight (its moments need only be finite); above 8, Laplace
    ratio = np.exp(-0.5 * zc**2 - 0.5 * np.log(2 * np.pi) - log_ndtr(zc))  # phi(z) / Phi(z)
    first = zc + ratio  # E[X] / sd
    second = zc**2 + zc * ratio + 1.0  # E[X^2] / sd^2
    third = zc**3 + 3 * zc + (2 + zc**2) * ratio  # E[X^3] / sd^3
    far = z > 8.0
    big = np.maximum(z, 8.0)
    mean = np.where(far, sd * (big + 1 / big), sd * second / first)
    var = sd**2 * np.where(far, 1 - 1 / big**2, np.maximum(third / first - (second / first) ** 2, 1e-9))
    # E[X] = sd (z + phi/Phi); for z << 0, Phi(z) E[X] = sd phi(z) (1 / z^2 - 3 / z^4 + ...).
    low = np.minimum(z, -6.0)
    log_evidence = np.where(
        z > -6.0,
        log_ndtr(np.maximum(z, -6.0)) + np.log(np.maximum(np.where(far, big, first), 1e-300)),
        -0.5 * low**2 - 0.5 * np.log(2 * np.pi) + np.log(1 / low**2 - 3 / low**4),
    ) + np.log(sd)
    return mean, var, log_evidence


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
    for j in (0, bins - 1):  # a bound's bin: two cells of the composition (the bound itself and the rest)
        mean[j], var[j], log_cdf[j] = _bound_site(histogram[j], sd[0])
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
    length = (b_all - a_all + 1 + (a_all == 0) + (b_all == bins - 1))[:, None]  # cells, a bound's pile one
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


@lru_cache(maxsize=4096)
def _single_bin_cdf(q: float, fraction: float) -> float:
    """P(u0 + q (u1 - u0) <= fraction) for the sorted pair (u0, u1) of two uniform edges: where the q-quantile of
    readings filling an unknown sub-interval of one bin lies."""
    if q >= 1.0:
        return float(fraction >= 1.0)
    grid = (np.arange(200) + 0.5) / 200
    low, high = np.minimum.outer(grid, grid), np.maximum.outer(grid, grid)
    return float(np.mean(low + q * (high - low) <= fraction))


class QuantileCdfs(NamedTuple):
    """A quantile's CDF (quantile_cdfs) under the posterior and at the two extremes of what a bound's bin holds
    exactly at the bound: each (B * SUBDIVISIONS + 2, C)."""

    posterior: np.ndarray  # a bound's bin split uniformly between the bound and the rest (its prior)
    lowest: np.ndarray  # every reading of the lower bound's bin at the bound, none at the upper bound
    highest: np.ndarray  # the reverse


def quantile_cdfs(posterior: HistogramPosterior, q: float) -> QuantileCdfs:
    """The CDF of each cell's q-quantile at the points lower + (k + i / SUBDIVISIONS) * width, k over bins and i
    over subdivisions, the last (the upper bound) from the left, then 1 at the upper bound itself: monotone, the
    first point the probability that the quantile is exactly the lower bound, the last jump that it is exactly
    the upper bound."""
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

    def average(parts: tuple[np.ndarray, ...], shares: list[np.ndarray], pile: str) -> np.ndarray:
        """P(quantile <= x) averaged over the quadrature of the continuous readings' share below x; with a pile
        at the lower (upper) bound holding a uniform share u of the bin, the share below x is u + (1 - u) s
        ((1 - u) s)."""
        if pile == "none":
            return np.mean([probability(parts, s) for s in shares], axis=0)
        piled = [u + (1 - u) * s if pile == "lower" else (1 - u) * s for u in _PILE for s in shares]
        return np.mean([probability(parts, s) for s in piled], axis=0)

    lowest, highest, middle = (np.zeros((bins * SUBDIVISIONS + 2, cells)) for _ in range(3))
    for k in range(bins):
        below = np.flatnonzero(last < k)  # the whole support is below bin k: the quantile certainly is too
        inside = np.flatnonzero((first <= k) & (k <= last))
        fe, le, ce, we = first[inside], last[inside], cell[inside], weight[inside]
        parts = quadratic_parts(k, inside)
        groups = {
            "interior": np.flatnonzero((fe < k) & (k < le)),
            "opens": np.flatnonzero((fe == k) & (k < le)),  # the distribution starts inside the bin
            "closes": np.flatnonzero((fe < k) & (k == le)),  # the distribution ends inside the bin
            "alone": np.flatnonzero(fe == le),  # both edges inside the one bin
        }
        piles = ("lower" if k == 0 else "none", "upper" if k == bins - 1 else "none")
        for i in range(SUBDIVISIONS + (1 if k == bins - 1 else 0)):  # the upper bound itself from the left
            f = i / SUBDIVISIONS
            base = np.bincount(cell[below], weights=weight[below], minlength=cells).astype(float)
            p_low, p_high, p_mid = (np.zeros(inside.size) for _ in range(3))
            for name, sel in groups.items():
                if not sel.size:
                    continue
                sub = tuple(part[sel] for part in parts)
                if name == "alone":
                    p_low[sel] = p_high[sel] = p_mid[sel] = _single_bin_cdf(q, f)
                    if piles[0] == "lower":  # all at the bound, or a uniform share u of them
                        p_low[sel] = 1.0
                        p_mid[sel] = np.mean([1.0 if u >= q else _single_bin_cdf((q - u) / (1 - u), f) for u in _PILE])
                    if piles[1] == "upper":  # at the bound from the left too: its pile is not below it
                        p_high[sel] = 0.0
                        p_mid[sel] = np.mean([_single_bin_cdf(q / (1 - u), f) if u < 1 - q else 0.0 for u in _PILE])
                    continue
                if name == "interior":
                    mid = f - tilt[k, ce[sel]] * f * (1 - f)
                    kappa = concentration[k, ce[sel]]
                    shares = list(np.clip(mid + spread_z * np.sqrt(mid * (1 - mid) / (kappa + 1)), 0.0, 1.0))
                elif name == "opens":  # the distribution's edge x0 somewhere in the bin, readings filling [x0, 1]
                    shares = [np.full(sel.size, min(max((f - x0) / (1 - x0), 0.0), 1.0)) for x0 in _EDGES]
                else:  # the distribution's edge x1 somewhere in the bin, readings filling [0, x1]
                    shares = [np.full(sel.size, min(f / x1, 1.0)) for x1 in _EDGES]
                p_low[sel] = p_high[sel] = p_mid[sel] = average(sub, shares, "none")
                if piles[0] == "lower":  # the support starts in bin 0: readings at the bound come first
                    p_low[sel] = probability(sub, 1.0)
                    p_mid[sel] = average(sub, shares, "lower")
                if piles[1] == "upper":  # readings at the upper bound come last (also from the left of it)
                    p_high[sel] = probability(sub, 0.0)
                    p_mid[sel] = average(sub, shares, "upper")
            index = k * SUBDIVISIONS + i
            for cdf, p in ((lowest, p_low), (highest, p_high), (middle, p_mid)):
                cdf[index] = base + np.bincount(ce, weights=we * p, minlength=cells)
    result = []
    for cdf in (middle, lowest, highest):
        cdf[-1] = 1.0
        result.append(np.maximum.accumulate(np.clip(cdf, 0.0, 1.0), axis=0))
    return QuantileCdfs(*result)


def quantile_cdf(posterior: HistogramPosterior, q: float) -> np.ndarray:
    """The posterior CDF of each cell's q-quantile (quantile_cdfs(...).posterior)."""
    return quantile_cdfs(posterior, q).posterior


def invert_cdf(cdf: np.ndarray, p: float, *, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """The point where each cell's CDF (from quantile_cdfs) reaches p, linear between the evaluation points: the
    lower bound where the CDF starts at p or above, the upper bound where only its last jump reaches p."""
    points, cells = cdf.shape
    step = (upper - lower) / (points - 2)
    reached = np.argmax(cdf >= p - 1e-12, axis=0)
    j = np.maximum(reached, 1)
    columns = np.arange(cells)
    before, after = cdf[j - 1, columns], cdf[j, columns]
    fraction = np.clip((p - before) / np.where(after > before, after - before, 1.0), 0.0, 1.0)
    point = np.minimum(lower + (j - 1 + fraction) * step, upper)
    return np.where(reached == 0, lower, point)


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
    """Quantile estimates (posterior medians) and 95% intervals per cell (reaching a clamp bound whenever the
    quantile may sit in its bin: how that bin splits between the bound and the rest is not observed).

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
    tail = (1 - INTERVAL_MASS) / 2
    for _, q in QUANTILES:
        cdfs = quantile_cdfs(posterior, q)
        estimates.append(invert_cdf(cdfs.posterior, 0.5, lower=low_end, upper=high_end))
        # How a bound's bin splits between the bound and the rest is not observed: the interval holds both extremes.
        lows.append(invert_cdf(cdfs.lowest, tail, lower=low_end, upper=high_end))
        highs.append(invert_cdf(cdfs.highest, 1 - tail, lower=low_end, upper=high_end))
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
