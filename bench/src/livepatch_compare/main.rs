//! livepatch-compare: lucos against Linux livepatch, in the same guest, on the same fixes.
//!
//! Boots one guest and, run after run, applies and rolls back two fixes with each system in
//! turn (which goes first alternates): `cmdline_proc_show` (lucos: guest-patches/cmdline;
//! livepatch: the kernel's samples/livepatch/livepatch-sample.ko) and `__x64_sys_newuname`
//! (lucos: guest-patches/uname; livepatch: images/livepatch/livepatch-uname.ko, the same new
//! code). It measures, from inside the guest with the workload of
//! images/initramfs/progs/lpc_probe.c pinned on every vCPU: the longest stall of all vCPUs
//! at once during the apply and the rollback, request latencies, the time to commit (and
//! to finish a rollback) on an idle and on a busy guest, and the cost per call of the
//! patched function. Prints a table (min / median / max over the runs, and the ratio of
//! the medians) and writes a PNG of the workload's latency over time. `--help` explains.

mod plot;
mod probe;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use lucos_bench::guest::{BootArgs, Guest};
use lucos_bench::lucos::Api;
use probe::{KlpOp, Window};
use serde::Serialize;

const HELP: &str = "\
usage: livepatch-compare [--runs N] [--vcpus N] [options]

Boots one lucos guest and compares lucos with Linux livepatch (CONFIG_LIVEPATCH) on the
same fixes, alternating the two systems run by run:
  cmdline  cmdline_proc_show   lucos: guest-patches/cmdline
                               livepatch: samples/livepatch/livepatch-sample.ko
  uname    __x64_sys_newuname  lucos: guest-patches/uname
                               livepatch: images/livepatch/livepatch-uname.ko (same new code)
For each fix and system, every run: apply on the idle guest (time to commit), cost per
call of the patched function, rollback and apply again while the workload runs pinned on
every vCPU (stall, request latency, time to commit), rollback on the idle guest. Also per
run: a window with no apply and the unpatched cost per call, for reference.

  lucos:     time from submitting the signed module on the API socket to `committed`
             (rollback: to `rolled-back`, memory freed), polled every 5 ms from the host
  livepatch: time from finit_module (insmod) to the end of the transition
             (/sys/kernel/livepatch/NAME/transition = 0, timed with the kernel's own log
             timestamp); rollback: writing 0 to .../enabled until rmmod succeeded
  stall:     the longest interval in which no vCPU's workload completed a request, within
             the apply (or rollback) interval, measured in the guest (lpc_probe)
  latency:   per request, from the previous request's end to its own (closed loop), over
             the whole window (--window-ms) around the apply, all vCPUs together

Options:
  --runs N         runs (default 3); each run applies and rolls back each fix 4 times
  --vcpus N        guest vCPUs (default 2); the workload runs pinned on each
  --window-ms MS   length of a measured window (default 4000)
  --lead-ms MS     time from the workload's start to the apply (default 300)
  --cost-ms MS     length of a cost-per-call loop (default 300)
  --bucket-ms MS   time-series bucket of the plot (default 10)
  --png PATH       the plot (default target/livepatch-compare.png)
  --json           print the results as JSON instead of the table
  --vmm PATH       lucos-vmm (default: next to this program; cargo build --release -p lucos-vmm)
  --images DIR     guest images (default $LUCOS_IMAGES or images/out; see images/build.sh)
  --font PATH      TTF font for the plot (default DejaVu Sans from fonts-dejavu-core)
  --mem SIZE       guest memory (default 256M)
  --kernel-log     leave the guest kernel's messages on the serial console (debugging)

