//! Writing the patch object: the changed and new functions of every unit, what they need
//! that the running kernel does not have (new globals, string literals, changed constant
//! data, alternative replacements), the special-section entries about them merged into one
//! table each, relocations rewritten so that every reference to unchanged code or data
//! names the running kernel's symbol unambiguously ([`crate::ksyms`]), and the lucos
//! records (`.lucos.info`, `.lucos.replace`). The result is an ELF relocatable that the
//! update server parses like any patch module.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use lucos_update_server::module::NAME_MAX;
use object::write::{Object as WObject, Relocation, SectionId, Symbol, SymbolId, SymbolSection};
use object::{
    elf, Architecture, BinaryFormat, Endianness, RelocationFlags, SectionFlags, SectionKind, SymbolFlags, SymbolKind,
    SymbolScope,
};
use thiserror::Error;

use crate::diff::{Facts, Landing, UnitDiff};
use crate::elf::{Obj, SymKind};
use crate::ksyms::{KsymError, UnitNamer, VmlinuxSyms};
use crate::special::{init_or_exit, Specials, Use, ORC_ENTRY};

/// Why the patch object cannot be written.
#[derive(Debug, Error)]
pub enum EmitError {
    /// A kernel symbol the patch refers to cannot be named.
    #[error(transparent)]
    Symbol(#[from] KsymError),
    /// The patch would need something lucos cannot provide; nothing is written.
    #[error("{unit}: {what}")]
    Unsupported {
        /// The unit.
        unit: String,
        /// What and why.
        what: String,
    },
    /// A name does not fit a lucos record.
    #[error("name '{0}' is longer than the {max} bytes of a lucos record", max = NAME_MAX - 1)]
    NameTooLong(String),
    /// The ELF writer failed.
    #[error("writing the patch object: {0}")]
    Write(String),
}

/// One unit to take code from.
pub struct UnitInput<'a> {
    /// The unit's object path (for messages).
    pub name: String,
    /// Original object's facts.
    pub o: &'a Facts<'a>,
    /// Patched object's facts.
    pub p: &'a Facts<'a>,
    /// The comparison.
    pub diff: &'a UnitDiff,
    /// Names the kernel's copies of the unit's symbols.
    pub namer: &'a UnitNamer<'a>,
}

/// A span of a patched section that goes into the patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Piece {
    unit: usize,
    sec: usize,
    start: u64,
    end: u64,
}

/// One replaced function, for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Replaced {
    /// The running kernel's function (the reference the update server resolves).
    pub old: String,
    /// The function in the patch.
    pub new: String,
    /// Why it counts as changed.
    pub why: String,
    /// The unit.
    pub unit: String,
}

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Emitted {
    /// The ELF bytes.
    #[serde(skip)]
    pub bytes: Vec<u8>,
    /// The replaced functions.
    pub replaced: Vec<Replaced>,
    /// New functions in the patch.
    pub new_functions: Vec<String>,
    /// New data objects in the patch.
    pub new_data: Vec<String>,
    /// Kernel symbols the patch refers to.
    pub kernel_refs: usize,
}

/// Layout of a callback record (`struct lucos_callback` in lucos.h): size, offset of the
/// wrapper's name (`entry`), offset of the pointer to the wrapper (`keep`).
const CALLBACK_RECORD: u64 = 8 + 3 * NAME_MAX as u64 + 8;
const CALLBACK_ENTRY: u64 = 8 + NAME_MAX as u64;
const CALLBACK_KEEP: u64 = 8 + 3 * NAME_MAX as u64;

/// Sections never shared between functions that are taken whole: string pools and
/// constants without symbols, alternative replacements.
fn whole_section(obj: &Obj, sec: usize) -> bool {
    let s = &obj.sections[sec];
    s.strings() || obj.symbols_in(sec).is_empty() || s.name.starts_with(".altinstr_")
}

/// Data sections whose pieces are merged into one output section by name: tables the
/// kernel walks as arrays.
fn merged_by_name(name: &str) -> bool {
    name == "__dyndbg" || name == "__dyndbg_classes"
}

