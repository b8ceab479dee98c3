//! Parsing a patch module: an ELF relocatable `.ko` built by kbuild with the lucos header.
//! We keep the allocatable code/data sections, the module's symbols, the relocations that
//! apply to kept sections, and the `.lucos.*` records.

use object::elf;
use object::read::elf::{ElfFile64, FileHeader, SectionHeader};
use object::{Endianness, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionIndex};
use std::time::Duration;
use thiserror::Error;

/// Size of a name field in the lucos records (LUCOS_NAME_MAX in lucos.h).
pub const NAME_MAX: usize = 128;
const REPLACE_RECORD: usize = 2 * NAME_MAX + 8;
const INFO_RECORD: usize = 4 + NAME_MAX + 256;
const DATA_RECORD: usize = NAME_MAX + 16;
const CALLBACK_RECORD: usize = 8 + 2 * NAME_MAX + 8;
/// Time limit of a callback that does not set one.
pub const DEFAULT_CALLBACK_LIMIT: Duration = Duration::from_secs(1);
/// Version of the lucos record ABI (first word of `.lucos.info`) that this server accepts.
pub const ABI_VERSION: u32 = 1;

/// Why a `.ko` file is rejected as a patch module.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModuleError {
    /// The file is not a well-formed x86-64 ELF relocatable object; the string says why.
    #[error("not an x86-64 ELF relocatable object: {0}")]
    NotElf(String),
    /// `.lucos.replace` is missing or empty.
    #[error("module has no .lucos.replace records: it replaces nothing (use LUCOS_REPLACE from lucos.h)")]
    NoReplacements,
    /// A `.lucos.*` section's size is not a whole number of its fixed-size records.
    #[error("malformed {section} section: size {size} is not a multiple of the {record}-byte record")]
    BadRecords {
        /// Name of the offending section.
        section: String,
        /// Its size in bytes.
        size: u64,
        /// Record size in bytes expected for that section.
        record: usize,
    },
    /// `.lucos.info` declares an ABI version other than [`ABI_VERSION`].
    #[error("lucos ABI version {0} is not supported (expected {ABI_VERSION})")]
    AbiVersion(u32),
    /// A record's name field has no NUL within its bytes or is not UTF-8.
    #[error("record field is not a NUL-terminated name")]
    BadName,
    /// A `.lucos.replace` record names a new function that is not a code symbol of a loaded
    /// executable section.
    #[error("replacement function '{0}' is not defined in the module's code")]
    NoNewFunction(String),
    /// The module has a non-empty section lucos cannot honour (e.g. `__jump_table`); the
    /// string names the section and what it is for.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A `.lucos.data` record has a zero multiplier or divisor.
    #[error("data rule for '{name}' scales by {mul}/{div}: both must be non-zero")]
    BadScale {
        /// Global the rule is for.
        name: String,
        /// Multiplier found in the record.
        mul: u64,
        /// Divisor found in the record.
        div: u64,
    },
    /// A `.lucos.callback` record's kind is not 1 (apply), 2 (revert) or 3 (thread).
    #[error("callback record '{name}' has unknown kind {kind}")]
    BadCallbackKind {
        /// The author's callback function.
        name: String,
        /// Kind word found in the record.
        kind: u32,
    },
    /// A callback record's wrapper entry is not a code symbol of the module.
    #[error("callback entry '{0}' is not defined in the module's code")]
    NoCallback(String),
    /// A relocation's symbol cannot be read, or its target is of an unknown kind.
    #[error("relocation in {section} at {offset:#x}: {what}")]
    BadRelocation {
        /// Section being relocated.
        section: String,
        /// Offset of the relocation within that section.
        offset: u64,
        /// Why it failed.
        what: String,
    },
}

/// A section copied into the guest.
#[derive(Debug, Clone)]
pub struct LoadSection {
    /// Index of the section in the module's ELF file.
    pub index: SectionIndex,
    /// ELF section name, e.g. `.text` or `.rodata.str1.1`.
    pub name: String,
    /// Contents (zeros for NOBITS).
    pub data: Vec<u8>,
    /// Required alignment in bytes (`sh_addralign`, at least 1).
    pub align: u64,
    /// `SHF_EXECINSTR`: the section holds code.
    pub exec: bool,
    /// `SHF_WRITE`: the section is written at run time.
    pub write: bool,
}

