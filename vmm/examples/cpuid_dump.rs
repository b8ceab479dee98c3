//! Prints KVM_GET_SUPPORTED_CPUID before and after the lucos filter (debug aid).
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;

fn main() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let c = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).expect("cpuid");
    let mut e = c.as_slice().to_vec();
    for x in &e {
        println!(
            "raw  {:#010x}.{:<2} f{} eax={:08x} ebx={:08x} ecx={:08x} edx={:08x}",
            x.function, x.index, x.flags, x.eax, x.ebx, x.ecx, x.edx
        );
    }
    lucos_vmm::boot::cpuid::filter(&mut e, 0, 1);
    for x in &e {
        println!(
            "filt {:#010x}.{:<2} f{} eax={:08x} ebx={:08x} ecx={:08x} edx={:08x}",
            x.function, x.index, x.flags, x.eax, x.ebx, x.ecx, x.edx
        );
    }
}
