//! `kpatch-suite`: kpatch's integration tests, run against lucos.
//!
//! A suite directory holds `NAME.patch` (must build and apply), `NAME-FAIL.patch` (must be
//! refused by lucos-build), `NAME-LOADED.test` (a shell script that exits 0 only while
//! `NAME` is applied) and optionally `multiple.test` (every patch with a LOADED test applied
//! at once, all tests pass, rolled back in reverse order). For each case: build with
//! lucos-build; for a LOADED test, check it fails before the apply, passes after, and
//! fails again after the rollback. One guest runs every case. Prints one line per case and
//! `N passed, M failed`; exits 1 if any failed.
//!
//! Patches are built where this program runs (on the host); the guest part runs in the
//! lane given by `--lane` (`images/lane.sh`), which re-runs this program with
//! `--guest-phase` there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use lucos_bench::guest::{BootArgs, Guest};
use lucos_bench::lucos::Api;
use serde::{Deserialize, Serialize};

/// Run kpatch's integration suite against lucos.
///
/// Builds every NAME.patch of the suite with lucos-build, boots one guest and follows
/// kpatch's conventions: NAME-LOADED.test must fail before the apply, pass after it and
/// fail after the rollback; NAME-FAIL.patch must be refused by lucos-build; multiple.test:
/// every patch with a LOADED test applied at once, all tests pass, rolled back in reverse.
/// Tests run inside the guest with its shell (busybox sh), as root; `sudo` runs its
/// command. A patch to a module is applied after the module is loaded (lucos refuses
/// patches to modules that are not loaded: README).
#[derive(Parser, Clone)]
#[command(name = "kpatch-suite", verbatim_doc_comment)]
struct Cli {
    /// The suite directory.
    #[arg(long)]
    suite: PathBuf,
    /// Kernel trees and guest images (images/build.sh's output).
    #[arg(long, default_value = "images/out")]
    images: PathBuf,
    /// lucos-vmm (default: next to this program).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// lucos-build (default: next to this program).
    #[arg(long)]
    lucos_build: Option<PathBuf>,
    /// Working directory (built patches, logs, console); must be under the checkout when
    /// the guest runs in the SVM lane.
    #[arg(long, default_value = "target/kpatch-suite")]
    work: PathBuf,
    /// Where the guest runs: svm, pvm, or auto ($LUCOS_LANE, else directly).
    #[arg(long, default_value = "auto")]
    lane: String,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Guest memory.
    #[arg(long, default_value = "1G")]
    mem: String,
    /// Only these cases (names without .patch).
    #[arg(long)]
    only: Vec<String>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// A list of cases known to fail with lucos today, one `NAME  reason` per line (`#`
    /// starts a comment). The exit status is then 0 when exactly those cases fail: a
    /// failure not in the list fails the run, and so does a listed case that passes (the
    /// list must be kept current). Without it, any failure fails the run.
    #[arg(long, value_name = "FILE")]
    known_failures: Option<PathBuf>,
    /// Internal: run the guest part (inside the lane).
    #[arg(long, hide = true)]
    guest_phase: bool,
}

/// One case's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Outcome {
    name: String,
    passed: bool,
    detail: String,
    seconds: f64,
}

