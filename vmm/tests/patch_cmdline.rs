//! End to end: a live code patch of `cmdline_proc_show`, applied from outside the guest
//! over the API socket, observed from inside the guest, rolled back; bad submissions are
//! refused and leave the guest untouched.

mod common;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::session::{build_patch, tempdir, Session};
use lucos_update_server::protocol::{self, Op, Request, Response};
use lucos_update_server::signing;

fn call(sock: &Path, op: Op, id: Option<u32>, payload: &[u8]) -> Response {
    let mut s = UnixStream::connect(sock).expect("connect API socket");
    let req = Request {
        op,
        id,
        payload_len: payload.len() as u64,
    };
    protocol::write_frame(&mut s, &req, payload).unwrap();
    protocol::read_header(&mut s).unwrap()
}

fn wait_state(sock: &Path, id: u32, want: &str) -> Response {
    let start = Instant::now();
    loop {
        let r = call(sock, Op::Status, Some(id), &[]);
        assert!(r.ok, "{r:?}");
        if r.patches[0].state == want {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "patch {id} never became {want}: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn cmdline(s: &mut Session) -> String {
    let out = s.run("cat /proc/cmdline");
    out.into_iter()
        .find(|l| l.contains("console=ttyS0"))
        .expect("cmdline output")
}

#[test]
fn cmdline_patch_apply_observe_rollback() {
    if !common::hw_virt() {
        common::skip_note("the end-to-end patch session (it observes the patch from guest userspace)");
        return;
    }
    let ko = build_patch("cmdline/lucos_cmdline.ko");
    let dir = tempdir("patch-cmdline");
    let (sk_hex, pk_hex) = signing::generate_keypair().unwrap();
    std::fs::write(dir.join("k.key"), &sk_hex).unwrap();
    std::fs::write(dir.join("k.pub"), &pk_hex).unwrap();
    let sk = signing::load_signing_key(&dir.join("k.key")).unwrap();
    let module = std::fs::read(&ko).unwrap();
    let signed = signing::sign(&module, &sk);
    let sock = dir.join("api.sock");

    let mut s = Session::boot(
        1,
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--trusted-key",
            dir.join("k.pub").to_str().unwrap(),
        ],
    );
    let before = cmdline(&mut s);
    assert!(!before.starts_with("lucos-patched"), "{before}");

    // Refusals first: the guest must be untouched by each.
    let r = call(&sock, Op::Apply, None, &module);
    assert!(!r.ok && r.error.contains("not signed"), "{r:?}");
    let other = signing::load_signing_key(&{
        let (o, _) = signing::generate_keypair().unwrap();
        std::fs::write(dir.join("o.key"), o).unwrap();
        dir.join("o.key")
    })
    .unwrap();
    let r = call(&sock, Op::Apply, None, &signing::sign(&module, &other));
    assert!(!r.ok && r.error.contains("does not trust"), "{r:?}");
    let r = call(&sock, Op::Apply, None, &signed[100..]);
    assert!(!r.ok && r.error.contains("truncated"), "{r:?}");
    let r = call(&sock, Op::Apply, None, &signing::sign(b"\x7fELF garbage", &sk));
    assert!(!r.ok && r.error.contains("invalid patch module"), "{r:?}");
    let r = call(&sock, Op::Rollback, Some(42), &[]);
    assert!(!r.ok && r.error.contains("no patch with id 42"), "{r:?}");
    assert_eq!(cmdline(&mut s), before, "refused submissions changed the guest");

    // Apply.
    let r = call(&sock, Op::Apply, None, &signed);
    assert!(r.ok, "{r:?}");
    let id = r.patches[0].id;
    eprintln!("apply: {}", r.message);
    let r = wait_state(&sock, id, "committed");
    eprintln!("status:\n{}", r.patches[0].details);
    let after = cmdline(&mut s);
    assert_eq!(after, format!("lucos-patched {before}"));

    // Roll back.
    let r = call(&sock, Op::Rollback, Some(id), &[]);
    assert!(r.ok, "{r:?}");
    wait_state(&sock, id, "rolled-back");
    assert_eq!(cmdline(&mut s), before);
    let r = call(&sock, Op::Rollback, Some(id), &[]);
    assert!(!r.ok && r.error.contains("already rolled-back"), "{r:?}");

    // Apply again after rollback works (memory was freed and is reusable).
    let r = call(&sock, Op::Apply, None, &signed);
    assert!(r.ok, "{r:?}");
    let id2 = r.patches[0].id;
    wait_state(&sock, id2, "committed");
    assert!(cmdline(&mut s).starts_with("lucos-patched "));
    assert!(call(&sock, Op::Rollback, Some(id2), &[]).ok);
    wait_state(&sock, id2, "rolled-back");

    assert_eq!(s.shutdown(), Some(0));
}
