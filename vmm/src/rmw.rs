//! Which instruction made a trapped write, and redoing it atomically.
//!
//! A write to a write-protected page (a `KVM_MEM_READONLY` memslot, [`crate::protect`])
//! is emulated by KVM: its emulator reads the old value from guest memory, computes, writes
//! the registers and flags back, advances RIP and exits with the value to store. For a
//! locked read-modify-write (`lock add`, `xchg`, `cmpxchg`, ...) that is not atomic: the
//! old value was read before the exit, and another vCPU may store meanwhile. The VMM
//! serialises every store to protected pages (the page only changes when it stores), so
//! it redoes the operation on the current value under that lock instead of storing KVM's:
//!
//! - [`identify`] finds the instruction that ends at the vCPU's RIP (already advanced):
//!   candidates of exactly the right length that write memory of the exit's size at the
//!   faulting address (its effective address translated with the current registers).
//! - [`classify`] says what it does: a plain store, an ALU read-modify-write with its
//!   source, `xchg`, `xadd`, `cmpxchg`, `cmpxchg8b`.
//! - [`redo`] computes what to store from the current value and fixes the registers and
//!   flags KVM computed from the stale one.
//!
//! Every lockable read-modify-write is redone whether or not it has a LOCK prefix: doing an
//! unlocked one atomically is one of its allowed outcomes.

use std::collections::HashMap;

use iced_x86::{Decoder, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::arch::x86_64::{
    RFLAGS_AF as AF, RFLAGS_CF as CF, RFLAGS_OF as OF, RFLAGS_PF as PF, RFLAGS_SF as SF, RFLAGS_ZF as ZF,
};
const STATUS: u64 = CF | PF | AF | ZF | SF | OF;

/// The longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// The vCPU state a trapped write is identified and redone with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cpu {
    /// General registers in encoding order: RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15.
    pub gpr: [u64; 16],
    /// RIP after the write (KVM has retired the instruction).
    pub rip: u64,
    /// RFLAGS as KVM left them.
    pub rflags: u64,
    /// FS base.
    pub fs_base: u64,
    /// GS base.
    pub gs_base: u64,
    /// Code segment width: 64, 32 or 16.
    pub bitness: u32,
}

impl Cpu {
    /// From KVM's registers.
    pub fn from_kvm(r: &kvm_regs, s: &kvm_sregs) -> Self {
        let bitness = if s.cs.l == 1 {
            64
        } else if s.cs.db == 1 {
            32
        } else {
            16
        };
        Self {
            gpr: [
                r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
                r.r15,
            ],
            rip: r.rip,
            rflags: r.rflags,
            fs_base: s.fs.base,
            gs_base: s.gs.base,
            bitness,
        }
    }

    /// Writes the general registers and RFLAGS back into `r`.
    pub fn store_into(&self, r: &mut kvm_regs) {
        let g = &self.gpr;
        (r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi) = (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) = (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        r.rflags = self.rflags;
    }

    /// The value of `reg` (general registers of any width, segment bases), if known.
    pub fn reg(&self, reg: Register) -> Option<u64> {
        match reg {
            Register::ES | Register::CS | Register::SS | Register::DS => return Some(0),
            Register::FS => return Some(self.fs_base),
            Register::GS => return Some(self.gs_base),
            _ => {}
        }
        let (idx, shift, bits) = gpr_slot(reg)?;
        Some((self.gpr[idx] >> shift) & mask(bits / 8))
    }

    /// Writes `v` to `reg` as the CPU does: 8/16-bit parts merge, 32-bit zero-extends.
    pub fn set_reg(&mut self, reg: Register, v: u64) {
        let Some((idx, shift, bits)) = gpr_slot(reg) else {
            return;
        };
        let g = &mut self.gpr[idx];
        *g = match bits {
            64 => v,
            32 => v & 0xffff_ffff,
            _ => {
                let m = mask(bits / 8) << shift;
                (*g & !m) | ((v << shift) & m)
            }
        };
    }
}

/// (index in [`Cpu::gpr`], bit shift, width in bits) of a general register.
fn gpr_slot(reg: Register) -> Option<(usize, u32, u32)> {
    let (shift, bits) = match reg {
        Register::AH | Register::CH | Register::DH | Register::BH => (8, 8),
        r if r.is_gpr8() => (0, 8),
        r if r.is_gpr16() => (0, 16),
        r if r.is_gpr32() => (0, 32),
        r if r.is_gpr64() => (0, 64),
        _ => return None,
    };
    let full = reg.full_register();
    let idx = full as usize - Register::RAX as usize;
    (idx < 16).then_some((idx, shift, bits))
}

/// All ones in the low `size` bytes.
fn mask(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size)) - 1
    }
}

