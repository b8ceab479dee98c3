//! The guest kernel's source and build trees: which object each C file became, with the
//! exact command kbuild compiled it with (`.NAME.o.cmd`), the headers it included, and the
//! module it was linked into.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why the kernel trees cannot be used.
#[derive(Debug, Error)]
pub enum TreeError {
    /// A directory or file the tool needs is missing.
    #[error("{what} '{path}' does not exist{hint}")]
    Missing {
        /// What it is.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
    /// A file could not be read.
    #[error("cannot read '{path}': {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The source tree, the O= build tree and the vmlinux built from them.
#[derive(Debug, Clone)]
pub struct Tree {
    /// Kernel source tree (what `source_*` lines of the `.cmd` files point into).
    pub src: PathBuf,
    /// kbuild output tree (`make O=`), with the objects and `.cmd` files.
    pub build: PathBuf,
    /// The vmlinux of that build.
    pub vmlinux: PathBuf,
}

/// One translation unit as kbuild built it.
#[derive(Debug, Clone)]
pub struct Unit {
    /// The object, relative to the build tree (`fs/proc/meminfo.o`).
    pub object: String,
    /// The C file, as the `.cmd` file names it (absolute).
    pub source: PathBuf,
    /// kbuild's command (`cmd_OBJ := ...`): compiler, then objtool.
    pub cmd: String,
    /// The module the object is linked into (kernel name: `-` made `_`), or `None` for
    /// vmlinux.
    pub module: Option<String>,
    /// The `.cmd` file (its `deps_` list names every header the unit includes).
    pub cmd_file: PathBuf,
}

impl Unit {
    /// The C file's path relative to the source tree.
    pub fn rel_source(&self, tree: &Tree) -> String {
        self.source
            .strip_prefix(&tree.src)
            .unwrap_or(&self.source)
            .display()
            .to_string()
    }

    /// Whether the unit includes the source-tree file `rel` (its `deps_` list names it).
    pub fn includes(&self, tree: &Tree, rel: &str) -> Result<bool, TreeError> {
        let text = std::fs::read_to_string(&self.cmd_file).map_err(|source| TreeError::Io {
            path: self.cmd_file.clone(),
            source,
        })?;
        let abs = tree.src.join(rel).display().to_string();
        Ok(text.split(|c: char| c.is_whitespace()).any(|w| w == abs || w == rel))
    }
}

/// Every C unit of the build tree.
#[derive(Debug, Default)]
pub struct Index {
    /// The units.
    pub units: Vec<Unit>,
    by_source: HashMap<String, usize>,
}

impl Index {
    /// The unit built from source-tree file `rel` (`fs/proc/meminfo.c`), if any.
    pub fn by_source(&self, rel: &str) -> Option<&Unit> {
        self.by_source.get(rel).map(|&i| &self.units[i])
    }
}

impl Tree {
    /// Opens `images/out`-style trees: `dir/src`, `dir/build`, `dir/vmlinux` (or the
    /// build tree's own vmlinux).
    pub fn from_dir(dir: &Path) -> Result<Self, TreeError> {
        let src = dir.join("src");
        let build = dir.join("build");
        let vmlinux = if dir.join("vmlinux").exists() {
            dir.join("vmlinux")
        } else {
            build.join("vmlinux")
        };
        Self::new(&src, &build, &vmlinux)
    }

    /// Opens explicit trees; paths are made absolute (symlinks resolved).
    pub fn new(src: &Path, build: &Path, vmlinux: &Path) -> Result<Self, TreeError> {
        let hint = ": build the guest kernel first (images/build.sh) or pass --tree/--src/--build";
        let canon = |p: &Path, what: &'static str| {
            std::fs::canonicalize(p).map_err(|_| TreeError::Missing {
                what,
                path: p.into(),
                hint,
            })
        };
        let tree = Tree {
            src: canon(src, "kernel source tree")?,
            build: canon(build, "kernel build tree")?,
            vmlinux: canon(vmlinux, "vmlinux")?,
        };
        for (f, what) in [
            ("scripts/genksyms/genksyms", "genksyms"),
            ("tools/objtool/objtool", "objtool"),
            (".config", "kernel .config"),
        ] {
            if !tree.build.join(f).exists() {
                return Err(TreeError::Missing {
                    what,
                    path: tree.build.join(f),
                    hint,
                });
            }
        }
        Ok(tree)
    }

    /// Reads every `.*.o.cmd` of the build tree (the C units) and every `*.mod` (which
    /// objects each module is made of).
    pub fn index(&self) -> Result<Index, TreeError> {
        let mut cmds = Vec::new();
        let mut mods = Vec::new();
        walk(&self.build, &mut |p: &Path| {
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                return;
            };
            if name.starts_with('.') && name.ends_with(".o.cmd") && !name.ends_with(".mod.o.cmd") {
                cmds.push(p.to_path_buf());
            } else if name.ends_with(".mod") && !name.starts_with('.') {
                mods.push(p.to_path_buf());
            }
        })
        .map_err(|source| TreeError::Io {
            path: self.build.clone(),
            source,
        })?;
        let mut module_of: HashMap<String, String> = HashMap::new();
        for m in &mods {
            let text = std::fs::read_to_string(m).map_err(|source| TreeError::Io {
                path: m.clone(),
                source,
            })?;
            let stem = m.file_stem().and_then(|s| s.to_str()).unwrap_or("").replace('-', "_");
            for o in text.split_whitespace() {
                module_of.insert(o.to_string(), stem.clone());
            }
        }
        let mut index = Index::default();
        for c in cmds {
            let Some(unit) = read_cmd(&c).map_err(|source| TreeError::Io {
                path: c.clone(),
                source,
            })?
            else {
                continue;
            };
            let Ok(rel) = unit.0.strip_prefix(&self.src) else {
                continue;
            };
            let rel = rel.display().to_string();
            if !rel.ends_with(".c") {
                continue;
            }
            let module = module_of.get(&unit.2).cloned();
            index.by_source.insert(rel, index.units.len());
            index.units.push(Unit {
                object: unit.2,
                source: unit.0,
                cmd: unit.1,
                module,
                cmd_file: c,
            });
        }
        Ok(index)
    }

