//! Compiling a translation unit before and after the diff, with kbuild's exact command
//! line plus `-ffunction-sections -fdata-sections` (so that every function and object
//! gets a section of its own and can be compared and taken alone), followed by the same
//! objtool pass kbuild runs (ORC data, retpoline, return and static-call sites, jump label
//! NOPs). Debug info is left out: it is never loaded and only slows the build.
//!
//! The patched sources live in a scratch tree that mirrors the source tree: the files the
//! diff touches, patched, and the other files of their directories (so that `#include
//! "local.h"` finds the patched copy). The compiler searches the scratch tree before the
//! source tree for every include directory, and `-fmacro-prefix-map` makes `__FILE__` the
//! same relative path as in the original build.

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::tree::{Tree, Unit};

/// Why a unit could not be compiled.
#[derive(Debug, Error)]
pub enum CompileError {
    /// kbuild's command line for the unit is not one lucos-build understands.
    #[error("cannot use kbuild's command for {object}: {why}")]
    Command {
        /// The object.
        object: String,
        /// What is missing.
        why: String,
    },
    /// A tool could not be started.
    #[error("cannot run {tool}: {source}")]
    Spawn {
        /// The tool.
        tool: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The compiler (or objtool, or genksyms) failed.
    #[error("{what} of {object} failed:\n{output}")]
    Failed {
        /// Which step.
        what: String,
        /// The object.
        object: String,
        /// What it printed.
        output: String,
    },
    /// A scratch file could not be written.
    #[error("scratch tree: {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Splits a shell command line into words (single and double quotes, backslashes), with
/// each unquoted `;` a word of its own.
pub fn shell_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut has = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                has = true;
                for d in chars.by_ref() {
                    if d == '\'' {
                        break;
                    }
                    cur.push(d);
                }
            }
            '"' => {
                has = true;
                while let Some(d) = chars.next() {
                    match d {
                        '"' => break,
                        '\\' => {
                            if let Some(&n) = chars.peek() {
                                if matches!(n, '"' | '\\' | '$' | '`') {
                                    cur.push(n);
                                    chars.next();
                                    continue;
                                }
                            }
                            cur.push('\\');
                        }
                        _ => cur.push(d),
                    }
                }
            }
            '\\' => {
                has = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ';' => {
                if has {
                    words.push(std::mem::take(&mut cur));
                    has = false;
                }
                words.push(";".into());
            }
            c if c.is_whitespace() => {
                if has {
                    words.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            c => {
                has = true;
                cur.push(c);
            }
        }
    }
    if has {
        words.push(cur);
    }
    words
}

/// Which build of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source as the running kernel was built from.
    Original,
    /// With the diff applied (from the scratch tree).
    Patched,
}

impl Side {
    /// `orig` or `patched`.
    pub fn dir(self) -> &'static str {
        match self {
            Side::Original => "orig",
            Side::Patched => "patched",
        }
    }
}

/// The commands that build one unit: compiler and objtool, as argument vectors.
#[derive(Debug, Clone)]
pub struct UnitCommands {
    /// `gcc ... -c -o OUT SRC`.
    pub cc: Vec<String>,
    /// `objtool ... OUT`, when kbuild runs it.
    pub objtool: Option<Vec<String>>,
    /// The compiler's flags alone (for the preprocessor run of genksyms).
    pub c_flags: Vec<String>,
    /// The source file compiled.
    pub source: PathBuf,
}

/// Builds the commands for `unit` on `side`, writing the object to `out`. `scratch` is
/// the patched mirror of the source tree.
pub fn commands(
    tree: &Tree,
    unit: &Unit,
    side: Side,
    scratch: &Path,
    out: &Path,
) -> Result<UnitCommands, CompileError> {
    commands_with(tree, unit, side, scratch, out, None)
}

