//! lucos-build on the real guest kernel trees (images/build.sh's images/out): what it takes
//! from a diff and what it refuses. Each case is a small diff against a small unit; the
//! patches are applied in real guests by vmm/tests/stable_fixes.rs and the kpatch suite.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs lucos-build on `diff`; returns (success, stderr, the output module if any).
fn build(tag: &str, diff: &str) -> (bool, String, Option<Vec<u8>>) {
    let dir = std::env::temp_dir().join(format!("lucos-build-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let patch = dir.join(format!("{tag}.patch"));
    std::fs::write(&patch, diff).unwrap();
    let out = dir.join(format!("{tag}.ko"));
    let r = Command::new(env!("CARGO_BIN_EXE_lucos-build"))
        .arg("--patch")
        .arg(&patch)
        .arg("--tree")
        .arg(root().join("images/out"))
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run lucos-build");
    let stderr = String::from_utf8_lossy(&r.stderr).to_string();
    let ko = std::fs::read(&out).ok();
    let _ = std::fs::remove_dir_all(&dir);
    (r.status.success(), stderr, ko)
}

/// A one-hunk diff of `file` replacing line `old` (which must be in the tree's source
/// exactly once, with its neighbours as context) by `new` lines.
fn diff(file: &str, old: &str, new: &[&str]) -> String {
    let text = std::fs::read_to_string(root().join("images/out/src").join(file)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == old)
        .unwrap_or_else(|| panic!("'{old}' not in {file}"));
    let (lo, hi) = (at.saturating_sub(3), (at + 4).min(lines.len()));
    let mut d = format!(
        "--- a/{file}\n+++ b/{file}\n@@ -{},{} +{},{} @@\n",
        lo + 1,
        hi - lo,
        lo + 1,
        hi - lo - 1 + new.len()
    );
    for (i, l) in lines[lo..hi].iter().enumerate() {
        if lo + i == at {
            d += &format!("-{l}\n");
            for n in new {
                d += &format!("+{n}\n");
            }
        } else {
            d += &format!(" {l}\n");
        }
    }
    d
}

#[test]
fn a_comment_in_a_header_rebuilds_its_includers_and_changes_nothing() {
    let d = diff(
        "fs/proc/fd.h",
        "static inline unsigned int proc_fd(struct inode *inode)",
        &[
            "/* the fd an inode of /proc/PID/fd stands for */",
            "static inline unsigned int proc_fd(struct inode *inode)",
        ],
    );
    let (ok, err, ko) = build("header", &d);
    assert!(!ok && ko.is_none(), "{err}");
    assert!(
        err.contains("fs/proc/base.o") && err.contains("fs/proc/fd.o"),
        "both includers compiled: {err}"
    );
    assert!(err.contains("no functions changed"), "{err}");
}

#[test]
fn a_changed_initial_value_of_existing_data_is_refused() {
    let d = diff(
        "kernel/time/clocksource.c",
        "static int verify_n_cpus = 8;",
        &["static int verify_n_cpus = 9;"],
    );
    let (ok, err, ko) = build("data", &d);
    assert!(!ok && ko.is_none(), "{err}");
    assert!(err.contains("existing data 'verify_n_cpus'"), "{err}");
}

#[test]
fn assembly_and_unbuilt_files_are_refused_before_compiling() {
    let asm = "--- a/arch/x86/lib/memcpy_64.S\n+++ b/arch/x86/lib/memcpy_64.S\n@@ -1,1 +1,2 @@\n /* x */\n+/* y */\n";
    let (ok, err, _) = build("asm", asm);
    assert!(!ok && err.contains("is assembly"), "{err}");
    assert!(!err.contains("compiling"), "refused before compiling: {err}");
    let unbuilt = "--- a/drivers/gpu/drm/drm_file.c\n+++ b/drivers/gpu/drm/drm_file.c\n@@ -1,1 +1,2 @@\n x\n+y\n";
    let (ok, err, _) = build("unbuilt", unbuilt);
    assert!(
        !ok && err.contains("not compiled in this kernel's configuration"),
        "{err}"
    );
}

/// A change to setitimer(): its printk_once flag (`__already_done`) is the running kernel's (the warning it
/// already printed is not printed again), not a new copy in the patch.
#[test]
fn run_once_state_stays_the_kernels() {
    let d = diff(
        "kernel/time/itimer.c",
        "	error = do_setitimer(which, &set_buffer, ovalue ? &get_buffer : NULL);",
        &[
            "	if (which < 0)",
            "		return -EINVAL;",
            "	error = do_setitimer(which, &set_buffer, ovalue ? &get_buffer : NULL);",
        ],
    );
    let (ok, err, ko) = build("once", &d);
    assert!(ok, "{err}");
    let ko = ko.unwrap();
    let m = lucos_update_server::module::PatchModule::parse(&ko).unwrap();
    let kernel: Vec<String> = m
        .relocs
        .iter()
        .filter_map(|r| match &r.target {
            lucos_update_server::module::SymbolPlace::Kernel(n) => Some(n.clone()),
            _ => None,
        })
        .collect();
    assert!(
        kernel.iter().any(|n| n.starts_with("itimer.c:__already_done")),
        "the once flag links to the kernel's copy: {kernel:?}"
    );
    assert!(
        m.replaces.iter().any(|r| r.old_name.contains("setitimer")),
        "{:?}",
        m.replaces
    );
}

/// A change inside a module (xfs): the function is named `xfs::NAME`, and the static table
/// it loops over is the running module's, by its start and by its end (one past the last
/// entry, which the compiler writes as the section plus the table's size), not a copy.
#[test]
fn a_module_function_links_to_the_modules_own_table_start_and_end() {
    let d = diff(
        "fs/xfs/xfs_stats.c",
        "	return len;",
        &[
            "	len += scnprintf(buf + len, PATH_MAX-len, \"lucos\\n\");",
            "	return len;",
        ],
    );
    let (ok, err, ko) = build("xfs", &d);
    assert!(ok, "{err}");
    let m = lucos_update_server::module::PatchModule::parse(&ko.unwrap()).unwrap();
    let olds: Vec<&str> = m.replaces.iter().map(|r| r.old_name.as_str()).collect();
    assert_eq!(olds, ["xfs::xfs_stats_format"]);
    let table: Vec<i64> = m
        .relocs
        .iter()
        .filter(|r| matches!(&r.target, lucos_update_server::module::SymbolPlace::Kernel(n) if n == "xfs::xstats.0"))
        .map(|r| r.addend)
        .collect();
    assert!(
        table.contains(&0) && table.iter().any(|&a| a > 0),
        "start and end: {table:?}"
    );
    assert!(
        !m.sections.iter().any(|s| s.name.contains("xstats")),
        "no copy of the table: {:?}",
        m.sections.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
}
