//! End to end over virtio-vsock: a guest program (the static `lucosctl` in the initramfs)
//! reaches the update server inside lucos-vmm at CID 2, port 1024. With `--vsock-api
//! apply` it applies and inspects a signed patch from inside the guest, but may never roll
//! one back, replay one the host rolled back, downgrade, or submit a module signed for
//! another kernel; by default (`read-only`) it may only list and inspect, even as root. A
//! connection to a port nobody serves is refused cleanly.
//!
//! Two guest boots, driven over their serial consoles.

mod common;

use std::os::unix::net::UnixStream;

use common::api::{call, wait_state, Keys};
use common::session::{build_patch, stripped, tempdir, Session};
use lucos_update_server::protocol::{self, Op, PatchState, Request, Response};

#[test]
fn guest_lucosctl_over_vsock() {
    let dir = tempdir("vsock");
    let keys = Keys::new(&dir);
    let signed = keys.sign(&stripped(&build_patch("cmdline/lucos_cmdline.ko"), &dir));
    let sock = dir.join("api.sock");
    let mut args = keys.vmm_args(&sock).to_vec();
    args.extend(["--vsock-api", "apply"]);
    let mut s = Session::boot(1, &args);

    // The device was found and bound by the guest's virtio-vsock driver.
    let out = s.run("cat /sys/bus/virtio/devices/*/device; cat /proc/cmdline");
    assert!(out.iter().any(|l| l.trim() == "0x0013"), "{out:?}\n{}", s.tail());
    assert!(
        out.iter().any(|l| l.contains("virtio_mmio.device=4K@0xd0000000:5")),
        "{out:?}"
    );

    // A request over vsock, answered by the update server.
    let out = s.run("lucosctl --vsock list; echo rc=$?");
    assert!(out.iter().any(|l| l.trim() == "no patches"), "{out:?}\n{}", s.tail());
    assert!(out.iter().any(|l| l.trim() == "rc=0"), "{out:?}");

    // A payload-carrying request, refused by the server (not signed), over the same path.
    let out = s.run("echo junk > /tmp/x.ko; lucosctl --vsock apply /tmp/x.ko; echo rc=$?");
    assert!(out.iter().any(|l| l.contains("not signed")), "{out:?}");
    assert!(out.iter().any(|l| l.trim() == "rc=1"), "{out:?}");

    // Nothing listens on port 5: the connection is reset, lucosctl fails cleanly.
    let out = s.run("LUCOS_VSOCK=1 lucosctl --port 5 list; echo rc=$?");
    assert!(
        out.iter().any(|l| l.contains("port 5") && l.contains("reset")),
        "{out:?}"
    );
    assert!(out.iter().any(|l| l.trim() == "rc=1"), "{out:?}");

    // The good port still works afterwards, and the Unix API socket serves the same server.
    let out = s.run("LUCOS_VSOCK=1 lucosctl status; echo rc=$?");
    assert!(out.iter().any(|l| l.trim() == "rc=0"), "{out:?}");
    let mut c = UnixStream::connect(&sock).expect("connect API socket");
    protocol::write_frame(
        &mut c,
        &Request {
            op: Op::List,
            id: None,
            payload_len: 0,
        },
        &[],
    )
    .unwrap();
    let r: Response = protocol::read_header(&mut c).unwrap();
    assert!(r.ok && r.patches.is_empty(), "{r:?}");

    // A real signed patch, applied, inspected and rolled back from inside the guest.
    s.upload("/tmp/cmdline.ko", &signed);
    let out = s.run("lucosctl --vsock apply /tmp/cmdline.ko --wait 300; echo rc=$?; cat /proc/cmdline");
    assert!(out.iter().any(|l| l.trim() == "rc=0"), "{out:?}");
    assert!(
        out.iter().any(|l| l.starts_with("lucos-patched console=ttyS0")),
        "{out:?}"
    );
    let out = s.run("lucosctl --vsock status 1; lucosctl --vsock list");
    assert!(
        out.iter().any(|l| l.contains("committed") && l.contains("cmdline")),
        "{out:?}"
    );
    assert!(
        out.iter().any(|l| l.contains("paused")),
        "status shows the pause time: {out:?}"
    );
    // Rollback (and cancel) only from the host: an unprivileged guest user and root alike
    // are refused, and the patch stays.
    add_nobody(&mut s);
    let out = s.run(
        "su nobody -s /bin/sh -c 'id -u; lucosctl --vsock rollback 1'; echo rc=$?; \
         lucosctl --vsock cancel 1; echo rc=$?; cat /proc/cmdline",
    );
    assert_eq!(
        out.iter().filter(|l| l.contains("only the host's API socket")).count(),
        2,
        "{out:?}"
    );
    assert!(!out.iter().any(|l| l.trim() == "rc=0"), "{out:?}");
    assert!(out.iter().any(|l| l.trim() == "65534"), "ran as nobody: {out:?}");
    assert!(
        out.iter().any(|l| l.starts_with("lucos-patched console=ttyS0")),
        "{out:?}"
    );
    host_rollback(&sock, 1);
    let out = s.run("cat /proc/cmdline");
    assert!(out.iter().any(|l| l.starts_with("console=ttyS0")), "{out:?}");

    // A replay of the module the host rolled back is refused.
    let out = s.run("lucosctl --vsock apply /tmp/cmdline.ko; echo rc=$?; cat /proc/cmdline");
    assert!(out.iter().any(|l| l.contains("replay")), "{out:?}");
    assert!(out.iter().any(|l| l.trim() == "rc=1"), "{out:?}");
    assert!(out.iter().any(|l| l.starts_with("console=ttyS0")), "{out:?}");

    // A newer version goes in; once the host rolled it back, the older one is a downgrade.
    let module = stripped(&build_patch("cmdline/lucos_cmdline.ko"), &dir);
    s.upload("/tmp/cmdline-v5.ko", &keys.sign_version(&module, 5));
    s.upload("/tmp/cmdline-v4.ko", &keys.sign_version(&module, 4));
    let out = s.run("lucosctl --vsock apply /tmp/cmdline-v5.ko --wait 300; echo rc=$?");
    assert!(out.iter().any(|l| l.trim() == "rc=0"), "{out:?}");
    let out = s.run("lucosctl --vsock list");
    let id: u32 = out
        .iter()
        .find(|l| l.contains("committed"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no committed patch: {out:?}"));
    host_rollback(&sock, id);
    let out = s.run("lucosctl --vsock apply /tmp/cmdline-v4.ko; echo rc=$?; cat /proc/cmdline");
    assert!(out.iter().any(|l| l.contains("downgrade")), "{out:?}");
    assert!(out.iter().any(|l| l.starts_with("console=ttyS0")), "{out:?}");

    // A module signed for another kernel build is refused.
    s.upload("/tmp/other.ko", &keys.sign_for(&module, &[0x11; 20], 9));
    let out = s.run("lucosctl --vsock apply /tmp/other.ko; echo rc=$?; cat /proc/cmdline");
    assert!(
        out.iter().any(|l| l.contains("signed for kernel build 1111")),
        "{out:?}"
    );
    assert!(out.iter().any(|l| l.starts_with("console=ttyS0")), "{out:?}");

    assert_eq!(s.shutdown(), Some(0));
}

/// Adds the unprivileged user `nobody` (uid 65534) to the guest, for `su nobody`.
fn add_nobody(s: &mut Session) {
    s.run("echo 'root:x:0:0::/:/bin/sh' > /etc/passwd; echo 'nobody:x:65534:65534::/tmp:/bin/sh' >> /etc/passwd");
}

/// Rolls patch `id` back over the host's API socket and waits until it is gone.
fn host_rollback(sock: &std::path::Path, id: u32) {
    let r = call(sock, Op::Rollback, Some(id), &[]);
    assert!(r.ok, "host rollback {id}: {r:?}");
    wait_state(sock, id, PatchState::RolledBack);
}

/// By default a guest may only look: list and status work, apply and rollback are refused
/// (as root too) and leave a patch the host applied in place.
#[test]
fn guest_vsock_api_is_read_only_by_default() {
    let dir = tempdir("vsock-ro");
    let keys = Keys::new(&dir);
    let signed = keys.sign(&stripped(&build_patch("cmdline/lucos_cmdline.ko"), &dir));
    let sock = dir.join("api.sock");
    let mut s = Session::boot(1, &keys.vmm_args(&sock));

    let r = call(&sock, Op::Apply, None, &signed);
    assert!(r.ok, "host apply: {r:?}");
    wait_state(&sock, 1, PatchState::Committed);
    s.upload("/tmp/cmdline.ko", &signed);
    add_nobody(&mut s);
    let out = s.run(
        "lucosctl --vsock list; echo rc=$?; \
         lucosctl --vsock rollback 1; echo rc=$?; \
         su nobody -s /bin/sh -c 'id -u; lucosctl --vsock rollback 1'; echo rc=$?; \
         lucosctl --vsock apply /tmp/cmdline.ko; echo rc=$?; cat /proc/cmdline",
    );
    assert!(
        out.iter().any(|l| l.contains("committed") && l.contains("cmdline")),
        "{out:?}"
    );
    assert_eq!(out.iter().filter(|l| l.trim() == "rc=1").count(), 3, "{out:?}");
    assert_eq!(
        out.iter().filter(|l| l.contains("only the host's API socket")).count(),
        2,
        "{out:?}"
    );
    assert!(
        out.iter().any(|l| l.contains("apply is not allowed over vsock")),
        "{out:?}"
    );
    assert!(out.iter().any(|l| l.trim() == "65534"), "ran as nobody: {out:?}");
    assert!(
        out.iter().any(|l| l.starts_with("lucos-patched console=ttyS0")),
        "the host's patch stays: {out:?}"
    );
    let r = call(&sock, Op::List, None, &[]);
    assert_eq!(r.patches.len(), 1, "{r:?}");
    assert_eq!(r.patches[0].state, PatchState::Committed);
    assert_eq!(s.shutdown(), Some(0));
}

#[test]
fn base64_matches_the_standard() {
    assert_eq!(common::session::base64_encode(b""), "");
    assert_eq!(common::session::base64_encode(b"f"), "Zg==");
    assert_eq!(common::session::base64_encode(b"fo"), "Zm8=");
    assert_eq!(common::session::base64_encode(b"foobar"), "Zm9vYmFy");
}