/// [`commands`], with `include` searched last by the patched build (lucos-build's own
/// headers: `kpatch-macros.h`, `kpatch-syscall.h`, `lucos.h`).
pub fn commands_with(
    tree: &Tree,
    unit: &Unit,
    side: Side,
    scratch: &Path,
    out: &Path,
    include: Option<&Path>,
) -> Result<UnitCommands, CompileError> {
    let bad = |why: &str| CompileError::Command {
        object: unit.object.clone(),
        why: why.into(),
    };
    let words = shell_words(&unit.cmd);
    let mut parts = words.split(|w| w == ";");
    let cc_in = parts.next().ok_or_else(|| bad("empty command"))?;
    let objtool_in: Option<&[String]> = parts.find(|p| p.first().is_some_and(|w| w.ends_with("objtool")));
    if cc_in.is_empty() || !cc_in[0].ends_with("gcc") && !cc_in[0].ends_with("cc") {
        return Err(bad("it does not start with the C compiler"));
    }
    let src_str = tree.src.display().to_string();
    let scratch_str = scratch.display().to_string();
    let source = match side {
        Side::Original => unit.source.clone(),
        Side::Patched => {
            let rel = unit.rel_source(tree);
            let p = scratch.join(&rel);
            if p.exists() {
                p
            } else {
                unit.source.clone()
            }
        }
    };
    let mut c_flags = Vec::new();
    let mut i = 1;
    let mut saw_o = false;
    while i < cc_in.len() {
        let w = &cc_in[i];
        i += 1;
        if w.starts_with("-Wp,-MMD") || w.starts_with("-Wp,-MD") || w == "-g" || w.starts_with("-gdwarf") {
            continue;
        }
        if w == "-c" {
            continue;
        }
        if w == "-o" {
            i += 1; // the object
            saw_o = true;
            continue;
        }
        if Path::new(w) == unit.source {
            continue;
        }
        if side == Side::Patched {
            // Scratch first for every include directory in the source tree.
            if w == "-I" || w == "-include" {
                if let Some(dir) = cc_in.get(i) {
                    if let Some(rest) = dir.strip_prefix(&src_str) {
                        let shadow = format!("{scratch_str}{rest}");
                        if w == "-include" {
                            c_flags.push(w.clone());
                            c_flags.push(if Path::new(&shadow).exists() {
                                shadow
                            } else {
                                dir.clone()
                            });
                            i += 1;
                            continue;
                        }
                        c_flags.extend([w.clone(), shadow]);
                    }
                }
            } else if let Some(dir) = w.strip_prefix("-I") {
                if let Some(rest) = dir.strip_prefix(&src_str) {
                    c_flags.push(format!("-I{scratch_str}{rest}"));
                }
            } else if w.starts_with("-fmacro-prefix-map=") {
                c_flags.push(format!("-fmacro-prefix-map={scratch_str}/="));
            }
        }
        c_flags.push(w.clone());
    }
    if !saw_o {
        return Err(bad("no -o OBJECT"));
    }
    if side == Side::Patched {
        if let Some(dir) = include {
            c_flags.push(format!("-I{}", dir.display()));
        }
    }
    c_flags.extend(["-ffunction-sections".into(), "-fdata-sections".into()]);
    let out_s = out.display().to_string();
    let mut cc = vec![cc_in[0].clone()];
    cc.extend(c_flags.iter().cloned());
    cc.extend(["-c".into(), "-o".into(), out_s.clone(), source.display().to_string()]);
    let objtool = objtool_in.map(|o| {
        let mut v: Vec<String> = o.to_vec();
        if let Some(last) = v.last_mut() {
            *last = out_s.clone();
        }
        v
    });
    Ok(UnitCommands {
        cc,
        objtool,
        c_flags,
        source,
    })
}

fn run(
    what: &str,
    object: &str,
    argv: &[String],
    cwd: &Path,
    stdin: Option<std::process::Stdio>,
) -> Result<std::process::Output, CompileError> {
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]).current_dir(cwd);
    if let Some(s) = stdin {
        c.stdin(s);
    }
    let out = c.output().map_err(|source| CompileError::Spawn {
        tool: argv[0].clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(CompileError::Failed {
            what: what.into(),
            object: object.into(),
            output: format!(
                "{}{}\n(command: {})",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                argv.join(" ")
            ),
        });
    }
    Ok(out)
}

/// Compiles and objtool-processes one unit.
pub fn build(tree: &Tree, unit: &Unit, cmds: &UnitCommands) -> Result<(), CompileError> {
    run("compiling", &unit.object, &cmds.cc, &tree.build, None)?;
    if let Some(o) = &cmds.objtool {
        run("objtool", &unit.object, o, &tree.build, None)?;
    }
    Ok(())
}

/// The symbol versions (CRCs) genksyms computes for the unit's exports, as kbuild does
/// with `CONFIG_MODVERSIONS`: preprocess with `-D__GENKSYMS__`, feed genksyms.
pub fn symbol_versions(tree: &Tree, unit: &Unit, cmds: &UnitCommands) -> Result<Vec<(String, String)>, CompileError> {
    let cc = cmds.cc[0].clone();
    let mut cpp = vec![cc, "-E".into(), "-D__GENKSYMS__".into()];
    cpp.extend(
        cmds.c_flags
            .iter()
            .filter(|f| *f != "-ffunction-sections" && *f != "-fdata-sections")
            .cloned(),
    );
    cpp.push(cmds.source.display().to_string());
    let pre = run("preprocessing for genksyms", &unit.object, &cpp, &tree.build, None)?;
    let genksyms = tree.build.join("scripts/genksyms/genksyms");
    let mut child = Command::new(&genksyms)
        .args(["-r", "/dev/null"])
        .current_dir(&tree.build)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| CompileError::Spawn {
            tool: genksyms.display().to_string(),
            source,
        })?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().ok_or_else(|| CompileError::Failed {
            what: "genksyms".into(),
            object: unit.object.clone(),
            output: "no stdin".into(),
        })?;
        stdin.write_all(&pre.stdout).map_err(|source| CompileError::Spawn {
            tool: "genksyms".into(),
            source,
        })?;
    }
    let out = child.wait_with_output().map_err(|source| CompileError::Spawn {
        tool: "genksyms".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(CompileError::Failed {
            what: "genksyms".into(),
            object: unit.object.clone(),
            output: String::from_utf8_lossy(&out.stderr).into(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("#SYMVER"))
                .then(|| (w.next().unwrap_or("").to_string(), w.next().unwrap_or("").to_string()))
        })
        .collect())
}

