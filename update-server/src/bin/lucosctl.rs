//! `lucosctl`: submit, inspect and roll back live patches; sign modules; make keys.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use lucos_update_server::protocol::{self, Op, Request, Response};
use lucos_update_server::signing;

const USAGE: &str = "\
lucosctl: live-patch a lucos guest kernel

usage:
  lucosctl [CONN] apply FILE.ko [--wait SECS]   submit a signed patch module
  lucosctl [CONN] list                          list patches
  lucosctl [CONN] status [ID]                   details (transition blockers, timings)
  lucosctl [CONN] rollback ID [--wait SECS]     undo a patch (committed, or still in transition)
  lucosctl [CONN] cancel ID [--wait SECS]       same as rollback: give up a transition that cannot finish
  lucosctl keygen PREFIX                                 write PREFIX.key (private) and PREFIX.pub
  lucosctl sign --key PREFIX.key FILE.ko [-o OUT.ko]     append an ed25519 signature (default: in place)

CONN is one of:
  --socket PATH   the Unix API socket given to `lucos-vmm run --api-sock` (default: $LUCOS_API_SOCK)
  --vsock         inside the guest: AF_VSOCK to the VMM (CID 2), port 1024 (also: $LUCOS_VSOCK=1)
  --port N        with --vsock: another port (for testing; the VMM resets unknown ports)
--wait SECS polls until the patch is committed (apply) or rolled back (rollback).
Exit codes: 0 ok, 1 the request failed (message on stderr), 2 usage error.";

fn usage_err(msg: &str) -> ExitCode {
    eprintln!("lucosctl: {msg}\n\n{USAGE}");
    ExitCode::from(2)
}

trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

/// How to reach the update server.
enum Target {
    Unix(Option<PathBuf>),
    Vsock(u32),
}

fn connect(target: &Target) -> Result<Box<dyn Conn>, String> {
    let socket = match target {
        Target::Unix(s) => s,
        Target::Vsock(port) => {
            let s = vsock::connect(vsock::HOST_CID, *port)
                .map_err(|e| format!("vsock connect to cid {} port {port}: {e}", vsock::HOST_CID))?;
            return Ok(Box::new(s));
        }
    };
    let path = socket
        .clone()
        .or_else(|| std::env::var_os("LUCOS_API_SOCK").map(PathBuf::from))
        .ok_or("no API socket: pass --socket PATH or set LUCOS_API_SOCK")?;
    let s = std::os::unix::net::UnixStream::connect(&path).map_err(|e| format!("connect {}: {e}", path.display()))?;
    Ok(Box::new(s))
}

fn call(conn: &mut dyn Conn, op: Op, id: Option<u32>, payload: &[u8]) -> Result<Response, String> {
    let req = Request {
        op,
        id,
        payload_len: payload.len() as u64,
    };
    protocol::write_frame(conn, &req, payload).map_err(|e| e.to_string())?;
    let resp: Response = protocol::read_header(conn).map_err(|e| e.to_string())?;
    if resp.ok {
        Ok(resp)
    } else {
        Err(resp.error)
    }
}

fn print_patches(r: &Response, details: bool) {
    if !r.message.is_empty() {
        println!("{}", r.message);
    }
    for p in &r.patches {
        if details {
            print!("{}", p.details);
        } else {
            println!("{:>3}  {:<13} {:<20} {}", p.id, p.state, p.name, p.functions.join(","));
        }
    }
}

