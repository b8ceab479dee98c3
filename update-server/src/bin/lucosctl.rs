//! `lucosctl`: submit, inspect and roll back live patches; sign modules; make keys.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use lucos_update_server::client::{Client, ClientError, Target};
use lucos_update_server::protocol::{self, Op, PatchInfo, PatchState, Response};
use lucos_update_server::signing;

/// Live-patch a lucos guest kernel through the update server in lucos-vmm.
///
/// The server is reached over the Unix API socket given to `lucos-vmm run --api-sock`
/// (--socket, or $LUCOS_API_SOCK), or from inside the guest over AF_VSOCK to the VMM
/// (--vsock, or $LUCOS_VSOCK=1).
///
/// Exit codes: 0 success; 1 the request failed (refused by the server, failed in the guest,
/// server unreachable; message on stderr); 2 usage error; 3 --wait gave up before the
/// patch reached the state.
#[derive(Parser)]
#[command(name = "lucosctl", version, verbatim_doc_comment)]
struct Cli {
    /// The Unix API socket of lucos-vmm.
    #[arg(long, global = true, value_name = "PATH", env = "LUCOS_API_SOCK")]
    socket: Option<PathBuf>,
    /// Inside the guest: talk to the VMM (CID 2) over AF_VSOCK.
    #[arg(long, global = true)]
    vsock: bool,
    /// With --vsock: another port (for testing; the VMM resets unknown ports). Implies --vsock.
    #[arg(long, global = true, value_name = "N")]
    port: Option<u32>,
    /// Print the server's reply as JSON (the protocol's typed fields) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Give up on a request the server has not answered within SECS (0: wait forever).
    #[arg(long, global = true, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Submit a signed patch module.
    Apply {
        /// The signed module (`lucosctl sign`).
        file: PathBuf,
        /// Wait up to SECS for the patch to commit.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// List the patches, one line each.
    List,
    /// Show one patch (or all): functions, data, timings, callbacks, what a transition waits on.
    Status {
        /// The patch (default: all).
        id: Option<u32>,
    },
    /// Undo a patch (committed, or still in its transition).
    Rollback {
        /// The patch.
        id: u32,
        /// Wait up to SECS for the patch's code to drain.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Same as rollback: give up a transition that cannot finish.
    Cancel {
        /// The patch.
        id: u32,
        /// Wait up to SECS for the patch's code to drain.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Write a new ed25519 key pair: PREFIX.key (private, created with mode 0600) and
    /// PREFIX.pub. Existing files (or symlinks) are not overwritten without --force.
    Keygen {
        /// Path prefix of the two files.
        prefix: String,
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Append an ed25519 signature to a patch module, binding it to a kernel build and a
    /// version: the server refuses it on another kernel, and refuses a version not newer
    /// than the highest it applied under the module's patch name.
    Sign {
        /// The private key (PREFIX.key from `keygen`).
        #[arg(long, value_name = "PREFIX.key")]
        key: PathBuf,
        /// The guest kernel (vmlinux) the module is built for; its GNU build id is signed.
        #[arg(long, value_name = "VMLINUX")]
        kernel: PathBuf,
        /// The module's version (per patch name, each release must have a higher one).
        #[arg(long = "version", value_name = "N")]
        patch_version: u64,
        /// The module (.ko).
        file: PathBuf,
        /// Where to write the signed module (default: in place).
        #[arg(short, value_name = "OUT.ko")]
        out: Option<PathBuf>,
    },
}

/// Why lucosctl failed, with the exit code of each kind.
enum Failure {
    /// A request failed or the server could not be reached (exit 1).
    Request(String),
    /// `--wait` gave up (exit 3).
    Timeout(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::WaitTimeout { .. } => Failure::Timeout(e.to_string()),
            e => Failure::Request(e.to_string()),
        }
    }
}

/// One line per patch: id, state, name, replaced functions.
fn summary_line(p: &PatchInfo) -> String {
    let funcs: Vec<&str> = p.functions.iter().map(|f| f.old.as_str()).collect();
    format!(
        "{:>3}  {:<13} {:<20} {}",
        p.id,
        p.state.as_str(),
        p.name,
        funcs.join(",")
    )
}

/// The multi-line report of `status`.
fn details(p: &PatchInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "patch {} '{}': {}", p.id, p.name, p.state);
    if !p.description.is_empty() {
        let _ = writeln!(s, "  {}", p.description);
    }
    for f in &p.functions {
        let _ = writeln!(
            s,
            "  {} ({:#x}, {} bytes) -> {} ({:#x})",
            f.old, f.old_addr, f.old_size, f.new, f.new_addr
        );
    }
    for d in &p.data {
        let _ = writeln!(
            s,
            "  data {} ({:#x}, {} bytes): new = old * {} / {}; {} trapped writes, {} converted; {}",
            d.name,
            d.addr,
            d.size,
            d.mul,
            d.div,
            d.trapped_writes,
            d.converted_writes,
            if d.protected {
                "write-protected"
            } else {
                "not protected"
            }
        );
    }
    let _ = writeln!(s, "  code+data at {:#x} ({} bytes)", p.image_addr, p.image_size);
    if !p.modules.is_empty() {
        let _ = writeln!(s, "  guest modules pinned: {}", p.modules.join(", "));
    }
    let _ = writeln!(
        s,
        "  vCPUs paused {} us; apply took {} us; {} stack checks",
        p.pause_us, p.apply_us, p.checks
    );
    for c in &p.callbacks {
        let _ = writeln!(
            s,
            "  {} callback '{}' at {:#x} (limit {} ms)",
            c.kind, c.name, c.addr, c.limit_ms
        );
    }
    for l in &p.callback_log {
        let _ = writeln!(s, "  {l}");
    }
    for b in &p.blockers {
        let _ = writeln!(s, "  waiting: {} is in {}", b.who, b.at);
    }
    for w in &p.warnings {
        let _ = writeln!(s, "  warning: {w}");
    }
    s
}

/// Prints a reply: JSON, or the message and one line (or the details) per patch.
fn print_reply(r: &Response, json: bool, full: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
        return;
    }
    if !r.message.is_empty() {
        println!("{}", r.message);
    }
    for p in &r.patches {
        if full {
            print!("{}", details(p));
        } else {
            println!("{}", summary_line(p));
        }
    }
}

/// Waits for patch `id` to reach `want` and says so.
fn wait_for(c: &mut Client, id: u32, want: PatchState, secs: u64, json: bool) -> Result<(), Failure> {
    let start = Instant::now();
    let p = c.wait_state(id, want, Duration::from_secs(secs), Duration::from_millis(100))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&p).unwrap_or_default());
    } else {
        println!("patch {id} {want} after {:.2}s", start.elapsed().as_secs_f64());
    }
    Ok(())
}

