//! Turning repetitions into the numbers the report prints: min/median/max, medians of percentiles, and
//! Markdown cells.

use crate::load::Outcome;

/// One repetition of one load: what the generator saw, CPU and the component's peak memory.
#[derive(Debug, Clone)]
pub struct Rep {
    /// The load's outcome.
    pub outcome: Outcome,
    /// The component process's peak resident set (bytes); none when a mock runs alone.
    pub peak_rss: Option<u64>,
    /// The component's CPU µs per reply (NaN without a component).
    pub cpu_us: f64,
    /// The mock's CPU µs per reply (NaN without a mock).
    pub mock_cpu_us: f64,
}

/// Repetitions of one (target, window), summarised.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Replies per second: min, median, max over repetitions.
    pub per_sec: [f64; 3],
    /// Median over repetitions of each run's p50, p99 and max latency (ms).
    pub latency_ms: [f64; 3],
    /// Median component CPU µs per reply.
    pub cpu_us: f64,
    /// Median mock CPU µs per reply (NaN without a mock).
    pub mock_cpu_us: f64,
    /// Largest peak RSS over repetitions (bytes); none without a component.
    pub peak_rss: Option<u64>,
}

impl Summary {
    /// The table cells every row shares: rate (min / **median** / max), p50, p99, max latency, CPU.
    pub fn cells(&self) -> String {
        format!(
            "{} / **{}** / {} | {} | {} | {} | {}",
            count(self.per_sec[0]),
            count(self.per_sec[1]),
            count(self.per_sec[2]),
            num(self.latency_ms[0], 2),
            num(self.latency_ms[1], 2),
            num(self.latency_ms[2], 1),
            num(self.cpu_us, 1),
        )
    }
}

/// The median of some numbers (NaN for none).
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Summarise repetitions.
pub fn summarize(reps: &[Rep]) -> Summary {
    let of = |f: &dyn Fn(&Rep) -> f64| median(reps.iter().map(f).collect());
    let rates: Vec<f64> = reps.iter().map(|r| r.outcome.per_sec()).collect();
    Summary {
        per_sec: [
            rates.iter().copied().fold(f64::INFINITY, f64::min),
            median(rates.clone()),
            rates.iter().copied().fold(0.0, f64::max),
        ],
        latency_ms: [
            of(&|r| r.outcome.quantile_ms(0.5)),
            of(&|r| r.outcome.quantile_ms(0.99)),
            of(&|r| r.outcome.quantile_ms(1.0)),
        ],
        cpu_us: of(&|r| r.cpu_us),
        mock_cpu_us: of(&|r| r.mock_cpu_us),
        peak_rss: reps.iter().filter_map(|r| r.peak_rss).max(),
    }
}

/// A count with thousands separators: `12,345`.
pub fn count(n: f64) -> String {
    if !n.is_finite() {
        return "–".into();
    }
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A number with `decimals` places, or a dash when there is none.
pub fn num(n: f64, decimals: usize) -> String {
    if n.is_finite() {
        format!("{n:.decimals$}")
    } else {
        "–".into()
    }
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / f64::from(1 << 20))
}

/// Bytes as MiB, or a dash when there is none.
pub fn mib_or_dash(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "–".into(), mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
        assert_eq!(count(1_234_567.4), "1,234,567");
        assert_eq!(count(999.0), "999");
        assert_eq!(num(f64::NAN, 1), "–");
    }
}