/// Whether `insn` writes memory, and the index of its memory operand.
fn memory_operand(insn: &Instruction) -> Option<u32> {
    (0..insn.op_count()).find(|&i| insn.op_kind(i) == OpKind::Memory)
}

fn writes(a: OpAccess) -> bool {
    matches!(
        a,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}

/// The guest-virtual address `insn` accesses, or `None` when it cannot be told from the
/// registers after the instruction (an address register the instruction itself writes).
fn access_address(insn: &Instruction, op: u32, cpu: &Cpu, info: &mut InstructionInfoFactory) -> Option<u64> {
    let written: Vec<Register> = info
        .info(insn)
        .used_registers()
        .iter()
        .filter(|u| writes(u.access()))
        .map(|u| u.register().full_register())
        .collect();
    for r in [insn.memory_base(), insn.memory_index()] {
        if r != Register::None && written.contains(&r.full_register()) {
            return None;
        }
    }
    let mut ea = insn.virtual_address(op, 0, |reg, _, _| cpu.reg(reg))?;
    // bt* with a register bit offset address a bit string around the operand.
    if matches!(insn.mnemonic(), Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc) && insn.op1_kind() == OpKind::Register {
        let bits = insn.memory_size().size() as u32 * 8;
        let reg = insn.op1_register();
        let raw = cpu.reg(reg)?;
        let width = gpr_slot(reg)?.2;
        let off = ((raw << (64 - width)) as i64) >> (64 - width);
        ea = ea.wrapping_add(((off & !(bits as i64 - 1)) >> 3) as u64);
    }
    Some(ea)
}

/// The instruction that ends at `cpu.rip` and wrote `len` bytes at guest-physical `gpa`.
///
/// `code` holds the bytes just before RIP (up to [`MAX_INSN_LEN`]; fewer when the page
/// before is unmapped); `translate` maps a guest-virtual address to guest-physical. Of the
/// candidates (every start from RIP-`code.len()` to RIP-1 that decodes to exactly the
/// bytes up to RIP, writes memory of `len` bytes, and whose effective address maps to
/// `gpa` where that can be checked) the longest wins, so a LOCK or other prefix is kept.
pub fn identify(
    code: &[u8],
    cpu: &Cpu,
    gpa: u64,
    len: usize,
    translate: impl Fn(u64) -> Option<u64>,
) -> Option<Instruction> {
    Identifier::new().identify(code, cpu, gpa, len, translate)
}

/// Cached entries of an [`Identifier`] before it starts afresh.
const SEEN_MAX: usize = 4096;

/// [`identify`] with a memory: for each RIP, the code bytes before it and the length of the
/// instruction found there. When the bytes are the same, that candidate is checked first
/// (one decode instead of up to 15).
pub struct Identifier {
    info: InstructionInfoFactory,
    seen: HashMap<u64, (Vec<u8>, usize)>,
}

impl Default for Identifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Identifier {
    /// An identifier that has seen nothing.
    pub fn new() -> Self {
        Self {
            info: InstructionInfoFactory::new(),
            seen: HashMap::new(),
        }
    }

    /// See [`identify`].
    pub fn identify(
        &mut self,
        code: &[u8],
        cpu: &Cpu,
        gpa: u64,
        len: usize,
        translate: impl Fn(u64) -> Option<u64>,
    ) -> Option<Instruction> {
        let code = &code[code.len().saturating_sub(MAX_INSN_LEN)..];
        if let Some((bytes, k)) = self.seen.get(&cpu.rip) {
            if bytes == code {
                if let Some(insn) = self.candidate(code, *k, cpu, gpa, len, &translate) {
                    return Some(insn);
                }
            }
        }
        for k in (1..=code.len()).rev() {
            if let Some(insn) = self.candidate(code, k, cpu, gpa, len, &translate) {
                if self.seen.len() >= SEEN_MAX {
                    self.seen.clear();
                }
                self.seen.insert(cpu.rip, (code.to_vec(), k));
                return Some(insn);
            }
        }
        None
    }

    /// The instruction of `k` bytes ending at RIP, if it wrote `len` bytes at `gpa`.
    fn candidate(
        &mut self,
        code: &[u8],
        k: usize,
        cpu: &Cpu,
        gpa: u64,
        len: usize,
        translate: &impl Fn(u64) -> Option<u64>,
    ) -> Option<Instruction> {
        let start = cpu.rip.wrapping_sub(k as u64);
        let mut d = Decoder::with_ip(cpu.bitness, &code[code.len() - k..], start, DecoderOptions::NONE);
        let insn = d.decode();
        if insn.is_invalid() || insn.len() != k {
            return None;
        }
        let op = memory_operand(&insn)?;
        if insn.memory_size().size() != len {
            return None;
        }
        if !self.info.info(&insn).used_memory().iter().any(|m| writes(m.access())) {
            return None;
        }
        match access_address(&insn, op, cpu, &mut self.info) {
            Some(ea) if translate(ea) != Some(gpa) => None,
            _ => Some(insn),
        }
    }
}

/// An ALU read-modify-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AluOp {
    /// `add`.
    Add,
    /// `sub`.
    Sub,
    /// `and`.
    And,
    /// `or`.
    Or,
    /// `xor`.
    Xor,
    /// `inc` (CF kept).
    Inc,
    /// `dec` (CF kept).
    Dec,
    /// `not` (no flags).
    Not,
    /// `neg`.
    Neg,
    /// `bts`: sets the bit, CF = its old value.
    Bts,
    /// `btr`: clears the bit.
    Btr,
    /// `btc`: flips the bit.
    Btc,
}