fn target(cli: &Cli) -> Result<Target, Failure> {
    let env_vsock = std::env::var("LUCOS_VSOCK").is_ok_and(|v| v == "1");
    let vsock = cli.vsock || cli.port.is_some() || (env_vsock && cli.socket.is_none());
    if vsock {
        return Ok(Target::Vsock(cli.port.unwrap_or(protocol::VSOCK_PORT)));
    }
    cli.socket
        .clone()
        .map(Target::Unix)
        .ok_or_else(|| Failure::Request("no API socket: pass --socket PATH or set LUCOS_API_SOCK".into()))
}

/// A connection to the server; requests on it give up after `--timeout`.
fn connect(cli: &Cli) -> Result<Client, Failure> {
    let target = target(cli)?;
    Ok(match cli.timeout {
        0 => Client::connect(&target)?,
        secs => Client::connect_timeout(&target, std::time::Duration::from_secs(secs))?,
    })
}

fn read(path: &PathBuf) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::Request(format!("{}: {e}", path.display())))
}

fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.json;
    match &cli.cmd {
        Cmd::Apply { file, wait } => {
            let data = read(file)?;
            if data.len() as u64 > protocol::MAX_PAYLOAD {
                return Err(Failure::Request(format!(
                    "{}: {} bytes, more than the {} bytes the update server accepts",
                    file.display(),
                    data.len(),
                    protocol::MAX_PAYLOAD
                )));
            }
            let mut c = connect(&cli)?;
            let r = c.call(Op::Apply, None, &data)?;
            print_reply(&r, json, false);
            if let (Some(secs), Some(p)) = (wait, r.patches.first()) {
                wait_for(&mut c, p.id, PatchState::Committed, *secs, json)?;
            }
        }
        Cmd::List => {
            let r = connect(&cli)?.call(Op::List, None, &[])?;
            if json {
                print_reply(&r, true, false);
            } else {
                if r.patches.is_empty() {
                    println!("no patches");
                }
                print_reply(&r, false, false);
                if let Some(n) = r.readonly_pages {
                    println!("write-protected guest pages: {n}");
                }
            }
        }
        Cmd::Status { id } => {
            let r = connect(&cli)?.call(Op::Status, *id, &[])?;
            print_reply(&r, json, true);
        }
        Cmd::Rollback { id, wait } | Cmd::Cancel { id, wait } => {
            let mut c = connect(&cli)?;
            print_reply(&c.call(Op::Rollback, Some(*id), &[])?, json, false);
            if let Some(secs) = wait {
                wait_for(&mut c, *id, PatchState::RolledBack, *secs, json)?;
            }
        }
        Cmd::Keygen { prefix, force } => {
            let (sk, pk) = signing::generate_keypair().map_err(|e| Failure::Request(e.to_string()))?;
            let key = PathBuf::from(format!("{prefix}.key"));
            let public = PathBuf::from(format!("{prefix}.pub"));
            signing::write_key_file(&key, &sk, 0o600, *force).map_err(|e| Failure::Request(e.to_string()))?;
            signing::write_key_file(&public, &pk, 0o644, *force).map_err(|e| Failure::Request(e.to_string()))?;
            println!("wrote {prefix}.key and {prefix}.pub (fingerprint {})", &pk[..16]);
        }
        Cmd::Sign {
            key,
            kernel,
            patch_version,
            file,
            out,
        } => {
            let sk = signing::load_signing_key(key).map_err(|e| Failure::Request(e.to_string()))?;
            let data = read(file)?;
            if signing::is_signed(&data) {
                return Err(Failure::Request(format!("{} is already signed", file.display())));
            }
            let m = lucos_update_server::module::PatchModule::parse(&data)
                .map_err(|e| Failure::Request(format!("{}: not a patch module: {e}", file.display())))?;
            let binding = signing::Binding {
                kernel_id: signing::kernel_id_of(kernel).map_err(|e| Failure::Request(e.to_string()))?,
                version: *patch_version,
            };
            let signed = signing::sign(&data, &binding, &sk).map_err(|e| Failure::Request(e.to_string()))?;
            let out = out.clone().unwrap_or_else(|| file.clone());
            std::fs::write(&out, signed).map_err(|e| Failure::Request(format!("{}: {e}", out.display())))?;
            println!(
                "signed {} ('{}' version {}, kernel build {}) with key {}",
                out.display(),
                m.name,
                binding.version,
                signing::hex(&binding.kernel_id),
                signing::fingerprint(&sk.verifying_key())
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Request(e)) => {
            eprintln!("lucosctl: {e}");
            ExitCode::from(1)
        }
        Err(Failure::Timeout(e)) => {
            eprintln!("lucosctl: {e}");
            ExitCode::from(3)
        }
    }
}
