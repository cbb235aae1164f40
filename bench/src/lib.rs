//! Small measuring helpers shared by the benchmarks: run a closure many
//! times, report the median and spread. Benchmarks compare against a
//! baseline measured in the same process, the same way, side by side.

use std::time::{Duration, Instant};

/// Timings of one measured operation.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Sorted samples.
    pub samples: Vec<Duration>,
}

impl Stats {
    /// The median sample.
    pub fn median(&self) -> Duration {
        self.samples[self.samples.len() / 2]
    }
    /// The 10th and 90th percentiles.
    pub fn p10_p90(&self) -> (Duration, Duration) {
        let n = self.samples.len();
        (self.samples[n / 10], self.samples[(n * 9) / 10])
    }
}

/// Run `f` `warmup` times unmeasured, then `n` times measured.
pub fn measure(warmup: usize, n: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..warmup {
        f();
    }
    let mut samples: Vec<Duration> = (0..n.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    samples.sort();
    Stats { samples }
}

/// Measure two operations interleaved (a, b, a, b, ...), so drift in the
/// machine's state (frequency, caches, other load) hits both alike.
pub fn measure_pair(
    warmup: usize,
    n: usize,
    mut a: impl FnMut(),
    mut b: impl FnMut(),
) -> (Stats, Stats) {
    for _ in 0..warmup {
        a();
        b();
    }
    let (mut sa, mut sb) = (Vec::new(), Vec::new());
    for _ in 0..n.max(1) {
        let t = Instant::now();
        a();
        sa.push(t.elapsed());
        let t = Instant::now();
        b();
        sb.push(t.elapsed());
    }
    sa.sort();
    sb.sort();
    (Stats { samples: sa }, Stats { samples: sb })
}

/// Microseconds with one decimal.
pub fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// This process's CPU time (user + system) from `/proc/self/stat`: what the
/// pool and its in-process nodes cost, whatever the wall clock says.
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here; 100 ticks/s.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Measure two operations pass for pass (a then b, then b then a, ...),
/// and return both timings and the per-pass ratios `time(b) / time(a)`,
/// sorted: the median ratio is robust to drift that a ratio of medians
/// is not.
pub fn measure_ratio(
    warmup: usize,
    n: usize,
    mut a: impl FnMut(),
    mut b: impl FnMut(),
) -> (Stats, Stats, Vec<f64>) {
    for _ in 0..warmup {
        a();
        b();
    }
    let (mut sa, mut sb, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n.max(1) {
        let time = |f: &mut dyn FnMut()| {
            let t = Instant::now();
            f();
            t.elapsed()
        };
        let (ta, tb) = if i % 2 == 0 {
            let ta = time(&mut a);
            (ta, time(&mut b))
        } else {
            let tb = time(&mut b);
            (time(&mut a), tb)
        };
        ratios.push(tb.as_secs_f64() / ta.as_secs_f64());
        sa.push(ta);
        sb.push(tb);
    }
    sa.sort();
    sb.sort();
    ratios.sort_by(f64::total_cmp);
    (Stats { samples: sa }, Stats { samples: sb }, ratios)
}

/// Sizes to run from the comma-separated list in `var`, else `full` (with
/// `--bench`) or `smoke` (under `cargo test`).
pub fn sizes_from_env(var: &str, full: &[usize], smoke: &[usize]) -> anyhow::Result<Vec<usize>> {
    match std::env::var(var) {
        Ok(v) => v
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|e| anyhow::anyhow!("{var}: {s:?}: {e}"))
            })
            .collect(),
        Err(_) if std::env::args().any(|a| a == "--bench") => Ok(full.to_vec()),
        Err(_) => Ok(smoke.to_vec()),
    }
}

/// A field of `/proc/<pid>/status` in kB, as MiB (`VmRSS`, `VmHWM`; 0 when
/// unreadable). `pid`: `None` for this process.
pub fn proc_status_mib(pid: Option<u32>, field: &str) -> u64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_owned(),
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// The summarize job's two prompts for a text (jobs/summarize/src/lib.rs),
/// rebuilt so native llama.cpp baselines do the same work: (summary prompt,
/// its token bound), (topic prompt, its token bound). Both stop at a newline.
pub fn summarize_prompts(text: &str) -> [(String, usize); 2] {
    const SUMMARY_SHOTS: &str = "Write a one-sentence summary of each text.\n\nText: The early bird gets the worm, but the second mouse gets the cheese.\nSummary: Being first is not always an advantage.\n\nText: Never trust a computer you can't throw out a window.\nSummary: Machines deserve only as much trust as we can control.\n\n";
    const TOPIC_SHOTS: &str = "Text: A penny saved is a penny earned.\nTopic: money\n\nText: Never trust a computer you can't throw out a window.\nTopic: technology\n\nText: The early bird gets the worm, but the second mouse gets the cheese.\nTopic: animals\n\n";
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    [
        (format!("{SUMMARY_SHOTS}Text: {line}\nSummary:"), 48),
        (format!("{TOPIC_SHOTS}Text: {line}\nTopic:"), 8),
    ]
}
