//! The vsock connection state machine (host side, CID 2).
//!
//! Guest packets (from the TX queue) come in through [`Muxer::recv`]; packets for the
//! guest (for the RX queue) come out of [`Muxer::next_rx`], one per RX buffer. Each
//! connection is backed by a host-side [`UnixStream`] that a [`PortListener`] hands out
//! when the guest connects to a port it serves (the update server, see
//! `crate::update`); the muxer shuttles bytes between the stream (non-blocking) and the
//! guest.
//!
//! Flow control follows the virtio-vsock credit scheme: every packet carries the sender's
//! receive buffer size (`buf_alloc`) and how many bytes it has consumed (`fwd_cnt`); a
//! sender keeps `bytes sent - peer fwd_cnt <= peer buf_alloc`. Bytes from the guest count
//! as consumed once written to the host stream; a CREDIT_UPDATE is sent when enough
//! credit has been freed that the guest may be waiting for it.
//!
//! Connection life: REQUEST -> RESPONSE (or RST when no listener serves the port); RW
//! both ways; a SHUTDOWN from the guest with "no more sends" half-closes the host stream
//! once its data is delivered; a full SHUTDOWN is answered with RST (the clean close of
//! the spec); host EOF becomes a SHUTDOWN to the guest, which answers RST. Anything
//! malformed or unexpected resets the connection; nothing panics.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, RwLock};

use log::debug;

use crate::{info_limited, warn_limited};

/// The host's CID: the VMM end of every connection.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type offered.
pub const TYPE_STREAM: u16 = 1;

/// Packet op: connection request from the guest.
pub const OP_REQUEST: u16 = 1;
/// Packet op: the host accepts a connection.
pub const OP_RESPONSE: u16 = 2;
/// Packet op: the connection is reset (refused, closed, or broken); never answered.
pub const OP_RST: u16 = 3;
/// Packet op: the sender stops receiving and/or sending (the `SHUTDOWN_*` flags).
pub const OP_SHUTDOWN: u16 = 4;
/// Packet op: data (`len` bytes follow the header).
pub const OP_RW: u16 = 5;
/// Packet op: the sender's `buf_alloc`/`fwd_cnt` changed; carries no data.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Packet op: asks the peer for a CREDIT_UPDATE.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Receive buffer the host advertises per connection (bytes the guest may have in flight).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Freed credit after which a CREDIT_UPDATE is sent unprompted.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;
/// Control packets waiting for RX buffers beyond this are dropped (a guest flooding us
/// with bad requests while not reading).
const MAX_PENDING_CONTROL: usize = 1024;

/// Accepts guest connections to host ports.
pub trait PortListener: Send + Sync {
    /// Returns the host end of a new connection to `port`, or `None` to refuse it (RST).
    fn connect(&self, port: u32) -> Option<UnixStream>;
}

/// Where the device finds its listener; set once the update server has started (it needs
/// the VM handle, so it starts after the device exists). Empty: every connection is reset.
pub type ListenerSlot = Arc<RwLock<Option<Arc<dyn PortListener>>>>;

/// A virtio-vsock packet header (`struct virtio_vsock_hdr`), as plain values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hdr {
    /// Sender's context id ([`HOST_CID`] for host-to-guest packets).
    pub src_cid: u64,
    /// Receiver's context id.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Bytes of data following the header.
    pub len: u32,
    /// Socket type; only [`TYPE_STREAM`] is served.
    pub type_: u16,
    /// One of the `OP_*` values.
    pub op: u16,
    /// `SHUTDOWN_*` bits for a SHUTDOWN packet, else 0.
    pub flags: u32,
    /// Sender's receive buffer size in bytes (its credit limit).
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from the connection so far (wraps at 2^32).
    pub fwd_cnt: u32,
}

/// A connection, named by (guest port, host port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnKey {
    /// Port on the guest side (source of the guest's REQUEST).
    pub guest_port: u32,
    /// Port on the host side (what the guest connected to, e.g. the update server's).
    pub host_port: u32,
}

struct Conn {
    stream: UnixStream,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes received from the guest and written to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    credit_update_due: bool,
    /// Guest bytes not yet written to the host stream.
    to_host: VecDeque<u8>,
    peer_shut_send: bool,
    peer_shut_rcv: bool,
    host_write_shut: bool,
    host_eof: bool,
    shutdown_sent: bool,
}

