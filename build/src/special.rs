//! The kernel's "special" sections: tables of fixed-size entries, each about one place in
//! the code (an `__ex_table` entry for a user access, a `__bug_table` entry for a WARN, an
//! alternative, a static key site, ...). An entry belongs to the function its first field
//! points into: it is compared with that function and goes into the patch with it.
//! Entry sizes come from the kernel's BTF where the kernel has a type for them.

use lucos_vmm::introspect::btf::KernelBtf;

/// How lucos-build treats a special section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Compared with its function and copied into the patch with it.
    Keep,
    /// Derived from the code by objtool (its entries change when the code does): not
    /// compared, copied into the patch with its function.
    Derived,
    /// Not needed in a patch (`__mcount_loc`: patch code is not traceable).
    Drop,
}

/// One special section type.
#[derive(Debug, Clone, Copy)]
pub struct Special {
    /// Section name.
    pub name: &'static str,
    /// Size of one entry.
    pub size: u64,
    /// Bytes of an entry that do not count when comparing (offset, length): the line
    /// number of a BUG entry, so that a moved `__LINE__` is not a change.
    pub ignore: Option<(u64, u64)>,
    /// What to do with it.
    pub usage: Use,
}

/// The special sections of this kernel, with their entry sizes.
#[derive(Debug, Clone)]
pub struct Specials {
    list: Vec<Special>,
}

impl Specials {
    /// Reads the entry sizes from the kernel's BTF (falling back to Linux 6.1 x86-64's for
    /// types BTF does not describe).
    pub fn new(btf: &KernelBtf) -> Self {
        let size = |ty: &str, fallback: u64| btf.size_of(ty).unwrap_or(fallback);
        let bug = size("bug_entry", 12);
        // bug_entry: bug_addr_disp, file_disp, line, flags (BUG_VERBOSE, relative pointers).
        let bug_line = btf.offset_of("bug_entry", "line").ok().map(|o| (o, 2));
        let list = vec![
            Special {
                name: "__bug_table",
                size: bug,
                ignore: bug_line,
                usage: Use::Keep,
            },
            Special {
                name: "__ex_table",
                size: size("exception_table_entry", 12),
                ignore: None,
                usage: Use::Keep,
            },
            Special {
                name: "__jump_table",
                size: size("jump_entry", 16),
                ignore: None,
                usage: Use::Keep,
            },
            Special {
                name: ".altinstructions",
                size: size("alt_instr", 12),
                ignore: None,
                usage: Use::Keep,
            },
            Special {
                name: ".static_call_sites",
                size: size("static_call_site", 8),
                ignore: None,
                usage: Use::Keep,
            },
            Special {
                name: ".parainstructions",
                size: size("paravirt_patch_site", 16),
                ignore: None,
                usage: Use::Keep,
            },
            Special {
                name: ".orc_unwind_ip",
                size: 4,
                ignore: None,
                usage: Use::Derived,
            },
            Special {
                name: ".retpoline_sites",
                size: 4,
                ignore: None,
                usage: Use::Derived,
            },
            Special {
                name: ".return_sites",
                size: 4,
                ignore: None,
                usage: Use::Derived,
            },
            Special {
                name: ".call_sites",
                size: 4,
                ignore: None,
                usage: Use::Derived,
            },
            Special {
                name: ".ibt_endbr_seal",
                size: 4,
                ignore: None,
                usage: Use::Derived,
            },
            Special {
                name: ".smp_locks",
                size: 4,
                ignore: None,
                usage: Use::Derived,
            },
            Special {
                name: "__mcount_loc",
                size: 8,
                ignore: None,
                usage: Use::Drop,
            },
            Special {
                name: "__patchable_function_entries",
                size: 8,
                ignore: None,
                usage: Use::Drop,
            },
        ];
        Self { list }
    }

    /// The table for section `name`, if it is a special section.
    pub fn get(&self, name: &str) -> Option<&Special> {
        self.list.iter().find(|s| s.name == name)
    }

    /// Every special section type.
    pub fn all(&self) -> &[Special] {
        &self.list
    }
}

/// Size of an ORC entry (`.orc_unwind`, parallel to `.orc_unwind_ip`).
pub const ORC_ENTRY: u64 = 6;

/// Sections that never go into a patch and never count as a change: objtool's and the
/// compiler's annotations, build metadata, exports (a patch exports nothing; the CRC check
/// refuses changed exports) and debug info.
pub fn ignored(name: &str) -> bool {
    const PREFIXES: &[&str] = &[
        ".discard",
        ".note",
        ".comment",
        ".debug",
        ".rela",
        ".BTF",
        "__ksymtab",
        "___ksymtab",
        "__kcrctab",
        ".modinfo",
        ".gnu.linkonce.this_module",
        ".eh_frame",
        ".printk_index",
        ".symtab",
        ".strtab",
        ".shstrtab",
        ".group",
        ".llvm_addrsig",
    ];
    name.is_empty() || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Code or data that runs or exists only during boot or module unload: a change there
/// cannot be applied to a running kernel.
pub fn init_or_exit(name: &str) -> bool {
    name.starts_with(".init.") || name.starts_with(".exit.") || name == ".init.text" || name == ".exit.text"
}