/// What a trapped write does, as far as redoing it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A store of KVM's value: a plain store, or a read-modify-write that cannot be
    /// locked (shifts, string stores, ...) and is not atomic on hardware either.
    Store,
    /// `op [mem], src`: stores `op(current, src)` and sets the flags from it.
    Alu {
        /// The operation.
        op: AluOp,
        /// Its source (immediate or register value; the bit offset for bt*).
        src: u64,
    },
    /// `xchg [mem], reg`: stores the written value, `reg` = current.
    Xchg {
        /// The register exchanged.
        reg: Register,
    },
    /// `xadd [mem], reg`: stores current + addend, `reg` = current.
    Xadd {
        /// The register (KVM left the stale old value there).
        reg: Register,
    },
    /// `cmpxchg [mem], reg`.
    Cmpxchg,
    /// `cmpxchg8b [mem]`.
    Cmpxchg8b,
    /// A locked operation that cannot be redone (`lock adc`/`sbb`: the carry in is lost
    /// once KVM wrote the flags, `cmpxchg16b`): stored as KVM computed it.
    Unsupported(Mnemonic),
}

/// What `insn` (from [`identify`]) does, with the source operand read from `cpu`.
pub fn classify(insn: &Instruction, cpu: &Cpu) -> Access {
    let Some(op) = memory_operand(insn) else {
        return Access::Store;
    };
    let src = || match insn.op1_kind() {
        OpKind::Register => cpu.reg(insn.op1_register()),
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => Some(insn.immediate(1)),
        _ => None,
    };
    let alu = |op: AluOp, src: Option<u64>| match src {
        Some(src) => Access::Alu { op, src },
        None => Access::Unsupported(insn.mnemonic()),
    };
    let first = op == 0;
    match insn.mnemonic() {
        Mnemonic::Add if first => alu(AluOp::Add, src()),
        Mnemonic::Sub if first => alu(AluOp::Sub, src()),
        Mnemonic::And if first => alu(AluOp::And, src()),
        Mnemonic::Or if first => alu(AluOp::Or, src()),
        Mnemonic::Xor if first => alu(AluOp::Xor, src()),
        Mnemonic::Bts if first => alu(AluOp::Bts, src()),
        Mnemonic::Btr if first => alu(AluOp::Btr, src()),
        Mnemonic::Btc if first => alu(AluOp::Btc, src()),
        Mnemonic::Inc if first => alu(AluOp::Inc, Some(0)),
        Mnemonic::Dec if first => alu(AluOp::Dec, Some(0)),
        Mnemonic::Not if first => alu(AluOp::Not, Some(0)),
        Mnemonic::Neg if first => alu(AluOp::Neg, Some(0)),
        Mnemonic::Xchg => {
            let other = if first { 1 } else { 0 };
            match insn.op_kind(other) {
                OpKind::Register => Access::Xchg {
                    reg: insn.op_register(other),
                },
                _ => Access::Unsupported(Mnemonic::Xchg),
            }
        }
        Mnemonic::Xadd if first && insn.op1_kind() == OpKind::Register => Access::Xadd {
            reg: insn.op1_register(),
        },
        Mnemonic::Cmpxchg if first => Access::Cmpxchg,
        Mnemonic::Cmpxchg8b => Access::Cmpxchg8b,
        Mnemonic::Cmpxchg16b => Access::Unsupported(Mnemonic::Cmpxchg16b),
        m @ (Mnemonic::Adc | Mnemonic::Sbb) if first && insn.has_lock_prefix() => Access::Unsupported(m),
        _ => Access::Store,
    }
}

