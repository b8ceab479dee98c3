//! Parsing a patch module: an ELF relocatable `.ko` built by kbuild with the lucos header.
//! We keep the allocatable code/data sections, the module's symbols, the relocations that
//! apply to kept sections, and the `.lucos.*` records.

use object::elf;
use object::read::elf::{ElfFile64, ElfSymbol64, FileHeader, SectionHeader};
use object::{
    Endianness, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionIndex, SymbolSection,
};
use std::time::Duration;
use thiserror::Error;

/// Size of a name field in the lucos records (LUCOS_NAME_MAX in lucos.h).
pub const NAME_MAX: usize = 128;
const REPLACE_RECORD: usize = 2 * NAME_MAX + 8;
const INFO_RECORD: usize = 4 + NAME_MAX + 256;
const DATA_RECORD: usize = NAME_MAX + 16;
/// `struct lucos_callback` of ABI 2: kind, timeout, name, entry, object, keep.
const CALLBACK_RECORD: usize = 8 + 3 * NAME_MAX + 8;
/// ...and of ABI 1, which had no `object`.
const CALLBACK_RECORD_V1: usize = 8 + 2 * NAME_MAX + 8;
/// Time limit of a callback that does not set one.
pub const DEFAULT_CALLBACK_LIMIT: Duration = Duration::from_secs(1);
/// Largest section alignment accepted: the patch image itself is only page aligned.
pub const MAX_ALIGN: u64 = 4096;
/// The most bytes an image may take when the caller does not know the patch region's size
/// ([`PatchModule::parse`]): the VMM's whole patch region.
pub const DEFAULT_MAX_IMAGE: u64 = 16 << 20;
/// Version of the lucos record ABI (first word of `.lucos.info`) that lucos.h writes: 2 added
/// the callbacks' `object` and the pre-apply and pre-revert kinds.
pub const ABI_VERSION: u32 = 2;
/// The oldest ABI version this server still reads (1: callback records without `object`).
pub const MIN_ABI_VERSION: u32 = 1;

/// Why a `.ko` file is rejected as a patch module.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModuleError {
    /// The file is not a well-formed x86-64 ELF relocatable object; the string says why.
    #[error("not an x86-64 ELF relocatable object: {0}")]
    NotElf(String),
    /// `.lucos.replace` is missing or empty, and there are no callbacks either.
    #[error("module has no .lucos.replace records and no callbacks: it does nothing (use LUCOS_REPLACE from lucos.h)")]
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
    /// `.lucos.info` declares an ABI version outside [`MIN_ABI_VERSION`]..=[`ABI_VERSION`].
    #[error("lucos ABI version {0} is not supported (expected {MIN_ABI_VERSION} to {ABI_VERSION})")]
    AbiVersion(u32),
    /// A record's name field has no NUL within its bytes or is not UTF-8.
    #[error("record field is not a NUL-terminated name")]
    BadName,
    /// A `.lucos.replace` record names a new function that is not a code symbol of a loaded
    /// executable section.
    #[error("replacement function '{0}' is not defined in the module's code")]
    NoNewFunction(String),
    /// The module has a non-empty section lucos cannot honour (e.g. `__tracepoints`); the
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
    /// A `.lucos.callback` record's kind is not 1 (apply), 2 (revert), 3 (thread), 4
    /// (pre-apply) or 5 (pre-revert).
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
    /// A relocation's symbol cannot be read, its target is of an unknown kind, or its field
    /// does not lie inside the section it patches.
    #[error("relocation in {section} at {offset:#x}: {what}")]
    BadRelocation {
        /// Section being relocated.
        section: String,
        /// Offset of the relocation within that section.
        offset: u64,
        /// Why it failed.
        what: String,
    },
    /// The loaded sections, laid out as the linker would, need more than `limit` bytes
    /// (the patch region); `size` is what they would take (`u64::MAX` if that overflows).
    #[error("module image needs {size} bytes (first too large: section '{section}'), more than the {limit}-byte patch region")]
    TooLarge {
        /// The section at which the running total went over the limit.
        section: String,
        /// Bytes the image needs up to and including that section.
        size: u64,
        /// The most an image may take.
        limit: u64,
    },
    /// A loaded section's `sh_addralign` is not a power of two or exceeds [`MAX_ALIGN`].
    #[error("section '{section}' has alignment {align}: must be a power of two of at most {MAX_ALIGN}")]
    BadAlign {
        /// The section.
        section: String,
        /// Its `sh_addralign`.
        align: u64,
    },
    /// A symbol defined in a loaded section does not lie inside it (`value + size` past the
    /// section's end), or a function entry is at or past the end of its code.
    #[error("symbol '{symbol}' at {section}+{value:#x} (size {size}) lies outside the {section_size}-byte section")]
    SymbolOutOfSection {
        /// The symbol (or, for an unnamed one, its index).
        symbol: String,
        /// The section it is defined in.
        section: String,
        /// Its value: the offset in the section.
        value: u64,
        /// Its size in bytes.
        size: u64,
        /// The section's size in bytes.
        section_size: u64,
    },
    /// A symbol is of a kind a patch module cannot have (a common symbol, or a reserved
    /// section index).
    #[error("symbol '{symbol}': {what}")]
    BadSymbol {
        /// The symbol.
        symbol: String,
        /// What is wrong with it.
        what: &'static str,
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
    /// Once, before the jumps are installed: a non-zero return refuses the patch.
    PreApply,
    /// Once, before the original code is restored (its result is only logged).
    PreRevert,
}

