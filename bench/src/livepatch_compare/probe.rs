//! What the guest programs print (`images/initramfs/progs/lpc_*.c`), parsed, and the
//! figures computed from it: latency percentiles and the longest stall of all vCPUs at
//! once within an interval.

/// One vCPU's worker in an `lpc_probe` window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cpu {
    pub cpu: u32,
    /// Requests made.
    pub n: u64,
    /// What the first answer came from: "old", "new" or "none".
    pub first: String,
    /// ns after the window's start of the first answer from the other code, if any.
    pub switch: Option<u64>,
    pub flips: u64,
    pub mixed: u64,
    /// Longest latency (ns).
    pub max: u64,
}

/// One `lpc_probe` window: the workload on every vCPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    /// Guest CLOCK_MONOTONIC (ns) at the common start, and the length (ns).
    pub t0: u64,
    pub dur: u64,
    pub cpus: Vec<Cpu>,
    /// All-vCPU stalls (start after `t0`, length), in us.
    pub stalls: Vec<(u64, u64)>,
    /// Latency histogram of all vCPUs: (bucket index, count) (see [`bucket_of`]).
    pub hist: Vec<(usize, u64)>,
    /// Longest latency ending in each `bucket_ms` bucket, in us (empty unless asked for).
    pub series: Vec<u64>,
    pub bucket_ms: u64,
    /// A worker had more gaps than it could keep: stalls may be missing.
    pub overflow: bool,
}

/// `KEY=VALUE` fields of a line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn num(line: &str, key: &str) -> Result<u64, String> {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key}= in guest line: {line}"))
}

/// Signed `KEY=VALUE` (-1 means none).
fn opt_num(line: &str, key: &str) -> Result<Option<u64>, String> {
    let v: i64 = field(line, key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key}= in guest line: {line}"))?;
    Ok(u64::try_from(v).ok())
}

/// `A:B` pairs after the first `skip` words.
fn pairs(line: &str, skip: usize) -> Result<Vec<(u64, u64)>, String> {
    line.split_whitespace()
        .skip(skip)
        .map(|w| {
            let (a, b) = w.split_once(':').ok_or_else(|| format!("bad pair '{w}' in: {line}"))?;
            Ok((
                a.parse().map_err(|_| format!("bad number '{a}' in: {line}"))?,
                b.parse().map_err(|_| format!("bad number '{b}' in: {line}"))?,
            ))
        })
        .collect()
}

/// Parses the output of `lpc_probe` (other lines are ignored).
pub fn parse_window(lines: &[String]) -> Result<Window, String> {
    let mut w = Window::default();
    let mut seen = false;
    for l in lines {
        let l = l.trim();
        match l.split_whitespace().next() {
            Some("lpc-window") => {
                seen = true;
                w.t0 = num(l, "t0")?;
                w.dur = num(l, "dur")?;
                w.overflow = num(l, "overflow")? != 0;
            }
            Some("lpc-probe") => w.cpus.push(Cpu {
                cpu: num(l, "cpu")? as u32,
                n: num(l, "n")?,
                first: field(l, "first").unwrap_or("none").to_string(),
                switch: opt_num(l, "switch")?,
                flips: num(l, "flips")?,
                mixed: num(l, "mixed")?,
                max: num(l, "max")?,
            }),
            Some("lpc-stalls") => w.stalls = pairs(l, 1)?,
            Some("lpc-hist") => w.hist = pairs(l, 1)?.into_iter().map(|(i, c)| (i as usize, c)).collect(),
            Some("lpc-ts") => {
                w.bucket_ms = num(l, "bucket_ms")?;
                w.series = l
                    .split_whitespace()
                    .skip(2)
                    .map(|v| v.parse().map_err(|_| format!("bad number '{v}' in: {l}")))
                    .collect::<Result<_, _>>()?;
            }
            _ => {}
        }
    }
    if !seen || w.cpus.is_empty() || w.cpus.iter().any(|c| c.n == 0) || w.hist.is_empty() {
        return Err(format!("the guest workload printed no (or partial) results: {lines:?}"));
    }
    Ok(w)
}

