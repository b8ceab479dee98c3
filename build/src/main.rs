//! `lucos-build`: a live patch module from an upstream source diff.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use lucos_build::pipeline::{self, progress, Options};
use lucos_build::tree::Tree;
use lucos_update_server::signing;

/// Build a lucos live patch from a kernel source diff.
///
/// Compiles every translation unit the diff touches (and every unit that includes a
/// changed header) before and after the diff, with the exact kbuild command lines of the
/// kernel build tree plus -ffunction-sections -fdata-sections; compares the objects
/// function by function (relocation-aware: a moved __LINE__ or a renamed .isra/.constprop
/// clone is not a change); and writes one patch module with the changed and new functions
/// and what they need, whose references to unchanged code and data name the running
/// kernel's symbols unambiguously (FILE:NAME,POS for locals, MODULE::NAME for code built as
/// a module). Accepts kpatch-style patches unmodified: kpatch-macros.h and kpatch-syscall.h
/// are on the include path.
///
/// Refuses, writing nothing, when no function changed, when existing data's initial value
/// or layout changes, when only __init/__exit code changes, when exported symbols' CRCs
/// would change, or when assembly, build files or new files change.
///
/// Exit codes: 0 built, 1 refused or failed (the message says why), 2 usage error.
#[derive(Parser)]
#[command(name = "lucos-build", version, verbatim_doc_comment)]
struct Cli {
    /// A unified diff against the kernel source (-p1 paths, as git and kpatch produce);
    /// repeat to apply several in order.
    #[arg(long = "patch", short = 'p', required = true)]
    patches: Vec<PathBuf>,
    /// Patch name, shown by `lucosctl list` (default: the first patch file's stem).
    #[arg(long)]
    name: Option<String>,
    /// Description shown by `lucosctl status` (default: the patch file names).
    #[arg(long)]
    description: Option<String>,
    /// Output patch module.
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Directory with src/, build/ and vmlinux of the running kernel (what images/build.sh
    /// makes).
    #[arg(long, default_value = "images/out")]
    tree: PathBuf,
    /// Kernel source tree (instead of --tree).
    #[arg(long, requires = "build")]
    src: Option<PathBuf>,
    /// Kernel build tree, `make O=` (instead of --tree).
    #[arg(long, requires = "src")]
    build: Option<PathBuf>,
    /// The vmlinux (default: the build tree's).
    #[arg(long)]
    vmlinux: Option<PathBuf>,
    /// Sign the module with this ed25519 key (`lucosctl keygen`), bound to the vmlinux's
    /// build and to --version.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Version the signature binds, as `lucosctl sign --version` (the server accepts only
    /// newer versions of a patch name).
    #[arg(long, default_value_t = 1)]
    patch_version: u64,
    /// Parallel compile jobs (default: the number of CPUs).
    #[arg(short = 'j', long)]
    jobs: Option<usize>,
    /// Keep the scratch directory (patched sources, both objects) at this path.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lucos-build: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let tree = match (&cli.src, &cli.build) {
        (Some(s), Some(b)) => Tree::new(s, b, cli.vmlinux.as_deref().unwrap_or(&b.join("vmlinux")))?,
        _ => {
            let mut t = Tree::from_dir(&cli.tree)?;
            if let Some(v) = &cli.vmlinux {
                t.vmlinux = std::fs::canonicalize(v)?;
            }
            t
        }
    };
    let stem = cli.patches[0]
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("patch")
        .to_string();
    let name = cli.name.clone().unwrap_or(stem);
    let description = cli.description.clone().unwrap_or_else(|| {
        let files: Vec<String> = cli
            .patches
            .iter()
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(String::from))
            .collect();
        format!("lucos-build from {}", files.join(", "))
    });
    let keep = cli.keep.is_some();
    let work = cli.keep.clone().unwrap_or_else(|| pipeline::default_work(&cli.output));
    let jobs = cli
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
    let mut patches = Vec::new();
    for p in &cli.patches {
        patches.push(std::fs::canonicalize(p).map_err(|e| format!("patch '{}': {e}", p.display()))?);
    }
    let opts = Options {
        patches,
        name,
        description,
        tree: tree.clone(),
        work: work.clone(),
        jobs,
    };
    let result = pipeline::build(&opts);
    if !keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    let (bytes, report) = result?;
    let bytes = match &cli.key {
        Some(k) => {
            let sk = signing::load_signing_key(k)?;
            let binding = signing::Binding {
                kernel_id: signing::kernel_id_of(&tree.vmlinux)?,
                version: cli.patch_version,
            };
            progress(&format!(
                "signed with key {} for kernel build {}",
                signing::fingerprint(&sk.verifying_key()),
                signing::hex(&binding.kernel_id)
            ));
            signing::sign(&bytes, &binding, &sk)?
        }
        None => bytes,
    };
    std::fs::write(&cli.output, &bytes).map_err(|e| format!("{}: {e}", cli.output.display()))?;
    progress(&format!(
        "wrote {} ({} bytes) in {:.1} s (compiling {:.1} s)",
        cli.output.display(),
        bytes.len(),
        t0.elapsed().as_secs_f64(),
        report.compile_s
    ));
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
