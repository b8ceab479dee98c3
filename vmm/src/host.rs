//! What kind of KVM the host has, and the CPU model lucos-vmm gives the guest on it.
//!
//! lucos-vmm decides once, at start, from the host's KVM module (and its parameters):
//!
//! - **Hardware KVM** (`kvm_intel`, `kvm_amd`, or any KVM that is not PVM): the guest gets
//!   every CPU feature `KVM_GET_SUPPORTED_CPUID` offers (XSAVE, AVX/AVX2/AVX-512, SMAP,
//!   SMEP, RDRAND, CX16, …), only the topology leaves are rewritten, and the kernel command
//!   line carries no CPU workaround.
//! - **PVM in native mode** (`/sys/module/kvm_pvm/parameters/pvm_native` = `Y`, a
//!   software-assisted KVM without VMX/SVM): its instruction emulator lacks XSAVE/XRSTOR,
//!   CMPXCHG16B, POPCNT, CLAC/STAC, RDRAND, … and it cannot intercept CPUID for the standard
//!   leaves, so those features are hidden in CPUID *and* turned off on the kernel command
//!   line (`noxsave clearcpuid=…`); the PV features that need hypercalls are hidden
//!   ([`crate::arch::x86_64::cpuid::hide_pv_hypercalls`]); the SYSCALL shim and the emulation
//!   fallbacks run ([`crate::pvm`], [`crate::quirks`]).
//!
//! `lucos-vmm run --print-config` shows the decision without booting.

use std::fmt;
use std::path::Path;

use serde::Serialize;

use crate::arch::x86_64::cpuid;
use crate::pvm::PVM_NATIVE_PARAM;

/// The host's KVM, as far as lucos-vmm's CPU model cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKvm {
    /// `kvm_intel` (VMX).
    KvmIntel,
    /// `kvm_amd` (SVM).
    KvmAmd,
    /// PVM in native mode (software-assisted, no VMX/SVM).
    PvmNative,
    /// A KVM none of the above modules claims (built in, or another backend): treated as
    /// hardware KVM.
    Other,
}

impl HostKvm {
    /// Looks at the loaded KVM modules under `/sys/module`.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// [`HostKvm::detect`] against another sysfs module folder (tests).
    pub fn detect_in(modules: &Path) -> Self {
        let pvm_param = modules.join(
            Path::new(PVM_NATIVE_PARAM)
                .strip_prefix("/sys/module")
                .expect("PVM_NATIVE_PARAM is under /sys/module"),
        );
        let pvm_native = std::fs::read_to_string(pvm_param)
            .map(|s| s.trim() == "Y")
            .unwrap_or(false);
        if pvm_native {
            HostKvm::PvmNative
        } else if modules.join("kvm_intel").is_dir() {
            HostKvm::KvmIntel
        } else if modules.join("kvm_amd").is_dir() {
            HostKvm::KvmAmd
        } else {
            HostKvm::Other
        }
    }

    /// True for a software-assisted KVM that needs lucos-vmm's workarounds.
    pub fn is_pvm(self) -> bool {
        self == HostKvm::PvmNative
    }
}

impl fmt::Display for HostKvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostKvm::KvmIntel => "kvm_intel (hardware virtualization, VMX)",
            HostKvm::KvmAmd => "kvm_amd (hardware virtualization, SVM)",
            HostKvm::PvmNative => "kvm_pvm in native mode (software-assisted, no VMX/SVM)",
            HostKvm::Other => "KVM (module not identified; treated as hardware KVM)",
        })
    }
}

/// The kernel command line every guest gets by default.
///
/// - `console=ttyS0`: the 8250 console; `8250.nr_uarts=1 pci=off`: skip absent hardware.
/// - `reboot=k`: reboot through the i8042 reset line the VMM watches; `panic=1`: a panic
///   resets at once (the VMM reports it as a crash, having seen the panic line).
/// - `tsc=reliable no_timer_check`: skip clocksource watchdog and timer checks that are slow
///   and flaky when VM exits are expensive.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off 8250.nr_uarts=1 no_timer_check tsc=reliable";