Run it in the SVM lane (README, \"Lanes\"): LUCOS_LANE=svm cargo run --release -p lucos-bench
--bin livepatch-compare -- --runs 3. Absolute times there are inflated by QEMU's emulation
of the lane's CPU; compare the ratios.";

struct Opts {
    runs: usize,
    vcpus: u8,
    window_ms: u64,
    lead_ms: u64,
    cost_ms: u64,
    bucket_ms: u64,
    png: PathBuf,
    json: bool,
    vmm: PathBuf,
    images: PathBuf,
    font: PathBuf,
    mem: String,
    kernel_log: bool,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn parse_args() -> Result<Opts, String> {
    let vmm = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("lucos-vmm")))
        .unwrap_or_else(|| root().join("target/release/lucos-vmm"));
    let mut o = Opts {
        runs: 3,
        vcpus: 2,
        window_ms: 4000,
        lead_ms: 300,
        cost_ms: 300,
        bucket_ms: 10,
        png: root().join("target/livepatch-compare.png"),
        json: false,
        vmm,
        images: std::env::var_os("LUCOS_IMAGES")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("images/out")),
        font: "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into(),
        mem: "256M".into(),
        kernel_log: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value (try --help)"));
        let num = |v: String| v.parse::<u64>().map_err(|_| format!("{a}: not a number: {v}"));
        match a.as_str() {
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--runs" => o.runs = num(val()?)? as usize,
            "--vcpus" => o.vcpus = u8::try_from(num(val()?)?).map_err(|_| "--vcpus: too many")?,
            "--window-ms" => o.window_ms = num(val()?)?,
            "--lead-ms" => o.lead_ms = num(val()?)?,
            "--cost-ms" => o.cost_ms = num(val()?)?,
            "--bucket-ms" => o.bucket_ms = num(val()?)?,
            "--png" => o.png = val()?.into(),
            "--json" => o.json = true,
            "--vmm" => o.vmm = val()?.into(),
            "--images" => o.images = val()?.into(),
            "--font" => o.font = val()?.into(),
            "--mem" => o.mem = val()?,
            "--kernel-log" => o.kernel_log = true,
            _ => return Err(format!("unknown argument '{a}' (try --help)")),
        }
    }
    if o.runs == 0 || o.vcpus == 0 || o.bucket_ms == 0 || o.lead_ms >= o.window_ms {
        return Err("--runs, --vcpus and --bucket-ms must be > 0 and --lead-ms < --window-ms".into());
    }
    Ok(o)
}

/// A fix both systems apply.
struct Pair {
    name: &'static str,
    function: &'static str,
    /// lpc_probe / lpc_cost request kind.
    kind: &'static str,
    /// lucos patch module, relative to the checkout.
    lucos_ko: &'static str,
    /// livepatch module in the guest, and its name under /sys/kernel/livepatch.
    klp_ko: &'static str,
    klp_name: &'static str,
}

const PAIRS: [Pair; 2] = [
    Pair {
        name: "cmdline",
        function: "cmdline_proc_show",
        kind: "cmdline",
        lucos_ko: "guest-patches/cmdline/lucos_cmdline.ko",
        klp_ko: "/lucos/livepatch-sample.ko",
        klp_name: "livepatch_sample",
    },
    Pair {
        name: "uname",
        function: "__x64_sys_newuname",
        kind: "uname",
        lucos_ko: "guest-patches/uname/lucos_uname.ko",
        klp_ko: "/lucos/livepatch-uname.ko",
        klp_name: "livepatch_uname",
    },
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Lucos,
    Livepatch,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Lucos => "lucos",
            System::Livepatch => "livepatch",
        }
    }
}

/// Figures per system: (key, table label).
const FIGURES: &[(&str, &str)] = &[
    ("apply.stall_us", "apply: longest all-vCPU stall (us)"),
    ("apply.lat_p50_us", "apply window: latency p50 (us)"),
    ("apply.lat_p99_us", "apply window: latency p99 (us)"),
    ("apply.lat_max_us", "apply window: latency max (us)"),
    ("apply.commit_idle_ms", "apply: time to commit, idle (ms)"),
    ("apply.commit_busy_ms", "apply: time to commit, busy (ms)"),
    ("rollback.stall_us", "rollback: longest all-vCPU stall (us)"),
    ("rollback.lat_p50_us", "rollback window: latency p50 (us)"),
    ("rollback.lat_p99_us", "rollback window: latency p99 (us)"),
    ("rollback.lat_max_us", "rollback window: latency max (us)"),
    ("rollback.done_idle_ms", "rollback: time to done, idle (ms)"),
    ("rollback.done_busy_ms", "rollback: time to done, busy (ms)"),
    ("cost.patched_ns", "cost per call, patched (ns)"),
    ("cost.overhead_ns", "cost per call, patched - unpatched (ns)"),
    ("apply.vmm_pause_us", "apply: vCPUs paused by lucos-vmm (us)"),
];

/// Figures with no apply, the same for both systems.
const REFERENCE: &[(&str, &str)] = &[
    ("idle.stall_us", "no apply: longest all-vCPU stall, window (us)"),
    ("idle.lat_p50_us", "no apply: latency p50 (us)"),
    ("idle.lat_p99_us", "no apply: latency p99 (us)"),
    ("idle.lat_max_us", "no apply: latency max (us)"),
    ("cost.unpatched_ns", "cost per call, unpatched (ns)"),
];

/// The figures of one fix, one system (or "reference"), one run.
#[derive(Serialize, Clone)]
struct Sample {
    pair: &'static str,
    system: &'static str,
    run: usize,
    figures: BTreeMap<&'static str, f64>,
    notes: Vec<String>,
}