impl CallbackKind {
    /// Lower-case name, as in messages and in the serialized form.
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackKind::Apply => "apply",
            CallbackKind::Revert => "revert",
            CallbackKind::Thread => "thread",
            CallbackKind::PreApply => "pre-apply",
            CallbackKind::PreRevert => "pre-revert",
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
    /// The object the callback belongs to: a guest module's name, or empty for vmlinux.
    /// The server passes that module's `struct module` address (0 for vmlinux) as the
    /// wrapper's first argument, and refuses the patch while the module is not loaded.
    pub object: String,
    /// Index into [`PatchModule::sections`] of the section holding `entry`.
    pub load_idx: usize,
    /// Byte offset of `entry` within that section.
    pub offset: u64,
    /// Longest the callback may run in the guest ([`DEFAULT_CALLBACK_LIMIT`] if the record says 0).
    pub limit: Duration,
}

/// A callback record before its entry is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackRecord {
    /// When it runs.
    pub kind: CallbackKind,
    /// The author's function.
    pub name: String,
    /// The wrapper to call.
    pub entry: String,
    /// Its object: a module name, or empty for vmlinux (always empty in ABI 1).
    pub object: String,
    /// Its time limit.
    pub limit: Duration,
}

/// The `.lucos.callback` records of a module of ABI version `abi`.
pub fn parse_callback_records(d: &[u8], abi: u32) -> Result<Vec<CallbackRecord>, ModuleError> {
    let size = if abi < 2 { CALLBACK_RECORD_V1 } else { CALLBACK_RECORD };
    records(d, ".lucos.callback", size)?
        .map(|rec| {
            let word = |i: usize| u32::from_le_bytes(rec[i..i + 4].try_into().unwrap_or([0; 4]));
            let name = cstr(&rec[8..8 + NAME_MAX])?;
            let entry = cstr(&rec[8 + NAME_MAX..8 + 2 * NAME_MAX])?;
            let object = if abi < 2 {
                String::new()
            } else {
                cstr(&rec[8 + 2 * NAME_MAX..8 + 3 * NAME_MAX])?
            };
            let kind = match word(0) {
                1 => CallbackKind::Apply,
                2 => CallbackKind::Revert,
                3 => CallbackKind::Thread,
                4 => CallbackKind::PreApply,
                5 => CallbackKind::PreRevert,
                kind => return Err(ModuleError::BadCallbackKind { name, kind }),
            };
            let limit = match word(4) {
                0 => DEFAULT_CALLBACK_LIMIT,
                ms => Duration::from_millis(u64::from(ms)),
            };
            Ok(CallbackRecord {
                kind,
                name,
                entry,
                object,
                limit,
            })
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
    /// Functions the patch replaces; empty only when it has callbacks.
    pub replaces: Vec<Replace>,
    /// Globals whose meaning the patch changes (`LUCOS_DATA_SCALE`).
    pub data: Vec<DataRule>,
    /// Callbacks from `.lucos.callback`, in record order.
    pub callbacks: Vec<Callback>,
    /// Non-fatal problems found while parsing (e.g. an ignored section), to show the user.
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
/// - `.call_sites` (call depth tracking, not in 6.1), `.ibt_endbr_seal` (IBT, not
///   configured): objtool's lists of sites the kernel may rewrite as an optimisation;
/// - `.static_call_sites`: static call sites stay calls of their trampoline, which the
///   kernel keeps pointing at the current target (why that is the same behaviour:
///   [`crate::thunks`]); `.retpoline_sites` and `.return_sites` are loaded and rewritten
///   as the kernel rewrites its own ([`crate::thunks`]);
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
/// [`crate::ktables`]; `.altinstructions` are applied: [`crate::alternatives`]; static
/// branches (`__jump_table`) are linked into the kernel's key lists: [`crate::jumplabel`].)
fn unsupported(name: &str) -> Option<&'static str> {
    Some(match name {
        "__param" => "module parameters (__param)",
        n if n.starts_with(".data..percpu") => {
            "per-CPU variables (.data..percpu): they need per-CPU memory the module loader \
             allocates"
        }
        "__tracepoints" | "__tracepoints_ptrs" | "_ftrace_events" | "_ftrace_eval_map" | "__bpf_raw_tp_map" => {
            "tracepoint or trace event definitions (they need registration with the tracing \
             core); using the kernel's own tracepoints is fine"
        }
        "__dyndbg_classes" => "dynamic debug class maps (DECLARE_DYNDBG_CLASSMAP)",
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

/// A loaded section before its bytes are copied: NOBITS sections have no bytes yet.
struct Pending<'d> {
    index: SectionIndex,
    name: String,
    bytes: Option<&'d [u8]>,
    size: u64,
    align: u64,
    exec: bool,
    write: bool,
}

/// Name of symbol `sym` for messages: its name, or `#index` for an unnamed one.
fn sym_label(sym: &ElfSymbol64<'_, '_, Endianness>) -> String {
    match sym.name() {
        Ok(n) if !n.is_empty() => n.to_string(),
        _ => format!("#{}", sym.index().0),
    }
}

impl PatchModule {
    /// Parses a `.ko` (without any signature trailer) whose image may take at most
    /// [`DEFAULT_MAX_IMAGE`] bytes. See [`parse_limited`](Self::parse_limited).
    pub fn parse(data: &[u8]) -> Result<Self, ModuleError> {
        Self::parse_limited(data, DEFAULT_MAX_IMAGE)
    }

    /// Parses a `.ko` (without any signature trailer) whose linked image must fit in
    /// `max_image` bytes (the patch region). Every size, offset and alignment the file
    /// gives is checked before it is used: sections against `max_image` (before anything
    /// is allocated for them), symbols and relocation fields against their sections. Never
    /// panics; malformed input gives an error.
    pub fn parse_limited(data: &[u8], max_image: u64) -> Result<Self, ModuleError> {
        // ELF structures are read in place and must be aligned: parse a copy otherwise.
        if !(data.as_ptr() as usize).is_multiple_of(8) {
            let mut words = vec![0u64; data.len().div_ceil(8)];
            // SAFETY: the byte view covers exactly the vector's memory (initialized u64s,
            // which have no padding), borrowed mutably through `words` for its lifetime.
            let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) };
            bytes[..data.len()].copy_from_slice(data);
            return Self::parse_aligned(&bytes[..data.len()], max_image);
        }
        Self::parse_aligned(data, max_image)
    }

    fn parse_aligned(data: &[u8], max_image: u64) -> Result<Self, ModuleError> {
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
        let mut pending = Vec::new();
        let mut load_of = std::collections::HashMap::new();
        for sec in file.sections() {
            let name = sec.name().unwrap_or("").to_string();
            let sh = sec.elf_section_header();
            let flags = sh.sh_flags(e);
            if flags & u64::from(elf::SHF_ALLOC) == 0 || skipped(&name) {
                continue;
            }
            // pr_debug()/dev_dbg() descriptors (`__dyndbg`) are loaded as data: each call
            // site tests its descriptor's static key (off, as every new descriptor starts in
            // the kernel, and linked like any key of the patch: [`crate::jumplabel`]) and
            // passes the descriptor to __dynamic_pr_debug(). The VMM lists them with the
            // dynamic debug core while the code is registered ([`crate::ktables`]), so
            // `dynamic_debug/control` shows them and turns them on.
            if let Some(what) = unsupported(&name) {
                if sec.size() > 0 {
                    return Err(ModuleError::Unsupported(format!("section {name}: {what}")));
                }
                continue;
            }
            let align = match sh.sh_addralign(e) {
                0 => 1,
                a if a.is_power_of_two() && a <= MAX_ALIGN => a,
                align => return Err(ModuleError::BadAlign { section: name, align }),
            };
            // NOBITS: only a size, checked against the limit below before any allocation.
            let bytes = if sh.sh_type(e) == elf::SHT_NOBITS {
                None
            } else {
                Some(
                    sec.data()
                        .map_err(|e| ModuleError::NotElf(format!("section '{name}': {e}")))?,
                )
            };
            load_of.insert(sec.index(), pending.len());
            pending.push(Pending {
                index: sec.index(),
                name,
                bytes,
                size: sec.size(),
                align,
                exec: flags & u64::from(elf::SHF_EXECINSTR) != 0,
                write: flags & u64::from(elf::SHF_WRITE) != 0,
            });
        }
        // The image as the linker lays it out must fit; several section headers may
        // describe the same file bytes, so the file's size bounds nothing.
        let placed: Vec<(u64, u64, bool)> = pending.iter().map(|p| (p.size, p.align, p.exec)).collect();
        if let Err((i, size)) = crate::link::image_size(&placed, max_image) {
            return Err(ModuleError::TooLarge {
                section: pending[i].name.clone(),
                size,
                limit: max_image,
            });
        }
        let sections: Vec<LoadSection> = pending
            .into_iter()
            .map(|p| LoadSection {
                index: p.index,
                data: match p.bytes {
                    Some(b) => b.to_vec(),
                    // Fits in max_image, checked above.
                    None => vec![0u8; p.size as usize],
                },
                name: p.name,
                align: p.align,
                exec: p.exec,
                write: p.write,
            })
            .collect();

        let place = |sym: &ElfSymbol64<'_, '_, Endianness>| -> Result<SymbolPlace, ModuleError> {
            let name = sym.name().unwrap_or("").to_string();
            Ok(match sym.section() {
                SymbolSection::Undefined => SymbolPlace::Kernel(name),
                SymbolSection::Section(idx) => match load_of.get(&idx) {
                    Some(&l) => {
                        let (value, size) = (sym.address(), sym.size());
                        let section_size = sections[l].data.len() as u64;
                        if value.checked_add(size).is_none_or(|end| end > section_size) {
                            return Err(ModuleError::SymbolOutOfSection {
                                symbol: sym_label(sym),
                                section: sections[l].name.clone(),
                                value,
                                size,
                                section_size,
                            });
                        }
                        SymbolPlace::Section {
                            load_idx: l,
                            offset: value,
                        }
                    }
                    None => SymbolPlace::NotLoaded(
                        file.section_by_index(idx)
                            .ok()
                            .and_then(|s| s.name().ok().map(String::from))
                            .unwrap_or_default(),
                    ),
                },
                SymbolSection::Common => {
                    return Err(ModuleError::BadSymbol {
                        symbol: sym_label(sym),
                        what: "common symbols are not supported (build with -fno-common)",
                    })
                }
                SymbolSection::Unknown => {
                    return Err(ModuleError::BadSymbol {
                        symbol: sym_label(sym),
                        what: "section index is reserved or unreadable",
                    })
                }
                _ => SymbolPlace::Absolute(sym.address()),
            })
        };
        // Every symbol defined in a loaded section lies inside it, used or not.
        for sym in file.symbols() {
            place(&sym)?;
        }

        let mut relocs = Vec::new();
        for sec in file.sections() {
            let Some(&load_idx) = load_of.get(&sec.index()) else {
                continue;
            };
            let section = &sections[load_idx];
            for (offset, r) in sec.relocations() {
                let bad = |what: String| ModuleError::BadRelocation {
                    section: section.name.clone(),
                    offset,
                    what,
                };
                let RelocationFlags::Elf { r_type } = r.flags() else {
                    return Err(ModuleError::NotElf("non-ELF relocation".into()));
                };
                // Unknown types are refused by the linker, by name; their field is at least
                // inside the section.
                let width = crate::link::reloc_width(r_type).unwrap_or(0);
                if offset
                    .checked_add(width)
                    .is_none_or(|end| end > section.data.len() as u64)
                {
                    return Err(bad(format!(
                        "the {width}-byte field lies outside the {}-byte section",
                        section.data.len()
                    )));
                }
                let (target, name) = match r.target() {
                    RelocationTarget::Symbol(si) => {
                        let sym = file.symbol_by_index(si).map_err(|e| bad(e.to_string()))?;
                        let mut n = sym.name().unwrap_or("").to_string();
                        if n.is_empty() {
                            n = sym
                                .section_index()
                                .and_then(|i| file.section_by_index(i).ok())
                                .and_then(|s| s.name().ok().map(String::from))
                                .unwrap_or_default();
                        }
                        (place(&sym)?, n)
                    }
                    RelocationTarget::Section(idx) => match load_of.get(&idx) {
                        Some(&l) => (
                            SymbolPlace::Section { load_idx: l, offset: 0 },
                            format!("section {idx:?}"),
                        ),
                        None => (SymbolPlace::NotLoaded(format!("{idx:?}")), format!("section {idx:?}")),
                    },
                    RelocationTarget::Absolute => (SymbolPlace::Absolute(0), "absolute".into()),
                    _ => return Err(bad("unknown relocation target".into())),
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
        let (mut name, mut description, mut abi) = (String::from("unnamed"), String::new(), ABI_VERSION);
        if let Some(sec) = file.section_by_name(".lucos.info") {
            let d = sec.data().map_err(|e| ModuleError::NotElf(e.to_string()))?;
            if d.len() != INFO_RECORD {
                return Err(ModuleError::BadRecords {
                    section: ".lucos.info".into(),
                    size: d.len() as u64,
                    record: INFO_RECORD,
                });
            }
            abi = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            if !(MIN_ABI_VERSION..=ABI_VERSION).contains(&abi) {
                return Err(ModuleError::AbiVersion(abi));
            }
            name = cstr(&d[4..4 + NAME_MAX])?;
            description = cstr(&d[4 + NAME_MAX..])?;
        }

        // .lucos.replace (may be empty only in a patch that has callbacks: checked below)
        let d = match file.section_by_name(".lucos.replace") {
            Some(sec) => sec.data().map_err(|e| ModuleError::NotElf(e.to_string()))?,
            None => &[],
        };
        let replace_records = records(d, ".lucos.replace", REPLACE_RECORD)?;
        // Functions defined in the module, by name (the first of a name wins), looked up
        // once: records may be many.
        let mut functions = std::collections::HashMap::new();
        for sym in file.symbols() {
            if sym.kind() == object::SymbolKind::Text {
                if let Ok(n) = sym.name() {
                    functions.entry(n).or_insert(sym);
                }
            }
        }
        // A function entry in the module's loaded code, with at least a byte of code there.
        let code_symbol = |name: &str| -> Result<Option<(usize, u64)>, ModuleError> {
            let Some(sym) = functions.get(name) else {
                return Ok(None);
            };
            match place(sym)? {
                SymbolPlace::Section { load_idx, offset } if sections[load_idx].exec => {
                    let section_size = sections[load_idx].data.len() as u64;
                    if offset >= section_size {
                        return Err(ModuleError::SymbolOutOfSection {
                            symbol: name.into(),
                            section: sections[load_idx].name.clone(),
                            value: offset,
                            size: sym.size(),
                            section_size,
                        });
                    }
                    Ok(Some((load_idx, offset)))
                }
                _ => Ok(None),
            }
        };
        let mut replaces = Vec::new();
        for rec in replace_records {
            let old_name = cstr(&rec[..NAME_MAX])?;
            let new_name = cstr(&rec[NAME_MAX..2 * NAME_MAX])?;
            let (load_idx, offset) =
                code_symbol(&new_name)?.ok_or_else(|| ModuleError::NoNewFunction(new_name.clone()))?;
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
            for r in parse_callback_records(d, abi)? {
                let (load_idx, offset) =
                    code_symbol(&r.entry)?.ok_or_else(|| ModuleError::NoCallback(r.entry.clone()))?;
                callbacks.push(Callback {
                    kind: r.kind,
                    name: r.name,
                    entry: r.entry,
                    object: r.object,
                    load_idx,
                    offset,
                    limit: r.limit,
                });
            }
        }
        // A patch does something: it replaces a function, or (kpatch's callback-only
        // patches) it runs callbacks.
        if replaces.is_empty() && callbacks.is_empty() {
            return Err(ModuleError::NoReplacements);
        }
        // Every function of the loaded code, for the guest kernel's symbol lookups.
        let function_list = file
            .symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text)
            .filter_map(|s| match place(&s) {
                Ok(SymbolPlace::Section { load_idx, offset }) if sections[load_idx].exec => Some(FuncSymbol {
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
            functions: function_list,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
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
            (".data..percpu", "per-CPU variables"),
            ("__tracepoints", "tracepoint"),
            ("__dyndbg_classes", "dynamic debug class maps"),
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
        assert!(PatchModule::parse(&module_with("__tracepoints", &[])).is_ok());
        // Static branches are loaded (and linked into the kernel's key lists).
        // pr_debug descriptors are loaded (and listed with the dynamic debug core).
        let m = PatchModule::parse(&module_with("__dyndbg", &[0; 56])).unwrap();
        assert!(m.sections.iter().any(|s| s.name == "__dyndbg"));
        let m = PatchModule::parse(&module_with("__jump_table", &[0; 16])).unwrap();
        assert!(m.sections.iter().any(|s| s.name == "__jump_table"));
        let m = PatchModule::parse(&module_with("__ex_table", &[0; 12])).unwrap();
        assert!(m.sections.iter().any(|s| s.name == "__ex_table"));
        let m = PatchModule::parse(&module_with(".parainstructions", &[0; 16])).unwrap();
        assert!(m.sections.iter().all(|s| s.name != ".parainstructions"), "skipped");
        assert_eq!(m.functions.len(), 1);
        assert_eq!(m.functions[0].name, "new_fn");
    }

    fn callback_record(kind: u32, ms: u32, name: &str, object: &str) -> Vec<u8> {
        let mut r = vec![0u8; CALLBACK_RECORD];
        r[..4].copy_from_slice(&kind.to_le_bytes());
        r[4..8].copy_from_slice(&ms.to_le_bytes());
        r[8..8 + name.len()].copy_from_slice(name.as_bytes());
        let entry = format!("__lucos_cb_{name}");
        r[8 + NAME_MAX..8 + NAME_MAX + entry.len()].copy_from_slice(entry.as_bytes());
        r[8 + 2 * NAME_MAX..8 + 2 * NAME_MAX + object.len()].copy_from_slice(object.as_bytes());
        r
    }

    fn rec(kind: CallbackKind, name: &str, object: &str, limit: Duration) -> CallbackRecord {
        CallbackRecord {
            kind,
            name: name.into(),
            entry: format!("__lucos_cb_{name}"),
            object: object.into(),
            limit,
        }
    }

    #[test]
    fn callback_records() {
        let mut d = callback_record(1, 0, "unlock", "");
        d.extend(callback_record(3, 250, "per_task", ""));
        d.extend(callback_record(4, 0, "pre", "joydev"));
        d.extend(callback_record(5, 0, "unpre", "joydev"));
        assert_eq!(
            parse_callback_records(&d, ABI_VERSION).unwrap(),
            vec![
                rec(CallbackKind::Apply, "unlock", "", DEFAULT_CALLBACK_LIMIT),
                rec(CallbackKind::Thread, "per_task", "", Duration::from_millis(250)),
                rec(CallbackKind::PreApply, "pre", "joydev", DEFAULT_CALLBACK_LIMIT),
                rec(CallbackKind::PreRevert, "unpre", "joydev", DEFAULT_CALLBACK_LIMIT),
            ]
        );
        assert!(matches!(
            parse_callback_records(&callback_record(9, 0, "x", ""), ABI_VERSION),
            Err(ModuleError::BadCallbackKind { kind: 9, .. })
        ));
        assert!(matches!(
            parse_callback_records(&d[..100], ABI_VERSION),
            Err(ModuleError::BadRecords { .. })
        ));
        // ABI 1 records have no object.
        let v1: Vec<u8> = callback_record(2, 0, "undo", "")[..CALLBACK_RECORD_V1].to_vec();
        assert_eq!(
            parse_callback_records(&v1, 1).unwrap(),
            vec![rec(CallbackKind::Revert, "undo", "", DEFAULT_CALLBACK_LIMIT)]
        );
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

    /// Real modules built by kbuild for the guest (debug info stripped), also the fuzzers'
    /// seeds.
    pub(crate) const REAL_MODULES: &[(&str, &[u8])] = &[
        ("cmdline", include_bytes!("../testdata/modules/cmdline.elf")),
        ("uname", include_bytes!("../testdata/modules/uname.elf")),
        ("deadlock_fix", include_bytes!("../testdata/modules/deadlock_fix.elf")),
        ("demo_units", include_bytes!("../testdata/modules/demo_units.elf")),
        ("cb_fault_data", include_bytes!("../testdata/modules/cb_fault_data.elf")),
    ];

    #[test]
    fn real_modules_parse() {
        for (name, ko) in REAL_MODULES {
            // (include_bytes! data need not be aligned: parse copies it then.)
            let m = PatchModule::parse(ko).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!m.replaces.is_empty(), "{name}");
            assert!(m.sections.iter().any(|s| s.name == ".text" && s.exec), "{name}");
        }
    }

    /// Byte offsets (in the file) of the ELF structures the malformed-module tests rewrite.
    struct Offsets {
        /// Section header of each section, by name.
        shdr: std::collections::HashMap<String, usize>,
        /// Symbol table entry of each named symbol.
        sym: std::collections::HashMap<String, usize>,
    }

    fn offsets(ko: &[u8]) -> Offsets {
        let file = ElfFile64::<Endianness>::parse(ko).unwrap();
        let at = |p: *const u8| p as usize - ko.as_ptr() as usize;
        let shdr = file
            .sections()
            .map(|s| {
                let h: *const _ = s.elf_section_header();
                (s.name().unwrap().to_string(), at(h.cast()))
            })
            .collect();
        let sym = file
            .symbols()
            .filter(|s| !s.name().unwrap_or("").is_empty())
            .map(|s| {
                let h: *const _ = s.elf_symbol();
                (s.name().unwrap().to_string(), at(h.cast()))
            })
            .collect();
        Offsets { shdr, sym }
    }

    /// The cmdline module with `f` applied to its bytes.
    fn cmdline_with(f: impl FnOnce(&mut Vec<u8>, &Offsets)) -> Vec<u8> {
        let mut ko = REAL_MODULES[0].1.to_vec();
        let o = offsets(&ko);
        f(&mut ko, &o);
        ko
    }

    fn put64(ko: &mut [u8], at: usize, v: u64) {
        ko[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    // Elf64_Shdr: sh_name 0, sh_type 4, sh_flags 8, sh_addr 16, sh_offset 24, sh_size 32,
    // sh_link 40, sh_info 44, sh_addralign 48. Elf64_Sym: st_value 8, st_size 16.
    const SH_SIZE: usize = 32;
    const SH_ADDRALIGN: usize = 48;
    const ST_SHNDX: usize = 6;
    const ST_VALUE: usize = 8;
    const ST_SIZE: usize = 16;

    /// A signed module with a 2^50-byte `.bss` aborted the VMM: `vec![0; 2^50]`.
    #[test]
    fn huge_bss_is_refused_before_allocating() {
        let ko = cmdline_with(|ko, o| put64(ko, o.shdr[".bss"] + SH_SIZE, 1 << 50));
        // .bss goes after the code and the other loaded sections.
        let e = PatchModule::parse(&ko).unwrap_err();
        assert!(
            matches!(&e, ModuleError::TooLarge { section, size, limit }
                if section == ".bss" && *size > 1 << 50 && *size < (1 << 50) + 4096 && *limit == DEFAULT_MAX_IMAGE),
            "{e:?}"
        );
        // Near 2^64 the layout itself would wrap.
        let ko = cmdline_with(|ko, o| put64(ko, o.shdr[".bss"] + SH_SIZE, u64::MAX - 8));
        assert!(matches!(
            PatchModule::parse(&ko),
            Err(ModuleError::TooLarge { size: u64::MAX, .. })
        ));
    }

    #[test]
    fn the_image_must_fit_the_patch_region() {
        let ko = cmdline_with(|ko, o| put64(ko, o.shdr[".bss"] + SH_SIZE, 3 << 20));
        let e = PatchModule::parse_limited(&ko, 2 << 20).unwrap_err();
        assert!(matches!(e, ModuleError::TooLarge { limit: 0x20_0000, .. }), "{e}");
        let m = PatchModule::parse_limited(&ko, 4 << 20).unwrap();
        let bss = m.sections.iter().find(|s| s.name == ".bss").unwrap();
        assert_eq!(bss.data.len(), 3 << 20);
        assert!(bss.data.iter().all(|&b| b == 0));
    }

    /// A replacement whose symbol lies past its section jumped 0x7ff000 past the image end.
    #[test]
    fn symbols_must_lie_inside_their_section() {
        let sym = "lucos_cmdline_proc_show";
        let ko = cmdline_with(|ko, o| put64(ko, o.sym[sym] + ST_VALUE, 0x7ff000));
        assert_eq!(
            PatchModule::parse(&ko).unwrap_err(),
            ModuleError::SymbolOutOfSection {
                symbol: sym.into(),
                section: ".text".into(),
                value: 0x7ff000,
                size: 53,
                section_size: 53
            }
        );
        // value + size wraps past 2^64.
        let ko = cmdline_with(|ko, o| {
            put64(ko, o.sym[sym] + ST_VALUE, 8);
            put64(ko, o.sym[sym] + ST_SIZE, u64::MAX - 1);
        });
        assert!(matches!(
            PatchModule::parse(&ko),
            Err(ModuleError::SymbolOutOfSection { value: 8, .. })
        ));
        // A data symbol the module does not even use is checked too.
        let ko = cmdline_with(|ko, o| {
            put64(ko, o.sym["__lucos_info"] + ST_SIZE, 389);
        });
        // (.lucos.info is not loaded: nothing to check there.)
        assert!(PatchModule::parse(&ko).is_ok());
        // A common symbol would have been linked at its alignment, as an absolute value.
        let ko = cmdline_with(|ko, o| {
            ko[o.sym[sym] + ST_SHNDX..o.sym[sym] + ST_SHNDX + 2].copy_from_slice(&elf::SHN_COMMON.to_le_bytes());
        });
        assert!(matches!(PatchModule::parse(&ko), Err(ModuleError::BadSymbol { .. })));
    }

    /// A function entry needs code at it: a zero-sized symbol at the very end is refused.
    #[test]
    fn an_entry_at_the_end_of_its_section_is_refused() {
        let sym = "lucos_cmdline_proc_show";
        let ko = cmdline_with(|ko, o| {
            put64(ko, o.sym[sym] + ST_VALUE, 53);
            put64(ko, o.sym[sym] + ST_SIZE, 0);
        });
        assert!(matches!(
            PatchModule::parse(&ko),
            Err(ModuleError::SymbolOutOfSection { value: 53, size: 0, .. })
        ));
    }

    /// A relocation at an offset that wraps when its width is added panicked the linker.
    #[test]
    fn relocations_must_lie_inside_their_section() {
        let rela = |ko: &[u8]| {
            let file = ElfFile64::<Endianness>::parse(ko).unwrap();
            let r = file.section_by_name(".rela.text").unwrap().file_range().unwrap().0;
            r as usize
        };
        for offset in [u64::MAX - 1, 0x34, 0x1000] {
            let ko = cmdline_with(|ko, _| {
                let first = rela(ko);
                put64(ko, first, offset); // r_offset of the first entry (PLT32, 4 bytes)
            });
            let e = PatchModule::parse(&ko).unwrap_err();
            assert!(
                matches!(&e, ModuleError::BadRelocation { section, offset: o, .. } if section == ".text" && *o == offset),
                "{offset:#x}: {e}"
            );
        }
        // The last 4 bytes of .text are fine.
        let ko = cmdline_with(|ko, _| {
            let first = rela(ko);
            put64(ko, first, 0x31);
        });
        assert!(PatchModule::parse(&ko).is_ok());
    }

    /// A module at an odd address (e.g. inside a larger buffer) parses as well.
    #[test]
    fn misaligned_input_parses() {
        let mut buf = vec![0u8; 1];
        buf.extend_from_slice(REAL_MODULES[0].1);
        let m = PatchModule::parse(&buf[1..]).unwrap();
        assert_eq!(m.name, "cmdline");
    }

    /// Alignments that are not powers of two, or so large that the layout needs terabytes.
    #[test]
    fn alignment_must_be_a_small_power_of_two() {
        for align in [3, 24, 1 << 40, 8192] {
            let ko = cmdline_with(|ko, o| put64(ko, o.shdr[".text"] + SH_ADDRALIGN, align));
            assert_eq!(
                PatchModule::parse(&ko).unwrap_err(),
                ModuleError::BadAlign {
                    section: ".text".into(),
                    align
                },
                "{align}"
            );
        }
        for align in [0, 1, 4096] {
            let ko = cmdline_with(|ko, o| put64(ko, o.shdr[".text"] + SH_ADDRALIGN, align));
            let m = PatchModule::parse(&ko).unwrap();
            assert_eq!(
                m.sections.iter().find(|s| s.name == ".text").unwrap().align,
                align.max(1)
            );
        }
    }

    /// Many section headers may describe the same file bytes: the image bound, not the
    /// file size, limits what is copied.
    #[test]
    fn aliased_sections_count_against_the_image_limit() {
        let ko = cmdline_with(|ko, o| {
            // .text covers the whole file.
            put64(ko, o.shdr[".text"] + 24, 0);
            put64(ko, o.shdr[".text"] + SH_SIZE, 4096);
        });
        assert!(matches!(
            PatchModule::parse_limited(&ko, 4096),
            Err(ModuleError::TooLarge { .. })
        ));
    }
}
