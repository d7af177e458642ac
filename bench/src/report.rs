//! Collecting per-trial figures, and printing their medians as a table or JSON.

use std::collections::HashMap;
use std::fmt::Write as _;

/// The result columns, in order. Index 0 is the direct path.
pub const COLUMNS: [&str; 3] = ["direct", "hostnet-proxy", "docker-proxy"];
pub const DIRECT: usize = 0;
pub const HOSTNET: usize = 1;
pub const DOCKER: usize = 2;

/// Which ratio columns make sense for a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ratios {
    /// hostnet/direct and hostnet/docker-proxy.
    Both,
    /// Only hostnet/docker-proxy (no direct value, or overheads over direct).
    DockerOnly,
    /// None (e.g. loss percentages, where 0 is common).
    No,
}

#[derive(Debug)]
struct Figure {
    key: &'static str,
    label: &'static str,
    decimals: usize,
    ratios: Ratios,
}

const fn fig(key: &'static str, label: &'static str, decimals: usize, ratios: Ratios) -> Figure {
    Figure {
        key,
        label,
        decimals,
        ratios,
    }
}

/// Every figure, in table order. Keys are also the JSON keys.
const FIGURES: &[Figure] = &[
    fig("bulk1_gbps", "TCP bulk, 1 stream (Gbit/s)", 2, Ratios::Both),
    fig(
        "bulk4_gbps",
        "TCP bulk, 4 streams (Gbit/s)",
        2,
        Ratios::Both,
    ),
    fig("rr_p50_us", "TCP RR 64 B, p50 (us)", 1, Ratios::Both),
    fig(
        "rr_p50_overhead_us",
        "  p50 overhead over direct (us)",
        1,
        Ratios::DockerOnly,
    ),
    fig("rr_p99_us", "TCP RR 64 B, p99 (us)", 1, Ratios::Both),
    fig(
        "rr_p99_overhead_us",
        "  p99 overhead over direct (us)",
        1,
        Ratios::DockerOnly,
    ),
    fig(
        "connrate_cps",
        "TCP connections/s (2 clients)",
        0,
        Ratios::Both,
    ),
    fig("udp64_pps", "UDP 64 B delivered (pkt/s)", 0, Ratios::Both),
    fig("udp64_loss_pct", "UDP 64 B loss (%)", 2, Ratios::No),
    fig(
        "udp1400_pps",
        "UDP 1400 B delivered (pkt/s)",
        0,
        Ratios::Both,
    ),
    fig("udp1400_loss_pct", "UDP 1400 B loss (%)", 2, Ratios::No),
    fig("idle_rss_kib", "Idle RSS (KiB)", 0, Ratios::DockerOnly),
    fig("idle_threads", "Idle threads", 0, Ratios::DockerOnly),
    fig("idle_fds", "Idle open fds", 0, Ratios::DockerOnly),
    fig("conns_held", "Idle conns held", 0, Ratios::DockerOnly),
    fig(
        "conns_rss_kib",
        "  RSS while holding (KiB)",
        0,
        Ratios::DockerOnly,
    ),
    fig(
        "conns_kib_per_conn",
        "  RSS per held conn (KiB)",
        2,
        Ratios::DockerOnly,
    ),
    fig(
        "conns_threads",
        "  threads while holding",
        0,
        Ratios::DockerOnly,
    ),
    fig(
        "conns_fds",
        "  open fds while holding",
        0,
        Ratios::DockerOnly,
    ),
];

/// Overhead figures derived from medians: (derived key, source key).
const OVERHEADS: &[(&str, &str)] = &[
    ("rr_p50_overhead_us", "rr_p50_us"),
    ("rr_p99_overhead_us", "rr_p99_us"),
];

