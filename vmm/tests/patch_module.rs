//! Parses and links the real cmdline patch module against the real guest vmlinux (no boot).

mod common;

use lucos_update_server::link::{self, LinkError};
use lucos_update_server::module::PatchModule;
use lucos_update_server::runpre;
use lucos_vmm::introspect::Vmlinux;
use lucos_vmm::symbols::SymbolTable;

#[test]
fn cmdline_module_parses_and_links_against_vmlinux() {
    let ko = common::session::build_patch("cmdline/lucos_cmdline.ko");
    let (vmlinux, _) = common::images();
    let syms = SymbolTable::from_vmlinux(&Vmlinux::read(&vmlinux).unwrap()).unwrap();
    let m = PatchModule::parse(&std::fs::read(&ko).unwrap()).unwrap();
    assert_eq!(m.name, "cmdline");
    assert_eq!(m.replaces.len(), 1);
    assert_eq!(m.replaces[0].old_name, "cmdline_proc_show");
    assert_eq!(m.replaces[0].new_name, "lucos_cmdline_proc_show");
    assert!(m.sections.iter().any(|s| s.name == ".text" && s.exec));
    assert!(!m
        .sections
        .iter()
        .any(|s| s.name.starts_with(".lucos") || s.name == ".modinfo"));

    // The old function exists in the guest kernel and starts with ftrace's 5-byte nop
    // (in the vmlinux file it is still the `call __fentry__` the compiler emitted, which
    // ftrace turns into the nop at boot; the live check happens on the running guest).
    let old = syms.get("cmdline_proc_show").expect("cmdline_proc_show in vmlinux");
    assert!(old.size >= 5);

    let base = 0xffff_ffff_8f00_0000;
    let resolve = |n: &str| syms.get(n).map(|s| s.addr);
    let l = link::link(&m, base, &resolve).unwrap();
    let names: Vec<&str> = l.kernel_refs.iter().map(|(n, _)| n.as_str()).collect();
    for n in ["saved_command_line", "seq_puts", "seq_putc"] {
        assert!(names.contains(&n), "{names:?}");
    }
    // The linked code calls seq_puts: find an e8 rel32 landing on it.
    let seq_puts = syms.get("seq_puts").unwrap().addr;
    let text = &l.image[..m.sections.iter().find(|s| s.name == ".text").unwrap().data.len()];
    let calls = (0..text.len().saturating_sub(5))
        .filter(|&i| text[i] == 0xe8)
        .filter(|&i| {
            let rel = i32::from_le_bytes(text[i + 1..i + 5].try_into().unwrap()) as i64;
            (base as i64 + i as i64 + 5 + rel) as u64 == seq_puts
        })
        .count();
    assert_eq!(calls, 2, "two calls to seq_puts:\n{}", runpre::disasm(text, base, 20));

    // Missing kernel symbols are refused by name.
    let partial = |n: &str| if n == "saved_command_line" { None } else { resolve(n) };
    assert_eq!(
        link::link(&m, base, &partial).unwrap_err(),
        LinkError::Unresolved("saved_command_line".into())
    );
}

#[test]
fn kernel_btf_gives_task_struct_layout() {
    let (vmlinux, _) = common::images();
    let btf = lucos_vmm::introspect::btf::KernelBtf::from_vmlinux(&Vmlinux::read(&vmlinux).unwrap()).unwrap();
    let l = lucos_vmm::introspect::kernel::TaskLayout::from_btf(&btf).unwrap();
    let size = btf.size_of("task_struct").unwrap();
    for (name, off) in [
        ("tasks", l.tasks),
        ("pid", l.pid),
        ("comm", l.comm),
        ("stack", l.stack),
        ("thread.sp", l.thread_sp),
    ] {
        assert!(off < size, "{name} at {off} outside task_struct ({size})");
    }
    assert_eq!(l.tgid, l.pid + 4, "pid and tgid are adjacent pid_t fields");
    assert!(btf.offset_of("task_struct", "no_such_field").is_err());
    // A vmlinux without .BTF gets a clear error.
    let e =
        lucos_vmm::introspect::btf::KernelBtf::from_vmlinux(&Vmlinux::read(&std::env::current_exe().unwrap()).unwrap())
            .err()
            .unwrap();
    assert!(e.to_string().contains("no .BTF section"), "{e}");
}
