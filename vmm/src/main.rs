//! `lucos-vmm`: boots an x86-64 Linux guest on KVM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use lucos_update_server::service::GuestRights;
use lucos_vmm::config::{parse_mem_size, DEFAULT_VSOCK_CID};
use lucos_vmm::host::{CpuPolicy, CpuReport};
use lucos_vmm::introspect::Vmlinux;
use lucos_vmm::vm::RunOptions;
use lucos_vmm::{Vm, VmConfig};

#[derive(Parser)]
#[command(
    name = "lucos-vmm",
    version,
    about = "A KVM VMM for hypervisor-assisted live updates of a Linux guest"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest: direct 64-bit boot of an uncompressed vmlinux with an optional initramfs.
    ///
    /// The serial console (COM1) is connected to stdout/stdin; when stdin is a terminal,
    /// Ctrl-A x quits. Exit codes: 0 guest rebooted or powered off (or Ctrl-A x),
    /// 1 VMM error (bad arguments, unreadable kernel, KVM failure), 2 usage error,
    /// 3 guest crashed (kernel panic, triple fault, unhandled VM exit; details on stderr),
    /// 4 --timeout expired.
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Uncompressed kernel ELF (vmlinux), e.g. images/out/vmlinux.
    #[arg(long, value_name = "PATH", required_unless_present = "print_config")]
    kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed if the kernel supports it).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default, which depends on the host's KVM: see
    /// --print-config).
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Extra arguments appended to the kernel command line.
    #[arg(long, value_name = "STR")]
    append: Option<String>,
    /// Guest memory, with K/M/G suffix.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    mem: String,
    /// Number of vCPUs (1-8).
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    /// Stop the guest (exit code 4) if it is still running after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Do not forward stdin to the guest console.
    #[arg(long)]
    no_stdin: bool,
    /// The guest's vsock CID (3 or more). Guest programs reach the update server at
    /// CID 2, port 1024 (`lucosctl --vsock` in the guest).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_VSOCK_CID)]
    vsock_cid: u64,
    /// Leave out the virtio-vsock device.
    #[arg(long)]
    no_vsock: bool,
    /// Serve the update API (lucosctl) on this Unix socket (and on vsock port 1024).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// What guest programs may ask the update server over vsock (port 1024): `off` (no
    /// service), `read-only` (list, status) or `apply` (also submit signed modules).
    /// Rollback and cancel are only ever accepted on the host's --api-sock.
    #[arg(long, value_name = "RIGHTS", value_enum, default_value_t = GuestRights::ReadOnly)]
    vsock_api: GuestRights,
    /// ed25519 public key (hex file, from `lucosctl keygen`) whose signatures are accepted
    /// on patch modules; repeatable. Without one, every patch is refused.
    #[arg(long, value_name = "FILE")]
    trusted_key: Vec<PathBuf>,
    /// Sample where the vCPUs are every MS milliseconds; print the hottest kernel functions at exit.
    #[arg(long, value_name = "MS")]
    profile: Option<u64>,
    /// With --profile: also record up to N callers per sample (heuristic stack scan).
    #[arg(long, value_name = "N", default_value_t = 0)]
    profile_depth: usize,
    /// Print what this host's KVM is, the guest CPU model chosen for it (workarounds, CPU
    /// features KVM offers and the guest gets) and the kernel command line; do not boot.
    #[arg(long)]
    print_config: bool,
    /// With --print-config: print JSON.
    #[arg(long, requires = "print_config")]
    json: bool,
}

fn run(args: RunArgs) -> Result<i32, String> {
    let started = Instant::now();
    let mem_bytes = parse_mem_size(&args.mem).map_err(|e| e.to_string())?;
    let cpu = CpuPolicy::detect();
    let mut cmdline = args.cmdline.unwrap_or_else(|| cpu.default_cmdline());
    if let Some(a) = args.append {
        cmdline.push(' ');
        cmdline.push_str(&a);
    }
    let mut trusted = Vec::new();
    for k in &args.trusted_key {
        trusted.push(lucos_update_server::signing::load_verifying_key(k).map_err(|e| e.to_string())?);
    }
    let config = VmConfig {
        kernel: args.kernel.unwrap_or_default(),
        initrd: args.initrd,
        cmdline,
        mem_bytes,
        vcpus: args.vcpus,
        vsock_cid: (!args.no_vsock).then_some(args.vsock_cid),
        cpu,
    };
    if args.print_config {
        config.validate().map_err(|e| e.to_string())?;
        let report = CpuReport::new(cpu, config.kernel_cmdline(), config.vcpus)
            .map_err(|e| format!("cannot read the CPUID KVM supports from /dev/kvm: {e}"))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
        } else {
            print!("{}", report.to_text());
        }
        return Ok(0);
    }
    let vmlinux = Vmlinux::read(&config.kernel).map_err(|e| e.to_string())?;
    let vm = Vm::build(&config, &vmlinux, Box::new(std::io::stdout())).map_err(|e| e.to_string())?;
    // Kept until exit: dropping it removes the API socket (if it is still ours).
    let mut _server = None;
    if let Some(sock) = &args.api_sock {
        if trusted.is_empty() {
            log::warn!("no --trusted-key given: every patch submission will be refused");
        }
        _server = Some(
            lucos_vmm::update::start_server(vm.handle(), &vmlinux, trusted, args.vsock_api, sock)
                .map_err(|e| format!("cannot start the update server: {e}"))?,
        );
    }
    let reason = vm
        .run(RunOptions {
            stdin: !args.no_stdin,
            timeout: args.timeout.map(Duration::from_secs),
            profile: args.profile.map(Duration::from_millis),
            profile_depth: args.profile_depth,
        })
        .map_err(|e| e.to_string())?;
    drop(_server);
    let code = reason.exit_code();
    eprintln!(
        "\r\nlucos-vmm: {} after {:.2}s (exit code {code})",
        reason.describe(),
        started.elapsed().as_secs_f64()
    );
    Ok(code)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run(args) => match run(args) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("lucos-vmm: error: {e}");
                1
            }
        },
    };
    ExitCode::from(code as u8)
}
