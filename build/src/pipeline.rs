//! The whole of `lucos-build`: diff → units → compile before and after → compare →
//! patch object → self-check with the update server's own parser → sign.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use lucos_update_server::module::PatchModule;
use lucos_vmm::introspect::btf::KernelBtf;
use lucos_vmm::introspect::Vmlinux;
use thiserror::Error;

use crate::compile::{self, CompileError, Side};
use crate::diff::{self, Facts, UnitDiff};
use crate::elf::{ElfError, Obj};
use crate::emit::{self, EmitError, Emitted, UnitInput};
use crate::ksyms::{KsymError, ModuleSyms, UnitNamer, VmlinuxSyms};
use crate::patchfile::{self, FileKind, PatchFileError};
use crate::special::Specials;
use crate::tree::{Tree, TreeError, Unit};

/// Why no patch was built. Every refusal leaves the output file unwritten.
#[derive(Debug, Error)]
pub enum BuildError {
    /// A patch file is unreadable or not a diff.
    #[error(transparent)]
    Patch(#[from] PatchFileError),
    /// The kernel trees are missing or unreadable.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// A compile step failed.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// An object could not be read.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// A kernel symbol could not be named.
    #[error(transparent)]
    Symbol(#[from] KsymError),
    /// Writing the patch object failed, or it needs something lucos cannot provide.
    #[error(transparent)]
    Emit(#[from] EmitError),
    /// The diff changes something a live patch cannot (the message says what and why).
    #[error("{0}")]
    Refused(String),
    /// The patch object the tool wrote is not one the update server accepts.
    #[error("the update server would refuse the patch: {0}")]
    SelfCheck(String),
    /// Other I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    /// The diffs, applied in order.
    pub patches: Vec<PathBuf>,
    /// The patch name (`LUCOS_PATCH` name: what `lucosctl list` shows).
    pub name: String,
    /// Free text for `lucosctl status`.
    pub description: String,
    /// The kernel trees.
    pub tree: Tree,
    /// Scratch directory (kept when the caller asks).
    pub work: PathBuf,
    /// Parallel compile jobs.
    pub jobs: usize,
}

/// A changed function, for the report.
pub use emit::Replaced;

/// What `lucos-build` did, for the progress lines and `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Patch name.
    pub name: String,
    /// Units compiled (objects).
    pub units: Vec<String>,
    /// Modules the patch changes (its functions there are linked against the loaded module).
    pub modules: Vec<String>,
    /// Replaced functions.
    pub replaced: Vec<Replaced>,
    /// New functions and data in the patch.
    pub new_functions: Vec<String>,
    /// New data objects.
    pub new_data: Vec<String>,
    /// Functions of `__init`/`__exit` code that changed and are not patched.
    pub init_changed: Vec<String>,
    /// Changed read-only data taken as new copies.
    pub renewed_data: Vec<String>,
    /// Warnings.
    pub warnings: Vec<String>,
    /// Seconds spent compiling (wall clock).
    pub compile_s: f64,
    /// Seconds in all.
    pub total_s: f64,
    /// Size of the patch object in bytes.
    pub bytes: usize,
}

/// The symbol versions genksyms gave a unit's exports on one side: (unit, side, name → CRC).
type UnitCrcs = (usize, Side, Vec<(String, String)>);

/// Prints a progress line on stderr.
pub fn progress(msg: &str) {
    eprintln!("lucos-build: {msg}");
}

/// Runs jobs on `n` threads; returns the first error.
fn parallel<T: Send, E: Send>(n: usize, jobs: Vec<T>, f: impl Fn(T) -> Result<(), E> + Sync) -> Result<(), E> {
    let queue = Mutex::new(jobs);
    let err: Mutex<Option<E>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..n.max(1) {
            s.spawn(|| loop {
                if err.lock().map(|e| e.is_some()).unwrap_or(true) {
                    return;
                }
                let Some(job) = queue.lock().ok().and_then(|mut q| q.pop()) else {
                    return;
                };
                if let Err(e) = f(job) {
                    if let Ok(mut slot) = err.lock() {
                        slot.get_or_insert(e);
                    }
                    return;
                }
            });
        }
    });
    match err.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Builds the patch; returns the patch object's bytes (unsigned) and the report.
pub fn build(opts: &Options) -> Result<(Vec<u8>, Report), BuildError> {
    let t0 = Instant::now();
    let tree = &opts.tree;
    let mut warnings = Vec::new();
    // 1. What the diffs change.
    let mut changes = Vec::new();
    for p in &opts.patches {
        changes.extend(patchfile::read(p)?);
    }
    let mut sources = Vec::new();
    let mut headers = Vec::new();
    for c in &changes {
        match c.kind() {
            FileKind::CSource => sources.push(c.path.clone()),
            FileKind::Header => headers.push(c.path.clone()),
            FileKind::Assembly => {
                return Err(BuildError::Refused(format!(
                    "{} is assembly: lucos-build patches C code only (assembly has no function sections to compare, and entry code cannot be redirected)",
                    c.path
                )))
            }
            FileKind::Other if c.path.starts_with("Documentation/") || c.path.ends_with(".rst") || c.path.ends_with(".txt") => {
                warnings.push(format!("{}: documentation, ignored", c.path));
            }
            FileKind::Other => {
                return Err(BuildError::Refused(format!(
                    "{} is not C source: changes to the build system, Kconfig or scripts need a new kernel build, not a live patch",
                    c.path
                )))
            }
        }
        if c.created && c.kind() == FileKind::CSource {
            return Err(BuildError::Refused(format!(
                "{} is a new file: it needs a Makefile change; put new code into an existing file",
                c.path
            )));
        }
    }
    sources.sort();
    sources.dedup();
    headers.sort();
    headers.dedup();
    // 2. Units: the changed C files and every unit including a changed header.
    progress(&format!(
        "{} patch file(s): {} C file(s), {} header(s) changed; reading the build tree {}",
        opts.patches.len(),
        sources.len(),
        headers.len(),
        tree.build.display()
    ));
    let index = tree.index()?;
    let mut units: Vec<Unit> = Vec::new();
    for s in &sources {
        let u = index.by_source(s).ok_or_else(|| {
            BuildError::Refused(format!(
                "{s} is not compiled in this kernel's configuration (no object built from it in {})",
                tree.build.display()
            ))
        })?;
        units.push(u.clone());
    }
    if !headers.is_empty() {
        for u in &index.units {
            if units.iter().any(|x| x.object == u.object) {
                continue;
            }
            for h in &headers {
                if u.includes(tree, h)? {
                    units.push(u.clone());
                    break;
                }
            }
        }
    }
    if units.is_empty() {
        return Err(BuildError::Refused(
            "the diff changes no C file compiled in this kernel".into(),
        ));
    }
    units.sort_by(|a, b| a.object.cmp(&b.object));
    let modules: Vec<String> = {
        let mut m: Vec<String> = units.iter().filter_map(|u| u.module.clone()).collect();
        m.sort();
        m.dedup();
        m
    };
    // 3. Scratch tree with the diffs applied.
    let scratch = opts.work.join("src");
    let _ = std::fs::remove_dir_all(&opts.work);
    std::fs::create_dir_all(&scratch).map_err(|source| BuildError::Io {
        path: scratch.clone(),
        source,
    })?;
    let touched: Vec<String> = changes.iter().map(|c| c.path.clone()).collect();
    compile::make_scratch(tree, &scratch, &touched, &opts.patches)?;
    let include = opts.work.join("include");
    write_headers(&include)?;
    // 4. Compile before and after.
    let tc = Instant::now();
    progress(&format!(
        "compiling {} unit(s) before and after the diff ({} jobs): {}",
        units.len(),
        opts.jobs,
        units.iter().map(|u| u.object.as_str()).collect::<Vec<_>>().join(", ")
    ));
    let mut jobs = Vec::new();
    for (i, u) in units.iter().enumerate() {
        for side in [Side::Original, Side::Patched] {
            let out = opts.work.join(side.dir()).join(&u.object);
            jobs.push((i, side, out));
        }
    }
    let crc: Mutex<Vec<UnitCrcs>> = Mutex::new(Vec::new());
    parallel(opts.jobs, jobs, |(i, side, out)| -> Result<(), BuildError> {
        let u = &units[i];
        if let Some(d) = out.parent() {
            std::fs::create_dir_all(d).map_err(|source| BuildError::Io { path: d.into(), source })?;
        }
        let t = Instant::now();
        let cmds = compile::commands_with(tree, u, side, &scratch, &out, Some(&include))?;
        compile::build(tree, u, &cmds)?;
        let exports = u.cmd_file.exists() && std::fs::read_to_string(&u.cmd_file).is_ok_and(|t| t.contains("#SYMVER "));
        if exports {
            let v = compile::symbol_versions(tree, u, &cmds)?;
            if let Ok(mut c) = crc.lock() {
                c.push((i, side, v));
            }
        }
        progress(&format!(
            "  CC {:8} {} ({:.1} s)",
            side.dir(),
            u.object,
            t.elapsed().as_secs_f64()
        ));
        Ok(())
    })?;
    let compile_s = tc.elapsed().as_secs_f64();
    // 5. Exported symbols' CRCs must not change.
    let crc = crc.into_inner().unwrap_or_default();
    for (i, u) in units.iter().enumerate() {
        let get = |side: Side| {
            crc.iter()
                .find(|c| c.0 == i && c.1 == side)
                .map(|c| c.2.clone())
                .unwrap_or_default()
        };
        let (o, p) = (get(Side::Original), get(Side::Patched));
        let changed: Vec<String> = o
            .iter()
            .filter(|(n, v)| p.iter().any(|(pn, pv)| pn == n && pv != v))
            .map(|(n, v)| {
                let nv = &p
                    .iter()
                    .find(|(pn, _)| pn == n)
                    .map(|x| x.1.clone())
                    .unwrap_or_default();
                format!("{n} ({v} -> {nv})")
            })
            .collect();
        if !changed.is_empty() {
            return Err(BuildError::Refused(format!(
                "{}: the diff changes the symbol versions (CRCs) of {} exported symbol(s): {}{}. Modules built against this kernel would no longer match them: a type an export's signature depends on changed (or a header it sees did). Restructure the fix so that exported interfaces keep their types",
                u.object,
                changed.len(),
                changed.iter().take(4).cloned().collect::<Vec<_>>().join(", "),
                if changed.len() > 4 { format!(" and {} more", changed.len() - 4) } else { String::new() }
            )));
        }
    }
    // 6. Compare.
    let vml = Vmlinux::read(&tree.vmlinux).map_err(|e| BuildError::Refused(e.to_string()))?;
    let btf = KernelBtf::from_vmlinux(&vml).map_err(|e| BuildError::Refused(e.to_string()))?;
    let specials = Specials::new(&btf);
    let ddebug_line = btf.offset_of("_ddebug", "format").ok().map(|o| (o + 8, 3));
    let vsyms = VmlinuxSyms::read(&tree.vmlinux, &tree.build)?;
    let mut msyms = Vec::new();
    for m in &modules {
        let ko = tree
            .module_ko(m)
            .ok_or_else(|| BuildError::Refused(format!("module {m}: no {m}.ko in modules.order")))?;
        msyms.push(ModuleSyms::read(&ko, m)?);
    }
    let mut objs = Vec::new();
    for u in &units {
        let o = Obj::read(&opts.work.join("orig").join(&u.object))?;
        let p = Obj::read(&opts.work.join("patched").join(&u.object))?;
        objs.push((o, p));
    }
    let facts: Vec<(Facts, Facts)> = objs
        .iter()
        .map(|(o, p)| (Facts::new(o, &specials), Facts::new(p, &specials)))
        .collect();
    let mut diffs: Vec<UnitDiff> = facts
        .iter()
        .map(|(o, p)| diff::diff(o, p, &specials, ddebug_line, &changes))
        .collect();
    for (i, d) in diffs.iter_mut().enumerate() {
        for n in diff::apply_ignores(&facts[i].1, d) {
            warnings.push(format!(
                "{}: {n} changed but is ignored (KPATCH_IGNORE_*)",
                units[i].object
            ));
        }
    }
    let mut namers: Vec<UnitNamer> = Vec::new();
    for (i, u) in units.iter().enumerate() {
        let n = match &u.module {
            Some(m) => msyms
                .iter()
                .find(|s| s.name() == m)
                .ok_or_else(|| BuildError::Refused(format!("module {m} not read")))?
                .unit(&objs[i].0, &u.object)?,
            None => vsyms.unit(&objs[i].0, &u.object)?,
        };
        namers.push(n);
    }
    let mut init_changed = Vec::new();
    let mut renewed_data = Vec::new();
    for (i, d) in diffs.iter().enumerate() {
        let u = &units[i];
        for (f, why) in &d.changed {
            progress(&format!(
                "  changed: {} ({}): {why}",
                objs[i].1.symbols[*f].name, u.object
            ));
        }
        for n in &d.init_changed {
            warnings.push(format!(
                "{}: {n} is __init/__exit code: its change cannot be applied to a running kernel and is left out",
                u.object
            ));
        }
        init_changed.extend(d.init_changed.iter().cloned());
        for &r in &d.renewed {
            renewed_data.push(objs[i].1.symbols[r].name.clone());
        }
        if let Some((n, why)) = d.changed_data.first() {
            return Err(BuildError::Refused(format!(
                "{}: the initial value or layout of existing data '{n}' changes ({why}): a live patch cannot change data the running kernel already has; convert it with a data patch (LUCOS_DATA_SCALE, README \"Data patches\") or keep its layout and add new state elsewhere",
                u.object
            )));
        }
    }
    // A patch whose diff only adds callbacks (kpatch's KPATCH_*_CALLBACK) is a patch too.
    let records = objs.iter().any(|(_, p)| {
        p.sections
            .iter()
            .any(|s| s.name.starts_with(".lucos.callback") && !s.data.is_empty())
    });
    if !records && diffs.iter().all(|d| d.changed.is_empty()) {
        return Err(BuildError::Refused(if init_changed.is_empty() {
            "no functions changed: the diff does not change what any function does (a moved __LINE__ in WARN/BUG metadata, a renamed clone, a comment or whitespace are not changes)".into()
        } else {
            format!(
                "only __init/__exit code changed ({}): it has already run (or runs at unload), so there is nothing to patch live",
                init_changed.join(", ")
            )
        }));
    }
    // 7. The patch object.
    let inputs: Vec<UnitInput> = (0..units.len())
        .map(|i| UnitInput {
            name: units[i].object.clone(),
            o: &facts[i].0,
            p: &facts[i].1,
            diff: &diffs[i],
            namer: &namers[i],
        })
        .collect();
    let Emitted {
        bytes,
        replaced,
        new_functions,
        new_data,
        kernel_refs,
    } = emit::emit(&inputs, &vsyms, &specials, &opts.name, &opts.description)?;
    // 8. The update server must accept it as it is.
    let m = PatchModule::parse(&bytes).map_err(|e| BuildError::SelfCheck(e.to_string()))?;
    progress(&format!(
        "patch object: {} bytes, {} replaced function(s), {} new function(s), {} new data object(s), {} kernel symbol(s) referenced, {} section(s)",
        bytes.len(),
        replaced.len(),
        new_functions.len(),
        new_data.len(),
        kernel_refs,
        m.sections.len()
    ));
    for r in &replaced {
        progress(&format!("  replace {} -> {}", r.old, r.new));
    }
    let report = Report {
        name: opts.name.clone(),
        units: units.iter().map(|u| u.object.clone()).collect(),
        modules,
        replaced,
        new_functions,
        new_data,
        init_changed,
        renewed_data,
        warnings,
        compile_s,
        total_s: t0.elapsed().as_secs_f64(),
        bytes: bytes.len(),
    };
    Ok((bytes, report))
}

/// The default scratch directory for an output file.
pub fn default_work(output: &Path) -> PathBuf {
    let name = output.file_name().and_then(|n| n.to_str()).unwrap_or("patch");
    std::env::temp_dir().join(format!("lucos-build-{}-{}", name, std::process::id()))
}

/// The headers patches may include: kpatch's macro headers (for kpatch-style patches
/// unmodified) and lucos.h, written for lucos.
const HEADERS: &[(&str, &str)] = &[
    ("kpatch-macros.h", include_str!("../include/kpatch-macros.h")),
    ("kpatch-syscall.h", include_str!("../include/kpatch-syscall.h")),
    ("lucos.h", include_str!("../../guest-patches/include/lucos.h")),
];

fn write_headers(dir: &Path) -> Result<(), BuildError> {
    std::fs::create_dir_all(dir).map_err(|source| BuildError::Io {
        path: dir.into(),
        source,
    })?;
    for (name, text) in HEADERS {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|source| BuildError::Io { path: p, source })?;
    }
    Ok(())
}
