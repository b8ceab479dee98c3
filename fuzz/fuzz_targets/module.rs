//! Fuzz target: the patch module parser. A signature proves who sent a module, not that it
//! is well formed: any input must parse or be refused, never panic or exhaust memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lucos_update_server::module::PatchModule;

fuzz_target!(|data: &[u8]| {
    let _ = PatchModule::parse(data);
});
