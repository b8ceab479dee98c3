//! Fuzz target: the protocol frame decoder, as the server reads requests (and checks an
//! apply's signature trailer) and as the client reads responses. Any input must give a
//! frame or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lucos_update_server::protocol::{read_header, read_request, Response};
use lucos_update_server::signing;

fuzz_target!(|data: &[u8]| {
    let Some((&which, frame)) = data.split_first() else {
        return;
    };
    let mut r = frame;
    if which & 1 == 0 {
        // A server reads requests one after another until the stream ends or fails.
        while let Ok((_req, payload)) = read_request(&mut r) {
            let _ = signing::verify(&payload, &[]);
        }
    } else {
        let _ = read_header::<_, Response>(&mut r);
    }
});