/// Where a module symbol lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SymbolPlace {
    /// Defined in loaded section `load_idx` at `offset`.
    Section {
        /// Index into [`PatchModule::sections`].
        load_idx: usize,
        /// Byte offset within that section.
        offset: u64,
    },
    /// Undefined: resolved against the guest kernel.
    Kernel(String),
    /// Absolute value.
    Absolute(u64),
    /// Defined in a section that is not loaded (e.g. .init.text, .modinfo).
    NotLoaded(String),
}

/// One relocation to apply.
#[derive(Debug, Clone)]
pub struct Reloc {
    /// Index into `sections` of the section being patched.
    pub load_idx: usize,
    /// Byte offset in the patched section at which the relocation is applied.
    pub offset: u64,
    /// ELF r_type (R_X86_64_*).
    pub r_type: u32,
    /// What the relocation refers to.
    pub target: SymbolPlace,
    /// ELF `r_addend`, added to the target's address.
    pub addend: i64,
    /// Symbol name for messages.
    pub name: String,
}

/// One `LUCOS_REPLACE` record, with the new function's place in the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replace {
    /// Guest kernel function being replaced.
    pub old_name: String,
    /// Module function that replaces it.
    pub new_name: String,
    /// Index into [`PatchModule::sections`] of the section holding `new_name`.
    pub new_load_idx: usize,
    /// Byte offset of `new_name` within that section.
    pub new_offset: u64,
}

/// One `LUCOS_DATA_SCALE` record: the global `name` is kept as `old * mul / div` by the
/// new code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRule {
    /// Guest global (a kernel symbol) whose value is converted when the patch goes in or out.
    pub name: String,
    /// Numerator of the old-to-new factor; never 0.
    pub mul: u64,
    /// Denominator of the old-to-new factor; never 0.
    pub div: u64,
}

impl DataRule {
    /// Old units to new.
    pub fn forward(&self, v: u64) -> u64 {
        ((v as u128 * self.mul as u128) / self.div as u128) as u64
    }

    /// New units to old.
    pub fn backward(&self, v: u64) -> u64 {
        ((v as u128 * self.div as u128) / self.mul as u128) as u64
    }
}

/// The fixed-size records of section `section`, or an error if its size is not a multiple.
fn records<'a>(d: &'a [u8], section: &str, record: usize) -> Result<std::slice::Chunks<'a, u8>, ModuleError> {
    if !d.len().is_multiple_of(record) {
        return Err(ModuleError::BadRecords {
            section: section.into(),
            size: d.len() as u64,
            record,
        });
    }
    Ok(d.chunks(record))
}

/// Parses the `.lucos.data` section contents.
pub fn parse_data_rules(d: &[u8]) -> Result<Vec<DataRule>, ModuleError> {
    records(d, ".lucos.data", DATA_RECORD)?
        .map(|rec| {
            let name = cstr(&rec[..NAME_MAX])?;
            let word = |i: usize| u64::from_le_bytes(rec[i..i + 8].try_into().unwrap_or([0; 8]));
            let (mul, div) = (word(NAME_MAX), word(NAME_MAX + 8));
            if mul == 0 || div == 0 {
                return Err(ModuleError::BadScale { name, mul, div });
            }
            Ok(DataRule { name, mul, div })
        })
        .collect()
}

/// When a callback runs (`LUCOS_*_CALLBACK` in lucos.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CallbackKind {
    /// Once, right after the jumps are installed.
    Apply,
    /// Once, right after the original code is restored.
    Revert,
    /// For each task found in old code, once it has left it.
    Thread,
}

impl CallbackKind {
    /// Lower-case name, as in messages and in the serialized form.
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackKind::Apply => "apply",
            CallbackKind::Revert => "revert",
            CallbackKind::Thread => "thread",
        }
    }
}