    /// The built module file for a module name (`xfs` → `fs/xfs/xfs.ko`), found through
    /// `modules.order`.
    pub fn module_ko(&self, module: &str) -> Option<PathBuf> {
        let order = std::fs::read_to_string(self.build.join("modules.order")).ok()?;
        order
            .lines()
            .map(str::trim)
            .find(|l| {
                Path::new(l)
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .is_some_and(|s| s.replace('-', "_") == module)
            })
            .map(|l| self.build.join(l))
    }
}

/// (source, command, object) from the head of a `.cmd` file, if it compiles a C file.
fn read_cmd(path: &Path) -> std::io::Result<Option<(PathBuf, String, String)>> {
    use std::io::{BufRead, BufReader};
    let f = std::fs::File::open(path)?;
    let mut cmd = None;
    for line in BufReader::new(f).lines().take(8) {
        let line = line?;
        if let Some(rest) = line.strip_prefix("cmd_") {
            if let Some((obj, c)) = rest.split_once(" := ") {
                cmd = Some((obj.to_string(), c.to_string()));
            }
        } else if let Some(rest) = line.strip_prefix("source_") {
            if let (Some((obj, c)), Some((_, src))) = (cmd.take(), rest.split_once(" := ")) {
                return Ok(Some((PathBuf::from(src.trim()), c, obj)));
            }
        }
    }
    Ok(None)
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        let p = e.path();
        if t.is_dir() {
            walk(&p, f)?;
        } else if t.is_file() {
            f(&p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_cmd_file_head() {
        let dir = std::env::temp_dir().join(format!("lucos-build-tree-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(".meminfo.o.cmd");
        std::fs::write(
            &p,
            "cmd_fs/proc/meminfo.o := gcc -c -o fs/proc/meminfo.o /s/fs/proc/meminfo.c ; ./tools/objtool/objtool --orc fs/proc/meminfo.o\n\nsource_fs/proc/meminfo.o := /s/fs/proc/meminfo.c\n\ndeps_fs/proc/meminfo.o := \\\n  /s/include/linux/mm.h \\\n",
        )
        .unwrap();
        let (src, cmd, obj) = read_cmd(&p).unwrap().unwrap();
        assert_eq!(src, PathBuf::from("/s/fs/proc/meminfo.c"));
        assert_eq!(obj, "fs/proc/meminfo.o");
        assert!(cmd.starts_with("gcc -c"));
        let u = Unit {
            object: obj,
            source: src,
            cmd,
            module: None,
            cmd_file: p,
        };
        let t = Tree {
            src: "/s".into(),
            build: dir.clone(),
            vmlinux: dir.join("vmlinux"),
        };
        assert!(u.includes(&t, "include/linux/mm.h").unwrap());
        assert!(!u.includes(&t, "include/linux/sched.h").unwrap());
        assert_eq!(u.rel_source(&t), "fs/proc/meminfo.c");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