/// An apply or rollback, as timed by the system that did it.
struct OpTime {
    /// Guest CLOCK_MONOTONIC (ns) at its start, when known (livepatch: timed in the guest).
    guest_start: Option<u64>,
    /// From its start to committed / rolled back.
    done: Duration,
    /// lucos: from sending the request to its answer (the jumps are in).
    call: Duration,
    pause_us: Option<u64>,
    note: Option<String>,
}

/// One measured window, reduced to figures and, in the last run, a plot trace.
struct WindowResult {
    figures: Vec<(&'static str, f64)>,
    /// (start, end) of the apply interval, guest ns.
    interval: (u64, u64),
    window: Window,
}

struct Bench {
    o: Opts,
    guest: Guest,
    api: Api,
    signed: Vec<Vec<u8>>,
    uts_sem: String,
    /// lucos patch ids currently applied, per pair.
    lucos_ids: [Option<u32>; 2],
    kernel: PathBuf,
    initrd: PathBuf,
    /// The guest console's log; the log of a guest that died is kept beside it.
    console_log: PathBuf,
    /// Guests that died and were replaced: (run, what happened, kept console log).
    restarts: Vec<Restart>,
}

#[derive(Serialize, Clone)]
struct Restart {
    run: usize,
    error: String,
    console_log: String,
}

/// A guest that dies during a run (lucos-vmm exits, or the guest stops answering) is
/// replaced and the run done again, at most this many times in all. In the SVM lane, a
/// guest now and then dies during a livepatch transition (README, "livepatch-compare").
const MAX_RESTARTS: usize = 2;

fn boot_guest(o: &Opts, api: &Api, kernel: &Path, initrd: &Path, log: PathBuf) -> Result<Guest, String> {
    let t = Instant::now();
    let g = Guest::boot(
        &BootArgs {
            vmm: &o.vmm,
            kernel,
            initrd,
            vcpus: o.vcpus,
            mem: &o.mem,
            extra: api.vmm_args(),
            timeout: Duration::from_secs(900),
        },
        log,
    )?;
    eprintln!("[livepatch-compare] guest up in {:.1} s", t.elapsed().as_secs_f64());
    Ok(g)
}

const OP_TIMEOUT: Duration = Duration::from_secs(300);
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

impl Bench {
    /// Checks the fresh guest and warms both systems up.
    fn prepare(&mut self) -> Result<(), String> {
        // Kernel messages stay off the serial console (livepatch logs every transition; a
        // console write costs the guest a VM exit per character).
        if !self.o.kernel_log {
            self.run("dmesg -n 1")?;
        }
        let online = self.run("cat /sys/devices/system/cpu/online")?;
        let want = match self.o.vcpus {
            1 => "0".to_string(),
            n => format!("0-{}", n - 1),
        };
        if !online.iter().any(|l| l.trim() == want) {
            return Err(self
                .guest
                .failure(&format!("guest CPUs online: {online:?}, expected {want}")));
        }
        let files = self.run(
            "ls /lucos/lpc_probe /lucos/lpc_cost /lucos/lpc_klp /lucos/livepatch-sample.ko /lucos/livepatch-uname.ko 2>&1",
        )?;
        if files.iter().any(|l| l.contains("No such file")) {
            return Err(format!(
                "the guest's initramfs lacks the bench's programs or livepatch modules ({files:?}): run images/build.sh"
            ));
        }
        let kallsyms = self.run("grep ' uts_sem$' /proc/kallsyms")?;
        self.uts_sem = kallsyms
            .iter()
            .find_map(|l| l.split_whitespace().next().filter(|a| a.len() == 16).map(String::from))
            .ok_or_else(|| format!("uts_sem not in the guest's /proc/kallsyms: {kallsyms:?}"))?;
        warm_up(self)
    }

    /// Replaces a guest that died in `run`, keeping its console log.
    fn restart(&mut self, run: usize, error: String) -> Result<(), String> {
        let kept = self.console_log.with_file_name(format!(
            "livepatch-compare-console.died-{}.log",
            self.restarts.len() + 1
        ));
        let _ = std::fs::rename(&self.console_log, &kept);
        eprintln!(
            "[livepatch-compare] NOTE: the guest died in run {}; starting a new one and doing the run again (console kept in {}):\n{error}",
            run + 1,
            kept.display()
        );
        self.restarts.push(Restart {
            run,
            error,
            console_log: kept.display().to_string(),
        });
        self.guest = boot_guest(&self.o, &self.api, &self.kernel, &self.initrd, self.console_log.clone())?;
        self.lucos_ids = [None, None];
        self.prepare()
    }

    fn run(&mut self, cmd: &str) -> Result<Vec<String>, String> {
        self.guest.run(cmd, CMD_TIMEOUT)
    }