/// One callback record, with the wrapper's place in the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callback {
    /// When the callback runs.
    pub kind: CallbackKind,
    /// The author's function (for messages).
    pub name: String,
    /// The wrapper the server calls.
    pub entry: String,
    /// Index into [`PatchModule::sections`] of the section holding `entry`.
    pub load_idx: usize,
    /// Byte offset of `entry` within that section.
    pub offset: u64,
    /// Longest the callback may run in the guest ([`DEFAULT_CALLBACK_LIMIT`] if the record says 0).
    pub limit: Duration,
}

/// A callback record before its entry is looked up: (kind, name, entry, limit).
pub fn parse_callback_records(d: &[u8]) -> Result<Vec<(CallbackKind, String, String, Duration)>, ModuleError> {
    records(d, ".lucos.callback", CALLBACK_RECORD)?
        .map(|rec| {
            let word = |i: usize| u32::from_le_bytes(rec[i..i + 4].try_into().unwrap_or([0; 4]));
            let name = cstr(&rec[8..8 + NAME_MAX])?;
            let entry = cstr(&rec[8 + NAME_MAX..8 + 2 * NAME_MAX])?;
            let kind = match word(0) {
                1 => CallbackKind::Apply,
                2 => CallbackKind::Revert,
                3 => CallbackKind::Thread,
                kind => return Err(ModuleError::BadCallbackKind { name, kind }),
            };
            let limit = match word(4) {
                0 => DEFAULT_CALLBACK_LIMIT,
                ms => Duration::from_millis(u64::from(ms)),
            };
            Ok((kind, name, entry, limit))
        })
        .collect()
}

/// A parsed patch module.
#[derive(Debug, Clone)]
pub struct PatchModule {
    /// Patch name from `.lucos.info`, or `unnamed` when the module has none.
    pub name: String,
    /// Free-text description from `.lucos.info` (empty when the module has none).
    pub description: String,
    /// Allocatable sections copied into the guest, in ELF order; `load_idx` fields index this.
    pub sections: Vec<LoadSection>,
    /// Relocations to apply to `sections` once they have guest addresses.
    pub relocs: Vec<Reloc>,
    /// Functions the patch replaces; never empty.
    pub replaces: Vec<Replace>,
    /// Globals whose meaning the patch changes (`LUCOS_DATA_SCALE`).
    pub data: Vec<DataRule>,
    /// Callbacks from `.lucos.callback`, in record order.
    pub callbacks: Vec<Callback>,
    /// Non-fatal problems found while parsing (e.g. an ignored `__jump_table`), to show the user.
    pub warnings: Vec<String>,
    /// The functions defined in loaded code (for the guest kernel's symbol lookups).
    pub functions: Vec<FuncSymbol>,
}

/// A function defined in the module's loaded code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuncSymbol {
    /// Its name.
    pub name: String,
    /// Index into [`PatchModule::sections`].
    pub load_idx: usize,
    /// Byte offset within that section.
    pub offset: u64,
    /// Size in bytes (`st_size`).
    pub size: u64,
    /// `STB_GLOBAL`.
    pub global: bool,
}

