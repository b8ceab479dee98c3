//! Comparing a unit's original and patched objects, function by function and
//! relocation-aware: a function counts as changed only if what it does changes.
//!
//! - Symbols are paired by name, ignoring the numbers the compiler appends (`foo.isra.0`
//!   and `foo.isra.1` are the same clone; `ctr.3` is static local `ctr`); several
//!   candidates of one name (static locals of the same name in different functions, WARN
//!   once flags, dynamic debug descriptors) are told apart by which functions use them.
//! - Two functions are the same when their bytes are equal outside relocation fields and
//!   each relocation refers to the same thing: the same (paired) symbol and addend, the same
//!   string for a string literal, the same bytes for anonymous constants; and when the
//!   special-section entries about them (exception table, BUG table, alternatives, static
//!   keys, static calls, paravirt sites) are the same, except a BUG entry's line number.
//!   A call to a changed function is not a change of the caller (the old function will jump
//!   to the new one); a use of changed read-only data is.
//! - A function that exists only inlined has no symbol of its own: its change shows as
//!   changes of the functions it is inlined into.

use std::collections::{BTreeMap, HashMap, HashSet};

use iced_x86::{Decoder, DecoderOptions};

use crate::elf::{read_uint, reloc_pcrel, reloc_width, Obj, Rel, SymKind};
use crate::patchfile::FileChange;
use crate::special::{ignored, init_or_exit, Specials, Use};

/// The name without the numbers the compiler or `__UNIQUE_ID` appends: `foo.isra.0` →
/// `foo.isra`, `ctr.3` → `ctr`, `__UNIQUE_ID_ddebug412` → `__UNIQUE_ID_ddebug`.
pub fn normalize(name: &str) -> String {
    let mut parts = name.split('.');
    let mut n = parts.next().unwrap_or("").to_string();
    for p in parts {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            n.push('.');
            n.push_str(p);
        }
    }
    if n.starts_with("__UNIQUE_ID_") {
        while n.ends_with(|c: char| c.is_ascii_digit()) {
            n.pop();
        }
    }
    n
}

/// What a relocation points at, in terms that can be compared across the two objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A function or object of the original object (by symbol index), plus an offset.
    Sym(usize, i64),
    /// Something the original object does not have (by name), plus an offset.
    New(String, i64),
    /// A string literal (the bytes up to its NUL).
    Str(Vec<u8>),
    /// Bytes of an anonymous constant (to the end of its section) and relocations there.
    Anon(Vec<u8>),
    /// An undefined symbol, by name, plus the addend.
    Undef(String, i64),
}

/// Where a relocation lands, inside its own object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// In symbol `sym` (a function or object), `delta` bytes in (the raw addend for a
    /// symbol reference, the resolved offset for a section-symbol reference).
    Sym(usize, i64),
    /// In a string pool section at this offset.
    Str(usize, u64),
    /// In a section (no symbol covers the place) at this offset.
    Anon(usize, u64),
    /// An undefined (or absolute) symbol.
    Undef(usize),
}

/// A special section of an object, its entries grouped by the section their first field
/// points into.
struct SpecialSection {
    name: String,
    index: usize,
    entry: u64,
    /// Section pointed into → entry indices.
    groups: BTreeMap<usize, Vec<u64>>,
}

/// An entry list about one section: (special section name, its index, entry size, entry
/// indices).
pub type EntryList<'f> = (&'f str, usize, u64, &'f [u64]);

/// Per-object facts computed once: instruction boundaries of code sections, who
/// references what, which special entries belong to which section.
pub struct Facts<'a> {
    /// The object.
    pub obj: &'a Obj,
    insn_ends: HashMap<usize, Vec<(u64, u64)>>,
    /// Each special section present.
    specials: Vec<SpecialSection>,
    /// Functions (symbol indices) whose code refers to each symbol.
    pub referrers: HashMap<usize, HashSet<usize>>,
}

