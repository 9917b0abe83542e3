//! Evaluation metrics and threshold suggestion.
//!
//! Pure functions over anomaly scores (higher = more abnormal). Image-level: ROC curve, exact
//! AUROC, confusion matrix, best-F1 threshold, thresholds for a target false-alarm or escape rate,
//! quantiles and histograms. Pixel-level: a streaming histogram AUROC accumulator and the PRO
//! (per-region overlap) score. Plus 8-connected component labelling, shared with inference.
//!
//! Conventions used throughout:
//! - A score `s` is flagged nok (positive) at threshold `t` when `s >= t`.
//! - NaN scores are treated as `+inf`, i.e. the most abnormal value possible (a broken score is
//!   never silently passed as good). `-0.0` is treated as `0.0`.
//! - Nothing here panics on empty inputs or NaN; where a value is undefined, `None` is returned.

use serde::{Deserialize, Serialize};

/// Errors from the pixel-level accumulator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    /// `scores` and `mask` passed to [`PixelRocAccumulator::add`] have different lengths.
    #[error("anomaly map has {scores} scores but the mask has {mask} pixels")]
    LengthMismatch {
        /// Number of scores given.
        scores: usize,
        /// Number of mask pixels given.
        mask: usize,
    },
    /// Two accumulators with different ranges or bin counts cannot be merged.
    #[error("cannot merge pixel ROC accumulators with different ranges or bin counts")]
    IncompatibleAccumulators,
}

/// Maps NaN to `+inf` and `-0.0` to `0.0`, so that `total_cmp` agrees with numeric order and ties.
fn clean(s: f32) -> f32 {
    if s.is_nan() {
        f32::INFINITY
    } else if s == 0.0 {
        0.0
    } else {
        s
    }
}

/// Cleaned copy of `values`, sorted ascending.
fn sorted_clean(values: &[f32]) -> Vec<f32> {
    let mut v: Vec<f32> = values.iter().map(|&s| clean(s)).collect();
    v.sort_unstable_by(f32::total_cmp);
    v
}

/// `num / den` as `f64`, `None` when `den == 0`.
fn ratio(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

// ---------------------------------------------------------------------------------------------
// Image-level ROC
// ---------------------------------------------------------------------------------------------

/// Image-level ROC point: the false-positive rate (good flagged nok) and true-positive rate (nok
/// flagged nok) when every score `>= threshold` is flagged nok.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RocPoint {
    /// Decision threshold (score `>=` threshold means nok). `+inf` for the starting point that
    /// flags nothing; note that JSON has no infinity, so serde_json writes it as `null`.
    pub threshold: f32,
    /// False-positive rate: fraction of good scores `>= threshold`.
    pub fpr: f64,
    /// True-positive rate: fraction of nok scores `>= threshold`.
    pub tpr: f64,
}

/// Image-level ROC curve, ordered by decreasing threshold, from `(fpr, tpr) = (0, 0)` to `(1, 1)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RocCurve {
    /// The first point has threshold `+inf` and rate `(0, 0)` (nothing flagged); then one point per
    /// distinct score (good or nok), in decreasing order, the last one (the smallest score) at
    /// `(1, 1)`. If some scores are `+inf`/NaN, the second point also has threshold `+inf`.
    pub points: Vec<RocPoint>,
}

/// ROC curve of good vs nok scores (score `>=` threshold means nok).
///
/// NaN scores count as `+inf`. Returns `None` if either side is empty (a rate would be undefined).
pub fn roc_curve(good_scores: &[f32], nok_scores: &[f32]) -> Option<RocCurve> {
    if good_scores.is_empty() || nok_scores.is_empty() {
        return None;
    }
    let good = sorted_clean(good_scores);
    let nok = sorted_clean(nok_scores);
    let (ng, nn) = (good.len(), nok.len());
    let mut points = vec![RocPoint {
        threshold: f32::INFINITY,
        fpr: 0.0,
        tpr: 0.0,
    }];
    // Walk both sorted lists from the top, one distinct value at a time.
    let (mut gi, mut ni) = (ng, nn); // number of elements not yet flagged on each side
    while gi > 0 || ni > 0 {
        let v = match (gi > 0, ni > 0) {
            (true, true) => good[gi - 1].max(nok[ni - 1]),
            (true, false) => good[gi - 1],
            _ => nok[ni - 1],
        };
        while gi > 0 && good[gi - 1] == v {
            gi -= 1;
        }
        while ni > 0 && nok[ni - 1] == v {
            ni -= 1;
        }
        points.push(RocPoint {
            threshold: v,
            fpr: (ng - gi) as f64 / ng as f64,
            tpr: (nn - ni) as f64 / nn as f64,
        });
    }
    Some(RocCurve { points })
}

/// Exact image-level AUROC: the probability that a random nok score is higher than a random good
/// score, ties counting 1/2 (Mann-Whitney U divided by `n_good * n_nok`).
///
/// 1 means perfect separation, 0.5 chance, 0 perfectly reversed. NaN scores count as `+inf` (two
/// NaNs tie). Returns `None` if either side is empty.
pub fn auroc(good_scores: &[f32], nok_scores: &[f32]) -> Option<f64> {
    if good_scores.is_empty() || nok_scores.is_empty() {
        return None;
    }
    let good = sorted_clean(good_scores);
    // Twice U, so that ties add an integer 1.
    let mut twice_u: u128 = 0;
    for &s in nok_scores {
        let s = clean(s);
        let below = good.partition_point(|&g| g < s);
        let not_above = good.partition_point(|&g| g <= s);
        twice_u += 2 * below as u128 + (not_above - below) as u128;
    }
    Some(twice_u as f64 / (2.0 * good.len() as f64 * nok_scores.len() as f64))
}

// ---------------------------------------------------------------------------------------------
// Histogram binning shared by the pixel accumulator and `histogram`
// ---------------------------------------------------------------------------------------------

