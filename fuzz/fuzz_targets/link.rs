//! Fuzz target: parse, then link at a fixed patch-region address against a fake kernel
//! symbol table, then patch the alternatives, as an apply does before it touches the guest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lucos_update_server::{alternatives, link, module::PatchModule};

/// Where the VMM's patch region starts in a 1 GiB guest (kernel high map).
const BASE: u64 = 0xffff_ffff_bf00_0000;

/// Every kernel symbol resolves, to an address derived from its name, except names
/// starting with `missing`; some land far away so that 32-bit relocations overflow.
fn kernel(name: &str) -> Option<u64> {
    if name.starts_with("missing") {
        return None;
    }
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    Some(match h % 4 {
        0 => 0xffff_ffff_8100_0000 + (h >> 40),
        1 => h >> 44,
        2 => h,
        _ => 0xffff_ffff_8200_0000 + (h >> 48),
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(m) = PatchModule::parse(data) else {
        return;
    };
    let Ok(mut linked) = link::link(&m, BASE, &kernel) else {
        return;
    };
    let mut caps = vec![0u32; 24];
    caps[9] = 1 << 20;
    let _ = alternatives::apply(&m, &mut linked, &caps);
    for r in &m.replaces {
        let _ = linked.addr_of(r.new_load_idx, r.new_offset);
    }
});