/// Sections whose objects lucos cannot install (new ones; the kernel's own stay usable).
fn unsupported_section(name: &str) -> Option<&'static str> {
    Some(match name {
        n if n.starts_with(".data..percpu") => "a new per-CPU variable",
        "__param" => "a new module parameter",
        "__tracepoints"
        | "__tracepoints_ptrs"
        | "__tracepoints_strings"
        | "_ftrace_events"
        | "_ftrace_eval_map"
        | "__bpf_raw_tp_map" => "a new tracepoint or trace event",
        ".init_array" | ".ctors" => "a constructor",
        ".static_call.text" | "__static_call_tramp_key" => "a new static call",
        "__syscalls_metadata" => "syscall trace metadata (use KPATCH_SYSCALL_DEFINE)",
        _ => return None,
    })
}

struct Builder<'a, 'b> {
    units: &'b [UnitInput<'a>],
    vmlinux: &'b VmlinuxSyms,
    out: WObject<'static>,
    pieces: BTreeSet<Piece>,
    piece_sec: HashMap<Piece, SectionId>,
    /// (unit, patched symbol) → output symbol.
    syms: HashMap<(usize, usize), SymbolId>,
    kernel: HashMap<String, SymbolId>,
    used_names: HashSet<String>,
    /// New global symbols by name: (unit, patched symbol).
    new_globals: HashMap<String, (usize, usize)>,
    merged: HashMap<String, (SectionId, u64)>,
}

impl<'a, 'b> Builder<'a, 'b> {
    fn piece_of(&self, unit: usize, sym: usize) -> Piece {
        let p = self.units[unit].p.obj;
        let s = &p.symbols[sym];
        let sec = s.section.unwrap_or(0);
        if p.symbols_in(sec).len() <= 1 || whole_section(p, sec) {
            Piece {
                unit,
                sec,
                start: 0,
                end: p.sections[sec].data.len() as u64,
            }
        } else {
            Piece {
                unit,
                sec,
                start: s.value,
                end: s.value + s.size.max(1),
            }
        }
    }

    fn whole(&self, unit: usize, sec: usize) -> Piece {
        Piece {
            unit,
            sec,
            start: 0,
            end: self.units[unit].p.obj.sections[sec].data.len() as u64,
        }
    }

    /// Whether patched symbol `sym` of `unit` goes into the patch (is not the kernel's).
    fn taken(&self, unit: usize, sym: usize) -> bool {
        let d = self.units[unit].diff;
        d.new.contains(&sym) || d.renewed.contains(&sym) || d.changed.iter().any(|c| c.0 == sym)
    }