impl Window {
    /// Latency percentile (ns) of all requests, p in 0..=100: the middle of its histogram
    /// bucket (within ~3%).
    pub fn percentile(&self, p: f64) -> f64 {
        let mut h = self.hist.clone();
        h.sort_unstable();
        let total: u64 = h.iter().map(|(_, c)| c).sum();
        if total == 0 {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in h {
            seen += c;
            if seen >= rank {
                let (lo, w) = bucket_range(i);
                return lo as f64 + (w as f64 - 1.0) / 2.0;
            }
        }
        unreachable!("rank <= total")
    }

    /// Longest latency (ns), exact.
    pub fn max_latency(&self) -> u64 {
        self.cpus.iter().map(|c| c.max).max().unwrap_or(0)
    }

    /// The longest all-vCPU stall (us) that overlaps `[lo, hi]` (guest ns), counting only
    /// the part inside it. Stalls shorter than the probe's gap_min (10 us) are not seen.
    pub fn stall_within(&self, lo: u64, hi: u64) -> u64 {
        self.stalls
            .iter()
            .map(|&(s, len)| {
                let (s, e) = (self.t0 + s * 1000, self.t0 + (s + len) * 1000);
                e.min(hi).saturating_sub(s.max(lo)) / 1000
            })
            .max()
            .unwrap_or(0)
    }

    /// Time of the first answer from the other code than at the start, over all vCPUs
    /// (guest ns), if one saw it.
    pub fn first_switch(&self) -> Option<u64> {
        self.cpus.iter().filter_map(|c| c.switch).min().map(|s| self.t0 + s)
    }
}

/// The guest's histogram bucket of a latency of `v` ns (`bucket_of` in lpc_probe.c):
/// values below 16 exactly, then 16 buckets per power of two.
#[cfg(test)]
pub fn bucket_of(v: u64) -> usize {
    if v < 16 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros() as usize;
    (e - 3) * 16 + ((v >> (e - 4)) & 15) as usize
}

/// Smallest value in bucket `i`, and the bucket's width.
pub fn bucket_range(i: usize) -> (u64, u64) {
    if i < 16 {
        return (i as u64, 1);
    }
    let e = i / 16 + 3;
    let sub = (i % 16) as u64;
    ((16 + sub) << (e - 4), 1 << (e - 4))
}

/// `lpc-klp` line from `lpc_klp load|unload`: t0 and the named times (ns after t0).
#[derive(Debug, Clone, PartialEq)]
pub struct KlpOp {
    pub t0: u64,
    /// Transition finished ("... complete" in the kernel log): /sys/.../transition is 0.
    pub done: u64,
    /// unload: the module is gone (delete_module succeeded).
    pub removed: Option<u64>,
    /// Where `done` comes from: "kmsg" (the kernel's own timestamp) or "poll".
    pub src: String,
}

pub fn parse_klp(lines: &[String]) -> Result<KlpOp, String> {
    let l = lines
        .iter()
        .find(|l| l.starts_with("lpc-klp "))
        .ok_or_else(|| format!("lpc_klp printed no result: {lines:?}"))?;
    Ok(KlpOp {
        t0: num(l, "t0")?,
        done: opt_num(l, "done")?.ok_or_else(|| format!("no done time: {l}"))?,
        removed: field(l, "removed")
            .map(|_| opt_num(l, "removed"))
            .transpose()?
            .flatten(),
        src: field(l, "src").unwrap_or("?").to_string(),
    })
}

/// `lpc-cost` line: (ns per call, state of the last answer). The cost is the median over
/// chunks of calls, so that the vCPU being preempted now and then does not count.
pub fn parse_cost(lines: &[String]) -> Result<(f64, String), String> {
    let l = lines
        .iter()
        .find(|l| l.starts_with("lpc-cost "))
        .ok_or_else(|| format!("lpc_cost printed no result: {lines:?}"))?;
    let chunk = num(l, "chunk")?;
    let med = num(l, "med")?;
    Ok((
        med as f64 / chunk.max(1) as f64,
        field(l, "state").unwrap_or("?").to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(String::from).collect()
    }

    #[test]
    fn buckets_cover_values() {
        for v in (0..5000u64).chain([65_535, 65_536, 1 << 33, 123_456_789_012]) {
            let (lo, w) = bucket_range(bucket_of(v));
            assert!(lo <= v && v < lo + w, "v={v} lo={lo} w={w}");
        }
        assert_eq!(bucket_range(bucket_of(16)), (16, 1));
        assert_eq!(bucket_range(bucket_of(1000)), (992, 32));
    }

    #[test]
    fn parses_probe_output() {
        let out = lines(
            "garbage\n\
             lpc-window t0=1000000 dur=5000000 ncpu=2 gap_min=10000 overflow=0\n\
             lpc-probe cpu=0 n=5 first=old switch=-1 flips=0 mixed=0 max=70000\n\
             lpc-probe cpu=1 n=10 first=old switch=200000 flips=1 mixed=0 max=90000\n\
             lpc-stalls 100:50 300:65\n\
             lpc-hist 20:14 40:1\n\
             lpc-ts bucket_ms=10 1 2 3",
        );
        let w = parse_window(&out).unwrap();
        assert_eq!(
            (w.t0, w.dur, w.cpus.len(), w.overflow),
            (1_000_000, 5_000_000, 2, false)
        );
        assert_eq!(
            (w.cpus[1].n, w.cpus[1].switch, w.cpus[0].switch),
            (10, Some(200_000), None)
        );
        assert_eq!((w.bucket_ms, w.series.clone()), (10, vec![1, 2, 3]));
        assert_eq!(w.first_switch(), Some(1_200_000));
        // 14 of 15 requests in bucket 20 (p50 and p90 there), one in bucket 40.
        assert_eq!(w.percentile(50.0), 20.0);
        assert_eq!(w.percentile(90.0), 20.0);
        assert_eq!(w.percentile(99.0), bucket_range(40).0 as f64 + 0.5);
        assert_eq!(w.max_latency(), 90_000);
        // Stalls at [1.1, 1.15] ms and [1.3, 1.365] ms of the guest clock.
        assert_eq!(w.stall_within(0, u64::MAX), 65);
        assert_eq!(w.stall_within(1_000_000, 1_320_000), 50);
        assert_eq!(w.stall_within(1_340_000, 1_400_000), 25);
        assert_eq!(w.stall_within(1_400_000, 1_500_000), 0);
        assert!(parse_window(&lines("lpc-stalls 1:2")).is_err());
    }

    #[test]
    fn parses_klp_and_cost() {
        let k = parse_klp(&lines(
            "lpc-klp op=unload t0=5 disabled=10 started=-1 done=300 polled=9000 removed=9100 src=kmsg",
        ))
        .unwrap();
        assert_eq!((k.t0, k.done, k.removed, k.src.as_str()), (5, 300, Some(9100), "kmsg"));
        let k = parse_klp(&lines(
            "lpc-klp op=load t0=5 loaded=10 started=7 done=30 polled=40 src=poll",
        ))
        .unwrap();
        assert_eq!(k.removed, None);
        let (ns, st) = parse_cost(&lines(
            "lpc-cost kind=uname calls=64 ns=1000 chunk=32 med=8000 min=7000 state=new",
        ))
        .unwrap();
        assert_eq!((ns, st.as_str()), (250.0, "new"));
    }
}