/// All trial values, per figure and column, plus optional cell texts that
/// replace the number (e.g. "died at 3333").
#[derive(Debug, Default)]
pub struct Results {
    samples: HashMap<&'static str, [Vec<f64>; 3]>,
    notes: HashMap<(&'static str, usize), String>,
    /// Trials whose value ended in a failure, e.g. the proxy died while
    /// holding connections: (figure, column) -> count.
    failures: HashMap<(&'static str, usize), usize>,
}

impl Results {
    pub fn add(&mut self, key: &'static str, col: usize, value: f64) {
        debug_assert!(FIGURES.iter().any(|f| f.key == key), "unknown figure {key}");
        self.samples.entry(key).or_default()[col].push(value);
    }

    /// Marks the trial just added for `key` as one where the proxy died.
    pub fn mark_died(&mut self, key: &'static str, col: usize) {
        *self.failures.entry((key, col)).or_default() += 1;
    }

    /// Turns died marks into cell texts: "died at N" (N the median value) when
    /// every trial died, "N (died k/R)" when some did.
    pub fn derive_notes(&mut self) {
        let failures: Vec<_> = self.failures.iter().map(|(&k, &n)| (k, n)).collect();
        for ((key, col), died) in failures {
            let total = self.samples(key, col).len();
            let Some(m) = self.median(key, col) else {
                continue;
            };
            let text = if died >= total {
                format!("died at {m:.0}")
            } else {
                format!("{m:.0} (died {died}/{total})")
            };
            self.notes.insert((key, col), text);
        }
    }

    pub fn median(&self, key: &str, col: usize) -> Option<f64> {
        let v = self.samples.get(key)?.get(col)?;
        median(v)
    }

    fn samples(&self, key: &str, col: usize) -> &[f64] {
        self.samples.get(key).map_or(&[], |s| &s[col])
    }

    /// Fills the overhead-over-direct figures from the medians.
    pub fn derive_overheads(&mut self) {
        for &(derived, source) in OVERHEADS {
            let Some(direct) = self.median(source, DIRECT) else {
                continue;
            };
            for col in [HOSTNET, DOCKER] {
                if let Some(v) = self.median(source, col) {
                    self.samples.entry(derived).or_default()[col] = vec![v - direct];
                }
            }
        }
    }

    fn cell(&self, f: &Figure, col: usize) -> String {
        if let Some(t) = self.notes.get(&(f.key, col)) {
            return t.clone();
        }
        match self.median(f.key, col) {
            Some(v) => format!("{v:.*}", f.decimals),
            None => "-".into(),
        }
    }

    fn ratio(&self, f: &Figure, num: usize, den: usize) -> String {
        let allowed = match f.ratios {
            Ratios::Both => true,
            Ratios::DockerOnly => den == DOCKER,
            Ratios::No => false,
        };
        if !allowed
            || self.notes.contains_key(&(f.key, num))
            || self.notes.contains_key(&(f.key, den))
        {
            return "-".into();
        }
        match (self.median(f.key, num), self.median(f.key, den)) {
            (Some(a), Some(b)) if b != 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        }
    }

    /// The table: one row per figure that has at least one value.
    pub fn table(&self) -> String {
        let header = [
            "figure",
            COLUMNS[DIRECT],
            COLUMNS[HOSTNET],
            COLUMNS[DOCKER],
            "hostnet/direct",
            "hostnet/docker-proxy",
        ];
        let mut rows: Vec<[String; 6]> = vec![header.map(String::from)];
        for f in FIGURES {
            let present = (0..3).any(|c| {
                !self.samples(f.key, c).is_empty() || self.notes.contains_key(&(f.key, c))
            });
            if !present {
                continue;
            }
            rows.push([
                f.label.to_string(),
                self.cell(f, DIRECT),
                self.cell(f, HOSTNET),
                self.cell(f, DOCKER),
                self.ratio(f, HOSTNET, DIRECT),
                self.ratio(f, HOSTNET, DOCKER),
            ]);
        }
        let mut widths = [0usize; 6];
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for (i, r) in rows.iter().enumerate() {
            let mut line = String::new();
            for (j, (c, w)) in r.iter().zip(widths).enumerate() {
                if j > 0 {
                    line.push_str(" | ");
                }
                let pad = w - c.chars().count();
                if j == 0 {
                    line.push_str(c);
                    line.push_str(&" ".repeat(pad));
                } else {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(c);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
            if i == 0 {
                let total = widths.iter().sum::<usize>() + 3 * (widths.len() - 1);
                out.push_str(&"-".repeat(total));
                out.push('\n');
            }
        }
        out
    }

    /// The medians (and raw trial values) as a JSON object; `meta` is a list
    /// of (key, already-encoded JSON value) pairs.
    pub fn json(&self, meta: &[(&str, String)]) -> String {
        let mut out = String::from("{\n  \"meta\": {");
        for (i, (k, v)) in meta.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(out, "{sep}\n    {}: {v}", json_str(k));
        }
        out.push_str("\n  },\n  \"figures\": {");
        let mut first = true;
        for f in FIGURES {
            if (0..3).all(|c| self.samples(f.key, c).is_empty()) {
                continue;
            }
            let sep = if first { "" } else { "," };
            first = false;
            let _ = write!(
                out,
                "{sep}\n    {}: {{\"label\": {}",
                json_str(f.key),
                json_str(f.label.trim())
            );
            for (c, name) in COLUMNS.iter().enumerate() {
                let median = self
                    .median(f.key, c)
                    .map_or_else(|| "null".to_string(), json_num);
                let samples: Vec<String> = self
                    .samples(f.key, c)
                    .iter()
                    .map(|&v| json_num(v))
                    .collect();
                let _ = write!(
                    out,
                    ", {}: {{\"median\": {median}, \"samples\": [{}]",
                    json_str(name),
                    samples.join(", ")
                );
                if let Some(t) = self.notes.get(&(f.key, c)) {
                    let _ = write!(out, ", \"note\": {}", json_str(t));
                }
                out.push('}');
            }
            out.push('}');
        }
        out.push_str("\n  }\n}\n");
        out
    }
}

/// Median of the values (mean of the middle two for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}

pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{}", (v * 1000.0).round() / 1000.0)
    } else {
        "null".into()
    }
}