/// PVM only: keep the guest kernel off instructions PVM's emulator cannot execute
/// (XSAVE/XRSTOR, CMPXCHG16B=141, POPCNT=151, FSGSBASE=288, RDSEED=306, SMAP's
/// CLAC/STAC=308, RDRAND=158, RDPID=534). PVM does not apply KVM_SET_CPUID2 to the standard
/// leaves the guest sees, so hiding them in CPUID is not enough there. clearcpuid taints
/// the kernel (TAINT_CPU_OUT_OF_SPEC).
pub const PVM_CMDLINE: &str = "noxsave clearcpuid=141,151,288,306,308,158,534";

/// What lucos-vmm changes in the guest's CPU for one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CpuPolicy {
    /// The host's KVM.
    pub host: HostKvm,
    /// Hide CMPXCHG16B and the XSAVE family (with AVX and everything built on XSAVE) in
    /// CPUID: instructions the host's emulator cannot run.
    pub hide_emulator_gaps: bool,
    /// Hide KVM's hypercall-based PV features (PV IPI, spinlock kick, yield, TLB flush).
    pub hide_pv_hypercalls: bool,
    /// Install the SYSCALL shim and the emulation fallbacks ([`crate::pvm`], [`crate::quirks`]).
    pub pvm_quirks: bool,
    /// Words added to [`BASE_CMDLINE`] for this host.
    pub cmdline_workarounds: &'static str,
}

impl CpuPolicy {
    /// The policy for `host`.
    pub fn for_host(host: HostKvm) -> Self {
        let pvm = host.is_pvm();
        CpuPolicy {
            host,
            hide_emulator_gaps: pvm,
            hide_pv_hypercalls: pvm,
            pvm_quirks: pvm,
            cmdline_workarounds: if pvm { PVM_CMDLINE } else { "" },
        }
    }

    /// The policy for this machine's KVM.
    pub fn detect() -> Self {
        Self::for_host(HostKvm::detect())
    }

    /// The default kernel command line on this host.
    pub fn default_cmdline(&self) -> String {
        if self.cmdline_workarounds.is_empty() {
            BASE_CMDLINE.to_string()
        } else {
            format!("{BASE_CMDLINE} {}", self.cmdline_workarounds)
        }
    }
}

/// One CPU feature in [`CpuReport`].
#[derive(Debug, Clone, Serialize)]
pub struct FeatureReport {
    /// The flag's name in `/proc/cpuinfo`.
    pub name: &'static str,
    /// KVM_GET_SUPPORTED_CPUID offers it.
    pub kvm: bool,
    /// The guest kernel will use it: in its CPUID and not turned off on its command line.
    pub guest: bool,
}

/// What `lucos-vmm run --print-config` prints.
#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    /// The host's KVM.
    pub host: HostKvm,
    /// The decisions taken for it.
    pub policy: CpuPolicy,
    /// The guest's full kernel command line.
    pub cmdline: String,
    /// [`crate::arch::x86_64::cpuid::REPORTED_FEATURES`], offered and given.
    pub features: Vec<FeatureReport>,
}

impl CpuReport {
    /// Builds the report from `/dev/kvm`'s supported CPUID for `policy` and `cmdline`.
    pub fn new(policy: CpuPolicy, cmdline: String, vcpus: u8) -> Result<Self, kvm_ioctls::Error> {
        let kvm = kvm_ioctls::Kvm::new()?;
        let offered = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?;
        let offered = offered.as_slice();
        let mut guest = offered.to_vec();
        cpuid::filter(&mut guest, 0, vcpus, policy.hide_emulator_gaps);
        let cleared = cleared_by_cmdline(&cmdline);
        let features = cpuid::REPORTED_FEATURES
            .iter()
            .map(|f| FeatureReport {
                name: f.name,
                kvm: f.present(offered),
                guest: f.present(&guest) && !cleared.contains(&f.name),
            })
            .collect();
        Ok(CpuReport {
            host: policy.host,
            policy,
            cmdline,
            features,
        })
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let p = &self.policy;
        let mut work = Vec::new();
        if p.hide_emulator_gaps {
            work.push("CPUID hides CMPXCHG16B and the XSAVE family (AVX, AVX2, AVX-512, ...)".to_string());
        }
        if p.hide_pv_hypercalls {
            work.push("CPUID hides KVM's hypercall PV features (PV IPI, spinlock kick, yield, TLB flush)".into());
        }
        if p.pvm_quirks {
            work.push("SYSCALL shim and emulation fallbacks (int3, fwait, sysretq)".into());
        }
        if !p.cmdline_workarounds.is_empty() {
            work.push(format!("kernel command line adds '{}'", p.cmdline_workarounds));
        }
        let mut s = format!(
            "host KVM:     {}
",
            self.host
        );
        if work.is_empty() {
            s.push_str(
                "workarounds:  none (the guest gets what KVM offers)
",
            );
        } else {
            s.push_str(
                "workarounds:
",
            );
            for w in work {
                s.push_str(&format!(
                    "  - {w}
"
                ));
            }
        }
        s.push_str(&format!(
            "kernel command line: {}
",
            self.cmdline
        ));
        s.push_str(
            "CPU feature   KVM offers   guest gets
",
        );
        for f in &self.features {
            let yn = |b: bool| if b { "yes" } else { "no" };
            s.push_str(&format!(
                "  {:<11} {:<12} {}
",
                f.name,
                yn(f.kvm),
                yn(f.guest)
            ));
        }
        s
    }
}