/// What to do after redoing a trapped write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redo {
    /// The value to store (its low `size` bytes), or `None` to store nothing.
    pub store: Option<u64>,
    /// Whether [`redo`] changed the registers or flags (write them back to the vCPU).
    pub regs_changed: bool,
}

fn parity_even(r: u64) -> bool {
    (r as u8).count_ones().is_multiple_of(2)
}

/// Sets the status flags in `rflags` from a result `r` of `size` bytes, with CF and OF
/// (and AF) as given.
fn set_flags(rflags: &mut u64, r: u64, size: u32, cf: bool, of: bool, af: bool) {
    let sign = 1u64 << (8 * size - 1);
    let mut f = *rflags & !STATUS;
    for (on, bit) in [
        (cf, CF),
        (of, OF),
        (af, AF),
        (r & mask(size) == 0, ZF),
        (r & sign != 0, SF),
        (parity_even(r), PF),
    ] {
        if on {
            f |= bit;
        }
    }
    *rflags = f;
}

/// `a + b` in `size` bytes: (result, CF, OF, AF).
fn add(a: u64, b: u64, size: u32) -> (u64, bool, bool, bool) {
    let m = mask(size);
    let sign = 1u64 << (8 * size - 1);
    let (a, b) = (a & m, b & m);
    let r = a.wrapping_add(b) & m;
    let cf = (a as u128 + b as u128) > m as u128;
    let of = (a ^ r) & (b ^ r) & sign != 0;
    (r, cf, of, (a ^ b ^ r) & 0x10 != 0)
}

/// `a - b` in `size` bytes: (result, CF, OF, AF).
fn sub(a: u64, b: u64, size: u32) -> (u64, bool, bool, bool) {
    let m = mask(size);
    let sign = 1u64 << (8 * size - 1);
    let (a, b) = (a & m, b & m);
    let r = a.wrapping_sub(b) & m;
    let of = (a ^ b) & (a ^ r) & sign != 0;
    (r, a < b, of, (a ^ b ^ r) & 0x10 != 0)
}

/// The accumulator of `size` bytes.
fn accumulator(size: u32) -> Register {
    match size {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    }
}