impl<'a> Facts<'a> {
    /// Computes the facts of `obj`.
    pub fn new(obj: &'a Obj, specials: &Specials) -> Self {
        let mut insn_ends = HashMap::new();
        for (i, s) in obj.sections.iter().enumerate() {
            if s.exec() && s.alloc() && !s.rels.is_empty() {
                let mut v = Vec::new();
                let mut d = Decoder::with_ip(64, &s.data, 0, DecoderOptions::NONE);
                while d.can_decode() {
                    let start = d.position() as u64;
                    let insn = d.decode();
                    if insn.is_invalid() {
                        break;
                    }
                    v.push((start, start + insn.len() as u64));
                }
                insn_ends.insert(i, v);
            }
        }
        let mut f = Facts {
            obj,
            insn_ends,
            specials: Vec::new(),
            referrers: HashMap::new(),
        };
        for sp in specials.all() {
            if sp.usage == Use::Drop {
                continue;
            }
            for (si, s) in obj.sections.iter().enumerate() {
                if s.name != sp.name || s.data.is_empty() || sp.size == 0 {
                    continue;
                }
                let mut groups: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
                for e in 0..(s.data.len() as u64 / sp.size) {
                    let at = e * sp.size;
                    if let Some(r) = s.rels_in(at, at + 1).first() {
                        if let Some((sec, _)) = f.landing_section(si, r) {
                            groups.entry(sec).or_default().push(e);
                        }
                    }
                }
                f.specials.push(SpecialSection {
                    name: sp.name.to_string(),
                    index: si,
                    entry: sp.size,
                    groups,
                });
            }
        }
        for (si, s) in obj.sections.iter().enumerate() {
            if !s.exec() || !s.alloc() {
                continue;
            }
            let funcs = obj.symbols_in(si);
            for r in &s.rels {
                let Some(&from) = funcs
                    .iter()
                    .rev()
                    .find(|&&fi| obj.symbols[fi].value <= r.offset && obj.symbols[fi].kind == SymKind::Func)
                else {
                    continue;
                };
                if let Landing::Sym(t, _) = f.landing(si, r) {
                    f.referrers.entry(t).or_default().insert(from);
                }
            }
        }
        f
    }

    /// Bytes from a relocation field to the end of its instruction (code), else 0: what a
    /// PC-relative addend is short of the referenced offset.
    fn adjust(&self, sec: usize, r: &Rel) -> i64 {
        if !reloc_pcrel(r.r_type) {
            return 0;
        }
        match self.insn_ends.get(&sec) {
            Some(v) => {
                let i = v.partition_point(|&(_, end)| end <= r.offset);
                match v.get(i) {
                    Some(&(start, end)) if start <= r.offset => (end - r.offset) as i64,
                    _ => 4,
                }
            }
            None => 0,
        }
    }

    /// Where relocation `r` of section `sec` lands.
    pub fn landing(&self, sec: usize, r: &Rel) -> Landing {
        let s = &self.obj.symbols[r.sym];
        match (s.kind, s.section) {
            (SymKind::Section, Some(t)) | (SymKind::NoType, Some(t)) => {
                let base = if s.kind == SymKind::Section { 0 } else { s.value as i64 };
                let off = base + r.addend + self.adjust(sec, r);
                let off = u64::try_from(off).unwrap_or(0);
                let ts = &self.obj.sections[t];
                if ts.strings() {
                    return Landing::Str(t, off);
                }
                // A place no symbol covers may be one past the end of an object: the end
                // of an array a loop runs to (`for (p = t; p < t + ARRAY_SIZE(t); p++)`),
                // which must name the same copy of the array as its start.
                match self.obj.covering(t, off).or_else(|| self.obj.ending_at(t, off)) {
                    Some(c) => {
                        // Keep the raw addend's relation: delta as an addend on the symbol.
                        let delta = off as i64 - self.obj.symbols[c].value as i64 - self.adjust(sec, r);
                        Landing::Sym(c, delta)
                    }
                    None => Landing::Anon(t, off),
                }
            }
            (SymKind::Func | SymKind::Object, Some(_)) => Landing::Sym(r.sym, r.addend),
            _ => Landing::Undef(r.sym),
        }
    }