fn wait_for(conn: &mut dyn Conn, id: u32, want: &str, secs: u64) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let r = call(conn, Op::Status, Some(id), &[])?;
        let p = r.patches.first().ok_or("empty status")?;
        if p.state == want {
            println!("patch {id} {want} after {:.2}s", start.elapsed().as_secs_f64());
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(secs) {
            return Err(format!(
                "patch {id} still {} after {secs}s; waiting on: {}",
                p.state,
                if p.waiting_on.is_empty() {
                    "-".into()
                } else {
                    p.waiting_on.join("; ")
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(args: Vec<String>) -> Result<(), String> {
    let mut socket = None;
    let mut use_vsock = std::env::var("LUCOS_VSOCK").is_ok_and(|v| v == "1");
    let mut port = protocol::VSOCK_PORT;
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(it.next().ok_or("--socket needs a path")?)),
            "--vsock" => use_vsock = true,
            "--port" => {
                let v = it.next().ok_or("--port needs a number")?;
                port = v.parse().map_err(|_| format!("bad --port '{v}'"))?;
                use_vsock = true;
            }
            _ => rest.push(a),
        }
    }
    let target = if use_vsock && socket.is_none() {
        Target::Vsock(port)
    } else {
        Target::Unix(socket)
    };
    let opt = |rest: &mut Vec<String>, name: &str| -> Result<Option<String>, String> {
        match rest.iter().position(|a| a == name) {
            Some(i) if i + 1 < rest.len() => {
                let v = rest.remove(i + 1);
                rest.remove(i);
                Ok(Some(v))
            }
            Some(_) => Err(format!("{name} needs a value")),
            None => Ok(None),
        }
    };
    let wait = opt(&mut rest, "--wait")?
        .map(|v| v.parse::<u64>().map_err(|_| format!("bad --wait '{v}'")))
        .transpose()?;
    let cmd = rest.first().cloned().unwrap_or_default();
    match cmd.as_str() {
        "apply" => {
            let file = rest.get(1).ok_or("apply needs FILE.ko")?;
            let data = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
            let mut c = connect(&target)?;
            let r = call(c.as_mut(), Op::Apply, None, &data)?;
            print_patches(&r, false);
            if let (Some(secs), Some(p)) = (wait, r.patches.first()) {
                wait_for(c.as_mut(), p.id, "committed", secs)?;
            }
        }
        "list" => {
            let r = call(connect(&target)?.as_mut(), Op::List, None, &[])?;
            if r.patches.is_empty() {
                println!("no patches");
            }
            print_patches(&r, false);
        }
        "status" => {
            let id = rest
                .get(1)
                .map(|s| s.parse::<u32>().map_err(|_| format!("bad patch id '{s}'")))
                .transpose()?;
            print_patches(&call(connect(&target)?.as_mut(), Op::Status, id, &[])?, true);
        }
        "rollback" | "cancel" => {
            let id: u32 = rest
                .get(1)
                .ok_or(format!("{cmd} needs an ID"))?
                .parse()
                .map_err(|_| "bad patch id")?;
            let mut c = connect(&target)?;
            print_patches(&call(c.as_mut(), Op::Rollback, Some(id), &[])?, false);
            if let Some(secs) = wait {
                wait_for(c.as_mut(), id, "rolled-back", secs)?;
            }
        }
        "keygen" => {
            let prefix = rest.get(1).ok_or("keygen needs PREFIX")?;
            let (sk, pk) = signing::generate_keypair().map_err(|e| e.to_string())?;
            let key = format!("{prefix}.key");
            std::fs::write(&key, format!("{sk}\n")).map_err(|e| format!("{key}: {e}"))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600));
            }
            std::fs::write(format!("{prefix}.pub"), format!("{pk}\n")).map_err(|e| e.to_string())?;
            println!("wrote {prefix}.key and {prefix}.pub (fingerprint {})", &pk[..16]);
        }
        "sign" => {
            let key = opt(&mut rest, "--key")?.ok_or("sign needs --key PREFIX.key")?;
            let out = opt(&mut rest, "-o")?;
            let file = rest.get(1).ok_or("sign needs FILE.ko")?;
            let sk = signing::load_signing_key(Path::new(&key)).map_err(|e| e.to_string())?;
            let data = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
            if data.ends_with(signing::MAGIC) {
                return Err(format!("{file} is already signed"));
            }
            lucos_update_server::module::PatchModule::parse(&data)
                .map_err(|e| format!("{file}: not a patch module: {e}"))?;
            let out = out.unwrap_or_else(|| file.clone());
            std::fs::write(&out, signing::sign(&data, &sk)).map_err(|e| format!("{out}: {e}"))?;
            println!("signed {out} with key {}", signing::fingerprint(&sk.verifying_key()));
        }
        "" | "-h" | "--help" | "help" => {
            println!("{USAGE}");
        }
        other => return Err(format!("unknown command '{other}'")),
    }
    Ok(())
}

/// AF_VSOCK client sockets (Linux), for use inside the guest.
mod vsock {
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// The host's CID (the VMM).
    pub const HOST_CID: u32 = 2;

    /// Connects a stream socket to `cid:port`; the socket reads and writes like a file.
    pub fn connect(cid: u32, port: u32) -> io::Result<File> {
        // SAFETY: plain system call with integer arguments.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a socket we just created and own exclusively.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` is a properly initialized sockaddr_vm that outlives the call and
        // `len` is its size; `fd` is an open socket.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
                len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(File::from(fd))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.starts_with("unknown command") || e.contains(" needs ") => usage_err(&e),
        Err(e) => {
            eprintln!("lucosctl: {e}");
            ExitCode::from(1)
        }
    }
}