/// Creates the scratch mirror: each file in `touched` (relative to the source tree) with
/// the other files of its directory, copied from the source tree, then patched in place by
/// GNU patch, patch by patch.
pub fn make_scratch(tree: &Tree, scratch: &Path, touched: &[String], patches: &[PathBuf]) -> Result<(), CompileError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CompileError::Io { path, source }
    };
    let mut dirs: Vec<&str> = touched
        .iter()
        .map(|t| t.rsplit_once('/').map(|(d, _)| d).unwrap_or(""))
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        let from = tree.src.join(d);
        let to = scratch.join(d);
        std::fs::create_dir_all(&to).map_err(io(&to))?;
        let Ok(entries) = std::fs::read_dir(&from) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                let dst = to.join(e.file_name());
                std::fs::copy(e.path(), &dst).map_err(io(&dst))?;
            }
        }
    }
    for p in patches {
        let argv: Vec<String> = vec![
            "patch".into(),
            "-p1".into(),
            "--forward".into(),
            "--no-backup-if-mismatch".into(),
            "-r".into(),
            "-".into(),
            "-d".into(),
            scratch.display().to_string(),
            "-i".into(),
            p.display().to_string(),
        ];
        run("applying the patch", &p.display().to_string(), &argv, scratch, None).map_err(|e| match e {
            CompileError::Failed { output, .. } => CompileError::Failed {
                what: format!("applying {} to the kernel source", p.display()),
                object: tree.src.display().to_string(),
                output,
            },
            e => e,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_kbuild_commands() {
        let w = shell_words(
            "gcc -Wp,-MMD,fs/.x.o.d -DKBUILD_MODFILE='\"fs/proc/proc\"' -I ./x -c -o fs/x.o /s/fs/x.c   ; ./tools/objtool/objtool --orc   fs/x.o",
        );
        assert_eq!(w[2], "-DKBUILD_MODFILE=\"fs/proc/proc\"");
        let semi = w.iter().position(|x| x == ";").unwrap();
        assert_eq!(w[semi + 1], "./tools/objtool/objtool");
        assert_eq!(w.last().unwrap(), "fs/x.o");
        assert_eq!(shell_words("a \"b \\\"c\\\"\" d\\ e"), vec!["a", "b \"c\"", "d e"]);
    }

    #[test]
    fn patched_commands_search_the_scratch_tree_first() {
        let tree = Tree {
            src: "/s".into(),
            build: "/b".into(),
            vmlinux: "/b/vmlinux".into(),
        };
        let unit = Unit {
            object: "fs/x.o".into(),
            source: "/s/fs/x.c".into(),
            cmd: "gcc -Wp,-MMD,fs/.x.o.d -I/s/include -I ./include -fmacro-prefix-map=/s/= -g -O2 -I /s/fs -c -o fs/x.o /s/fs/x.c ; ./tools/objtool/objtool --orc fs/x.o".into(),
            module: None,
            cmd_file: "/b/fs/.x.o.cmd".into(),
        };
        let c = commands(
            &tree,
            &unit,
            Side::Patched,
            Path::new("/t/scratch"),
            Path::new("/t/p/fs/x.o"),
        )
        .unwrap();
        let cc = c.cc.join(" ");
        assert!(cc.starts_with("gcc -I/t/scratch/include -I/s/include -I ./include -fmacro-prefix-map=/t/scratch/= -fmacro-prefix-map=/s/= -O2 -I /t/scratch/fs -I /s/fs"), "{cc}");
        assert!(
            cc.ends_with("-ffunction-sections -fdata-sections -c -o /t/p/fs/x.o /s/fs/x.c"),
            "{cc}"
        );
        assert!(!cc.contains(" -g "));
        assert_eq!(
            c.objtool.unwrap(),
            vec!["./tools/objtool/objtool", "--orc", "/t/p/fs/x.o"]
        );
        let o = commands(
            &tree,
            &unit,
            Side::Original,
            Path::new("/t/scratch"),
            Path::new("/t/o/fs/x.o"),
        )
        .unwrap();
        assert!(!o.cc.join(" ").contains("scratch"));
    }
}