/// Bin index of `v` among `bins` equal bins over `[lo, hi]`, clamping outside values into the end
/// bins; NaN goes to the last bin. A degenerate range (`hi <= lo` or a non-finite end) puts values
/// `>= lo` in the last bin and the rest in the first. `bins` must be at least 1.
fn bin_index(v: f32, lo: f32, hi: f32, bins: usize) -> usize {
    let last = bins - 1;
    let v = clean(v);
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return if v >= lo { last } else { 0 };
    }
    let t = (f64::from(v) - f64::from(lo)) / (f64::from(hi) - f64::from(lo)) * bins as f64;
    if t <= 0.0 {
        0
    } else {
        // `as` saturates for huge values; `min` keeps `v == hi` (and above) in the last bin.
        (t.floor() as usize).min(last)
    }
}

// ---------------------------------------------------------------------------------------------
// Pixel-level AUROC accumulator
// ---------------------------------------------------------------------------------------------

/// Pixel-level AUROC over millions of pixels without storing them: counts anomalous (positive,
/// mask `true`) and normal (negative) pixels in a fixed-range histogram of their scores.
///
/// Scores outside `[lo, hi]` clamp into the end bins and NaN counts as `+inf` (last bin). The
/// AUROC is exact up to the bin resolution: pixels in the same bin count as ties. Accumulators
/// built with the same `(lo, hi, bins)` can be [merged](Self::merge), e.g. one per rayon worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PixelRocAccumulator {
    lo: f32,
    hi: f32,
    pos: Vec<u64>,
    neg: Vec<u64>,
}

impl PixelRocAccumulator {
    /// Empty accumulator with `bins` equal bins over `[lo, hi]` (`bins` of 0 is raised to 1).
    ///
    /// If `hi <= lo` or either end is not finite the range is degenerate: scores `>= lo` go to
    /// the last bin and the others to the first.
    pub fn new(lo: f32, hi: f32, bins: usize) -> Self {
        let bins = bins.max(1);
        Self {
            lo,
            hi,
            pos: vec![0; bins],
            neg: vec![0; bins],
        }
    }

    /// Adds one anomaly map: `scores[i]` is a pixel score and `mask[i]` whether the pixel is
    /// anomalous in the ground truth.
    ///
    /// # Errors
    /// [`MetricsError::LengthMismatch`] if the lengths differ; nothing is added then.
    pub fn add(&mut self, scores: &[f32], mask: &[bool]) -> Result<(), MetricsError> {
        if scores.len() != mask.len() {
            return Err(MetricsError::LengthMismatch {
                scores: scores.len(),
                mask: mask.len(),
            });
        }
        let bins = self.pos.len();
        for (&s, &m) in scores.iter().zip(mask) {
            let b = bin_index(s, self.lo, self.hi, bins);
            if m {
                self.pos[b] += 1;
            } else {
                self.neg[b] += 1;
            }
        }
        Ok(())
    }

    /// Adds the counts of `other` into `self`.
    ///
    /// # Errors
    /// [`MetricsError::IncompatibleAccumulators`] if the two were built with different `lo`,
    /// `hi` or `bins`; `self` is left unchanged then.
    pub fn merge(&mut self, other: &Self) -> Result<(), MetricsError> {
        let same_range = self.lo.to_bits() == other.lo.to_bits()
            && self.hi.to_bits() == other.hi.to_bits()
            && self.pos.len() == other.pos.len();
        if !same_range {
            return Err(MetricsError::IncompatibleAccumulators);
        }
        for (a, b) in self.pos.iter_mut().zip(&other.pos) {
            *a += b;
        }
        for (a, b) in self.neg.iter_mut().zip(&other.neg) {
            *a += b;
        }
        Ok(())
    }

    /// Pixel AUROC: the area under the ROC curve traced by the bin edges as thresholds (trapezoid
    /// rule), which equals the probability that an anomalous pixel lands in a higher bin than a
    /// normal one, same bin counting 1/2. `None` if there is no anomalous or no normal pixel.
    pub fn auroc(&self) -> Option<f64> {
        let (np, nn) = (self.n_pos(), self.n_neg());
        if np == 0 || nn == 0 {
            return None;
        }
        let mut neg_below: u64 = 0;
        let mut twice_u: u128 = 0;
        for (&p, &n) in self.pos.iter().zip(&self.neg) {
            twice_u += u128::from(p) * (2 * u128::from(neg_below) + u128::from(n));
            neg_below += n;
        }
        Some(twice_u as f64 / (2.0 * np as f64 * nn as f64))
    }

    /// Number of anomalous (mask `true`) pixels added.
    pub fn n_pos(&self) -> u64 {
        self.pos.iter().sum()
    }

    /// Number of normal (mask `false`) pixels added.
    pub fn n_neg(&self) -> u64 {
        self.neg.iter().sum()
    }

    /// Lower end of the histogram range.
    pub fn lo(&self) -> f32 {
        self.lo
    }

    /// Upper end of the histogram range.
    pub fn hi(&self) -> f32 {
        self.hi
    }

    /// Number of bins.
    pub fn bins(&self) -> usize {
        self.pos.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Confusion matrix and F1
// ---------------------------------------------------------------------------------------------

/// Confusion matrix at a threshold (score `>=` threshold means nok = positive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    /// Good images passed as good (true negatives).
    pub true_good: usize,
    /// Good images flagged nok: false alarms (false positives).
    pub false_nok: usize,
    /// Nok images passed as good: escapes (false negatives).
    pub false_good: usize,
    /// Nok images flagged nok (true positives).
    pub true_nok: usize,
}

impl ConfusionMatrix {
    /// Counts the decisions `score >= threshold` (nok) for known good and nok scores.
    ///
    /// NaN scores count as `+inf` (flagged at any non-NaN threshold); a NaN threshold flags
    /// nothing.
    pub fn at_threshold(good_scores: &[f32], nok_scores: &[f32], threshold: f32) -> Self {
        let flagged = |s: &&f32| clean(**s) >= threshold;
        let false_nok = good_scores.iter().filter(flagged).count();
        let true_nok = nok_scores.iter().filter(flagged).count();
        Self {
            true_good: good_scores.len() - false_nok,
            false_nok,
            false_good: nok_scores.len() - true_nok,
            true_nok,
        }
    }