    /// The section a relocation lands in, and the offset there.
    pub fn landing_section(&self, sec: usize, r: &Rel) -> Option<(usize, u64)> {
        let s = &self.obj.symbols[r.sym];
        let t = s.section?;
        let base = if s.kind == SymKind::Section { 0 } else { s.value as i64 };
        let off = base + r.addend + self.adjust(sec, r);
        Some((t, u64::try_from(off).ok()?))
    }

    /// The special entries about section `sec`: (special section name, section index,
    /// entry size, entry indices).
    pub fn entries_about(&self, sec: usize) -> Vec<EntryList<'_>> {
        self.specials
            .iter()
            .filter_map(|s| {
                s.groups
                    .get(&sec)
                    .map(|v| (s.name.as_str(), s.index, s.entry, v.as_slice()))
            })
            .collect()
    }
}

/// The C string at `off` of section `sec`.
fn cstr_at(obj: &Obj, sec: usize, off: u64) -> Vec<u8> {
    let d = &obj.sections[sec].data;
    let start = (off as usize).min(d.len());
    let end = d[start..].iter().position(|&b| b == 0).map_or(d.len(), |p| start + p);
    d[start..end].to_vec()
}

/// `bytes` with every `PATH:LINE` of file `f` given the line's new number.
fn remap_lines(bytes: &[u8], f: &FileChange) -> Vec<u8> {
    let pat = format!("{}:", f.path).into_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(&pat) {
            let start = i + pat.len();
            let end = start + bytes[start..].iter().take_while(|c| c.is_ascii_digit()).count();
            let line = std::str::from_utf8(&bytes[start..end])
                .ok()
                .and_then(|d| d.parse::<u32>().ok());
            if let Some(new) = line.and_then(|l| f.map_line(l)) {
                out.extend_from_slice(&pat);
                out.extend_from_slice(new.to_string().as_bytes());
                i = end;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Pairing of the patched object's symbols with the original's.
#[derive(Debug, Default, Clone)]
pub struct Pairing {
    /// Patched symbol index → original symbol index.
    pub p2o: HashMap<usize, usize>,
    /// Original → patched.
    pub o2p: HashMap<usize, usize>,
}

/// The functions and objects of an object that can be compared and taken: defined in
/// allocated sections that are not metadata or special tables.
pub fn items(obj: &Obj, specials: &Specials) -> Vec<usize> {
    (0..obj.symbols.len())
        .filter(|&i| {
            let s = &obj.symbols[i];
            let Some(sec) = s.section else { return false };
            let sec = &obj.sections[sec];
            matches!(s.kind, SymKind::Func | SymKind::Object)
                && sec.alloc()
                && !ignored(&sec.name)
                && specials.get(&sec.name).is_none()
        })
        .collect()
}

/// Pairs the symbols of `p` (patched) with those of `o` (original).
pub fn pair(o: &Facts, p: &Facts, specials: &Specials) -> Pairing {
    let mut by_key_o: BTreeMap<(String, bool), Vec<usize>> = BTreeMap::new();
    let mut by_key_p: BTreeMap<(String, bool), Vec<usize>> = BTreeMap::new();
    for i in items(o.obj, specials) {
        let s = &o.obj.symbols[i];
        by_key_o
            .entry((normalize(&s.name), s.kind == SymKind::Func))
            .or_default()
            .push(i);
    }
    for i in items(p.obj, specials) {
        let s = &p.obj.symbols[i];
        by_key_p
            .entry((normalize(&s.name), s.kind == SymKind::Func))
            .or_default()
            .push(i);
    }
    let mut pairing = Pairing::default();
    let link = |pi: usize, oi: usize, pr: &mut Pairing| {
        pr.p2o.insert(pi, oi);
        pr.o2p.insert(oi, pi);
    };
    // Functions first (exact name, then the only candidate), so that data can be told
    // apart by the functions that use it.
    for pass_funcs in [true, false] {
        for (key, ps) in &by_key_p {
            if key.1 != pass_funcs {
                continue;
            }
            let Some(os) = by_key_o.get(key) else { continue };
            let mut left_p: Vec<usize> = Vec::new();
            let mut left_o: Vec<usize> = os.clone();
            for &pi in ps {
                let name = &p.obj.symbols[pi].name;
                let exact = left_o.iter().position(|&oi| &o.obj.symbols[oi].name == name);
                match exact {
                    Some(k) if ps.len() == 1 || os.len() == 1 || is_plain(name) => {
                        link(pi, left_o.remove(k), &mut pairing);
                    }
                    _ => left_p.push(pi),
                }
            }
            if left_p.len() == 1 && left_o.len() == 1 {
                link(left_p[0], left_o[0], &mut pairing);
                continue;
            }
            // Several of one name: by the (normalized) names of the functions using them,
            // in order.
            let users = |f: &Facts, i: usize| -> Vec<String> {
                let mut v: Vec<String> = f
                    .referrers
                    .get(&i)
                    .map(|s| s.iter().map(|&u| normalize(&f.obj.symbols[u].name)).collect())
                    .unwrap_or_default();
                v.sort();
                v.dedup();
                v
            };
            for pi in left_p {
                let up = users(p, pi);
                if let Some(k) = left_o.iter().position(|&oi| users(o, oi) == up) {
                    link(pi, left_o.remove(k), &mut pairing);
                }
            }
        }
    }
    pairing
}

/// A name without a compiler-added number.
fn is_plain(name: &str) -> bool {
    normalize(name) == name
}

/// A place in an object: section index and offset.
type Place = (usize, u64);

/// Why a patched function or object differs from its original.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference(pub String);

/// Compares two objects' items (functions or data) in their objects.
pub struct Comparer<'a> {
    /// Original.
    pub o: &'a Facts<'a>,
    /// Patched.
    pub p: &'a Facts<'a>,
    /// The pairing.
    pub pairing: &'a Pairing,
    /// Patched symbols that are new copies (changed read-only data): a reference to one is
    /// a change.
    pub renewed: &'a HashSet<usize>,
    /// The special section types.
    pub specials: &'a Specials,
    /// Bytes of a dynamic debug descriptor to ignore (its line number), if known.
    pub ddebug_line: Option<(u64, u64)>,
    /// How the diff moves lines, per changed file (`__FILE__` path): a string that differs
    /// only in a `FILE:LINE` the diff moved is the same string.
    pub lines: &'a [FileChange],
}

impl Comparer<'_> {
    fn target(&self, f: &Facts, sec: usize, r: &Rel, patched: bool) -> Target {
        let obj = f.obj;
        match f.landing(sec, r) {
            Landing::Sym(i, d) => {
                if patched {
                    match self.pairing.p2o.get(&i) {
                        Some(&o) if !self.renewed.contains(&i) => Target::Sym(o, d),
                        _ => Target::New(obj.symbols[i].name.clone(), d),
                    }
                } else {
                    Target::Sym(i, d)
                }
            }
            Landing::Str(s, off) => Target::Str(cstr_at(obj, s, off)),
            Landing::Anon(s, off) => {
                let d = &obj.sections[s].data;
                Target::Anon(d[(off as usize).min(d.len())..].to_vec())
            }
            Landing::Undef(i) => Target::Undef(obj.symbols[i].name.clone(), r.addend),
        }
    }

    /// Compares `[o_start, o_start+len)` of original section `os` with the same span at
    /// `p_start` of patched section `ps`, bytes outside relocation fields and `ignore`
    /// (offsets relative to the span) and relocation targets.
    fn same_span(
        &self,
        (os, o_start): Place,
        (ps, p_start): Place,
        len: u64,
        ignore: Option<(u64, u64)>,
        skip_first_rel: bool,
    ) -> Result<(), Difference> {
        let (so, sp) = (&self.o.obj.sections[os], &self.p.obj.sections[ps]);
        let get = |d: &[u8], s: u64| -> Option<Vec<u8>> { d.get(s as usize..(s + len) as usize).map(<[u8]>::to_vec) };
        let (Some(mut bo), Some(mut bp)) = (get(&so.data, o_start), get(&sp.data, p_start)) else {
            return Err(Difference("size changed".into()));
        };
        let ro = so.rels_in(o_start, o_start + len);
        let rp = sp.rels_in(p_start, p_start + len);
        if ro.len() != rp.len() {
            return Err(Difference(format!("{} references instead of {}", rp.len(), ro.len())));
        }
        for (b, rels, start) in [(&mut bo, ro, o_start), (&mut bp, rp, p_start)] {
            for r in rels {
                let w = reloc_width(r.r_type).unwrap_or(4) as u64;
                for k in (r.offset - start)..((r.offset - start + w).min(len)) {
                    b[k as usize] = 0;
                }
            }
            if let Some((io, il)) = ignore {
                for k in io..(io + il).min(len) {
                    b[k as usize] = 0;
                }
            }
        }
        if bo != bp {
            let at = bo.iter().zip(&bp).position(|(a, b)| a != b).unwrap_or(0);
            return Err(Difference(format!("bytes differ at +{at:#x}")));
        }
        for (k, (a, b)) in ro.iter().zip(rp).enumerate() {
            if a.offset - o_start != b.offset - p_start || a.r_type != b.r_type {
                return Err(Difference(format!("reference at +{:#x} moved", a.offset - o_start)));
            }
            if skip_first_rel && k == 0 {
                continue;
            }
            let (ta, tb) = (self.target(self.o, os, a, false), self.target(self.p, ps, b, true));
            if ta != tb && !self.moved_line_only(&ta, &tb) {
                return Err(Difference(format!(
                    "at +{:#x} refers to {} (was {})",
                    a.offset - o_start,
                    self.describe(&tb),
                    self.describe(&ta)
                )));
            }
        }
        Ok(())
    }

    /// Whether two string targets differ only in `FILE:LINE` references (from
    /// `__FILE__ ":" __stringify(__LINE__)`) to lines the diff moved but did not change.
    fn moved_line_only(&self, a: &Target, b: &Target) -> bool {
        let (Target::Str(a), Target::Str(b)) = (a, b) else {
            return false;
        };
        let mut s = a.clone();
        for f in self.lines {
            s = remap_lines(&s, f);
        }
        &s == b
    }

    fn describe(&self, t: &Target) -> String {
        match t {
            Target::Sym(i, d) => format!("{}{:+}", self.o.obj.symbols[*i].name, d),
            Target::New(n, d) => format!("new {n}{d:+}"),
            Target::Str(s) => format!(
                "\"{}\"",
                String::from_utf8_lossy(s).chars().take(40).collect::<String>()
            ),
            Target::Anon(_) => "a constant".into(),
            Target::Undef(n, _) => n.clone(),
        }
        .replace('\n', "\\n")
    }

    /// Compares function/object `pi` of the patched object with its original `oi`.
    pub fn compare(&self, oi: usize, pi: usize) -> Result<(), Difference> {
        let (so, sp) = (&self.o.obj.symbols[oi], &self.p.obj.symbols[pi]);
        let (Some(os), Some(ps)) = (so.section, sp.section) else {
            return Err(Difference("not defined".into()));
        };
        let whole_o = self.o.obj.symbols_in(os).len() == 1;
        let whole_p = self.p.obj.symbols_in(ps).len() == 1;
        let (o_start, o_len, p_start, p_len) = if whole_o && whole_p {
            (
                0,
                self.o.obj.sections[os].data.len() as u64,
                0,
                self.p.obj.sections[ps].data.len() as u64,
            )
        } else {
            (so.value, so.size, sp.value, sp.size)
        };
        if o_len != p_len {
            return Err(Difference(format!("size {p_len} (was {o_len})")));
        }
        let ignore = if self.o.obj.sections[os].name == "__dyndbg" {
            self.ddebug_line
        } else {
            None
        };
        self.same_span((os, o_start), (ps, p_start), o_len, ignore, false)?;
        if so.kind == SymKind::Func {
            self.same_entries(os, ps)?;
        }
        Ok(())
    }

    /// Compares the special entries about original section `os` and patched `ps`.
    fn same_entries(&self, os: usize, ps: usize) -> Result<(), Difference> {
        let eo = self.o.entries_about(os);
        let ep = self.p.entries_about(ps);
        for sp in self.specials.all() {
            if sp.usage != Use::Keep {
                continue;
            }
            let find = |v: &[EntryList]| -> Vec<(usize, u64)> {
                v.iter()
                    .filter(|e| e.0 == sp.name)
                    .flat_map(|e| e.3.iter().map(move |&k| (e.1, k * e.2)))
                    .collect()
            };
            let (lo, lp) = (find(&eo), find(&ep));
            if lo.len() != lp.len() {
                return Err(Difference(format!(
                    "{} {} entries (was {})",
                    lp.len(),
                    sp.name,
                    lo.len()
                )));
            }
            for (&(so, ao), &(spn, ap)) in lo.iter().zip(&lp) {
                let anchor = |f: &Facts, s: usize, at: u64| {
                    f.obj.sections[s]
                        .rels_in(at, at + 1)
                        .first()
                        .and_then(|r| f.landing_section(s, r))
                        .map(|x| x.1)
                };
                if anchor(self.o, so, ao) != anchor(self.p, spn, ap) {
                    return Err(Difference(format!("{} entry moved", sp.name)));
                }
                self.same_span((so, ao), (spn, ap), sp.size, sp.ignore, true)
                    .map_err(|d| Difference(format!("{} entry: {}", sp.name, d.0)))?;
                if sp.name == ".altinstructions" {
                    self.same_replacement(so, ao, spn, ap)?;
                }
            }
        }
        Ok(())
    }

    /// Compares the replacement code of two alternative entries.
    fn same_replacement(&self, so: usize, ao: u64, sp: usize, ap: u64) -> Result<(), Difference> {
        let repl = |f: &Facts, s: usize, at: u64| -> Option<(usize, u64, u64)> {
            let sec = &f.obj.sections[s];
            let len = read_uint(&sec.data, at + 11, 1)?;
            let r = sec.rels_in(at + 4, at + 5).first()?;
            let (t, off) = f.landing_section(s, r)?;
            Some((t, off, len))
        };
        match (repl(self.o, so, ao), repl(self.p, sp, ap)) {
            (Some((to, oo, lo)), Some((tp, op, lp))) if lo == lp => self
                .same_span((to, oo), (tp, op), lo, None, false)
                .map_err(|d| Difference(format!("alternative replacement: {}", d.0))),
            (None, None) => Ok(()),
            _ => Err(Difference("alternative replacement differs".into())),
        }
    }
}

/// The result of comparing one unit.
#[derive(Debug, Default)]
pub struct UnitDiff {
    /// The pairing.
    pub pairing: Pairing,
    /// Changed functions (patched symbol index) and why.
    pub changed: Vec<(usize, String)>,
    /// Changed functions in `__init`/`__exit` sections (names): cannot be applied.
    pub init_changed: Vec<String>,
    /// Patched symbols with no original (new functions and data).
    pub new: HashSet<usize>,
    /// Paired read-only data (or dynamic debug descriptors) whose contents changed: taken
    /// as new copies.
    pub renewed: HashSet<usize>,
    /// Paired writable data whose initial value changed: refused.
    pub changed_data: Vec<(String, String)>,
}

/// Compares a unit's original and patched objects.
pub fn diff(
    o: &Facts,
    p: &Facts,
    specials: &Specials,
    ddebug_line: Option<(u64, u64)>,
    lines: &[FileChange],
) -> UnitDiff {
    let pairing = pair(o, p, specials);
    let mut out = UnitDiff::default();
    let empty = HashSet::new();
    // Data first: a changed read-only object is a new copy, which its users then see.
    {
        let cmp = Comparer {
            o,
            p,
            pairing: &pairing,
            renewed: &empty,
            specials,
            ddebug_line,
            lines,
        };
        for pi in items(p.obj, specials) {
            let s = &p.obj.symbols[pi];
            if s.kind != SymKind::Object {
                continue;
            }
            let Some(&oi) = pairing.p2o.get(&pi) else {
                out.new.insert(pi);
                continue;
            };
            if let Err(d) = cmp.compare(oi, pi) {
                let sec = &p.obj.sections[s.section.unwrap_or(0)];
                if !sec.write() || sec.name == "__dyndbg" {
                    out.renewed.insert(pi);
                } else {
                    out.changed_data.push((s.name.clone(), d.0));
                }
            }
        }
    }
    let cmp = Comparer {
        o,
        p,
        pairing: &pairing,
        renewed: &out.renewed,
        specials,
        ddebug_line,
        lines,
    };
    for pi in items(p.obj, specials) {
        let s = &p.obj.symbols[pi];
        if s.kind != SymKind::Func {
            continue;
        }
        let Some(&oi) = pairing.p2o.get(&pi) else {
            out.new.insert(pi);
            continue;
        };
        if let Err(d) = cmp.compare(oi, pi) {
            let sec = &p.obj.sections[s.section.unwrap_or(0)];
            if init_or_exit(&sec.name) {
                out.init_changed.push(s.name.clone());
            } else {
                out.changed.push((pi, d.0));
            }
        }
    }
    out.pairing = pairing;
    out
}

/// Honours kpatch's `KPATCH_IGNORE_FUNCTION` and `KPATCH_IGNORE_SECTION` (kpatch-macros.h):
/// functions they name, and functions in sections they name, are not changed. Returns the
/// names left out.
pub fn apply_ignores(p: &Facts, d: &mut UnitDiff) -> Vec<String> {
    let obj = p.obj;
    let mut funcs = HashSet::new();
    let mut sections = HashSet::new();
    for (si, s) in obj.sections.iter().enumerate() {
        for r in &s.rels {
            match (s.name.as_str(), p.landing(si, r)) {
                (".kpatch.ignore.functions", Landing::Sym(i, _)) => {
                    funcs.insert(i);
                }
                (".kpatch.ignore.sections", Landing::Str(t, off)) => {
                    sections.insert(cstr_at(obj, t, off));
                }
                _ => {}
            }
        }
    }
    let mut dropped = Vec::new();
    d.changed.retain(|(f, _)| {
        let sec = obj.symbols[*f]
            .section
            .map(|i| obj.sections[i].name.as_bytes().to_vec());
        let keep = !funcs.contains(f) && !sec.is_some_and(|n| sections.contains(&n));
        if !keep {
            dropped.push(obj.symbols[*f].name.clone());
        }
        keep
    });
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_references_follow_the_diff() {
        let f = FileChange {
            path: "arch/x86/kvm/x86.c".into(),
            created: false,
            deleted: false,
            hunks: vec![(1, 1, 1, 2)],
        };
        assert_eq!(
            remap_lines(b"field \"x\" at arch/x86/kvm/x86.c:8431 (size", &f),
            b"field \"x\" at arch/x86/kvm/x86.c:8432 (size".to_vec()
        );
        assert_eq!(remap_lines(b"other.c:10", &f), b"other.c:10".to_vec());
    }

    #[test]
    fn normalizes_compiler_suffixes() {
        assert_eq!(normalize("foo.isra.0"), "foo.isra");
        assert_eq!(normalize("foo.constprop.0.isra.0"), "foo.constprop.isra");
        assert_eq!(normalize("ctr.3"), "ctr");
        assert_eq!(normalize("foo.cold"), "foo.cold");
        assert_eq!(normalize("__UNIQUE_ID_ddebug412"), "__UNIQUE_ID_ddebug");
        assert_eq!(normalize("meminfo_proc_show"), "meminfo_proc_show");
        assert_eq!(normalize("x.1.2"), "x");
    }
}