/// Sections that kbuild or the compiler add but that only matter to the in-kernel module
/// loader (or to kernel-wide patching passes), and that lucos does not load. Each is safe
/// to leave out:
/// - `.modinfo`, `__versions`, `.gnu.linkonce.this_module`, `.note*`, `.comment`,
///   `__ksymtab*`, `__kcrctab*`, `.printk_index`: module metadata, exports (a patch
///   exports nothing), version CRCs, the printk format index;
/// - `__mcount_loc`, `__patchable_function_entries`: ftrace call sites; patch functions
///   keep their `call __fentry__` NOPs and are not traceable;
/// - `.retpoline_sites`, `.return_sites`, `.call_sites`, `.ibt_endbr_seal`,
///   `.static_call_sites`: objtool's lists of sites the kernel may rewrite as an
///   optimisation; unrewritten, they call the retpoline/return thunks and static call
///   trampolines, which the kernel set up for its CPU, so they behave the same;
/// - `.smp_locks`: LOCK prefixes to strip on a uniprocessor boot; kept, they are correct;
/// - `.parainstructions`: paravirt call sites; unpatched they call through `pv_ops`,
///   which is what they are patched into on this kernel (correct, a few cycles slower);
/// - `.init.*`, `.exit.*`: module init/exit code (references to them are refused by the
///   linker); `.discard*`, `.eh_frame`: not used by the kernel; `.lucos.*`: the records.
fn skipped(name: &str) -> bool {
    const PREFIXES: &[&str] = &[
        ".modinfo",
        "__versions",
        ".gnu.linkonce.this_module",
        ".note",
        "__mcount_loc",
        ".return_sites",
        ".retpoline_sites",
        ".call_sites",
        ".ibt_endbr_seal",
        "__patchable_function_entries",
        ".static_call_sites",
        ".init.",
        ".exit.",
        ".lucos.",
        ".comment",
        "__ksymtab",
        "__kcrctab",
        ".discard",
        ".smp_locks",
        ".eh_frame",
        ".parainstructions",
        ".printk_index",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Sections whose presence means code that needs something lucos does not provide: a
/// module with one is refused before anything is written to the guest. (`__ex_table`,
/// `__bug_table` and the ORC tables are loaded and registered with the guest kernel:
/// [`crate::ktables`]; `.altinstructions` are applied: [`crate::alternatives`].)
fn unsupported(name: &str) -> Option<&'static str> {
    Some(match name {
        "__param" => "module parameters (__param)",
        "__jump_table" => {
            "static keys (__jump_table): their sites would keep the build-time default and \
             not follow the guest's key flips"
        }
        n if n.starts_with(".data..percpu") => {
            "per-CPU variables (.data..percpu): they need per-CPU memory the module loader \
             allocates"
        }
        "__tracepoints" | "__tracepoints_ptrs" | "_ftrace_events" | "_ftrace_eval_map" | "__bpf_raw_tp_map" => {
            "tracepoint or trace event definitions (they need registration with the tracing \
             core); using the kernel's own tracepoints is fine"
        }
        "__dyndbg" | "__dyndbg_classes" => "dynamic debug descriptors (__dyndbg)",
        ".init_array" | ".ctors" => "constructors (.init_array: GCOV/KASAN builds)",
        "_kprobe_blacklist" => "kprobe blacklists (_kprobe_blacklist)",
        "__static_call_tramp_key" | ".static_call.text" => "static call definitions (DEFINE_STATIC_CALL)",
        _ => return None,
    })
}

fn cstr(b: &[u8]) -> Result<String, ModuleError> {
    let end = b.iter().position(|&c| c == 0).ok_or(ModuleError::BadName)?;
    String::from_utf8(b[..end].to_vec()).map_err(|_| ModuleError::BadName)
}

impl PatchModule {
    /// Parses a `.ko` (without any signature trailer).
    pub fn parse(data: &[u8]) -> Result<Self, ModuleError> {
        let file = ElfFile64::<Endianness>::parse(data).map_err(|e| ModuleError::NotElf(e.to_string()))?;
        let hdr = file.elf_header();
        let e = file.endian();
        if hdr.e_type(e) != elf::ET_REL || hdr.e_machine(e) != elf::EM_X86_64 {
            return Err(ModuleError::NotElf(format!(
                "e_type {} e_machine {} (want ET_REL, EM_X86_64)",
                hdr.e_type(e),
                hdr.e_machine(e)
            )));
        }
        let warnings = Vec::new();
        let mut sections = Vec::new();
        let mut load_of = std::collections::HashMap::new();
        for sec in file.sections() {
            let name = sec.name().unwrap_or("").to_string();
            let sh = sec.elf_section_header();
            let flags = sh.sh_flags(e);
            if flags & u64::from(elf::SHF_ALLOC) == 0 || skipped(&name) {
                continue;
            }
            if let Some(what) = unsupported(&name) {
                if sec.size() > 0 {
                    return Err(ModuleError::Unsupported(format!("section {name}: {what}")));
                }
                continue;
            }
            let data = if sh.sh_type(e) == elf::SHT_NOBITS {
                vec![0u8; sec.size() as usize]
            } else {
                sec.data().map_err(|e| ModuleError::NotElf(e.to_string()))?.to_vec()
            };
            load_of.insert(sec.index(), sections.len());
            sections.push(LoadSection {
                index: sec.index(),
                name,
                data,
                align: sec.align().max(1),
                exec: flags & u64::from(elf::SHF_EXECINSTR) != 0,
                write: flags & u64::from(elf::SHF_WRITE) != 0,
            });
        }

        let place = |sym: &object::read::elf::ElfSymbol64<'_, '_, Endianness>| -> SymbolPlace {
            let name = sym.name().unwrap_or("").to_string();
            if sym.is_undefined() {
                return SymbolPlace::Kernel(name);
            }
            match sym.section_index() {
                Some(idx) => match load_of.get(&idx) {
                    Some(&l) => SymbolPlace::Section {
                        load_idx: l,
                        offset: sym.address(),
                    },
                    None => SymbolPlace::NotLoaded(
                        file.section_by_index(idx)
                            .ok()
                            .and_then(|s| s.name().ok().map(String::from))
                            .unwrap_or_default(),
                    ),
                },
                None => SymbolPlace::Absolute(sym.address()),
            }
        };

        let mut relocs = Vec::new();
        for sec in file.sections() {
            let Some(&load_idx) = load_of.get(&sec.index()) else {
                continue;
            };
            for (offset, r) in sec.relocations() {
                let RelocationFlags::Elf { r_type } = r.flags() else {
                    return Err(ModuleError::NotElf("non-ELF relocation".into()));
                };
                let (target, name) = match r.target() {
                    RelocationTarget::Symbol(si) => {
                        let sym = file.symbol_by_index(si).map_err(|e| ModuleError::BadRelocation {
                            section: sections[load_idx].name.clone(),
                            offset,
                            what: e.to_string(),
                        })?;
                        let mut n = sym.name().unwrap_or("").to_string();
                        if n.is_empty() {
                            n = sym
                                .section_index()
                                .and_then(|i| file.section_by_index(i).ok())
                                .and_then(|s| s.name().ok().map(String::from))
                                .unwrap_or_default();
                        }
                        (place(&sym), n)
                    }
                    RelocationTarget::Section(idx) => match load_of.get(&idx) {
                        Some(&l) => (
                            SymbolPlace::Section { load_idx: l, offset: 0 },
                            format!("section {idx:?}"),
                        ),
                        None => (SymbolPlace::NotLoaded(format!("{idx:?}")), format!("section {idx:?}")),
                    },
                    RelocationTarget::Absolute => (SymbolPlace::Absolute(0), "absolute".into()),
                    _ => {
                        return Err(ModuleError::BadRelocation {
                            section: sections[load_idx].name.clone(),
                            offset,
                            what: "unknown relocation target".into(),
                        })
                    }
                };
                relocs.push(Reloc {
                    load_idx,
                    offset,
                    r_type,
                    target,
                    addend: r.addend(),
                    name,
                });
            }
        }

        // .lucos.info
        let (mut name, mut description) = (String::from("unnamed"), String::new());
        if let Some(sec) = file.section_by_name(".lucos.info") {
            let d = sec.data().map_err(|e| ModuleError::NotElf(e.to_string()))?;
            if d.len() != INFO_RECORD {
                return Err(ModuleError::BadRecords {
                    section: ".lucos.info".into(),
                    size: d.len() as u64,
                    record: INFO_RECORD,
                });
            }
            let abi = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            if abi != ABI_VERSION {
                return Err(ModuleError::AbiVersion(abi));
            }
            name = cstr(&d[4..4 + NAME_MAX])?;
            description = cstr(&d[4 + NAME_MAX..])?;
        }

        // .lucos.replace
        let sec = file
            .section_by_name(".lucos.replace")
            .ok_or(ModuleError::NoReplacements)?;
        let d = sec.data().map_err(|e| ModuleError::NotElf(e.to_string()))?;
        if d.is_empty() {
            return Err(ModuleError::NoReplacements);
        }
        let replace_records = records(d, ".lucos.replace", REPLACE_RECORD)?;
        // A function defined in the module's loaded code.
        let code_symbol = |name: &str| -> Option<(usize, u64)> {
            let sym = file
                .symbols()
                .find(|s| s.name() == Ok(name) && s.kind() == object::SymbolKind::Text)?;
            match place(&sym) {
                SymbolPlace::Section { load_idx, offset } if sections[load_idx].exec => Some((load_idx, offset)),
                _ => None,
            }
        };
        let mut replaces = Vec::new();
        for rec in replace_records {
            let old_name = cstr(&rec[..NAME_MAX])?;
            let new_name = cstr(&rec[NAME_MAX..2 * NAME_MAX])?;
            let (load_idx, offset) =
                code_symbol(&new_name).ok_or_else(|| ModuleError::NoNewFunction(new_name.clone()))?;
            replaces.push(Replace {
                old_name,
                new_name,
                new_load_idx: load_idx,
                new_offset: offset,
            });
        }
        // .lucos.data (optional)
        let data = match file.section_by_name(".lucos.data") {
            Some(sec) => parse_data_rules(sec.data().map_err(|e| ModuleError::NotElf(e.to_string()))?)?,
            None => Vec::new(),
        };
        // .lucos.callback (optional)
        let mut callbacks = Vec::new();
        if let Some(sec) = file.section_by_name(".lucos.callback") {
            let d = sec.data().map_err(|e| ModuleError::NotElf(e.to_string()))?;
            for (kind, name, entry, limit) in parse_callback_records(d)? {
                let (load_idx, offset) = code_symbol(&entry).ok_or_else(|| ModuleError::NoCallback(entry.clone()))?;
                callbacks.push(Callback {
                    kind,
                    name,
                    entry,
                    load_idx,
                    offset,
                    limit,
                });
            }
        }
        let functions = file
            .symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text)
            .filter_map(|s| match place(&s) {
                SymbolPlace::Section { load_idx, offset } if sections[load_idx].exec => Some(FuncSymbol {
                    name: s.name().ok()?.to_string(),
                    load_idx,
                    offset,
                    size: s.size(),
                    global: s.is_global(),
                }),
                _ => None,
            })
            .collect();
        Ok(PatchModule {
            name,
            description,
            sections,
            relocs,
            replaces,
            data,
            callbacks,
            warnings,
            functions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal patch module (one function replacing `old_fn`) plus a section `extra`
    /// holding `data`, as an ELF relocatable.
    fn module_with(extra: &str, data: &[u8]) -> Vec<u8> {
        use object::write::{Object, Symbol, SymbolSection};
        use object::{Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags, SymbolKind, SymbolScope};
        let mut o = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let text = o.add_section(vec![], b".text".to_vec(), SectionKind::Text);
        o.append_section_data(text, &[0xc3; 16], 16);
        o.add_symbol(Symbol {
            name: b"new_fn".to_vec(),
            value: 0,
            size: 16,
            kind: SymbolKind::Text,
            scope: SymbolScope::Compilation,
            weak: false,
            section: SymbolSection::Section(text),
            flags: SymbolFlags::None,
        });
        let rep = o.add_section(vec![], b".lucos.replace".to_vec(), SectionKind::ReadOnlyData);
        let mut r = vec![0u8; REPLACE_RECORD];
        r[..6].copy_from_slice(b"old_fn");
        r[NAME_MAX..NAME_MAX + 6].copy_from_slice(b"new_fn");
        o.append_section_data(rep, &r, 8);
        let kind = if extra.starts_with(".data") || extra.starts_with("__") {
            SectionKind::Data
        } else {
            SectionKind::ReadOnlyData
        };
        let x = o.add_section(vec![], extra.as_bytes().to_vec(), kind);
        o.append_section_data(x, data, 8);
        o.write().unwrap()
    }

    #[test]
    fn sections_lucos_cannot_honour_are_refused_by_name() {
        for (section, why) in [
            ("__jump_table", "static keys"),
            (".data..percpu", "per-CPU variables"),
            ("__tracepoints", "tracepoint"),
            ("__dyndbg", "dynamic debug"),
            ("__param", "module parameters"),
        ] {
            let e = PatchModule::parse(&module_with(section, &[0; 16])).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, ModuleError::Unsupported(_)) && msg.contains(section) && msg.contains(why),
                "{section}: {msg}"
            );
        }
        // Empty ones do not matter; tables lucos registers are loaded.
        assert!(PatchModule::parse(&module_with("__jump_table", &[])).is_ok());
        let m = PatchModule::parse(&module_with("__ex_table", &[0; 12])).unwrap();
        assert!(m.sections.iter().any(|s| s.name == "__ex_table"));
        let m = PatchModule::parse(&module_with(".parainstructions", &[0; 16])).unwrap();
        assert!(m.sections.iter().all(|s| s.name != ".parainstructions"), "skipped");
        assert_eq!(m.functions.len(), 1);
        assert_eq!(m.functions[0].name, "new_fn");
    }

    fn callback_record(kind: u32, ms: u32, name: &str) -> Vec<u8> {
        let mut r = vec![0u8; CALLBACK_RECORD];
        r[..4].copy_from_slice(&kind.to_le_bytes());
        r[4..8].copy_from_slice(&ms.to_le_bytes());
        r[8..8 + name.len()].copy_from_slice(name.as_bytes());
        let entry = format!("__lucos_cb_{name}");
        r[8 + NAME_MAX..8 + NAME_MAX + entry.len()].copy_from_slice(entry.as_bytes());
        r
    }

    #[test]
    fn callback_records() {
        let mut d = callback_record(1, 0, "unlock");
        d.extend(callback_record(3, 250, "per_task"));
        let cbs = parse_callback_records(&d).unwrap();
        assert_eq!(
            cbs,
            vec![
                (
                    CallbackKind::Apply,
                    "unlock".into(),
                    "__lucos_cb_unlock".into(),
                    DEFAULT_CALLBACK_LIMIT
                ),
                (
                    CallbackKind::Thread,
                    "per_task".into(),
                    "__lucos_cb_per_task".into(),
                    Duration::from_millis(250)
                ),
            ]
        );
        assert!(matches!(
            parse_callback_records(&callback_record(9, 0, "x")),
            Err(ModuleError::BadCallbackKind { kind: 9, .. })
        ));
        assert!(matches!(
            parse_callback_records(&d[..100]),
            Err(ModuleError::BadRecords { .. })
        ));
    }

    fn record(name: &str, mul: u64, div: u64) -> Vec<u8> {
        let mut r = vec![0u8; DATA_RECORD];
        r[..name.len()].copy_from_slice(name.as_bytes());
        r[NAME_MAX..NAME_MAX + 8].copy_from_slice(&mul.to_le_bytes());
        r[NAME_MAX + 8..].copy_from_slice(&div.to_le_bytes());
        r
    }

    #[test]
    fn data_records() {
        let mut d = record("lucos_demo_timeout", 1000, 1);
        d.extend(record("other", 1, 4));
        let rules = parse_data_rules(&d).unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            (rules[0].name.as_str(), rules[0].mul, rules[0].div),
            ("lucos_demo_timeout", 1000, 1)
        );
        assert_eq!(rules[0].forward(250), 250_000);
        assert_eq!(rules[0].backward(250_000), 250);
        assert_eq!(rules[1].forward(8), 2);
        assert_eq!(
            rules[0].forward(u64::MAX / 10),
            (u64::MAX / 10).wrapping_mul(1000),
            "wraps like the guest would"
        );
        assert!(matches!(parse_data_rules(&d[1..]), Err(ModuleError::BadRecords { .. })));
        assert!(matches!(
            parse_data_rules(&record("x", 0, 1)),
            Err(ModuleError::BadScale { .. })
        ));
        assert!(matches!(
            parse_data_rules(&[0xffu8; DATA_RECORD]),
            Err(ModuleError::BadName)
        ));
    }
}