    /// Precision `true_nok / (true_nok + false_nok)`; `None` if nothing is flagged.
    pub fn precision(&self) -> Option<f64> {
        ratio(self.true_nok, self.true_nok + self.false_nok)
    }

    /// Recall (detection rate) `true_nok / (true_nok + false_good)`; `None` if there is no nok.
    pub fn recall(&self) -> Option<f64> {
        ratio(self.true_nok, self.true_nok + self.false_good)
    }

    /// F1 `2 tp / (2 tp + fp + fn)` (harmonic mean of precision and recall, 0 when either is 0);
    /// `None` only if nothing is flagged and there is no nok.
    pub fn f1(&self) -> Option<f64> {
        ratio(
            2 * self.true_nok,
            2 * self.true_nok + self.false_nok + self.false_good,
        )
    }

    /// Fraction of correct decisions; `None` if there are no images.
    pub fn accuracy(&self) -> Option<f64> {
        ratio(
            self.true_good + self.true_nok,
            self.true_good + self.false_nok + self.false_good + self.true_nok,
        )
    }

    /// Fraction of good images flagged nok, `false_nok / (true_good + false_nok)`; `None` if there
    /// is no good image.
    pub fn false_alarm_rate(&self) -> Option<f64> {
        ratio(self.false_nok, self.true_good + self.false_nok)
    }

