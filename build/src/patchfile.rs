//! Reading a unified diff (`git diff`, `diff -Nupr`, a stable-tree commit): which files
//! it changes and, per file, how line numbers move (for telling a moved `__LINE__` from a
//! real change). Applying it is left to GNU patch, as kpatch-build does.

use std::path::Path;

use thiserror::Error;

/// Why a patch file cannot be used.
#[derive(Debug, Error)]
pub enum PatchFileError {
    /// It could not be read.
    #[error("cannot read patch '{path}': {source}")]
    Io {
        /// The patch.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// It changes no file.
    #[error("'{0}' is not a unified diff: no '--- a/FILE' / '+++ b/FILE' header")]
    Empty(String),
    /// A hunk header is malformed.
    #[error("'{path}' line {line}: malformed hunk header '{text}'")]
    BadHunk {
        /// The patch.
        path: String,
        /// Line number in the patch.
        line: usize,
        /// The header.
        text: String,
    },
}

/// What kind of source file a diff touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    /// A C translation unit (`.c`).
    CSource,
    /// A header (`.h`).
    Header,
    /// Assembly (`.S`, `.s`): refused.
    Assembly,
    /// Anything else (Makefile, Kconfig, scripts, linker scripts, docs): refused unless
    /// it is documentation.
    Other,
}

/// One file a diff changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    /// Path relative to the source tree root (after stripping one component, as `-p1`).
    pub path: String,
    /// The diff creates the file.
    pub created: bool,
    /// The diff deletes the file.
    pub deleted: bool,
    /// Hunks as (old start, old count, new start, new count).
    pub hunks: Vec<(u32, u32, u32, u32)>,
}

impl FileChange {
    /// The file's kind, from its name.
    pub fn kind(&self) -> FileKind {
        kind_of(&self.path)
    }

    /// The new line number of old line `old`, if that line survives unchanged (a line
    /// inside a hunk that the hunk changes has none).
    pub fn map_line(&self, old: u32) -> Option<u32> {
        let mut shift: i64 = 0;
        for &(os, oc, ns, nc) in &self.hunks {
            if old < os {
                break;
            }
            if old < os + oc {
                return None;
            }
            shift = i64::from(ns) + i64::from(nc) - (i64::from(os) + i64::from(oc));
        }
        u32::try_from(i64::from(old) + shift).ok()
    }
}

/// The kind of a source path.
pub fn kind_of(path: &str) -> FileKind {
    let ext = Path::new(path).extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "c" => FileKind::CSource,
        "h" => FileKind::Header,
        "S" | "s" => FileKind::Assembly,
        _ => FileKind::Other,
    }
}

/// Strips `a/` / `b/` (one path component, like `patch -p1`) and a trailing timestamp.
fn header_path(rest: &str) -> Option<String> {
    let p = rest.split('\t').next().unwrap_or(rest).trim_end();
    if p == "/dev/null" {
        return None;
    }
    let p = p.split_once('/').map(|(_, r)| r).unwrap_or(p);
    Some(p.to_string())
}

fn parse_range(s: &str) -> Option<(u32, u32)> {
    let (a, b) = match s.split_once(',') {
        Some((a, b)) => (a, b),
        None => (s, "1"),
    };
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Parses the text of a unified diff.
pub fn parse(name: &str, text: &str) -> Result<Vec<FileChange>, PatchFileError> {
    let mut files: Vec<FileChange> = Vec::new();
    let mut old: Option<Option<String>> = None;
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if let Some(rest) = l.strip_prefix("--- ") {
            if lines.get(i + 1).is_some_and(|n| n.starts_with("+++ ")) {
                old = Some(header_path(rest));
                i += 1;
                continue;
            }
        }
        if let Some(rest) = l.strip_prefix("+++ ") {
            if let Some(o) = old.take() {
                let new = header_path(rest);
                let path = new.clone().or(o.clone()).unwrap_or_default();
                files.push(FileChange {
                    path,
                    created: o.is_none(),
                    deleted: new.is_none(),
                    hunks: Vec::new(),
                });
                i += 1;
                continue;
            }
        }
        if let Some(rest) = l.strip_prefix("@@ ") {
            let bad = || PatchFileError::BadHunk {
                path: name.into(),
                line: i + 1,
                text: l.into(),
            };
            let f = files.last_mut().ok_or_else(bad)?;
            let mut parts = rest.split_whitespace();
            let o = parts.next().and_then(|p| p.strip_prefix('-')).and_then(parse_range);
            let n = parts.next().and_then(|p| p.strip_prefix('+')).and_then(parse_range);
            let (Some((os, oc)), Some((ns, nc))) = (o, n) else {
                return Err(bad());
            };
            f.hunks.push((os, oc, ns, nc));
            // Skip the hunk body by its counts, so that body lines starting with "---"
            // are never taken for headers.
            let (mut left_old, mut left_new) = (oc, nc);
            i += 1;
            while i < lines.len() && (left_old > 0 || left_new > 0) {
                match lines[i].as_bytes().first() {
                    Some(b'-') => left_old = left_old.saturating_sub(1),
                    Some(b'+') => left_new = left_new.saturating_sub(1),
                    Some(b'\\') => {}
                    _ => {
                        left_old = left_old.saturating_sub(1);
                        left_new = left_new.saturating_sub(1);
                    }
                }
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    if files.is_empty() {
        return Err(PatchFileError::Empty(name.into()));
    }
    Ok(files)
}

/// Reads and parses a patch file.
pub fn read(path: &Path) -> Result<Vec<FileChange>, PatchFileError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PatchFileError::Io {
        path: name.clone(),
        source,
    })?;
    parse(&name, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIFF: &str = "\
diff -Nupr a/fs/proc/meminfo.c b/fs/proc/meminfo.c
--- a/fs/proc/meminfo.c
+++ b/fs/proc/meminfo.c
@@ -29,6 +29,8 @@ static void show_val_kb(struct seq_file
 \tseq_write(m, \" kB\\n\", 4);
 }
 
+static int foo = 5;
+
 static int meminfo_proc_show(struct seq_file *m, void *v)
 {
 \tstruct sysinfo i;
@@ -154,6 +156,6 @@ static int meminfo_proc_show(struct seq_
 \tshow_val_kb(m, \"CmaFree:        \",
 --- not a header
 #endif
+\tseq_printf(m, \"kpatch:         %d\\n\", foo);
 
 \thugetlb_report_meminfo(m);
 
--- /dev/null
+++ b/include/new.h
@@ -0,0 +1 @@
+#define X 1
";

    #[test]
    fn files_hunks_and_line_moves() {
        let f = parse("t", DIFF).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].path, "fs/proc/meminfo.c");
        assert_eq!(f[0].kind(), FileKind::CSource);
        assert_eq!(f[0].hunks, vec![(29, 6, 29, 8), (154, 6, 156, 6)]);
        assert_eq!(f[0].map_line(10), Some(10));
        assert_eq!(f[0].map_line(100), Some(102));
        assert_eq!(f[0].map_line(200), Some(202));
        assert_eq!(f[0].map_line(155), None);
        assert_eq!(f[1].path, "include/new.h");
        assert!(f[1].created && !f[1].deleted);
        assert_eq!(f[1].kind(), FileKind::Header);
    }

    #[test]
    fn not_a_diff() {
        assert!(matches!(parse("x", "hello\n"), Err(PatchFileError::Empty(_))));
    }
}
