//! End to end over virtio-vsock: a guest program (the static `lucosctl` in the initramfs)
//! reaches the update server inside lucos-vmm at CID 2, port 1024, and applies, inspects
//! and rolls back a signed patch from inside the guest; a connection to a port nobody serves
//! is refused cleanly.
//!
//! One guest boot (minutes on a software-assisted KVM), driven over its serial console.

mod common;

use std::os::unix::net::UnixStream;

use common::api::Keys;
use common::session::{build_patch, stripped, tempdir, Session};
use lucos_update_server::protocol::{self, Op, Request, Response};

#[test]
fn guest_lucosctl_over_vsock() {
    let dir = tempdir("vsock");
    let keys = Keys::new(&dir);
    let signed = keys.sign(&stripped(&build_patch("cmdline/lucos_cmdline.ko"), &dir));
    let sock = dir.join("api.sock");
    let mut s = Session::boot(1, &keys.vmm_args(&sock));

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
    let out = s.run("lucosctl --vsock rollback 1 --wait 300; echo rc=$?; cat /proc/cmdline");
    assert!(out.iter().any(|l| l.trim() == "rc=0"), "{out:?}");
    assert!(out.iter().any(|l| l.starts_with("console=ttyS0")), "{out:?}");
    let out = s.run("lucosctl --vsock rollback 1; echo rc=$?");
    assert!(out.iter().any(|l| l.contains("already rolled-back")), "{out:?}");
    assert!(out.iter().any(|l| l.trim() == "rc=1"), "{out:?}");

    assert_eq!(s.shutdown(), Some(0));
}

#[test]
fn base64_matches_the_standard() {
    assert_eq!(common::session::base64_encode(b""), "");
    assert_eq!(common::session::base64_encode(b"f"), "Zg==");
    assert_eq!(common::session::base64_encode(b"fo"), "Zm8=");
    assert_eq!(common::session::base64_encode(b"foobar"), "Zm9vYmFy");
}