/// The reported features a kernel command line turns off: `noxsave` (XSAVE and what needs
/// it) and `clearcpuid=N,...` (Linux's X86_FEATURE numbers).
fn cleared_by_cmdline(cmdline: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    for word in cmdline.split_whitespace() {
        if word == "noxsave" {
            out.extend(["xsave", "avx", "avx2", "avx512f"]);
        } else if let Some(list) = word.strip_prefix("clearcpuid=") {
            for n in list.split(',').filter_map(|n| n.parse::<u32>().ok()) {
                out.extend(
                    cpuid::REPORTED_FEATURES
                        .iter()
                        .filter(|f| f.linux_number() == n)
                        .map(|f| f.name),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysfs(modules: &[&str], pvm_native: Option<&str>) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "lucos-host-test-{}-{}",
            std::process::id(),
            modules.join("-") + pvm_native.unwrap_or("")
        ));
        let _ = std::fs::remove_dir_all(&d);
        for m in modules {
            std::fs::create_dir_all(d.join(m)).unwrap();
        }
        if let Some(v) = pvm_native {
            std::fs::create_dir_all(d.join("kvm_pvm/parameters")).unwrap();
            std::fs::write(d.join("kvm_pvm/parameters/pvm_native"), v).unwrap();
        }
        d
    }

    #[test]
    fn detects_each_kind() {
        assert_eq!(HostKvm::detect_in(&sysfs(&["kvm", "kvm_amd"], None)), HostKvm::KvmAmd);
        assert_eq!(
            HostKvm::detect_in(&sysfs(&["kvm", "kvm_intel"], None)),
            HostKvm::KvmIntel
        );
        assert_eq!(HostKvm::detect_in(&sysfs(&["kvm"], Some("Y\n"))), HostKvm::PvmNative);
        // PVM loaded but not in native mode runs only PVM-aware guests: no workaround helps.
        assert_eq!(HostKvm::detect_in(&sysfs(&["kvm"], Some("N\n"))), HostKvm::Other);
        assert_eq!(HostKvm::detect_in(&sysfs(&["kvm"], None)), HostKvm::Other);
    }

    #[test]
    fn pvm_cmdline_clears_what_it_says() {
        let c = cleared_by_cmdline(PVM_CMDLINE);
        for f in [
            "cx16", "popcnt", "fsgsbase", "rdseed", "smap", "rdrand", "rdpid", "xsave", "avx", "avx2",
        ] {
            assert!(c.contains(&f), "{f}: {c:?}");
        }
        assert!(!c.contains(&"smep"));
        assert!(cleared_by_cmdline(BASE_CMDLINE).is_empty());
    }

    #[test]
    fn workarounds_only_on_pvm() {
        for host in [HostKvm::KvmAmd, HostKvm::KvmIntel, HostKvm::Other] {
            let p = CpuPolicy::for_host(host);
            assert!(
                !p.hide_emulator_gaps && !p.hide_pv_hypercalls && !p.pvm_quirks,
                "{host}"
            );
            assert_eq!(p.default_cmdline(), BASE_CMDLINE);
            assert!(!p.default_cmdline().contains("clearcpuid"));
        }
        let p = CpuPolicy::for_host(HostKvm::PvmNative);
        assert!(p.hide_emulator_gaps && p.hide_pv_hypercalls && p.pvm_quirks);
        assert_eq!(p.default_cmdline(), format!("{BASE_CMDLINE} {PVM_CMDLINE}"));
    }
}