    fn apply(&mut self, pi: usize, sys: System) -> Result<OpTime, String> {
        let p = &PAIRS[pi];
        match sys {
            System::Lucos => {
                let t = self.api.apply(&self.signed[pi], OP_TIMEOUT)?;
                self.lucos_ids[pi] = Some(t.id);
                Ok(OpTime {
                    guest_start: None,
                    done: t.done,
                    call: t.call,
                    pause_us: t.pause_us,
                    note: None,
                })
            }
            System::Livepatch => {
                let params = if p.name == "uname" {
                    format!("uts_sem_addr=0x{}", self.uts_sem)
                } else {
                    String::new()
                };
                let out = self.guest.run(
                    &format!("/lucos/lpc_klp load {} {} {params}", p.klp_ko, p.klp_name),
                    OP_TIMEOUT,
                )?;
                let k = probe::parse_klp(&out).map_err(|e| self.guest.failure(&e))?;
                Ok(klp_time(&k, k.done))
            }
        }
    }

    fn rollback(&mut self, pi: usize, sys: System) -> Result<OpTime, String> {
        let p = &PAIRS[pi];
        match sys {
            System::Lucos => {
                let id = self.lucos_ids[pi]
                    .take()
                    .ok_or("rollback of a lucos patch that is not applied")?;
                let t = self.api.rollback(id, OP_TIMEOUT)?;
                Ok(OpTime {
                    guest_start: None,
                    done: t.done,
                    call: t.call,
                    pause_us: None,
                    note: None,
                })
            }
            System::Livepatch => {
                let out = self
                    .guest
                    .run(&format!("/lucos/lpc_klp unload {}", p.klp_name), OP_TIMEOUT)?;
                let k = probe::parse_klp(&out).map_err(|e| self.guest.failure(&e))?;
                let removed = k
                    .removed
                    .ok_or_else(|| self.guest.failure("lpc_klp unload: no removed time"))?;
                Ok(klp_time(&k, removed))
            }
        }
    }

    /// Cost per call (ns) of pair `pi`'s function; checks which code answered.
    fn cost(&mut self, pi: usize, want: &str) -> Result<f64, String> {
        let cmd = format!("/lucos/lpc_cost 0 {} {}", PAIRS[pi].kind, self.o.cost_ms);
        let out = self.run(&cmd)?;
        let (ns, state) = probe::parse_cost(&out).map_err(|e| self.guest.failure(&e))?;
        if state != want {
            return Err(self.guest.failure(&format!(
                "{}: expected the {want} code to answer, got {state}",
                PAIRS[pi].function
            )));
        }
        Ok(ns)
    }

    /// A window: the workload on every vCPU for --window-ms; `op` runs --lead-ms after it
    /// started. `series`: also record the time series for the plot.
    fn window<T>(
        &mut self,
        pi: usize,
        series: bool,
        op: impl FnOnce(&mut Self) -> Result<T, String>,
    ) -> Result<(Window, T), String> {
        let o = &self.o;
        let bucket = if series { o.bucket_ms } else { 0 };
        let cmd = format!(
            "rm -f /tmp/lpc_p; /lucos/lpc_probe {} {} {} {bucket} > /tmp/lpc_p & true",
            o.vcpus, PAIRS[pi].kind, o.window_ms
        );
        self.run(&cmd)?;
        std::thread::sleep(Duration::from_millis(self.o.lead_ms));
        let t = op(self)?;
        let timeout = Duration::from_millis(self.o.window_ms) + CMD_TIMEOUT;
        let out = self.guest.run("wait; cat /tmp/lpc_p", timeout)?;
        let w = probe::parse_window(&out).map_err(|e| self.guest.failure(&e))?;
        if w.cpus.len() != usize::from(self.o.vcpus) {
            return Err(self.guest.failure(&format!(
                "expected the workload on {} vCPUs, got {}",
                self.o.vcpus,
                w.cpus.len()
            )));
        }
        if let Some(c) = w.cpus.iter().find(|c| c.mixed > 0) {
            return Err(self.guest.failure(&format!(
                "the workload on vCPU {} got {} answers from neither the old nor the new code",
                c.cpu, c.mixed
            )));
        }
        Ok((w, t))
    }