impl Conn {
    fn new(stream: UnixStream, hdr: &Hdr) -> Self {
        Self {
            stream,
            peer_buf_alloc: hdr.buf_alloc,
            peer_fwd_cnt: Wrapping(hdr.fwd_cnt),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            credit_update_due: false,
            to_host: VecDeque::new(),
            peer_shut_send: false,
            peer_shut_rcv: false,
            host_write_shut: false,
            host_eof: false,
            shutdown_sent: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Writes buffered guest bytes to the host stream. Err: the host end is gone.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.credit_update_due = true;
        }
        if self.peer_shut_send && self.to_host.is_empty() && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }
}

/// What the muxer would like to hear about a host stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// The host stream's file descriptor.
    pub fd: RawFd,
    /// Wake when it is readable.
    pub read: bool,
    /// Wake when it is writable.
    pub write: bool,
}

/// All vsock connections of one device.
pub struct Muxer {
    guest_cid: u64,
    listener: ListenerSlot,
    conns: BTreeMap<ConnKey, Conn>,
    /// Control packets (op, flags) waiting for an RX buffer.
    control: VecDeque<(ConnKey, u16, u32)>,
}

impl Muxer {
    /// A muxer for the guest with context id `guest_cid`, with no connections; new connections
    /// are offered to the listener in `listener`.
    pub fn new(guest_cid: u64, listener: ListenerSlot) -> Self {
        Self {
            guest_cid,
            listener,
            conns: BTreeMap::new(),
            control: VecDeque::new(),
        }
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Closes every connection (their host streams see EOF) and forgets pending control
    /// packets: the device stopped.
    pub fn drop_all(&mut self) {
        self.conns.clear();
        self.control.clear();
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn queue_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        if self.control.len() >= MAX_PENDING_CONTROL {
            warn_limited!("vsock: too many control packets pending; dropping op {op} for {key:?}");
            return;
        }
        self.control.push_back((key, op, flags));
    }

    /// Drops the connection (closing its host stream) and tells the guest.
    fn reset(&mut self, key: ConnKey) {
        self.conns.remove(&key);
        self.queue_control(key, OP_RST, 0);
    }

    /// Handles one packet from the guest.
    pub fn recv(&mut self, hdr: &Hdr, data: &[u8]) {
        let key = ConnKey {
            guest_port: hdr.src_port,
            host_port: hdr.dst_port,
        };
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            warn_limited!(
                "vsock: dropping packet from cid {} to cid {} (guest is {}, host {HOST_CID})",
                hdr.src_cid,
                hdr.dst_cid,
                self.guest_cid
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            debug!("vsock: socket type {} not supported; reset", hdr.type_);
            if hdr.op != OP_RST {
                self.reset(key);
            }
            return;
        }
        if hdr.op == OP_REQUEST {
            if self.conns.contains_key(&key) {
                warn_limited!("vsock: REQUEST for existing connection {key:?}; reset");
                self.reset(key);
                return;
            }
            let listener = self.listener.read().unwrap_or_else(|e| e.into_inner()).clone();
            let stream = listener.and_then(|l| l.connect(key.host_port));
            match stream.map(|s| s.set_nonblocking(true).map(|()| s)) {
                Some(Ok(s)) => {
                    info_limited!(
                        "vsock: guest port {} connected to host port {}",
                        key.guest_port,
                        key.host_port
                    );
                    self.conns.insert(key, Conn::new(s, hdr));
                    self.queue_control(key, OP_RESPONSE, 0);
                }
                Some(Err(e)) => {
                    warn_limited!("vsock: host stream for {key:?}: {e}");
                    self.queue_control(key, OP_RST, 0);
                }
                None => {
                    info_limited!("vsock: nothing listens on host port {}; reset", key.host_port);
                    self.queue_control(key, OP_RST, 0);
                }
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op != OP_RST {
                debug!("vsock: op {} for unknown connection {key:?}; reset", hdr.op);
                self.queue_control(key, OP_RST, 0);
            }
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match hdr.op {
            OP_RST => {
                debug!("vsock: guest reset {key:?}");
                self.conns.remove(&key);
            }
            OP_RW => {
                if conn.peer_shut_send {
                    warn_limited!("vsock: data after SHUTDOWN(send) on {key:?}; reset");
                    return self.reset(key);
                }
                if data.len() > (BUF_ALLOC as usize).saturating_sub(conn.to_host.len()) {
                    warn_limited!("vsock: guest overran its credit on {key:?}; reset");
                    return self.reset(key);
                }
                conn.to_host.extend(data);
                if conn.flush().is_err() {
                    self.reset(key);
                }
            }
            OP_SHUTDOWN => {
                conn.peer_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                conn.peer_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
                if conn.flush().is_err() {
                    return self.reset(key);
                }
                self.close_if_done(key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => conn.credit_update_due = true,
            op => {
                warn_limited!("vsock: unexpected op {op} on {key:?}; reset");
                self.reset(key);
            }
        }
    }

    /// A connection the guest fully shut down is answered with RST once the guest's data
    /// has reached the host stream.
    fn close_if_done(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get(&key) {
            if c.peer_shut_send && c.peer_shut_rcv && c.to_host.is_empty() {
                debug!("vsock: {key:?} closed by the guest");
                self.reset(key);
            }
        }
    }

    /// Writes buffered guest data to the host streams.
    pub fn flush_to_host(&mut self) {
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.to_host.is_empty())
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else { continue };
            match c.flush() {
                Ok(()) => self.close_if_done(key),
                Err(e) => {
                    debug!("vsock: host end of {key:?} gone: {e}");
                    self.reset(key);
                }
            }
        }
    }

    fn header(&self, key: ConnKey, op: u16, flags: u32, len: u32) -> Hdr {
        let (buf_alloc, fwd_cnt) = self.conns.get(&key).map_or((0, 0), |c| (BUF_ALLOC, c.fwd_cnt.0));
        Hdr {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.host_port,
            dst_port: key.guest_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn sent(&mut self, key: ConnKey, hdr: &Hdr) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.last_fwd_cnt_sent = Wrapping(hdr.fwd_cnt);
            c.credit_update_due = false;
            c.rx_cnt += Wrapping(hdr.len);
        }
    }

    /// The next packet for the guest, its data (if any) read into `buf`; `None` when there
    /// is nothing to send. Returns the header and the number of data bytes in `buf`.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<(Hdr, usize)> {
        if let Some((key, op, flags)) = self.control.pop_front() {
            let h = self.header(key, op, flags, 0);
            self.sent(key, &h);
            return Some((h, 0));
        }
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else { continue };
            if !c.host_eof && !c.peer_shut_rcv && c.peer_credit() > 0 && !buf.is_empty() {
                let max = (c.peer_credit() as usize).min(buf.len());
                match c.stream.read(&mut buf[..max]) {
                    Ok(0) => c.host_eof = true,
                    Ok(n) => {
                        let h = self.header(key, OP_RW, 0, n as u32);
                        self.sent(key, &h);
                        return Some((h, n));
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                    Err(e) => {
                        debug!("vsock: reading host end of {key:?}: {e}");
                        self.conns.remove(&key);
                        let h = self.header(key, OP_RST, 0, 0);
                        return Some((h, 0));
                    }
                }
            }
            let Some(c) = self.conns.get_mut(&key) else { continue };
            if c.host_eof && !c.shutdown_sent {
                c.shutdown_sent = true;
                debug!("vsock: host closed {key:?}");
                let h = self.header(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0);
                self.sent(key, &h);
                return Some((h, 0));
            }
            if c.credit_update_due {
                let h = self.header(key, OP_CREDIT_UPDATE, 0, 0);
                self.sent(key, &h);
                return Some((h, 0));
            }
        }
        None
    }

    /// Whether a packet for the guest is ready without reading a host stream.
    pub fn has_control(&self) -> bool {
        !self.control.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.credit_update_due || (c.host_eof && !c.shutdown_sent))
    }

    /// Which host streams to watch: readable when the guest could take data (`rx_room`:
    /// the RX queue has buffers), writable when guest data waits for room.
    pub fn interest(&self, rx_room: bool) -> Vec<Interest> {
        self.conns
            .values()
            .map(|c| Interest {
                fd: c.stream.as_raw_fd(),
                read: rx_room && !c.host_eof && !c.peer_shut_rcv && c.peer_credit() > 0,
                write: !c.to_host.is_empty(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out one end of a socket pair per connection, keeping the other for the test.
    #[derive(Default)]
    pub(crate) struct Pairs {
        pub port: u32,
        pub ends: std::sync::Mutex<Vec<UnixStream>>,
    }

    impl PortListener for Pairs {
        fn connect(&self, port: u32) -> Option<UnixStream> {
            if port != self.port {
                return None;
            }
            let (a, b) = UnixStream::pair().ok()?;
            self.ends.lock().unwrap().push(a);
            Some(b)
        }
    }

    fn g2h(op: u16, len: u32) -> Hdr {
        Hdr {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    fn muxer() -> (Muxer, Arc<Pairs>) {
        let pairs = Arc::new(Pairs {
            port: 1024,
            ..Default::default()
        });
        let slot: ListenerSlot = Arc::new(RwLock::new(Some(pairs.clone() as Arc<dyn PortListener>)));
        (Muxer::new(3, slot), pairs)
    }

    #[test]
    fn credit_limits_host_to_guest() {
        let (mut m, pairs) = muxer();
        m.recv(&g2h(OP_REQUEST, 0), &[]);
        let mut buf = [0u8; 8192];
        assert_eq!(m.next_rx(&mut buf).unwrap().0.op, OP_RESPONSE);
        pairs.ends.lock().unwrap()[0].write_all(&[7u8; 6000]).unwrap();
        // Guest advertised 4096 bytes of buffer.
        let (h, n) = m.next_rx(&mut buf).unwrap();
        assert_eq!((h.op, n), (OP_RW, 4096));
        assert!(m.next_rx(&mut buf).is_none());
        assert!(!m.interest(true)[0].read);
        // The guest consumed it: the rest flows.
        let mut cu = g2h(OP_CREDIT_UPDATE, 0);
        cu.fwd_cnt = 4096;
        m.recv(&cu, &[]);
        let (h, n) = m.next_rx(&mut buf).unwrap();
        assert_eq!((h.op, n), (OP_RW, 1904));
    }

    #[test]
    fn misaddressed_and_bad_packets() {
        let (mut m, _pairs) = muxer();
        let mut h = g2h(OP_REQUEST, 0);
        h.src_cid = 9;
        m.recv(&h, &[]);
        assert!(m.next_rx(&mut [0; 16]).is_none());
        let mut h = g2h(OP_REQUEST, 0);
        h.type_ = 2;
        m.recv(&h, &[]);
        assert_eq!(m.next_rx(&mut [0; 16]).unwrap().0.op, OP_RST);
        m.recv(&g2h(OP_RW, 3), b"abc");
        assert_eq!(m.next_rx(&mut [0; 16]).unwrap().0.op, OP_RST);
        // An RST for an unknown connection is not answered.
        m.recv(&g2h(OP_RST, 0), &[]);
        assert!(m.next_rx(&mut [0; 16]).is_none());
        // Unknown op on a live connection resets it.
        m.recv(&g2h(OP_REQUEST, 0), &[]);
        assert_eq!(m.next_rx(&mut [0; 16]).unwrap().0.op, OP_RESPONSE);
        m.recv(&g2h(99, 0), &[]);
        assert_eq!(m.next_rx(&mut [0; 16]).unwrap().0.op, OP_RST);
        assert_eq!(m.connections(), 0);
    }

    #[test]
    fn overrun_resets() {
        let (mut m, _pairs) = muxer();
        m.recv(&g2h(OP_REQUEST, 0), &[]);
        m.next_rx(&mut [0; 16]).unwrap();
        // The peer never reads: the socket pair's buffer fills, then BUF_ALLOC is exceeded.
        let chunk = vec![1u8; 64 * 1024];
        let mut reset = false;
        for _ in 0..64 {
            m.recv(&g2h(OP_RW, chunk.len() as u32), &chunk);
            if m.connections() == 0 {
                reset = true;
                break;
            }
        }
        assert!(reset);
    }
}