    /// Fraction of nok images passed as good, `false_good / (false_good + true_nok)`; `None` if
    /// there is no nok image.
    pub fn escape_rate(&self) -> Option<f64> {
        ratio(self.false_good, self.false_good + self.true_nok)
    }
}

/// Threshold that maximises F1 over all candidate thresholds (the distinct good and nok scores);
/// returns `(threshold, f1)`.
///
/// Among equally good thresholds the highest is returned (fewest false alarms). NaN scores count
/// as `+inf`. `None` if there is no nok score.
pub fn f1_best_threshold(good_scores: &[f32], nok_scores: &[f32]) -> Option<(f32, f64)> {
    if nok_scores.is_empty() {
        return None;
    }
    let mut all: Vec<(f32, bool)> = good_scores
        .iter()
        .map(|&s| (clean(s), false))
        .chain(nok_scores.iter().map(|&s| (clean(s), true)))
        .collect();
    // Descending by score.
    all.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let n_nok = nok_scores.len();
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut best: Option<(f32, f64)> = None;
    let mut i = 0;
    while i < all.len() {
        let v = all[i].0;
        while i < all.len() && all[i].0 == v {
            if all[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        let f1 = 2.0 * tp as f64 / (2 * tp + fp + (n_nok - tp)) as f64;
        if best.is_none_or(|(_, b)| f1 > b) {
            best = Some((v, f1));
        }
    }
    best
}

// ---------------------------------------------------------------------------------------------
// Quantiles and rate-based thresholds
// ---------------------------------------------------------------------------------------------

/// Linear-interpolated quantile of ascending, NaN-free, non-empty `sorted` (numpy's default).
fn quantile_sorted(sorted: &[f32], q: f64) -> f32 {
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let i = (pos.floor() as usize).min(sorted.len() - 1);
    let frac = pos - i as f64;
    let a = sorted[i];
    if frac == 0.0 || i + 1 >= sorted.len() {
        return a;
    }
    let b = sorted[i + 1];
    if a == b || a.is_infinite() {
        return a;
    }
    if b.is_infinite() {
        return b;
    }
    let (a, b) = (f64::from(a), f64::from(b));
    // numpy's lerp: interpolate from the nearer end for accuracy.
    let v = if frac < 0.5 {
        a + (b - a) * frac
    } else {
        b - (b - a) * (1.0 - frac)
    };
    v as f32
}

/// Linear-interpolated quantile (`q` in `[0, 1]`, like numpy's default `method="linear"`) of
/// `values`.
///
/// `q` outside `[0, 1]` is clamped; NaN values count as `+inf`. `None` if `values` is empty or
/// `q` is NaN.
pub fn quantile(values: &[f32], q: f64) -> Option<f32> {
    if values.is_empty() || q.is_nan() {
        return None;
    }
    Some(quantile_sorted(&sorted_clean(values), q))
}

/// A threshold chosen for a target rate, with the rate it achieves on the scores it came from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RateThreshold {
    /// The threshold (score `>=` threshold means nok).
    pub threshold: f32,
    /// The rate achieved on the given scores (false-alarm or escape rate), `<=` the target.
    pub achieved_rate: f64,
    /// Number of images (scores) the threshold rests on.
    pub n_images: usize,
}

/// Threshold for a target false-alarm rate from good scores: the smallest threshold such that the
/// fraction of good scores `>= threshold` is `<= rate`.
///
/// The candidates are the distinct good scores plus the next `f32` above the largest one (which
/// flags none); any threshold between the next lower distinct score (exclusive) and the returned
/// one flags the same images. NaN scores count as `+inf`, which no threshold passes. Returns the
/// threshold, the achieved rate and the number of good images. `None` if `good_scores` is empty,
/// `rate` is NaN, or no threshold meets `rate` (`rate < 0`, or more than `rate` of the scores are
/// NaN/`+inf`).
pub fn threshold_for_false_alarm_rate(good_scores: &[f32], rate: f64) -> Option<RateThreshold> {
    if good_scores.is_empty() || rate.is_nan() {
        return None;
    }
    let sorted = sorted_clean(good_scores);
    let n = sorted.len();
    // Ascending over candidate thresholds: the first that meets the rate is the smallest.
    let mut i = 0;
    while i < n {
        let v = sorted[i];
        let achieved = (n - i) as f64 / n as f64; // scores >= v: from index i on
        if achieved <= rate {
            return Some(RateThreshold {
                threshold: v,
                achieved_rate: achieved,
                n_images: n,
            });
        }
        while i < n && sorted[i] == v {
            i += 1;
        }
    }
    // Above the largest score; `+inf` stays `+inf` and still flags the `+inf` scores.
    let threshold = sorted[n - 1].next_up();
    let flagged = n - sorted.partition_point(|&s| s < threshold);
    let achieved = flagged as f64 / n as f64;
    (achieved <= rate).then_some(RateThreshold {
        threshold,
        achieved_rate: achieved,
        n_images: n,
    })
}

/// Threshold for a target escape rate from nok scores: the largest threshold such that the
/// fraction of nok scores `< threshold` is `<= rate`.
///
/// The candidates are the distinct nok scores (any threshold strictly above the largest one would
/// pass every nok), so the result is always a nok score. NaN scores count as `+inf`. Returns the
/// threshold, the achieved escape rate and the number of nok images. `None` if `nok_scores` is
/// empty, `rate` is NaN or `rate < 0`.
pub fn threshold_for_escape_rate(nok_scores: &[f32], rate: f64) -> Option<RateThreshold> {
    if nok_scores.is_empty() || rate.is_nan() || rate < 0.0 {
        return None;
    }
    let sorted = sorted_clean(nok_scores);
    let n = sorted.len();
    // Descending over candidates: the first that meets the rate is the largest. The smallest
    // score always meets it (nothing is below it), so this always returns.
    let mut j = n;
    while j > 0 {
        let v = sorted[j - 1];
        let below = sorted.partition_point(|&s| s < v);
        let achieved = below as f64 / n as f64;
        if achieved <= rate {
            return Some(RateThreshold {
                threshold: v,
                achieved_rate: achieved,
                n_images: n,
            });
        }
        j = below;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------------------------

/// Histogram of values over `[lo, hi]` with equal bins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Lower end of the range (left edge of the first bin).
    pub lo: f32,
    /// Upper end of the range (right edge of the last bin, which includes it).
    pub hi: f32,
    /// Count per bin; bin `i` covers `[lo + i w, lo + (i + 1) w)` with `w = (hi - lo) / bins`.
    pub counts: Vec<u64>,
}

/// Histogram of `values` over `[lo, hi]` with `bins` equal bins.
///
/// Values outside the range clamp into the end bins and NaN counts as `+inf` (last bin). With a
/// degenerate range (`hi <= lo` or a non-finite end) values `>= lo` go to the last bin and the
/// others to the first. `bins == 0` gives empty `counts` (values are dropped).
pub fn histogram(values: &[f32], lo: f32, hi: f32, bins: usize) -> Histogram {
    let mut counts = vec![0u64; bins];
    if bins > 0 {
        for &v in values {
            counts[bin_index(v, lo, hi, bins)] += 1;
        }
    }
    Histogram { lo, hi, counts }
}

// ---------------------------------------------------------------------------------------------
// Connected components
// ---------------------------------------------------------------------------------------------

/// One 8-connected component of a boolean mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    /// Number of pixels.
    pub area_px: u32,
    /// Bounding box `[x, y, w, h]` in pixels (top-left corner, width, height).
    pub bbox: [u32; 4],
}

/// 8-connected component labelling of a row-major boolean mask of `width * height` pixels.
///
/// Returns per-pixel labels (0 = background, `k >= 1` = `components[k - 1]`) and the components
/// sorted by area descending (ties in raster order of their first pixel). Iterative flood fill
/// with an explicit stack, so large fully-set masks are fine. Mask entries beyond
/// `width * height` are ignored and missing ones count as background. If `width * height`
/// overflows `usize`, returns no labels and no components.
pub fn component_labels(mask: &[bool], width: usize, height: usize) -> (Vec<u32>, Vec<Component>) {
    let Some(n) = width.checked_mul(height) else {
        return (Vec::new(), Vec::new());
    };
    let is_set = |i: usize| mask.get(i).copied().unwrap_or(false);
    let mut labels = vec![0u32; n];
    // Components in discovery order, as (area, x0, y0, x1, y1) with inclusive corners.
    let mut found: Vec<(u64, usize, usize, usize, usize)> = Vec::new();
    let mut stack: Vec<usize> = Vec::new();
    for start in 0..n {
        if labels[start] != 0 || !is_set(start) {
            continue;
        }
        let label = u32::try_from(found.len() + 1).unwrap_or(u32::MAX);
        let (sx, sy) = (start % width, start / width);
        let mut comp = (0u64, sx, sy, sx, sy);
        labels[start] = label;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % width, i / width);
            comp.0 += 1;
            comp.1 = comp.1.min(x);
            comp.2 = comp.2.min(y);
            comp.3 = comp.3.max(x);
            comp.4 = comp.4.max(y);
            for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                    let j = ny * width + nx;
                    if labels[j] == 0 && is_set(j) {
                        labels[j] = label;
                        stack.push(j);
                    }
                }
            }
        }
        found.push(comp);
    }
    // Sort by area descending (stable: ties keep raster order) and relabel to match.
    let mut order: Vec<usize> = (0..found.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(found[k].0));
    let mut new_label = vec![0u32; found.len() + 1];
    for (rank, &old) in order.iter().enumerate() {
        new_label[old + 1] = u32::try_from(rank + 1).unwrap_or(u32::MAX);
    }
    for l in &mut labels {
        if *l != 0 {
            *l = new_label[*l as usize];
        }
    }
    let to_u32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let components = order
        .iter()
        .map(|&k| {
            let (area, x0, y0, x1, y1) = found[k];
            Component {
                area_px: to_u32(area),
                bbox: [
                    to_u32(x0 as u64),
                    to_u32(y0 as u64),
                    to_u32((x1 - x0 + 1) as u64),
                    to_u32((y1 - y0 + 1) as u64),
                ],
            }
        })
        .collect();
    (labels, components)
}