    /// Rollback or apply (`apply`) while the workload runs: figures under `prefix`.
    fn busy_op(&mut self, pi: usize, sys: System, apply: bool, series: bool) -> Result<(WindowResult, OpTime), String> {
        let (w, t) = self.window(
            pi,
            series,
            |b| if apply { b.apply(pi, sys) } else { b.rollback(pi, sys) },
        )?;
        let (before, prefix) = if apply { ("old", "apply") } else { ("new", "rollback") };
        if let Some(c) = w.cpus.iter().find(|c| c.first != before) {
            return Err(self.guest.failure(&format!(
                "{prefix} with {}: the workload on vCPU {} first saw the {} code, expected {before}",
                sys.name(),
                c.cpu,
                c.first
            )));
        }
        let (lo, hi) = (w.t0, w.t0 + w.dur);
        let mut note = t.note.clone();
        if w.overflow {
            note = Some(format!(
                "{prefix}: the workload kept too many gaps; stalls may be missed"
            ));
        }
        let interval = match (t.guest_start, w.first_switch()) {
            (Some(s), _) => (s, s + t.done.as_nanos() as u64),
            // lucos is timed on the host: place it at the workload's first answer from the
            // other code (which follows the end of the pause), minus the API call; the
            // interval ends a whole `done` after that answer (a superset of the truth).
            (None, Some(v)) => (v.saturating_sub(t.call.as_nanos() as u64), v + t.done.as_nanos() as u64),
            (None, None) => {
                note = Some(format!(
                    "{prefix}: the workload never saw the change; stall over the whole window"
                ));
                (lo, hi)
            }
        };
        if interval.1 > hi {
            note = Some(format!(
                "{prefix}: done {:.0} ms after the window ended (raise --window-ms)",
                (interval.1 - hi) as f64 / 1e6
            ));
        }
        let figures = vec![
            (stall_key(prefix), w.stall_within(interval.0, interval.1) as f64),
            (lat_key(prefix, 50), w.percentile(50.0) / 1e3),
            (lat_key(prefix, 99), w.percentile(99.0) / 1e3),
            (lat_key(prefix, 100), w.max_latency() as f64 / 1e3),
        ];
        let mut t = t;
        t.note = note;
        Ok((
            WindowResult {
                figures,
                interval,
                window: w,
            },
            t,
        ))
    }
}

fn stall_key(prefix: &str) -> &'static str {
    match prefix {
        "apply" => "apply.stall_us",
        "rollback" => "rollback.stall_us",
        _ => "idle.stall_us",
    }
}

fn lat_key(prefix: &str, p: u32) -> &'static str {
    match (prefix, p) {
        ("apply", 50) => "apply.lat_p50_us",
        ("apply", 99) => "apply.lat_p99_us",
        ("apply", _) => "apply.lat_max_us",
        ("rollback", 50) => "rollback.lat_p50_us",
        ("rollback", 99) => "rollback.lat_p99_us",
        ("rollback", _) => "rollback.lat_max_us",
        (_, 50) => "idle.lat_p50_us",
        (_, 99) => "idle.lat_p99_us",
        _ => "idle.lat_max_us",
    }
}