/// Redoes `access`, a write of `size` bytes (1, 2, 4 or 8) for which KVM computed `data`
/// from a stale read, on `current`, the value in memory now (read under the store lock).
/// Fixes `cpu`'s registers and flags as the instruction would have set them.
pub fn redo(access: Access, size: u32, current: u64, data: u64, cpu: &mut Cpu) -> Redo {
    let m = mask(size);
    let (c, data) = (current & m, data & m);
    let store = |v: u64, regs_changed: bool| Redo {
        store: Some(v & m),
        regs_changed,
    };
    let nothing = |regs_changed: bool| Redo {
        store: None,
        regs_changed,
    };
    match access {
        Access::Store | Access::Unsupported(_) => store(data, false),
        Access::Alu { op, src } => {
            let f = &mut cpu.rflags;
            let keep_cf = *f & CF != 0;
            let r = match op {
                AluOp::Add | AluOp::Inc => {
                    let (r, cf, of, af) = add(c, if op == AluOp::Inc { 1 } else { src }, size);
                    set_flags(f, r, size, if op == AluOp::Inc { keep_cf } else { cf }, of, af);
                    r
                }
                AluOp::Sub | AluOp::Dec => {
                    let (r, cf, of, af) = sub(c, if op == AluOp::Dec { 1 } else { src }, size);
                    set_flags(f, r, size, if op == AluOp::Dec { keep_cf } else { cf }, of, af);
                    r
                }
                AluOp::Neg => {
                    let (r, cf, of, af) = sub(0, c, size);
                    set_flags(f, r, size, cf, of, af);
                    r
                }
                AluOp::And | AluOp::Or | AluOp::Xor => {
                    let r = match op {
                        AluOp::And => c & src,
                        AluOp::Or => c | src,
                        _ => c ^ src,
                    } & m;
                    set_flags(f, r, size, false, false, false);
                    r
                }
                AluOp::Not => !c & m,
                AluOp::Bts | AluOp::Btr | AluOp::Btc => {
                    let bit = 1u64 << (src & (8 * size as u64 - 1));
                    *f = (*f & !CF) | if c & bit != 0 { CF } else { 0 };
                    match op {
                        AluOp::Bts => c | bit,
                        AluOp::Btr => c & !bit,
                        _ => c ^ bit,
                    }
                }
            };
            store(r, op != AluOp::Not)
        }
        Access::Xchg { reg } => {
            cpu.set_reg(reg, c);
            store(data, true)
        }
        Access::Xadd { reg } => {
            // KVM stored old + addend and put its (stale) old value in `reg`.
            let addend = data.wrapping_sub(cpu.reg(reg).unwrap_or(0)) & m;
            let (r, cf, of, af) = add(c, addend, size);
            set_flags(&mut cpu.rflags, r, size, cf, of, af);
            cpu.set_reg(reg, c);
            store(r, true)
        }
        Access::Cmpxchg => {
            if cpu.rflags & ZF == 0 {
                // KVM's compare failed: it returned the value it read and writes it back
                // unchanged. The failure stands at that read; storing would clobber newer data.
                return nothing(false);
            }
            // KVM's compare succeeded: the accumulator still holds the expected value.
            let acc = accumulator(size);
            let expected = cpu.reg(acc).unwrap_or(0) & m;
            let (r, cf, of, af) = sub(expected, c, size);
            set_flags(&mut cpu.rflags, r, size, cf, of, af);
            if c == expected {
                store(data, true)
            } else {
                cpu.set_reg(acc, c);
                nothing(true)
            }
        }
        Access::Cmpxchg8b => {
            if cpu.rflags & ZF == 0 {
                return nothing(false);
            }
            let expected = (cpu.gpr[2] & 0xffff_ffff) << 32 | (cpu.gpr[0] & 0xffff_ffff);
            if c == expected {
                store(data, false)
            } else {
                (cpu.gpr[0], cpu.gpr[2]) = (c & 0xffff_ffff, c >> 32);
                cpu.rflags &= !ZF;
                nothing(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;

    const PAGE: u64 = 0x20000;

    fn asm(f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        f(&mut a);
        a.assemble(0x8000).unwrap()
    }

    /// Identifies the last instruction of `code` (placed so that it ends at RIP).
    fn last(code: &[u8], cpu: &mut Cpu, len: usize) -> Option<Instruction> {
        cpu.rip = 0x8000 + code.len() as u64;
        cpu.bitness = 64;
        let tail = &code[code.len().saturating_sub(MAX_INSN_LEN)..];
        identify(tail, cpu, PAGE + 0x10, len, Some)
    }

    #[test]
    fn finds_the_locked_instruction_before_rip() {
        let mut cpu = Cpu::default();
        cpu.gpr[3] = PAGE; // rbx
        let code = asm(|a| {
            a.mov(rax, 0x1234_5678_9abc_i64).unwrap();
            a.lock().add(dword_ptr(rbx + 0x10), 7).unwrap();
        });
        let insn = last(&code, &mut cpu, 4).expect("identified");
        assert!(insn.has_lock_prefix());
        assert_eq!(classify(&insn, &cpu), Access::Alu { op: AluOp::Add, src: 7 });
        // Wrong size or address: nothing matches.
        assert!(last(&code, &mut cpu, 8).is_none());
        cpu.gpr[3] = PAGE + 8;
        assert!(last(&code, &mut cpu, 4).is_none());
    }

    #[test]
    fn remembered_lengths_are_rechecked() {
        let mut cpu = Cpu::default();
        cpu.gpr[3] = PAGE; // rbx
        let code = asm(|a| {
            a.nop().unwrap();
            a.lock().xadd(qword_ptr(rbx + 0x10), rcx).unwrap();
        });
        cpu.rip = 0x8000 + code.len() as u64;
        cpu.bitness = 64;
        let mut id = Identifier::new();
        let first = id.identify(&code, &cpu, PAGE + 0x10, 8, Some).unwrap();
        assert_eq!(id.identify(&code, &cpu, PAGE + 0x10, 8, Some), Some(first));
        // Same bytes, another address: the remembered candidate no longer fits.
        assert!(id.identify(&code, &cpu, PAGE + 0x18, 8, Some).is_none());
        // Other bytes at the same RIP: searched afresh.
        let other = asm(|a| {
            for _ in 0..3 {
                a.nop().unwrap();
            }
            a.mov(qword_ptr(rbx + 0x10), rcx).unwrap();
        });
        assert_eq!(other.len(), code.len());
        let insn = id.identify(&other, &cpu, PAGE + 0x10, 8, Some).unwrap();
        assert_eq!(classify(&insn, &cpu), Access::Store);
    }

    #[test]
    fn plain_stores_and_register_sources() {
        let mut cpu = Cpu::default();
        cpu.gpr[7] = PAGE + 0x10; // rdi
        cpu.gpr[1] = 0xff; // rcx
        let code = asm(|a| a.mov(qword_ptr(rdi), rcx).unwrap());
        let insn = last(&code, &mut cpu, 8).unwrap();
        assert_eq!(classify(&insn, &cpu), Access::Store);
        let code = asm(|a| a.lock().or(qword_ptr(rdi), rcx).unwrap());
        let insn = last(&code, &mut cpu, 8).unwrap();
        assert_eq!(
            classify(&insn, &cpu),
            Access::Alu {
                op: AluOp::Or,
                src: 0xff
            }
        );
        // xchg with the address register exchanged: the address cannot be checked.
        let code = asm(|a| a.xchg(qword_ptr(rdi), rdi).unwrap());
        let insn = last(&code, &mut cpu, 8).unwrap();
        assert_eq!(classify(&insn, &cpu), Access::Xchg { reg: Register::RDI });
        // Absolute and gs-relative addresses.
        let code = asm(|a| a.lock().inc(word_ptr(PAGE + 0x10)).unwrap());
        assert!(last(&code, &mut cpu, 2).is_some());
        cpu.gs_base = PAGE;
        let code = asm(|a| a.lock().dec(dword_ptr(0x10).gs()).unwrap());
        let insn = last(&code, &mut cpu, 4).unwrap();
        assert_eq!(classify(&insn, &cpu), Access::Alu { op: AluOp::Dec, src: 0 });
    }

    #[test]
    fn bit_string_offsets_move_the_address() {
        let mut cpu = Cpu::default();
        cpu.gpr[7] = PAGE; // rdi
        cpu.gpr[0] = 0x10 * 8 + 3; // rax: bit 3 of the qword at +0x10
        let code = asm(|a| a.lock().bts(qword_ptr(rdi), rax).unwrap());
        let insn = last(&code, &mut cpu, 8).unwrap();
        let access = classify(&insn, &cpu);
        let r = redo(access, 8, 0, 0, &mut cpu);
        assert_eq!(r.store, Some(8));
        assert_eq!(cpu.rflags & CF, 0);
        let r = redo(access, 8, 8, 0, &mut cpu);
        assert_eq!(r.store, Some(8));
        assert_eq!(cpu.rflags & CF, CF);
    }

    #[test]
    fn alu_results_and_flags_come_from_the_current_value() {
        let mut cpu = Cpu::default();
        let add = Access::Alu { op: AluOp::Add, src: 1 };
        // KVM computed 5 from a stale 4; memory holds 0xffffffff now.
        let r = redo(add, 4, 0xffff_ffff, 5, &mut cpu);
        assert_eq!(r.store, Some(0));
        assert_eq!(cpu.rflags & STATUS, CF | ZF | PF | AF);
        // inc keeps CF; sub borrows; neg of 0x80 overflows.
        cpu.rflags = CF;
        let r = redo(Access::Alu { op: AluOp::Inc, src: 0 }, 1, 0x7f, 0, &mut cpu);
        assert_eq!(r.store, Some(0x80));
        assert_eq!(cpu.rflags & STATUS, CF | OF | SF | AF);
        redo(Access::Alu { op: AluOp::Sub, src: 2 }, 8, 1, 0, &mut cpu);
        assert_eq!(cpu.rflags & (CF | SF | ZF), CF | SF);
        let r = redo(Access::Alu { op: AluOp::Neg, src: 0 }, 1, 0x80, 0, &mut cpu);
        assert_eq!(r.store, Some(0x80));
        assert_eq!(cpu.rflags & (CF | OF), CF | OF);
        let r = redo(
            Access::Alu {
                op: AluOp::And,
                src: 0xf0,
            },
            2,
            0x0f,
            0,
            &mut cpu,
        );
        assert_eq!(r.store, Some(0));
        assert_eq!(cpu.rflags & STATUS, ZF | PF);
        let before = cpu.rflags;
        let r = redo(Access::Alu { op: AluOp::Not, src: 0 }, 2, 0x0f, 0, &mut cpu);
        assert_eq!((r.store, r.regs_changed, cpu.rflags), (Some(0xfff0), false, before));
    }

    #[test]
    fn xadd_and_xchg_return_the_current_value() {
        let mut cpu = Cpu::default();
        // KVM read 10 (stale), stored 13 and left 10 in ecx; memory holds 20 now.
        cpu.gpr[1] = 10;
        let r = redo(Access::Xadd { reg: Register::ECX }, 4, 20, 13, &mut cpu);
        assert_eq!((r.store, cpu.gpr[1]), (Some(23), 20));
        cpu.gpr[1] = 0xdead_0000_0000_0007;
        let r = redo(Access::Xchg { reg: Register::CL }, 1, 0x42, 0x99, &mut cpu);
        assert_eq!((r.store, cpu.gpr[1]), (Some(0x99), 0xdead_0000_0000_0042));
        cpu.gpr[1] = 0x1234;
        redo(Access::Xchg { reg: Register::CH }, 1, 0x42, 0x99, &mut cpu);
        assert_eq!(cpu.gpr[1], 0x4234);
    }

    #[test]
    fn cmpxchg_is_redone_on_success_and_stands_on_failure() {
        // KVM failed: nothing is stored, registers stay as KVM set them.
        let mut cpu = Cpu::default();
        cpu.gpr[0] = 7;
        let r = redo(Access::Cmpxchg, 8, 9, 7, &mut cpu);
        assert_eq!(
            r,
            Redo {
                store: None,
                regs_changed: false
            }
        );
        // KVM succeeded (expected 7) and memory still holds 7: stored.
        cpu.rflags = ZF;
        let r = redo(Access::Cmpxchg, 8, 7, 8, &mut cpu);
        assert_eq!(r.store, Some(8));
        assert_eq!(cpu.rflags & ZF, ZF);
        // Memory changed to 9 meanwhile: fails now, RAX gets 9.
        let r = redo(Access::Cmpxchg, 4, 9, 8, &mut cpu);
        assert_eq!((r.store, cpu.gpr[0], cpu.rflags & ZF), (None, 9, 0));
        // cmpxchg8b likewise, EDX:EAX.
        (cpu.gpr[0], cpu.gpr[2], cpu.rflags) = (1, 2, ZF);
        let r = redo(Access::Cmpxchg8b, 8, 2 << 32 | 1, 5, &mut cpu);
        assert_eq!(r.store, Some(5));
        let r = redo(Access::Cmpxchg8b, 8, 4 << 32 | 3, 5, &mut cpu);
        assert_eq!((r.store, cpu.gpr[0], cpu.gpr[2], cpu.rflags & ZF), (None, 3, 4, 0));
    }
}