/// 8-connected components of a row-major boolean mask (`width * height`), with area and bounding
/// box, sorted by area descending. See [`component_labels`] for the details and the labels.
pub fn connected_components(mask: &[bool], width: usize, height: usize) -> Vec<Component> {
    component_labels(mask, width, height).1
}

// ---------------------------------------------------------------------------------------------
// PRO score
// ---------------------------------------------------------------------------------------------

/// One anomaly map with its ground-truth mask, both row-major `width * height`.
#[derive(Debug, Clone, Copy)]
pub struct MapWithMask<'a> {
    /// Per-pixel anomaly scores (higher = more abnormal).
    pub scores: &'a [f32],
    /// Ground truth: `true` for anomalous pixels.
    pub mask: &'a [bool],
    /// Map width in pixels.
    pub width: usize,
    /// Map height in pixels.
    pub height: usize,
}

/// Number of FPR levels sampled evenly over `[0, fpr_limit]` for the PRO sweep.
const PRO_FPR_STEPS: usize = 256;
/// At most this many normal-pixel scores are sampled (with a stride) to place the thresholds.
const PRO_SAMPLE_CAP: usize = 1 << 21;

/// PRO (per-region overlap) score integrated up to a false-positive rate limit (0.3 in MVTec AD),
/// normalised to `[0, 1]` (1 = every region fully found before any normal pixel is flagged).
///
/// Regions are the 8-connected components of each mask. For a threshold `t`, PRO is the mean over
/// all regions of the fraction of the region's pixels with score `>= t`, and the FPR is the
/// fraction of all normal pixels with score `>= t`. The PRO-vs-FPR curve from `(0, 0)` is
/// integrated with trapezoids up to `fpr_limit` (clamped to at most 1; the curve is linearly
/// interpolated at the limit) and divided by it.
///
/// Thresholds: the normal-pixel score quantiles at 256 evenly spaced FPR levels over
/// `[0, fpr_limit]` (taken from a strided sample of at most 2^21 normal pixels), plus the next
/// `f32` above the largest normal score and the smallest score overall. Each point's PRO and FPR
/// are computed exactly over all pixels. NaN scores count as `+inf`.
///
/// `None` if there is no region or no normal pixel, if `fpr_limit` is not `> 0` (or NaN), or if
/// some map's `scores` or `mask` length is not `width * height`.
pub fn pro_score(maps: &[MapWithMask<'_>], fpr_limit: f64) -> Option<f64> {
    if fpr_limit.is_nan() || fpr_limit <= 0.0 {
        return None;
    }
    let limit = fpr_limit.min(1.0);
    for m in maps {
        let n = m.width.checked_mul(m.height)?;
        if m.scores.len() != n || m.mask.len() != n {
            return None;
        }
    }
    // Pass 1: normal-pixel count, largest normal score, smallest score.
    let mut n_normal: u64 = 0;
    let mut max_normal = f32::NEG_INFINITY;
    let mut min_all = f32::INFINITY;
    for m in maps {
        for (&s, &a) in m.scores.iter().zip(m.mask) {
            let s = clean(s);
            min_all = min_all.min(s);
            if !a {
                n_normal += 1;
                max_normal = max_normal.max(s);
            }
        }
    }
    if n_normal == 0 {
        return None;
    }
    // Pass 2: strided sample of normal scores to place thresholds.
    let stride = n_normal.div_ceil(PRO_SAMPLE_CAP as u64).max(1);
    let mut sample: Vec<f32> = Vec::with_capacity((n_normal / stride + 1) as usize);
    let mut k: u64 = 0;
    for m in maps {
        for (&s, &a) in m.scores.iter().zip(m.mask) {
            if !a {
                if k.is_multiple_of(stride) {
                    sample.push(clean(s));
                }
                k += 1;
            }
        }
    }
    sample.sort_unstable_by(f32::total_cmp);
    let mut thresholds: Vec<f32> = (0..PRO_FPR_STEPS)
        .map(|i| {
            let fpr = limit * i as f64 / (PRO_FPR_STEPS - 1) as f64;
            quantile_sorted(&sample, 1.0 - fpr)
        })
        .collect();
    thresholds.push(max_normal.next_up());
    thresholds.push(min_all);
    thresholds.sort_unstable_by(f32::total_cmp);
    thresholds.dedup();
    let nt = thresholds.len();
    // Pass 3: per pixel, `bin` = number of thresholds <= score, so the pixel is flagged at
    // threshold index j (ascending) iff j < bin. Histogram normal pixels and each region.
    let mut normal_hist = vec![0u64; nt + 1];
    let mut region_hist: Vec<u64> = Vec::new();
    let mut region_area: Vec<u64> = Vec::new();
    for m in maps {
        let (labels, comps) = component_labels(m.mask, m.width, m.height);
        let base = region_area.len();
        region_area.extend(comps.iter().map(|c| u64::from(c.area_px)));
        region_hist.resize(region_area.len() * (nt + 1), 0);
        for (&s, &l) in m.scores.iter().zip(&labels) {
            let s = clean(s);
            let bin = thresholds.partition_point(|&t| t <= s);
            if l == 0 {
                normal_hist[bin] += 1;
            } else {
                region_hist[(base + l as usize - 1) * (nt + 1) + bin] += 1;
            }
        }
    }
    let n_regions = region_area.len();
    if n_regions == 0 {
        return None;
    }
    // Flagged counts at threshold j = sum of hist[j + 1..]; build suffix sums in place.
    fn suffix_sums(h: &mut [u64]) {
        for i in (0..h.len().saturating_sub(1)).rev() {
            h[i] += h[i + 1];
        }
    }
    suffix_sums(&mut normal_hist);
    let mut pro = vec![0f64; nt];
    for (r, &area) in region_area.iter().enumerate() {
        let h = &mut region_hist[r * (nt + 1)..(r + 1) * (nt + 1)];
        suffix_sums(h);
        for (j, p) in pro.iter_mut().enumerate() {
            *p += h[j + 1] as f64 / area as f64;
        }
    }
    // Curve from the highest threshold down: FPR and PRO both grow.
    let mut curve = vec![(0.0f64, 0.0f64)];
    for j in (0..nt).rev() {
        let fpr = normal_hist[j + 1] as f64 / n_normal as f64;
        curve.push((fpr, pro[j] / n_regions as f64));
    }
    Some(trapezoid_up_to(&curve, limit) / limit)
}

/// Trapezoid area under the piecewise-linear curve `points` (sorted by x) from its first x up to
/// `limit`, interpolating linearly at the limit.
fn trapezoid_up_to(points: &[(f64, f64)], limit: f64) -> f64 {
    let mut area = 0.0;
    for w in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x0 >= limit {
            break;
        }
        if x1 <= limit {
            area += (x1 - x0) * (y0 + y1) / 2.0;
        } else {
            let y = y0 + (y1 - y0) * (limit - x0) / (x1 - x0);
            area += (limit - x0) * (y0 + y) / 2.0;
            break;
        }
    }
    area
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny deterministic LCG (Numerical Recipes constants) giving floats in [0, 1).
    struct Lcg(u64);

    impl Lcg {
        fn next_f32(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 40) as f32) / (1u64 << 24) as f32
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn auroc_hand_cases() {
        assert_eq!(auroc(&[0.1, 0.2], &[0.8, 0.9]), Some(1.0));
        assert_eq!(auroc(&[0.8, 0.9], &[0.1, 0.2]), Some(0.0));
        assert_eq!(auroc(&[0.5, 0.5, 0.5], &[0.5, 0.5]), Some(0.5));
        // good [1, 2, 3], nok [2, 4]: nok 2 beats 1, ties 2 -> 1.5; nok 4 beats all -> 3.
        // U = 4.5 of 6 pairs.
        assert!(close(auroc(&[1.0, 2.0, 3.0], &[2.0, 4.0]).unwrap(), 0.75));
        // NaN counts as +inf: the NaN nok beats everything, NaN good ties with it.
        assert!(close(auroc(&[1.0], &[f32::NAN]).unwrap(), 1.0));
        assert!(close(auroc(&[f32::NAN], &[f32::NAN]).unwrap(), 0.5));
        // -0.0 ties with 0.0.
        assert!(close(auroc(&[-0.0], &[0.0]).unwrap(), 0.5));
        assert_eq!(auroc(&[], &[1.0]), None);
        assert_eq!(auroc(&[1.0], &[]), None);
    }

    #[test]
    fn roc_curve_points_and_endpoints() {
        let c = roc_curve(&[1.0, 2.0, 3.0], &[2.0, 4.0]).unwrap();
        let got: Vec<(f32, f64, f64)> = c
            .points
            .iter()
            .map(|p| (p.threshold, p.fpr, p.tpr))
            .collect();
        let third = 1.0 / 3.0;
        let want = [
            (f32::INFINITY, 0.0, 0.0),
            (4.0, 0.0, 0.5),
            (3.0, third, 0.5),
            (2.0, 2.0 * third, 1.0),
            (1.0, 1.0, 1.0),
        ];
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.0, w.0);
            assert!(close(g.1, w.1) && close(g.2, w.2), "{g:?} vs {w:?}");
        }
        // Trapezoid area of the curve equals the exact AUROC.
        let area: f64 = c
            .points
            .windows(2)
            .map(|w| (w[1].fpr - w[0].fpr) * (w[0].tpr + w[1].tpr) / 2.0)
            .sum();
        assert!(close(area, 0.75));
        assert!(roc_curve(&[], &[1.0]).is_none());
        assert!(roc_curve(&[1.0], &[]).is_none());
    }

    #[test]
    fn pixel_accumulator_matches_exact_auroc() {
        let mut rng = Lcg(42);
        let good: Vec<f32> = (0..3000).map(|_| rng.next_f32()).collect();
        let nok: Vec<f32> = (0..1000).map(|_| 0.3 + rng.next_f32()).collect();
        let exact = auroc(&good, &nok).unwrap();
        assert!(exact > 0.6 && exact < 0.9, "exact {exact}");

        // Split across two accumulators and merge, as rayon workers would.
        let mut a = PixelRocAccumulator::new(0.0, 1.3, 1000);
        let mut b = PixelRocAccumulator::new(0.0, 1.3, 1000);
        a.add(&good[..1500], &[false; 1500]).unwrap();
        b.add(&good[1500..], &[false; 1500]).unwrap();
        b.add(&nok, &vec![true; nok.len()]).unwrap();
        a.merge(&b).unwrap();
        assert_eq!((a.n_pos(), a.n_neg()), (1000, 3000));
        let approx = a.auroc().unwrap();
        assert!((approx - exact).abs() < 0.01, "{approx} vs {exact}");

        // Few bins over a range that clamps: still a valid probability.
        let mut coarse = PixelRocAccumulator::new(0.2, 0.8, 3);
        coarse.add(&good, &vec![false; good.len()]).unwrap();
        coarse.add(&nok, &vec![true; nok.len()]).unwrap();
        let c = coarse.auroc().unwrap();
        assert!((0.0..=1.0).contains(&c));

        assert_eq!(
            a.add(&[1.0, 2.0], &[true]),
            Err(MetricsError::LengthMismatch { scores: 2, mask: 1 })
        );
        assert_eq!(
            a.merge(&PixelRocAccumulator::new(0.0, 1.0, 1000)),
            Err(MetricsError::IncompatibleAccumulators)
        );
        let mut only_neg = PixelRocAccumulator::new(0.0, 1.0, 10);
        only_neg.add(&[0.5], &[false]).unwrap();
        assert_eq!(only_neg.auroc(), None);
        assert_eq!(PixelRocAccumulator::new(0.0, 1.0, 10).auroc(), None);
    }

    #[test]
    fn pixel_accumulator_exact_when_bins_separate() {
        let mut acc = PixelRocAccumulator::new(0.0, 4.0, 4);
        // Normal pixels in bins 0, 1; anomalous in bins 1, 3 -> same as exact auroc with ties.
        acc.add(&[0.5, 1.5, 1.5, 3.5], &[false, false, true, true])
            .unwrap();
        assert!(close(acc.auroc().unwrap(), 0.875));
        assert!(close(
            acc.auroc().unwrap(),
            auroc(&[0.5, 1.5], &[1.5, 3.5]).unwrap()
        ));
    }

    #[test]
    fn confusion_matrix_hand_case() {
        let good = [0.1, 0.4, 0.6, 0.2];
        let nok = [0.7, 0.3, 0.9];
        let cm = ConfusionMatrix::at_threshold(&good, &nok, 0.5);
        assert_eq!(
            cm,
            ConfusionMatrix {
                true_good: 3,
                false_nok: 1,
                false_good: 1,
                true_nok: 2,
            }
        );
        assert!(close(cm.precision().unwrap(), 2.0 / 3.0));
        assert!(close(cm.recall().unwrap(), 2.0 / 3.0));
        assert!(close(cm.f1().unwrap(), 2.0 / 3.0));
        assert!(close(cm.accuracy().unwrap(), 5.0 / 7.0));
        assert!(close(cm.false_alarm_rate().unwrap(), 0.25));
        assert!(close(cm.escape_rate().unwrap(), 1.0 / 3.0));
        // Threshold equal to a score flags it; NaN scores are flagged.
        let cm = ConfusionMatrix::at_threshold(&[0.5, f32::NAN], &[], 0.5);
        assert_eq!((cm.true_good, cm.false_nok), (0, 2));
        assert_eq!(cm.recall(), None);
        assert_eq!(cm.escape_rate(), None);
        let empty = ConfusionMatrix::at_threshold(&[], &[], 0.5);
        assert_eq!(empty.accuracy(), None);
        assert_eq!(empty.f1(), None);
        assert_eq!(empty.precision(), None);
        assert_eq!(empty.false_alarm_rate(), None);
    }

    #[test]
    fn f1_best_threshold_cases() {
        let (t, f1) = f1_best_threshold(&[0.1, 0.2, 0.3], &[0.8, 0.9]).unwrap();
        assert_eq!(t, 0.8);
        assert!(close(f1, 1.0));
        // good [1, 3], nok [2, 4]: t=4 -> 2/3, t=3 -> 1/2, t=2 -> 4/5, t=1 -> 2/3.
        let (t, f1) = f1_best_threshold(&[1.0, 3.0], &[2.0, 4.0]).unwrap();
        assert_eq!(t, 2.0);
        assert!(close(f1, 0.8));
        assert_eq!(f1_best_threshold(&[1.0], &[]), None);
        let (t, f1) = f1_best_threshold(&[], &[2.0, 1.0]).unwrap();
        assert_eq!(t, 1.0);
        assert!(close(f1, 1.0));
    }

    #[test]
    fn quantile_matches_numpy() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&v, 0.5), Some(2.5));
        assert!((quantile(&v, 0.9).unwrap() - 3.7).abs() < 1e-6);
        assert_eq!(quantile(&v, 1.0), Some(4.0));
        assert_eq!(quantile(&v, 2.0), Some(4.0));
        assert_eq!(quantile(&[7.0], 0.3), Some(7.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&v, f64::NAN), None);
        assert_eq!(quantile(&[1.0, f32::NAN], 0.5), Some(f32::INFINITY));
    }

    #[test]
    fn false_alarm_rate_threshold() {
        let good: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        // At most 20 % of good scores >= t: t = 9 flags {9, 10}.
        let r = threshold_for_false_alarm_rate(&good, 0.2).unwrap();
        assert_eq!(r.threshold, 9.0);
        assert!(close(r.achieved_rate, 0.2));
        assert_eq!(r.n_images, 10);
        // 25 % still only allows two images.
        assert_eq!(
            threshold_for_false_alarm_rate(&good, 0.25)
                .unwrap()
                .threshold,
            9.0
        );
        // Zero rate: just above the largest score.
        let r = threshold_for_false_alarm_rate(&good, 0.0).unwrap();
        assert!(r.threshold > 10.0 && r.threshold < 10.001);
        assert_eq!(r.achieved_rate, 0.0);
        // Rate 1: everything may be flagged, the smallest score.
        assert_eq!(
            threshold_for_false_alarm_rate(&good, 1.0)
                .unwrap()
                .threshold,
            1.0
        );
        // Ties: [1, 2, 2, 3] at 50 %: t = 2 would flag 3 of 4, so t = 3.
        let r = threshold_for_false_alarm_rate(&[1.0, 2.0, 2.0, 3.0], 0.5).unwrap();
        assert_eq!(r.threshold, 3.0);
        assert!(close(r.achieved_rate, 0.25));
        assert!(threshold_for_false_alarm_rate(&[], 0.1).is_none());
        assert!(threshold_for_false_alarm_rate(&good, -0.1).is_none());
        assert!(threshold_for_false_alarm_rate(&good, f64::NAN).is_none());
        // A NaN good score can never pass, so a zero rate is impossible.
        assert!(threshold_for_false_alarm_rate(&[1.0, f32::NAN], 0.0).is_none());
        let r = threshold_for_false_alarm_rate(&[1.0, f32::NAN], 0.5).unwrap();
        assert_eq!(r.threshold, f32::INFINITY);
    }

    #[test]
    fn escape_rate_threshold() {
        let nok: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        // At most 20 % of nok scores < t: t = 3 passes {1, 2}.
        let r = threshold_for_escape_rate(&nok, 0.2).unwrap();
        assert_eq!(r.threshold, 3.0);
        assert!(close(r.achieved_rate, 0.2));
        assert_eq!(r.n_images, 10);
        // Zero escapes: the smallest nok score.
        let r = threshold_for_escape_rate(&nok, 0.0).unwrap();
        assert_eq!(r.threshold, 1.0);
        assert_eq!(r.achieved_rate, 0.0);
        // Ties: [1, 2, 2, 3] at 40 %: t = 3 would pass 3 of 4, so t = 2 passes 1.
        let r = threshold_for_escape_rate(&[1.0, 2.0, 2.0, 3.0], 0.4).unwrap();
        assert_eq!(r.threshold, 2.0);
        assert!(close(r.achieved_rate, 0.25));
        assert_eq!(
            threshold_for_escape_rate(&nok, 1.0).unwrap().threshold,
            10.0
        );
        assert!(threshold_for_escape_rate(&[], 0.1).is_none());
        assert!(threshold_for_escape_rate(&nok, -0.1).is_none());
        assert!(threshold_for_escape_rate(&nok, f64::NAN).is_none());
    }

    #[test]
    fn histogram_counts() {
        let h = histogram(
            &[-1.0, 0.0, 0.1, 0.25, 0.5, 0.99, 1.0, 5.0, f32::NAN],
            0.0,
            1.0,
            4,
        );
        // [0, .25): -1, 0, 0.1 | [.25, .5): 0.25 | [.5, .75): 0.5 | [.75, 1]: .99, 1, 5, NaN
        assert_eq!(h.counts, vec![3, 1, 1, 4]);
        assert_eq!((h.lo, h.hi), (0.0, 1.0));
        assert!(histogram(&[1.0], 0.0, 1.0, 0).counts.is_empty());
        // Degenerate range.
        assert_eq!(
            histogram(&[0.0, 1.0, 2.0], 1.0, 1.0, 3).counts,
            vec![1, 0, 2]
        );
    }

    #[test]
    fn connected_components_hand_mask() {
        // 6 x 4; `#` set. The two diagonal pixels at top-left join under 8-connectivity.
        let rows = ["#....#", ".#...#", "....##", "##...."];
        let mask: Vec<bool> = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c == '#'))
            .collect();
        let (labels, comps) = component_labels(&mask, 6, 4);
        assert_eq!(
            comps,
            vec![
                Component {
                    area_px: 4,
                    bbox: [4, 0, 2, 3],
                },
                Component {
                    area_px: 2,
                    bbox: [0, 0, 2, 2],
                },
                Component {
                    area_px: 2,
                    bbox: [0, 3, 2, 1],
                },
            ]
        );
        assert_eq!(labels[0], 2);
        assert_eq!(labels[7], 2);
        assert_eq!(labels[5], 1);
        assert_eq!(labels[18], 3);
        assert_eq!(labels[1], 0);
        assert_eq!(connected_components(&mask, 6, 4), comps);
        assert!(connected_components(&[], 0, 0).is_empty());
        assert!(connected_components(&[false; 6], 3, 2).is_empty());
    }

    #[test]
    fn connected_components_large_full_mask() {
        let (w, h) = (1000, 1000);
        let comps = connected_components(&vec![true; w * h], w, h);
        assert_eq!(
            comps,
            vec![Component {
                area_px: 1_000_000,
                bbox: [0, 0, 1000, 1000],
            }]
        );
    }

    #[test]
    fn pro_score_cases() {
        let (w, h) = (8, 8);
        let mut mask = vec![false; w * h];
        for y in 2..4 {
            for x in 2..4 {
                mask[y * w + x] = true;
            }
        }
        mask[7 * w + 7] = true; // second, 1-pixel region
        let perfect: Vec<f32> = mask.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
        let map = |scores: &[f32]| -> f64 {
            let maps = [MapWithMask {
                scores,
                mask: &mask,
                width: w,
                height: h,
            }];
            pro_score(&maps, 0.3).unwrap()
        };
        assert!(close(map(&perfect), 1.0));

        // Only half of the 2x2 region stands out, the 1-pixel region is found:
        // curve (0,0) -> (0, 0.75) -> (1, 1); area to 0.3 = 0.3 * (0.75 + 0.825) / 2.
        let mut half = perfect.clone();
        half[2 * w + 2] = 0.0;
        half[2 * w + 3] = 0.0;
        assert!(close(map(&half), (0.75 + 0.825) / 2.0));

        // Random scores: PRO ~ FPR, so about 0.3 / 2 = 0.15; inverted scores: 0.
        let mut rng = Lcg(7);
        let random: Vec<f32> = (0..w * h).map(|_| rng.next_f32()).collect();
        let r = map(&random);
        assert!(r < 0.6, "random {r}");
        let inverted: Vec<f32> = perfect.iter().map(|s| 1.0 - s).collect();
        assert!(close(map(&inverted), 0.0));

        // No region / bad lengths / bad limit.
        let none = vec![false; w * h];
        let maps = [MapWithMask {
            scores: &perfect,
            mask: &none,
            width: w,
            height: h,
        }];
        assert_eq!(pro_score(&maps, 0.3), None);
        assert_eq!(pro_score(&[], 0.3), None);
        let bad = [MapWithMask {
            scores: &perfect[..10],
            mask: &mask,
            width: w,
            height: h,
        }];
        assert_eq!(pro_score(&bad, 0.3), None);
        let ok = [MapWithMask {
            scores: &perfect,
            mask: &mask,
            width: w,
            height: h,
        }];
        assert_eq!(pro_score(&ok, 0.0), None);
        assert_eq!(pro_score(&ok, f64::NAN), None);
    }

    #[test]
    fn pro_score_random_large_is_near_half_limit() {
        let (w, h) = (200, 200);
        let mut rng = Lcg(3);
        let mut mask = vec![false; w * h];
        for y in 50..100 {
            for x in 50..120 {
                mask[y * w + x] = true;
            }
        }
        let scores: Vec<f32> = (0..w * h).map(|_| rng.next_f32()).collect();
        let maps = [MapWithMask {
            scores: &scores,
            mask: &mask,
            width: w,
            height: h,
        }];
        let p = pro_score(&maps, 0.3).unwrap();
        assert!((p - 0.15).abs() < 0.02, "random pro {p}");
    }
}