    /// Adds the pieces needed by everything reachable from `roots`.
    fn close(&mut self, roots: Vec<Piece>) -> Result<(), EmitError> {
        let mut work = roots;
        while let Some(pc) = work.pop() {
            if !self.pieces.insert(pc) {
                continue;
            }
            let u = &self.units[pc.unit];
            let p = u.p.obj;
            let sec = &p.sections[pc.sec];
            if let Some(what) = unsupported_section(&sec.name) {
                let sym = p
                    .covering(pc.sec, pc.start)
                    .map(|i| p.symbols[i].name.clone())
                    .unwrap_or_default();
                return Err(EmitError::Unsupported {
                    unit: u.name.clone(),
                    what: format!(
                        "{what} ('{sym}' in section {}): lucos cannot add it to a running kernel",
                        sec.name
                    ),
                });
            }
            for r in sec.rels_in(pc.start, pc.end) {
                work.extend(self.needs(pc.unit, pc.sec, r)?);
            }
            // Special entries about code in this piece.
            if sec.exec() {
                for (_, si, size, ents) in u.p.entries_about(pc.sec) {
                    for &e in ents {
                        let at = e * size;
                        if self.anchor_in(pc, si, at) {
                            for r in p.sections[si].rels_in(at, at + size).iter().skip(1) {
                                work.extend(self.needs(pc.unit, si, r)?);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the special entry at `at` of section `si` is about code in piece `pc`.
    fn anchor_in(&self, pc: Piece, si: usize, at: u64) -> bool {
        let f = self.units[pc.unit].p;
        f.obj.sections[si]
            .rels_in(at, at + 1)
            .first()
            .and_then(|r| f.landing_section(si, r))
            .is_some_and(|(s, off)| s == pc.sec && off >= pc.start && off < pc.end)
    }

    /// The pieces a relocation needs in the patch.
    fn needs(&self, unit: usize, sec: usize, r: &crate::elf::Rel) -> Result<Vec<Piece>, EmitError> {
        let u = &self.units[unit];
        let p = u.p.obj;
        Ok(match u.p.landing(sec, r) {
            Landing::Sym(i, _) => {
                let s = &p.symbols[i];
                if self.taken(unit, i) {
                    if s.section.is_some_and(|x| init_or_exit(&p.sections[x].name)) {
                        return Err(self.init_ref(unit, &s.name));
                    }
                    vec![self.piece_of(unit, i)]
                } else {
                    vec![]
                }
            }
            Landing::Str(s, _) | Landing::Anon(s, _) => {
                if init_or_exit(&p.sections[s].name) {
                    return Err(self.init_ref(unit, &p.sections[s].name));
                }
                vec![self.whole(unit, s)]
            }
            Landing::Undef(i) => match self.new_globals.get(&p.symbols[i].name) {
                Some(&(gu, gs)) => vec![self.piece_of(gu, gs)],
                None => vec![],
            },
        })
    }

    fn init_ref(&self, unit: usize, name: &str) -> EmitError {
        EmitError::Unsupported {
            unit: self.units[unit].name.clone(),
            what: format!("patched code refers to '{name}', which is __init/__exit code or data (freed after boot)"),
        }
    }

    fn unique(&mut self, name: &str) -> String {
        let mut n = name.to_string();
        let mut k = 1;
        while !self.used_names.insert(n.clone()) {
            k += 1;
            n = format!("{name}.lucos{k}");
        }
        n
    }

    fn section_for(&mut self, name: &str, sh_type: u32, sh_flags: u64, align: u64, data: &[u8]) -> (SectionId, u64) {
        let kind = if sh_flags & u64::from(elf::SHF_EXECINSTR) != 0 {
            SectionKind::Text
        } else if sh_type == elf::SHT_NOBITS {
            SectionKind::UninitializedData
        } else if sh_flags & u64::from(elf::SHF_WRITE) != 0 {
            SectionKind::Data
        } else {
            SectionKind::ReadOnlyData
        };
        let id = self.out.add_section(vec![], name.as_bytes().to_vec(), kind);
        let off = if sh_type == elf::SHT_NOBITS {
            self.out.append_section_bss(id, data.len() as u64, align)
        } else {
            self.out.append_section_data(id, data, align)
        };
        self.out.section_mut(id).flags = SectionFlags::Elf { sh_flags };
        (id, off)
    }

    fn kernel_sym(&mut self, spec: String) -> SymbolId {
        if let Some(&id) = self.kernel.get(&spec) {
            return id;
        }
        let id = self.out.add_symbol(Symbol {
            name: spec.clone().into_bytes(),
            value: 0,
            size: 0,
            kind: SymbolKind::Unknown,
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Undefined,
            flags: SymbolFlags::None,
        });
        self.kernel.insert(spec, id);
        id
    }

    /// Where piece `pc`'s byte `off` (section-relative) is in the output.
    fn out_place(&self, pc: Piece) -> Option<(SectionId, u64)> {
        self.piece_sec.get(&pc).map(|&id| (id, 0)).or_else(|| {
            let name = &self.units[pc.unit].p.obj.sections[pc.sec].name;
            self.merged
                .get(&format!("{}#{}#{}#{}", name, pc.unit, pc.sec, pc.start))
                .copied()
        })
    }

    /// Target symbol and addend for relocation `r` of section `sec` of `unit`.
    fn target(&mut self, unit: usize, sec: usize, r: &crate::elf::Rel) -> Result<(SymbolId, i64), EmitError> {
        let u = &self.units[unit];
        let p = u.p.obj;
        let rs = &p.symbols[r.sym];
        // Offset of the target in its section, as the raw relocation has it.
        let base = match rs.kind {
            SymKind::Section => 0,
            _ => rs.value as i64,
        };
        let off_sec = base + r.addend;
        match u.p.landing(sec, r) {
            Landing::Sym(i, _) => {
                let s = &p.symbols[i];
                if self.taken(unit, i) {
                    let pc = self.piece_of(unit, i);
                    let id = self.syms.get(&(unit, i)).copied();
                    match id {
                        Some(id) => Ok((id, off_sec - s.value as i64)),
                        None => {
                            let (sid, at) = self
                                .out_place(pc)
                                .ok_or_else(|| EmitError::Write(format!("no place for {}", s.name)))?;
                            let ssym = self.out.section_symbol(sid);
                            Ok((ssym, off_sec - pc.start as i64 + at as i64))
                        }
                    }
                } else {
                    let oi = *u
                        .diff
                        .pairing
                        .p2o
                        .get(&i)
                        .ok_or_else(|| EmitError::Write(format!("{} is unpaired", s.name)))?;
                    let spec = u.namer.spec(u.o.obj, oi)?;
                    let id = self.kernel_sym(spec);
                    Ok((id, off_sec - s.value as i64))
                }
            }
            Landing::Str(s, _) | Landing::Anon(s, _) => {
                let pc = self.whole(unit, s);
                let (sid, at) = self
                    .out_place(pc)
                    .ok_or_else(|| EmitError::Write(format!("no place for section {}", p.sections[s].name)))?;
                let ssym = self.out.section_symbol(sid);
                Ok((ssym, off_sec + at as i64))
            }
            Landing::Undef(i) => {
                let name = p.symbols[i].name.clone();
                if let Some(&(gu, gs)) = self.new_globals.get(&name) {
                    if let Some(&id) = self.syms.get(&(gu, gs)) {
                        return Ok((id, r.addend));
                    }
                }
                let spec = u.namer.external(self.vmlinux, &name);
                let id = self.kernel_sym(spec);
                Ok((id, r.addend))
            }
        }
    }

    /// Copies the relocations of `[from, to)` of section `sec` of `unit` to `out` at
    /// `out_off`, with their targets mapped.
    fn add_relocs(
        &mut self,
        (unit, sec): (usize, usize),
        (from, to): (u64, u64),
        (out, out_off): (SectionId, u64),
    ) -> Result<(), EmitError> {
        let rels: Vec<crate::elf::Rel> = self.units[unit].p.obj.sections[sec].rels_in(from, to).to_vec();
        for r in &rels {
            let (symbol, addend) = self.target(unit, sec, r)?;
            self.out
                .add_relocation(
                    out,
                    Relocation {
                        offset: r.offset - from + out_off,
                        symbol,
                        addend,
                        flags: RelocationFlags::Elf { r_type: r.r_type },
                    },
                )
                .map_err(|e| EmitError::Write(e.to_string()))?;
        }
        Ok(())
    }
}

/// Writes the patch object for the changed functions of `units`.
pub fn emit(
    units: &[UnitInput],
    vmlinux: &VmlinuxSyms,
    specials: &Specials,
    name: &str,
    description: &str,
) -> Result<Emitted, EmitError> {
    let mut b = Builder {
        units,
        vmlinux,
        out: WObject::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little),
        pieces: BTreeSet::new(),
        piece_sec: HashMap::new(),
        syms: HashMap::new(),
        kernel: HashMap::new(),
        used_names: HashSet::new(),
        new_globals: HashMap::new(),
        merged: HashMap::new(),
    };
    for (ui, u) in units.iter().enumerate() {
        for &s in &u.diff.new {
            let sym = &u.p.obj.symbols[s];
            if sym.global {
                b.new_globals.insert(sym.name.clone(), (ui, s));
            }
        }
    }
    // Roots: changed functions and the lucos records the unit's macros made.
    let mut roots = Vec::new();
    for (ui, u) in units.iter().enumerate() {
        for &(s, _) in &u.diff.changed {
            roots.push(b.piece_of(ui, s));
        }
        for (si, sec) in u.p.obj.sections.iter().enumerate() {
            if sec.name.starts_with(".lucos.") && sec.alloc() {
                roots.push(b.whole(ui, si));
            }
        }
    }
    b.close(roots)?;

    // Sections and symbols for every piece (merged tables by name).
    let pieces: Vec<Piece> = b.pieces.iter().copied().collect();
    for &pc in &pieces {
        let p = units[pc.unit].p.obj;
        let sec = &p.sections[pc.sec];
        let data = &sec.data[pc.start as usize..pc.end as usize];
        if merged_by_name(&sec.name) || sec.name.starts_with(".lucos.") {
            let key = sec.name.clone();
            let (id, at) = match b.merged.get(&key).copied() {
                Some((id, _)) => {
                    let at = b.out.append_section_data(id, data, sec.align);
                    (id, at)
                }
                None => {
                    let (id, at) = b.section_for(&sec.name, sec.sh_type, sec.flags, sec.align, data);
                    b.merged.insert(key, (id, 0));
                    (id, at)
                }
            };
            b.merged
                .insert(format!("{}#{}#{}#{}", sec.name, pc.unit, pc.sec, pc.start), (id, at));
        } else {
            let (id, _) = b.section_for(&sec.name, sec.sh_type, sec.flags, sec.align, data);
            b.piece_sec.insert(pc, id);
        }
    }
    let mut new_functions = Vec::new();
    let mut new_data = Vec::new();
    for &pc in &pieces {
        let u = &units[pc.unit];
        let p = u.p.obj;
        let Some((sid, at)) = b.out_place(pc) else { continue };
        for si in p.symbols_in(pc.sec) {
            let s = &p.symbols[si];
            if s.value < pc.start || s.value >= pc.end.max(pc.start + 1) || !b.taken(pc.unit, si) {
                continue;
            }
            let name = b.unique(&s.name);
            if u.diff.new.contains(&si) {
                if s.kind == SymKind::Func {
                    new_functions.push(name.clone());
                } else {
                    new_data.push(name.clone());
                }
            }
            let id = b.out.add_symbol(Symbol {
                name: name.into_bytes(),
                value: s.value - pc.start + at,
                size: s.size,
                kind: if s.kind == SymKind::Func {
                    SymbolKind::Text
                } else {
                    SymbolKind::Data
                },
                scope: SymbolScope::Compilation,
                weak: false,
                section: SymbolSection::Section(sid),
                flags: SymbolFlags::None,
            });
            b.syms.insert((pc.unit, si), id);
        }
    }
    // Relocations of every piece.
    for &pc in &pieces {
        let Some((sid, at)) = b.out_place(pc) else { continue };
        b.add_relocs((pc.unit, pc.sec), (pc.start, pc.end), (sid, at))?;
    }
    // A callback record names its wrapper, which may have been renamed (wrappers of the
    // same name from several files): write the output name into the record.
    for &pc in &pieces {
        let p = units[pc.unit].p.obj;
        if p.sections[pc.sec].name != ".lucos.callback" {
            continue;
        }
        let Some((sid, at)) = b.out_place(pc) else { continue };
        for r in p.sections[pc.sec].rels_in(pc.start, pc.end) {
            let rec = (r.offset - pc.start) / CALLBACK_RECORD * CALLBACK_RECORD;
            if r.offset - pc.start - rec != CALLBACK_KEEP {
                continue;
            }
            let Landing::Sym(w, _) = units[pc.unit].p.landing(pc.sec, r) else {
                continue;
            };
            let Some(&id) = b.syms.get(&(pc.unit, w)) else { continue };
            let name = b.out.symbol(id).name.clone();
            let field = &mut b.out.section_mut(sid).data_mut()
                [(at + rec + CALLBACK_ENTRY) as usize..(at + rec + CALLBACK_ENTRY) as usize + NAME_MAX];
            if name.len() >= NAME_MAX {
                return Err(EmitError::NameTooLong(String::from_utf8_lossy(&name).into()));
            }
            field.fill(0);
            field[..name.len()].copy_from_slice(&name);
        }
    }
    // Special tables: one output section per type, entries about the pieces' code.
    for sp in specials.all() {
        if sp.usage == Use::Drop {
            continue;
        }
        let mut entries: Vec<(usize, usize, u64)> = Vec::new();
        for &pc in &pieces {
            let u = &units[pc.unit];
            if !u.p.obj.sections[pc.sec].exec() {
                continue;
            }
            for (name, si, size, ents) in u.p.entries_about(pc.sec) {
                if name != sp.name {
                    continue;
                }
                for &e in ents {
                    if b.anchor_in(pc, si, e * size) {
                        entries.push((pc.unit, si, e));
                    }
                }
            }
        }
        if entries.is_empty() {
            continue;
        }
        entries.sort();
        entries.dedup();
        let first = &units[entries[0].0].p.obj.sections[entries[0].1];
        let (id, _) = b.section_for(sp.name, first.sh_type, first.flags, first.align, &[]);
        let orc = (sp.name == ".orc_unwind_ip").then(|| {
            b.section_for(".orc_unwind", elf::SHT_PROGBITS, u64::from(elf::SHF_ALLOC), 2, &[])
                .0
        });
        for (ui, si, e) in entries {
            let sec = &units[ui].p.obj.sections[si];
            let at = e * sp.size;
            let bytes = sec.data[at as usize..(at + sp.size) as usize].to_vec();
            let out_off = b.out.append_section_data(id, &bytes, sec.align.min(8));
            b.add_relocs((ui, si), (at, at + sp.size), (id, out_off))?;
            if let Some(orc_id) = orc {
                let p = units[ui].p.obj;
                let osec = p
                    .section_named(".orc_unwind")
                    .ok_or_else(|| EmitError::Write("no .orc_unwind".into()))?;
                let o_at = e * ORC_ENTRY;
                let ob = p.sections[osec]
                    .data
                    .get(o_at as usize..(o_at + ORC_ENTRY) as usize)
                    .ok_or_else(|| EmitError::Write(".orc_unwind shorter than .orc_unwind_ip".into()))?
                    .to_vec();
                b.out.append_section_data(orc_id, &ob, 2);
            }
        }
    }
    // lucos records.
    let mut replaced = Vec::new();
    let mut info = vec![0u8; 4 + NAME_MAX + 256];
    info[..4].copy_from_slice(&lucos_update_server::module::ABI_VERSION.to_le_bytes());
    put_name(&mut info[4..4 + NAME_MAX], name)?;
    let desc: String = description.chars().take(255).collect();
    info[4 + NAME_MAX..4 + NAME_MAX + desc.len().min(255)].copy_from_slice(&desc.as_bytes()[..desc.len().min(255)]);
    b.section_for(".lucos.info", elf::SHT_PROGBITS, u64::from(elf::SHF_ALLOC), 4, &info);
    let (rep, _) = b.section_for(".lucos.replace", elf::SHT_PROGBITS, u64::from(elf::SHF_ALLOC), 8, &[]);
    let mut changed: BTreeMap<String, (usize, usize, String)> = BTreeMap::new();
    for (ui, u) in units.iter().enumerate() {
        for (s, why) in &u.diff.changed {
            let sym = &u.p.obj.symbols[*s];
            // A cold part is jumped to from its function, never called.
            if sym.name.ends_with(".cold") || sym.name.contains(".cold.") {
                continue;
            }
            let oi = u.diff.pairing.p2o[s];
            let old = u.namer.spec(u.o.obj, oi)?;
            changed.insert(old, (ui, *s, why.clone()));
        }
    }
    for (old, (ui, s, why)) in changed {
        let id = b.syms[&(ui, s)];
        let new = String::from_utf8_lossy(&b.out.symbol(id).name).to_string();
        let mut rec = vec![0u8; 2 * NAME_MAX + 8];
        put_name(&mut rec[..NAME_MAX], &old)?;
        put_name(&mut rec[NAME_MAX..2 * NAME_MAX], &new)?;
        let off = b.out.append_section_data(rep, &rec, 8);
        b.out
            .add_relocation(
                rep,
                Relocation {
                    offset: off + 2 * NAME_MAX as u64,
                    symbol: id,
                    addend: 0,
                    flags: RelocationFlags::Elf {
                        r_type: elf::R_X86_64_64,
                    },
                },
            )
            .map_err(|e| EmitError::Write(e.to_string()))?;
        replaced.push(Replaced {
            old,
            new,
            why,
            unit: units[ui].name.clone(),
        });
    }
    let kernel_refs = b.kernel.len();
    let bytes = b.out.write().map_err(|e| EmitError::Write(e.to_string()))?;
    Ok(Emitted {
        bytes,
        replaced,
        new_functions,
        new_data,
        kernel_refs,
    })
}

fn put_name(field: &mut [u8], name: &str) -> Result<(), EmitError> {
    if name.len() >= field.len() {
        return Err(EmitError::NameTooLong(name.into()));
    }
    field[..name.len()].copy_from_slice(name.as_bytes());
    Ok(())
}
