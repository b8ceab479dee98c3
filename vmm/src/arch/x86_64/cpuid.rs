//! Guest CPUID: KVM_GET_SUPPORTED_CPUID with the topology leaves rewritten per vCPU. On a
//! host whose emulator cannot run them ([`crate::host::CpuPolicy::hide_emulator_gaps`]:
//! PVM), CMPXCHG16B (`lock cmpxchg16b`) and the XSAVE family (`xrstor`; the guest falls back
//! to FXSAVE/FXRSTOR) are hidden too, with AVX and friends that depend on XSAVE. On hardware
//! KVM the guest gets every feature KVM offers.

use kvm_bindings::kvm_cpuid_entry2;

// Leaf 1 ECX.
const ECX_CX16: u32 = 1 << 13;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
const ECX_FMA: u32 = 1 << 12;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX.
const EDX_HTT: u32 = 1 << 28;
// Leaf 7.0 EBX: AVX2, AVX512F/DQ/IFMA/PF/ER/CD/BW/VL.
const EBX7_AVX_MASK: u32 =
    (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
// Leaf 7.0 ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ, VAES/VPCLMULQDQ (VEX/EVEX).
const ECX7_AVX_MASK: u32 = (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
// Leaf 7.0 EDX: AVX512_4VNNIW/4FMAPS, AMX.
const EDX7_AVX_MASK: u32 = (1 << 2) | (1 << 3) | (1 << 22) | (1 << 24) | (1 << 25);
// Leaf 7.1 EAX: AVX-VNNI, AVX512_BF16.
const EAX71_AVX_MASK: u32 = (1 << 4) | (1 << 5);

/// Rewrites `entries` (from KVM_GET_SUPPORTED_CPUID) for vCPU `cpu` of `vcpus`; with
/// `hide_emulator_gaps`, also hides CMPXCHG16B and the XSAVE family.
pub fn filter(entries: &mut [kvm_cpuid_entry2], cpu: u8, vcpus: u8, hide_emulator_gaps: bool) {
    // Bits needed to number `vcpus` logical processors.
    let core_shift = (vcpus as u32).next_power_of_two().trailing_zeros();
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (1, _) => {
                if hide_emulator_gaps {
                    e.ecx &= !(ECX_CX16 | ECX_XSAVE | ECX_OSXSAVE | ECX_AVX | ECX_F16C | ECX_FMA);
                }
                e.ecx |= ECX_HYPERVISOR;
                // EBX: APIC id (31:24), logical processor count (23:16), CLFLUSH size (15:8).
                e.ebx = ((cpu as u32) << 24) | ((vcpus as u32) << 16) | (8 << 8);
                if vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            (4, _) => {
                // Cores per package - 1 in EAX[31:26]; threads sharing this cache in EAX[25:14].
                e.eax &= 0x3fff;
                e.eax |= ((vcpus as u32 - 1) & 0x3f) << 26;
                let level = (e.eax >> 5) & 0x7;
                if level >= 3 {
                    e.eax |= (vcpus as u32 - 1) << 14;
                }
            }
            (7, 0) if hide_emulator_gaps => {
                e.ebx &= !EBX7_AVX_MASK;
                e.ecx &= !ECX7_AVX_MASK;
                e.edx &= !EDX7_AVX_MASK;
            }
            (7, 1) if hide_emulator_gaps => e.eax &= !EAX71_AVX_MASK,
            (0xb, idx) => {
                // Extended topology: one thread per core, `vcpus` cores per package.
                e.edx = cpu as u32;
                match idx {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | idx;
                    }
                    1 => {
                        e.eax = core_shift;
                        e.ebx = vcpus as u32;
                        e.ecx = (2 << 8) | idx;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = idx;
                    }
                }
            }
            (0xd, _) if hide_emulator_gaps => {
                // No XSAVE: no XSAVE state components.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

/// A CPU feature as `/proc/cpuinfo` names it, and where CPUID reports it.
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    /// The flag in `/proc/cpuinfo`.
    pub name: &'static str,
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u8,
}

#[derive(Debug, Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
}

const fn feature(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// The features `lucos-vmm run --print-config` reports: those a host workaround may hide,
/// and the security features a patched guest relies on.
pub const REPORTED_FEATURES: &[Feature] = &[
    feature("cx16", 1, 0, Reg::Ecx, 13),
    feature("popcnt", 1, 0, Reg::Ecx, 23),
    feature("xsave", 1, 0, Reg::Ecx, 26),
    feature("avx", 1, 0, Reg::Ecx, 28),
    feature("rdrand", 1, 0, Reg::Ecx, 30),
    feature("fsgsbase", 7, 0, Reg::Ebx, 0),
    feature("avx2", 7, 0, Reg::Ebx, 5),
    feature("smep", 7, 0, Reg::Ebx, 7),
    feature("avx512f", 7, 0, Reg::Ebx, 16),
    feature("rdseed", 7, 0, Reg::Ebx, 18),
    feature("smap", 7, 0, Reg::Ebx, 20),
    feature("rdpid", 7, 0, Reg::Ecx, 22),
];

impl Feature {
    /// Linux's `X86_FEATURE_*` number (word * 32 + bit), as `clearcpuid=` takes it.
    pub fn linux_number(&self) -> u32 {
        let word = match (self.leaf, self.subleaf, self.reg) {
            (1, _, Reg::Ecx) => 4,
            (7, 0, Reg::Ebx) => 9,
            (7, 0, Reg::Ecx) => 16,
            _ => unreachable!("REPORTED_FEATURES uses only these registers"),
        };
        word * 32 + self.bit as u32
    }

    /// True when `entries` report this feature.
    pub fn present(&self, entries: &[kvm_cpuid_entry2]) -> bool {
        entries
            .iter()
            .find(|e| e.function == self.leaf && e.index == self.subleaf)
            .is_some_and(|e| {
                let r = match self.reg {
                    Reg::Ebx => e.ebx,
                    Reg::Ecx => e.ecx,
                };
                r & (1 << self.bit) != 0
            })
    }
}

/// KVM's paravirtual feature leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
// Leaf 0x4000_0001 EAX: PV features that work through hypercalls (`vmcall`/`vmmcall`):
// PV spinlock kicks (KVM_HC_KICK_CPU), PV IPIs (KVM_HC_SEND_IPI), PV yield (KVM_HC_SCHED_YIELD).
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
// PV TLB flush: the guest skips the flush IPI to a preempted vCPU and relies on KVM to flush
// its TLB on the next entry (a flag in the steal-time area).
const KVM_FEATURE_PV_TLB_FLUSH: u32 = 1 << 9;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;

/// Hides the KVM PV features a PVM host in native mode does not implement. It does not
/// return from a guest `vmmcall` (seen: the second vCPU's first PV IPI never completes and
/// SMP bring-up hangs), so PV IPIs, PV spinlock kicks and PV yield go; and with PV TLB
/// flush, guest processes crashed on NULL pointers when vCPUs were preempted (seen:
/// busybox segfaults on CPU 1 with two guests sharing two host cores), so it goes too: the
/// guest then sends real flush IPIs. kvm-clock and the other MSR-based features stay.
pub fn hide_pv_hypercalls(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == KVM_CPUID_FEATURES) {
        e.eax &=
            !(KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD | KVM_FEATURE_PV_TLB_FLUSH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn hides_cx16_and_xsave_and_sets_topology() {
        let mut e = vec![
            entry(1, 0, 0x806f8, 0xff00_0800, u32::MAX, u32::MAX),
            entry(7, 0, 0, u32::MAX, u32::MAX, u32::MAX),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 16, 0x201, 7),
            entry(0xd, 0, 7, 0x340, 0x340, 0),
        ];
        let kvm_offers = e.clone();
        filter(&mut e, 1, 2, true);
        assert_eq!(e[0].ecx & (ECX_CX16 | ECX_XSAVE | ECX_OSXSAVE | ECX_AVX), 0);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[0].ebx >> 24, 1, "APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 2, "logical count");
        assert_eq!(e[1].ebx & (1 << 5), 0, "AVX2 hidden");
        assert_ne!(e[1].ebx & 1, 0, "FSGSBASE kept");
        assert_eq!((e[2].edx, e[2].ebx), (1, 1));
        assert_eq!((e[3].eax, e[3].ebx, e[3].edx), (1, 2, 1));
        assert_eq!((e[4].eax, e[4].ebx), (0, 0));

        // Without the emulator gaps, everything KVM offers stays; topology is the same.
        let mut h = kvm_offers.clone();
        filter(&mut h, 1, 2, false);
        for f in REPORTED_FEATURES {
            assert_eq!(f.present(&h), f.present(&kvm_offers), "{}", f.name);
        }
        assert!(REPORTED_FEATURES.iter().all(|f| f.present(&h)));
        assert_eq!(h[0].ebx >> 24, 1, "APIC id");
        assert_eq!((h[4].eax, h[4].ebx), (7, 0x340), "XSAVE leaf kept");
    }

    #[test]
    fn hides_hypercall_pv_features_only() {
        let clocksource2 = 1 << 3;
        let mut e = vec![entry(KVM_CPUID_FEATURES, 0, u32::MAX, 0, 0, 0), entry(1, 0, 0, 0, 0, 0)];
        hide_pv_hypercalls(&mut e);
        assert_eq!(
            e[0].eax & (KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SCHED_YIELD),
            0
        );
        assert_ne!(e[0].eax & clocksource2, 0, "kvm-clock stays");
    }
}
