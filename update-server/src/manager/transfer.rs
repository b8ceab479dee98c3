//! Data patches: the globals a patch converts, converting their values in the pause that
//! installs or removes the jumps, and the write rule that converts old-unit writes during
//! the transition.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::patch::DataPatch;
use super::{owner, ApplyError, Manager};
use crate::guest::{Guest, GuestError, WriteRule};
use crate::module::PatchModule;

pub(super) fn read_uint(g: &dyn Guest, addr: u64, size: u64) -> Result<u64, GuestError> {
    let mut b = [0u8; 8];
    g.read(addr, &mut b[..size as usize])?;
    Ok(u64::from_le_bytes(b))
}

pub(super) fn write_uint(g: &dyn Guest, addr: u64, size: u64, v: u64) -> Result<(), GuestError> {
    g.write(addr, &v.to_le_bytes()[..size as usize])
}

/// The write rule while a data patch is in a transition. Every trapped write on the
/// page is counted in `faults`. A whole-object write is converted with `conv` when the
/// writer's RIP is outside the patch image `image` (apply: old code writes old units) or,
/// with `from_image`, inside it (rollback: the patch's code writes new units); everything
/// else is stored as written.
fn transfer_rule(
    size: u64,
    image: (u64, u64),
    from_image: bool,
    conv: impl Fn(u64) -> u64 + Send + Sync + 'static,
    faults: Arc<AtomicU64>,
    converted: Arc<AtomicU64>,
) -> WriteRule {
    Arc::new(move |off: i64, bytes: &[u8], rip: u64| {
        faults.fetch_add(1, Ordering::Relaxed);
        let in_image = rip >= image.0 && rip < image.1;
        if off == 0 && bytes.len() as u64 == size && in_image == from_image {
            let mut b = [0u8; 8];
            b[..bytes.len()].copy_from_slice(bytes);
            converted.fetch_add(1, Ordering::Relaxed);
            return conv(u64::from_le_bytes(b)).to_le_bytes()[..bytes.len()].to_vec();
        }
        bytes.to_vec()
    })
}

impl Manager {
    /// Finds and checks the globals a module's data rules name.
    pub(super) fn resolve_data(g: &dyn Guest, m: &PatchModule) -> Result<Vec<DataPatch>, ApplyError> {
        let range = |a: &str, b: &str| Some((g.symbol(a).ok()?.0, g.symbol(b).ok()?.0));
        let text = range("_stext", "_etext");
        let rodata = range("__start_rodata", "__end_rodata");
        let mut out: Vec<DataPatch> = Vec::new();
        for r in &m.data {
            let (addr, size) = g.symbol(&r.name).map_err(|source| ApplyError::DataObject {
                name: r.name.clone(),
                source,
            })?;
            let bad = |why: String| ApplyError::BadDataObject {
                name: r.name.clone(),
                addr,
                size,
                why,
            };
            for (what, rng) in [("kernel text", text), ("read-only data", rodata)] {
                if let Some((lo, hi)) = rng {
                    if addr < hi && addr + size.max(1) > lo {
                        return Err(bad(format!("it lies in {what}")));
                    }
                }
            }
            if size != 4 && size != 8 {
                return Err(bad("only 4- and 8-byte integers can be scaled".into()));
            }
            if let Some(o) = out.iter().find(|o| o.addr >> 12 == addr >> 12) {
                return Err(bad(format!("it shares a page with '{}' of the same patch", o.name)));
            }
            out.push(DataPatch {
                name: r.name.clone(),
                addr,
                size,
                mul: r.mul,
                div: r.div,
                protected: false,
                faults: Arc::default(),
                converted: Arc::default(),
            });
        }
        Ok(out)
    }
}

/// With the world stopped: converts each data object's value (forward on apply,
/// backward on rollback) and write-protects it with the matching transfer rule. On
/// failure every value and protection is restored.
pub(super) fn transfer_data(
    g: &dyn Guest,
    data: &[DataPatch],
    id: u32,
    image: (u64, u64),
    install: bool,
) -> Result<(), ApplyError> {
    if data.is_empty() {
        return Ok(());
    }
    let who = owner(id);
    if !install {
        // The forward protection is still there if the patch never committed.
        let _ = g.unprotect(&who);
    }
    let mut done: Vec<(u64, u64, u64)> = Vec::new();
    let result = (|| -> Result<(), ApplyError> {
        for d in data {
            let v = read_uint(g, d.addr, d.size)?;
            let rule = d.rule();
            let nv = if install { rule.forward(v) } else { rule.backward(v) };
            write_uint(g, d.addr, d.size, nv)?;
            done.push((d.addr, d.size, v));
            let conv = move |x: u64| if install { rule.forward(x) } else { rule.backward(x) };
            let r = transfer_rule(d.size, image, !install, conv, d.faults.clone(), d.converted.clone());
            g.protect(d.addr, d.size, &who, r)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = g.unprotect(&who);
        for (addr, size, v) in done {
            let _ = write_uint(g, addr, size, v);
        }
    }
    result
}