/// What the build phase leaves for the guest phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Built {
    name: String,
    ko: PathBuf,
    modules: Vec<String>,
    loaded_test: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = if cli.guest_phase { guest_phase(&cli) } else { run(&cli) };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("kpatch-suite: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn abs(p: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(p).ok();
    std::fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// The build phase (here), then the guest phase (in the lane).
fn run(cli: &Cli) -> Result<bool, String> {
    let t0 = Instant::now();
    let work = abs(&cli.work)?;
    let images = std::fs::canonicalize(&cli.images)
        .map_err(|e| format!("{}: {e} (run images/build.sh)", cli.images.display()))?;
    let suite = std::fs::canonicalize(&cli.suite).map_err(|e| format!("{}: {e}", cli.suite.display()))?;
    let builder = cli.lucos_build.clone().unwrap_or_else(|| sibling("lucos-build"));
    let mut patches: Vec<String> = std::fs::read_dir(&suite)
        .map_err(|e| format!("{}: {e}", suite.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".patch").map(String::from))
        .filter(|n| cli.only.is_empty() || cli.only.contains(n))
        .collect();
    patches.sort();
    if patches.is_empty() {
        return Err(format!("{} has no .patch files", suite.display()));
    }
    let api = Api::with_keys(&work, &images.join("vmlinux"))?;
    println!(
        "kpatch-suite: {} patch(es) from {}; building with {}",
        patches.len(),
        suite.display(),
        builder.display()
    );
    let mut outcomes = Vec::new();
    let mut built = Vec::new();
    for name in &patches {
        let t = Instant::now();
        let fail = name.ends_with("-FAIL");
        let ko = work.join(format!("{name}.ko"));
        let log = work.join(format!("{name}.build.log"));
        let json = work.join(format!("{name}.build.json"));
        let out = Command::new(&builder)
            .arg("--patch")
            .arg(suite.join(format!("{name}.patch")))
            .arg("--name")
            .arg(name.replace('-', "_"))
            .arg("--tree")
            .arg(&images)
            .arg("--key")
            .arg(api.secret_key())
            .arg("-o")
            .arg(&ko)
            .arg("--json")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", builder.display()))?;
        let _ = std::fs::write(&log, [&out.stderr[..], &out.stdout[..]].concat());
        let _ = std::fs::write(&json, &out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let error = stderr
            .lines()
            .find_map(|l| l.strip_prefix("lucos-build: error: "))
            .unwrap_or("")
            .to_string();
        let secs = t.elapsed().as_secs_f64();
        if fail {
            let refused = out.status.code() == Some(1) && !error.is_empty();
            let o = Outcome {
                name: name.clone(),
                passed: refused,
                detail: if refused {
                    format!("refused by lucos-build: {error}")
                } else {
                    format!(
                        "lucos-build did not refuse it (exit {:?}; log {})",
                        out.status.code(),
                        log.display()
                    )
                },
                seconds: secs,
            };
            print_outcome(&o);
            outcomes.push(o);
            continue;
        }
        if !out.status.success() {
            let o = Outcome {
                name: name.clone(),
                passed: false,
                detail: format!("lucos-build failed: {error} (log {})", log.display()),
                seconds: secs,
            };
            print_outcome(&o);
            outcomes.push(o);
            continue;
        }
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let modules = report["modules"]
            .as_array()
            .map(|a| a.iter().filter_map(|m| m.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let test = suite.join(format!("{name}-LOADED.test"));
        println!("  built {name} in {secs:.1} s");
        built.push(Built {
            name: name.clone(),
            ko,
            modules,
            loaded_test: test.exists().then_some(test),
        });
    }
    let multiple = suite.join("multiple.test").exists() && cli.only.is_empty();
    // The guest part, where the lane says.
    std::fs::write(
        work.join("built.json"),
        serde_json::to_vec_pretty(&(built.clone(), multiple)).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", work.display()))?;
    let lane = if cli.lane == "auto" {
        std::env::var("LUCOS_LANE").unwrap_or_default()
    } else {
        cli.lane.clone()
    };
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut args: Vec<String> = vec![
        "--guest-phase".into(),
        "--suite".into(),
        suite.display().to_string(),
        "--images".into(),
        images.display().to_string(),
        "--work".into(),
        work.display().to_string(),
        "--vcpus".into(),
        cli.vcpus.to_string(),
        "--mem".into(),
        cli.mem.clone(),
    ];
    if let Some(v) = &cli.vmm {
        args.extend(["--vmm".into(), abs_file(v)?.display().to_string()]);
    }
    let results = work.join("guest-results.json");
    let _ = std::fs::remove_file(&results);
    if !built.is_empty() {
        let lane_sh = images.parent().map(|p| p.join("lane.sh")).unwrap_or_default();
        let status = if lane == "svm" {
            Command::new(&lane_sh)
                .arg("svm")
                .arg("--")
                .arg(&me)
                .args(&args)
                .status()
        } else {
            Command::new(&me).args(&args).status()
        }
        .map_err(|e| format!("cannot start the guest phase: {e}"))?;
        match std::fs::read(&results) {
            Ok(b) => outcomes.extend(serde_json::from_slice::<Vec<Outcome>>(&b).map_err(|e| e.to_string())?),
            Err(_) => outcomes.push(Outcome {
                name: "guest".into(),
                passed: false,
                detail: format!("the guest phase ended ({status}) without results"),
                seconds: 0.0,
            }),
        }
    }
    outcomes.sort_by(|a, b| a.name.cmp(&b.name));
    let passed = outcomes.iter().filter(|o| o.passed).count();
    let failed = outcomes.len() - passed;
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcomes).map_err(|e| e.to_string())?
        );
    }
    println!(
        "kpatch-suite: {passed} passed, {failed} failed ({:.0} s)",
        t0.elapsed().as_secs_f64()
    );
    match &cli.known_failures {
        None => Ok(failed == 0),
        Some(path) => {
            let known = read_known_failures(path)?;
            let selected = |n: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == n);
            let mut ok = true;
            for o in &outcomes {
                match (o.passed, known.iter().find(|(n, _)| *n == o.name)) {
                    (false, None) => {
                        println!("kpatch-suite: {} failed and is not a known failure", o.name);
                        ok = false;
                    }
                    (true, Some(_)) => {
                        println!(
                            "kpatch-suite: {} passed but is listed in {}: take it out",
                            o.name,
                            path.display()
                        );
                        ok = false;
                    }
                    (false, Some((_, why))) => println!("kpatch-suite: {} fails as known: {why}", o.name),
                    (true, None) => {}
                }
            }
            for (n, _) in known.iter().filter(|(n, _)| selected(n)) {
                if !outcomes.iter().any(|o| &o.name == n) {
                    println!(
                        "kpatch-suite: {n} is listed in {} but is not in the suite",
                        path.display()
                    );
                    ok = false;
                }
            }
            Ok(ok)
        }
    }
}

/// `NAME  reason` lines of a known-failures list.
fn read_known_failures(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(parse_known_failures(&text))
}

fn parse_known_failures(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once(char::is_whitespace) {
            Some((n, why)) => (n.to_string(), why.trim().to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect()
}

fn abs_file(p: &Path) -> Result<PathBuf, String> {
    std::fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn print_outcome(o: &Outcome) {
    println!(
        "{} {} ({:.1} s): {}",
        if o.passed { "PASS" } else { "FAIL" },
        o.name,
        o.seconds,
        o.detail
    );
}

/// The guest: one boot, every built case.
fn guest_phase(cli: &Cli) -> Result<bool, String> {
    let work = abs(&cli.work)?;
    let images = abs_file(&cli.images)?;
    let (built, multiple): (Vec<Built>, bool) =
        serde_json::from_slice(&std::fs::read(work.join("built.json")).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let mut api = Api::with_keys(&work, &images.join("vmlinux"))?;
    // A Unix socket cannot live on the lane's shared (9p) checkout.
    api.sock = std::env::temp_dir().join(format!("kpatch-suite-{}.sock", std::process::id()));
    let vmm = cli.vmm.clone().unwrap_or_else(|| sibling("lucos-vmm"));
    let (kernel, initrd) = (images.join("vmlinux"), images.join("initramfs.cpio"));
    let _ = std::fs::remove_file(&api.sock);
    let boot = BootArgs {
        vmm: &vmm,
        kernel: &kernel,
        initrd: &initrd,
        vcpus: cli.vcpus,
        mem: &cli.mem,
        extra: api.vmm_args(),
        timeout: Duration::from_secs(600),
    };
    let mut g = Guest::boot(&boot, work.join("console.log"))?;
    let t = Duration::from_secs(120);
    // What kpatch's tests expect of the system: root with sudo, debugfs mounted.
    g.run("dmesg -n 1; mount -t debugfs none /sys/kernel/debug 2>/dev/null; printf '#!/bin/sh\\nexec \"$@\"\\n' > /bin/sudo; chmod +x /bin/sudo", t)?;
    let mut outcomes = Vec::new();
    let mut tests: BTreeMap<String, String> = BTreeMap::new();
    for b in &built {
        if let Some(tp) = &b.loaded_test {
            let text = std::fs::read(tp).map_err(|e| format!("{}: {e}", tp.display()))?;
            let path = format!("/tmp/{}-LOADED.test", b.name);
            put_file(&mut g, &path, &text)?;
            tests.insert(b.name.clone(), path);
        }
    }
    for b in &built {
        let t0 = Instant::now();
        let r = one_case(&mut g, &api, b, tests.get(&b.name));
        let o = Outcome {
            name: b.name.clone(),
            passed: r.is_ok(),
            detail: match r {
                Ok(d) => d,
                Err(e) => e,
            },
            seconds: t0.elapsed().as_secs_f64(),
        };
        print_outcome(&o);
        outcomes.push(o);
        if g.lost() {
            break;
        }
    }
    if multiple && !g.lost() {
        let t0 = Instant::now();
        let with_tests: Vec<&Built> = built.iter().filter(|b| tests.contains_key(&b.name)).collect();
        let r = multiple_case(&mut g, &api, &with_tests, &tests);
        let o = Outcome {
            name: "multiple".into(),
            passed: r.is_ok(),
            detail: match r {
                Ok(d) => d,
                Err(e) => e,
            },
            seconds: t0.elapsed().as_secs_f64(),
        };
        print_outcome(&o);
        outcomes.push(o);
    }
    let _ = g.shutdown();
    std::fs::write(
        work.join("guest-results.json"),
        serde_json::to_vec_pretty(&outcomes).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    Ok(outcomes.iter().all(|o| o.passed))
}

/// Writes a file in the guest through its shell (base64 on one console line).
fn put_file(g: &mut Guest, path: &str, data: &[u8]) -> Result<(), String> {
    let b64 = base64(data);
    if b64.len() > 3000 {
        return Err(format!("{path}: {} bytes is too long for the console", data.len()));
    }
    g.run(&format!("echo {b64} | base64 -d > {path}"), Duration::from_secs(30))?;
    Ok(())
}

fn base64(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                s.push(T[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Runs a LOADED test in the guest: its exit status and output.
fn run_test(g: &mut Guest, path: &str) -> Result<(i32, Vec<String>), String> {
    let mut out = g.run(&format!("sh {path} </dev/null; echo @@RC=$?"), Duration::from_secs(120))?;
    let rc = out
        .pop()
        .and_then(|l| l.trim().strip_prefix("@@RC=").and_then(|v| v.parse().ok()))
        .ok_or("the test's exit status was not printed")?;
    Ok((rc, out))
}

fn load_modules(g: &mut Guest, b: &Built) -> Result<(), String> {
    for m in &b.modules {
        let out = g.run(&format!("modprobe {m} 2>&1; echo @@RC=$?"), Duration::from_secs(120))?;
        if out.last().map(|l| l.trim()) != Some("@@RC=0") {
            return Err(format!("modprobe {m} failed in the guest: {}", out.join(" | ")));
        }
    }
    Ok(())
}

fn apply(g: &mut Guest, api: &Api, b: &Built) -> Result<u32, String> {
    load_modules(g, b)?;
    let signed = std::fs::read(&b.ko).map_err(|e| format!("{}: {e}", b.ko.display()))?;
    api.apply(&signed, Duration::from_secs(120))
        .map(|t| t.id)
        .map_err(|e| format!("apply: {e}"))
}

fn one_case(g: &mut Guest, api: &Api, b: &Built, test: Option<&String>) -> Result<String, String> {
    let Some(test) = test else {
        let id = apply(g, api, b)?;
        api.rollback(id, Duration::from_secs(120))
            .map_err(|e| format!("rollback: {e}"))?;
        return Ok("built, applied, committed, rolled back".into());
    };
    let (rc, out) = run_test(g, test)?;
    if rc == 0 {
        return Err(format!("the LOADED test passes before the apply: {}", out.join(" | ")));
    }
    let id = apply(g, api, b)?;
    let (rc, out) = run_test(g, test)?;
    if rc != 0 {
        let _ = api.rollback(id, Duration::from_secs(120));
        return Err(format!(
            "the LOADED test fails with the patch applied (exit {rc}): {}",
            out.join(" | ")
        ));
    }
    api.rollback(id, Duration::from_secs(120))
        .map_err(|e| format!("rollback: {e}"))?;
    let (rc, out) = run_test(g, test)?;
    if rc == 0 {
        return Err(format!(
            "the LOADED test still passes after the rollback: {}",
            out.join(" | ")
        ));
    }
    Ok("LOADED test: fails before, passes applied, fails rolled back".into())
}

fn multiple_case(
    g: &mut Guest,
    api: &Api,
    built: &[&Built],
    tests: &BTreeMap<String, String>,
) -> Result<String, String> {
    let mut ids = Vec::new();
    let mut result = Ok(());
    for b in built {
        match apply(g, api, b) {
            Ok(id) => ids.push(id),
            Err(e) => {
                result = Err(format!("{}: {e}", b.name));
                break;
            }
        }
    }
    if result.is_ok() {
        for b in built {
            let (rc, out) = run_test(g, &tests[&b.name])?;
            if rc != 0 {
                result = Err(format!(
                    "{}-LOADED.test fails with all applied: {}",
                    b.name,
                    out.join(" | ")
                ));
                break;
            }
        }
    }
    for id in ids.iter().rev() {
        if let Err(e) = api.rollback(*id, Duration::from_secs(120)) {
            result = result.and(Err(format!("rollback of {id}: {e}")));
        }
    }
    result?;
    for b in built {
        let (rc, _) = run_test(g, &tests[&b.name])?;
        if rc == 0 {
            return Err(format!("{}-LOADED.test passes after all were rolled back", b.name));
        }
    }
    Ok(format!(
        "{} applied together, all LOADED tests pass, rolled back in reverse",
        built.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_and_base64() {
        Cli::command().debug_assert();
        assert_eq!(base64(b"grep -q x"), "Z3JlcCAtcSB4");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
    }

    #[test]
    fn known_failures_are_name_and_reason_lines() {
        let k = parse_known_failures("# header\n\nmodule   needs __dyndbg # why\nsyscall\n");
        assert_eq!(
            k,
            vec![
                ("module".to_string(), "needs __dyndbg".to_string()),
                ("syscall".to_string(), String::new())
            ]
        );
    }
}