fn klp_time(k: &KlpOp, done: u64) -> OpTime {
    OpTime {
        guest_start: Some(k.t0),
        done: Duration::from_nanos(done),
        call: Duration::ZERO,
        pause_us: None,
        note: (k.src != "kmsg").then(|| format!("livepatch end taken from polling ({})", k.src)),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Plot traces of the last run, per pair: (idle, lucos, livepatch) windows.
#[derive(Default)]
struct Traces {
    panels: Panels,
}

/// Buckets in which no request ended lie inside a stall: give them the latency of the
/// request that ended it (the next bucket with one), rather than zero.
fn fill_stalls(values: &mut [u64]) {
    let mut next = 0;
    for v in values.iter_mut().rev() {
        if *v == 0 {
            *v = next;
        } else {
            next = *v;
        }
    }
}

fn trace_of(label: String, color: plot::RGBColor, w: &WindowResult) -> Option<plot::Trace> {
    if w.window.series.is_empty() {
        return None;
    }
    let mut values = w.window.series.clone();
    fill_stalls(&mut values);
    let (start, bucket) = (w.window.t0 as f64, w.window.bucket_ms as f64 * 1e6);
    let origin = w.interval.0 as f64;
    let points = values
        .iter()
        .enumerate()
        .map(|(i, &v)| ((start + (i as f64 + 0.5) * bucket - origin) / 1e6, v as f64))
        .collect();
    let span = (w.interval.1 > w.interval.0).then(|| (0.0, (w.interval.1 - w.interval.0) as f64 / 1e6));
    Some(plot::Trace {
        label,
        color,
        points,
        span,
    })
}

/// One apply and rollback of each fix with each system, not measured: the first use of
/// each path (lucos: the update server's first link; livepatch: the first module load)
/// costs more than the next ones.
fn warm_up(b: &mut Bench) -> Result<(), String> {
    for (pi, pair) in PAIRS.iter().enumerate() {
        for sys in [System::Lucos, System::Livepatch] {
            eprintln!("[livepatch-compare] warm-up: {} with {}", pair.name, sys.name());
            b.apply(pi, sys)?;
            b.cost(pi, "new")?;
            b.rollback(pi, sys)?;
            b.cost(pi, "old")?;
        }
    }
    Ok(())
}

/// Everything, run by run; a run in which the guest died is done again on a new guest.
fn measure(b: &mut Bench, samples: &mut Vec<Sample>, traces: &mut Traces) -> Result<(), String> {
    let runs = b.o.runs;
    for run in 0..runs {
        loop {
            match measure_run(b, run) {
                Ok((s, panels)) => {
                    samples.extend(s);
                    if let Some(p) = panels {
                        traces.panels = p;
                    }
                    break;
                }
                Err(e) if b.guest.lost() && b.restarts.len() < MAX_RESTARTS => b.restart(run, e)?,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

type Panels = Vec<Vec<(String, plot::RGBColor, WindowResult)>>;

/// One run: both fixes, both systems. Returns its samples and, for the last run, the
/// windows to plot.
fn measure_run(b: &mut Bench, run: usize) -> Result<(Vec<Sample>, Option<Panels>), String> {
    let runs = b.o.runs;
    let last = run + 1 == runs;
    let mut samples = Vec::new();
    let mut panels = Vec::new();
    let order = if run & 1 == 0 {
        [System::Lucos, System::Livepatch]
    } else {
        [System::Livepatch, System::Lucos]
    };
    for (pi, pair) in PAIRS.iter().enumerate() {
        eprintln!(
            "[livepatch-compare] run {}/{runs}: {} ({}), {} first",
            run + 1,
            pair.name,
            pair.function,
            order[0].name()
        );
        // Reference: no apply.
        let unpatched = b.cost(pi, "old")?;
        let (w, ()) = b.window(pi, last, |_| Ok(()))?;
        let mut reference = BTreeMap::new();
        reference.insert("cost.unpatched_ns", unpatched);
        reference.insert("idle.stall_us", w.stall_within(w.t0, w.t0 + w.dur) as f64);
        reference.insert("idle.lat_p50_us", w.percentile(50.0) / 1e3);
        reference.insert("idle.lat_p99_us", w.percentile(99.0) / 1e3);
        reference.insert("idle.lat_max_us", w.max_latency() as f64 / 1e3);
        samples.push(Sample {
            pair: pair.name,
            system: "reference",
            run,
            figures: reference,
            notes: vec![],
        });
        let mut panel = Vec::new();
        if last {
            let lead = w.t0 + b.o.lead_ms * 1_000_000;
            panel.push((
                "no apply".to_string(),
                plot::IDLE,
                WindowResult {
                    figures: vec![],
                    interval: (lead, lead),
                    window: w,
                },
            ));
        }

        for sys in order {
            let mut f = BTreeMap::new();
            let mut notes = Vec::new();
            // Idle apply, then the cost of the patched function.
            let t = b.apply(pi, sys)?;
            f.insert("apply.commit_idle_ms", ms(t.done));
            notes.extend(t.note);
            let patched = b.cost(pi, "new")?;
            f.insert("cost.patched_ns", patched);
            f.insert("cost.overhead_ns", patched - unpatched);
            // Rollback, then apply, under load.
            let (w, t) = b.busy_op(pi, sys, false, false)?;
            f.insert("rollback.done_busy_ms", ms(t.done));
            f.extend(w.figures.iter().copied());
            notes.extend(t.note);
            let (w, t) = b.busy_op(pi, sys, true, last)?;
            f.insert("apply.commit_busy_ms", ms(t.done));
            if let Some(p) = t.pause_us {
                f.insert("apply.vmm_pause_us", p as f64);
            }
            f.extend(w.figures.iter().copied());
            notes.extend(t.note);
            if last {
                let color = if sys == System::Lucos {
                    plot::LUCOS
                } else {
                    plot::LIVEPATCH
                };
                panel.push((sys.name().to_string(), color, w));
            }
            // Idle rollback.
            let t = b.rollback(pi, sys)?;
            f.insert("rollback.done_idle_ms", ms(t.done));
            notes.extend(t.note);
            for n in &notes {
                eprintln!("[livepatch-compare]   note ({}): {n}", sys.name());
            }
            samples.push(Sample {
                pair: pair.name,
                system: sys.name(),
                run,
                figures: f,
                notes,
            });
        }
        if last {
            panels.push(panel);
        }
    }
    Ok((samples, last.then_some(panels)))
}

/// min, median, max.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
struct Stats {
    min: f64,
    median: f64,
    max: f64,
}

fn stats(v: &[f64]) -> Option<Stats> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stats {
        min: v[0],
        median,
        max: v[n - 1],
    })
}

/// lucos / livepatch of the medians, when that means something.
fn ratio(l: Option<Stats>, k: Option<Stats>) -> Option<f64> {
    let (l, k) = (l?, k?);
    (k.median > 0.0 && l.median >= 0.0).then(|| l.median / k.median)
}

#[derive(Serialize)]
struct Row {
    pair: &'static str,
    figure: &'static str,
    label: &'static str,
    lucos: Option<Stats>,
    livepatch: Option<Stats>,
    reference: Option<Stats>,
    ratio: Option<f64>,
}

fn summarize(samples: &[Sample]) -> Vec<Row> {
    let values = |pair: &str, sys: &str, key: &str| -> Vec<f64> {
        samples
            .iter()
            .filter(|s| s.pair == pair && s.system == sys)
            .filter_map(|s| s.figures.get(key).copied())
            .collect()
    };
    let mut rows = Vec::new();
    for p in &PAIRS {
        for &(key, label) in FIGURES {
            let l = stats(&values(p.name, "lucos", key));
            let k = stats(&values(p.name, "livepatch", key));
            rows.push(Row {
                pair: p.name,
                figure: key,
                label,
                lucos: l,
                livepatch: k,
                reference: None,
                ratio: ratio(l, k),
            });
        }
        for &(key, label) in REFERENCE {
            rows.push(Row {
                pair: p.name,
                figure: key,
                label,
                lucos: None,
                livepatch: None,
                reference: stats(&values(p.name, "reference", key)),
                ratio: None,
            });
        }
    }
    rows
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn fmt_stats(s: Option<Stats>) -> String {
    match s {
        Some(s) => format!("{} / {} / {}", fmt_num(s.min), fmt_num(s.median), fmt_num(s.max)),
        None => "-".into(),
    }
}

fn table(rows: &[Row], header: &str) -> String {
    let mut out = String::new();
    out.push_str(header);
    for p in &PAIRS {
        out.push_str(&format!(
            "\n{} ({}): min / median / max over the runs\n",
            p.function, p.name
        ));
        out.push_str(&format!(
            "{:<46} {:>26} {:>26} {:>9}\n",
            "", "lucos", "livepatch", "lucos/lp"
        ));
        for r in rows.iter().filter(|r| r.pair == p.name) {
            let (a, b) = match r.reference {
                Some(_) => (fmt_stats(r.reference), String::new()),
                None => (fmt_stats(r.lucos), fmt_stats(r.livepatch)),
            };
            let ratio = r.ratio.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
            let ratio = if r.reference.is_some() { String::new() } else { ratio };
            out.push_str(&format!("{:<46} {a:>26} {b:>26} {ratio:>9}\n", r.label));
        }
    }
    out
}

#[derive(Serialize)]
struct Report<'a> {
    lane: String,
    host_kvm: String,
    vcpus: u8,
    runs: usize,
    window_ms: u64,
    lead_ms: u64,
    cost_ms: u64,
    png: String,
    /// Guests that died and were replaced (the run was done again).
    restarts: &'a [Restart],
    rows: &'a [Row],
    samples: &'a [Sample],
}

fn check_file(p: &Path, what: &str) -> Result<(), String> {
    if p.exists() {
        Ok(())
    } else {
        Err(format!("{what} not found at {}: {}", p.display(), fix_for(what)))
    }
}

fn fix_for(what: &str) -> &'static str {
    if what == "lucos-vmm" {
        "build it with `cargo build --release -p lucos-vmm` (or pass --vmm)"
    } else {
        "run images/build.sh"
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("livepatch-compare: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<(), String> {
    let o = parse_args()?;
    let kernel = o.images.join("vmlinux");
    let initrd = o.images.join("initramfs.cpio");
    check_file(&o.vmm, "lucos-vmm")?;
    check_file(&kernel, "guest kernel")?;
    check_file(&initrd, "guest initramfs")?;
    for p in &PAIRS {
        check_file(&root().join(p.lucos_ko), "lucos patch module")?;
    }
    check_file(&o.font, "plot font").map_err(|_| {
        format!(
            "plot font {} not found: install Debian's fonts-dejavu-core (images/build.sh does), or pass --font",
            o.font.display()
        )
    })?;
    let dir = std::env::temp_dir().join(format!("lucos-livepatch-compare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let api = Api::new(&dir, &kernel)?;
    let signed = PAIRS
        .iter()
        .zip(1..)
        .map(|(p, version)| api.signed(&root().join(p.lucos_ko), version))
        .collect::<Result<Vec<_>, _>>()?;
    let lane = std::env::var("LUCOS_LANE_INSIDE").unwrap_or_else(|_| "none".into());
    let host_kvm = lucos_vmm::host::HostKvm::detect().to_string();
    eprintln!(
        "[livepatch-compare] lane: {lane}; host KVM: {host_kvm}; booting the guest ({} vCPUs)",
        o.vcpus
    );
    // The whole guest console, kept (next to the plot) to look into a failure.
    let console_log = o.png.with_file_name("livepatch-compare-console.log");
    if let Some(d) = console_log.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let guest = boot_guest(&o, &api, &kernel, &initrd, console_log.clone())?;
    let mut b = Bench {
        o,
        guest,
        api,
        signed,
        uts_sem: String::new(),
        lucos_ids: [None, None],
        kernel,
        initrd,
        console_log,
        restarts: Vec::new(),
    };
    b.prepare()?;

    let t_measure = Instant::now();
    let mut samples = Vec::new();
    let mut traces = Traces::default();
    measure(&mut b, &mut samples, &mut traces)?;
    let measured = t_measure.elapsed();
    let Bench { o, guest, restarts, .. } = b;
    guest.shutdown()?;
    let _ = std::fs::remove_dir_all(&dir);

    let rows = summarize(&samples);
    let title = format!(
        "lucos vs Linux livepatch: workload latency around an apply ({} vCPUs, lane: {lane})",
        o.vcpus
    );
    let panels: Vec<plot::Panel> = PAIRS
        .iter()
        .zip(&traces.panels)
        .map(|(p, ws)| plot::Panel {
            title: format!(
                "{} ({}), last run; shaded: from the apply until committed",
                p.function, p.name
            ),
            traces: ws
                .iter()
                .filter_map(|(label, color, w)| trace_of(label.clone(), *color, w))
                .collect(),
        })
        .collect();
    plot::draw(&o.png, &title, &panels, &o.font)?;
    if o.json {
        let r = Report {
            lane,
            host_kvm,
            vcpus: o.vcpus,
            runs: o.runs,
            window_ms: o.window_ms,
            lead_ms: o.lead_ms,
            cost_ms: o.cost_ms,
            png: o.png.display().to_string(),
            restarts: &restarts,
            rows: &rows,
            samples: &samples,
        };
        println!("{}", serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?);
    } else {
        let header = format!(
            "livepatch-compare: {} runs, {} vCPUs, lane: {lane} (host KVM: {host_kvm})\n\
             busy = lpc_probe pinned on every vCPU calling the patched function; windows of {} ms;\n\
             ratio = lucos median / livepatch median (below 1: lucos is smaller)",
            o.runs, o.vcpus, o.window_ms
        );
        let mut header = header;
        for r in &restarts {
            header.push_str(&format!(
                "\nNOTE: the guest died in run {} and the run was done again on a new guest ({}): {}",
                r.run + 1,
                r.console_log,
                r.error.lines().next().unwrap_or("")
            ));
        }
        print!("{}", table(&rows, &header));
        println!("plot: {}", o.png.display());
    }
    eprintln!(
        "[livepatch-compare] measured in {:.1} s; plot written to {}",
        measured.as_secs_f64(),
        o.png.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_ratio() {
        let s = stats(&[3.0, 1.0, f64::NAN, 2.0]).unwrap();
        assert_eq!(
            s,
            Stats {
                min: 1.0,
                median: 2.0,
                max: 3.0
            }
        );
        assert_eq!(stats(&[4.0, 1.0]).unwrap().median, 2.5);
        assert!(stats(&[]).is_none());
        let k = stats(&[8.0]);
        assert_eq!(ratio(Some(s), k), Some(0.25));
        assert_eq!(ratio(Some(s), stats(&[0.0])), None);
    }

    #[test]
    fn stalls_are_filled() {
        let mut v = vec![3, 0, 0, 40, 2, 0];
        fill_stalls(&mut v);
        assert_eq!(v, vec![3, 40, 40, 40, 2, 0]);
    }

    #[test]
    fn every_figure_has_a_row() {
        let mut f = BTreeMap::new();
        for &(k, _) in FIGURES {
            f.insert(k, 1.0);
        }
        let samples = vec![Sample {
            pair: "uname",
            system: "lucos",
            run: 0,
            figures: f,
            notes: vec![],
        }];
        let rows = summarize(&samples);
        assert_eq!(rows.len(), PAIRS.len() * (FIGURES.len() + REFERENCE.len()));
        let t = table(&rows, "h");
        assert!(t.contains("apply: time to commit, idle (ms)"));
        assert!(t.contains("1.00 / 1.00 / 1.00"));
    }
}
