//! The virtio-vsock device (virtio device id 19): three queues (RX, TX, event) and a
//! config space holding the guest's CID. The host end is CID 2 ([`HOST_CID`]); guest
//! connections go to a [`PortListener`] through the [`Muxer`].
//!
//! Once the driver sets DRIVER_OK, a worker thread owns the queues: it wakes on a queue
//! notification (the vCPU thread's QueueNotify write signals an eventfd) or on host
//! stream readiness (epoll), then drains the TX queue into the muxer, writes pending
//! guest data to the host streams, and fills RX buffers with the muxer's packets.
//!
//! The driver is untrusted. Whatever it puts in the queues, the worker only works when
//! there is progress to make: a malformed chain is used with length 0, an RX buffer
//! without room for data is used with length 0 when it cannot carry a control packet,
//! and a queue whose available index is more than the queue size ahead (or cannot be
//! read) stops the device: it sets DEVICE_NEEDS_RESET (virtio 1.2, 2.1.2), drops its
//! connections and does nothing more until the driver resets it. What the device takes
//! from an RX buffer is capped at [`MAX_PKT_DATA`], whatever length the descriptor claims.
//! Log lines the guest can trigger are rate-limited.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Hdr, ListenerSlot, Muxer, HOST_CID};
use super::{
    ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};
use crate::memory::GuestMem;
use crate::warn_limited;

pub use super::muxer::PortListener;

/// Virtio device id of vsock.
pub const VSOCK_DEVICE_ID: u32 = 19;
/// Index of the RX queue: buffers the guest gives for packets to it.
pub const RXQ: usize = 0;
/// Index of the TX queue: packets the guest sends.
pub const TXQ: usize = 1;
/// Index of the event queue (the device never reports an event on it).
pub const EVQ: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest packet payload accepted or produced (as Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`):
/// the most the device takes from one RX buffer, whatever its descriptor's length.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// epoll token of the queue-notification eventfd (stream tokens are their fds).
const KICK_TOKEN: u64 = u64::MAX;

/// The vsock device.
pub struct Vsock {
    cid: u64,
    listener: ListenerSlot,
    worker: Option<Worker>,
    /// Set by the worker when the driver broke a queue; cleared by a reset.
    needs_reset: Arc<AtomicBool>,
}

struct Worker {
    kick: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Vsock {
    /// A vsock device for a guest with CID `cid`, serving connections through `listener`.
    pub fn new(cid: u64, listener: ListenerSlot) -> Self {
        Self {
            cid,
            listener,
            worker: None,
            needs_reset: Arc::new(AtomicBool::new(false)),
        }
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop.store(true, Ordering::Release);
            let _ = w.kick.write(1);
            if w.thread.join().is_err() {
                warn!("vsock: worker thread panicked");
            }
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_ID
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    /// `struct virtio_vsock_config { le64 guest_cid; }`
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        warn_limited!("vsock: guest wrote read-only config at {offset:#x}; ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        _features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let queues = <[Queue; 3]>::try_from(queues).map_err(|q| ActivateError::QueueCount {
            expected: 3,
            got: q.len(),
        })?;
        self.stop_worker();
        self.needs_reset.store(false, Ordering::Release);
        let mut backend = VsockBackend::new(mem, queues, interrupt, Muxer::new(self.cid, self.listener.clone()));
        backend.needs_reset = self.needs_reset.clone();
        let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (k, s) = (kick.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || backend.run(&k, &s))
            .map_err(ActivateError::Worker)?;
        self.worker = Some(Worker { kick, stop, thread });
        Ok(())
    }

    fn queue_notify(&mut self, index: u32) {
        if index as usize > EVQ {
            warn_limited!("vsock: notify for queue {index}, which does not exist");
            return;
        }
        if let Some(w) = &self.worker {
            let _ = w.kick.write(1);
        }
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.needs_reset.store(false, Ordering::Release);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }
}

/// The device's queues and connections; runs on the worker thread (tests drive it
/// directly).
pub struct VsockBackend {
    mem: GuestMem,
    rxq: Queue,
    txq: Queue,
    /// The event queue: the guest fills it, the device never has an event to report
    /// (only transport resets on migration use it).
    _evq: Queue,
    interrupt: Arc<Interrupt>,
    muxer: Muxer,
    /// Data of the TX packet being handled (at most [`MAX_PKT_DATA`] bytes).
    tx_buf: Vec<u8>,
    /// Room for one RX packet's data: [`MAX_PKT_DATA`] bytes, allocated once, never sized
    /// from a length the guest gave.
    rx_buf: Box<[u8]>,
    /// The driver broke a queue: the device stopped and asks for a reset.
    needs_reset: Arc<AtomicBool>,
    /// Rounds of the worker loop (tests watch it for busy loops).
    rounds: Arc<AtomicU64>,
}

/// Why a queue cannot be processed any more.
#[derive(Debug, thiserror::Error)]
#[error("vsock: {queue} queue: {source}; device stopped until the driver resets it")]
struct QueueBroken {
    queue: &'static str,
    source: virtio_queue::Error,
}

fn hdr_of<B: BitmapSlice>(p: &VsockPacket<'_, B>) -> Hdr {
    Hdr {
        src_cid: p.src_cid(),
        dst_cid: p.dst_cid(),
        src_port: p.src_port(),
        dst_port: p.dst_port(),
        len: p.len(),
        type_: p.type_(),
        op: p.op(),
        flags: p.flags(),
        buf_alloc: p.buf_alloc(),
        fwd_cnt: p.fwd_cnt(),
    }
}

impl VsockBackend {
    /// A backend for the queues `[RX, TX, event]` as the driver set them up, raising
    /// `interrupt` when it uses buffers.
    pub fn new(mem: GuestMem, queues: [Queue; 3], interrupt: Arc<Interrupt>, muxer: Muxer) -> Self {
        let [rxq, txq, evq] = queues;
        Self {
            mem,
            rxq,
            txq,
            _evq: evq,
            interrupt,
            muxer,
            tx_buf: Vec::new(),
            rx_buf: vec![0u8; MAX_PKT_DATA as usize].into_boxed_slice(),
            needs_reset: Arc::new(AtomicBool::new(false)),
            rounds: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether the device stopped because the driver broke a queue (DEVICE_NEEDS_RESET).
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The counter of worker loop rounds (tests watch it for busy loops).
    pub fn rounds(&self) -> Arc<AtomicU64> {
        self.rounds.clone()
    }

    /// Bytes of packet buffers the device holds (tests check they do not grow with the
    /// guest's descriptor lengths).
    pub fn buffer_bytes(&self) -> usize {
        self.tx_buf.capacity() + self.rx_buf.len()
    }

    /// Stops the device for good (until a reset): sets DEVICE_NEEDS_RESET, tells the
    /// driver with a configuration change interrupt, drops every connection.
    fn fail(&mut self, e: QueueBroken) {
        if self.needs_reset.swap(true, Ordering::AcqRel) {
            return;
        }
        warn_limited!("{e}");
        self.muxer.drop_all();
        self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
    }

    /// The next available chain of queue `which`; `Err` when the available ring is
    /// unusable (index too far ahead, unreadable).
    fn pop<'m>(
        mem: &'m GuestMem,
        q: &mut Queue,
        which: usize,
    ) -> Result<Option<DescriptorChain<&'m GuestMem>>, QueueBroken> {
        // `iter` rather than `pop_descriptor_chain`, which logs an error on every call
        // with a broken ring and hides the error.
        match q.iter(mem) {
            Ok(mut it) => Ok(it.next()),
            Err(source) => Err(QueueBroken {
                queue: if which == RXQ { "RX" } else { "TX" },
                source,
            }),
        }
    }

    /// The connection state machine (tests inspect it).
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    fn notify(&mut self, which: usize) {
        let q = if which == RXQ { &mut self.rxq } else { &mut self.txq };
        match q.needs_notification(&self.mem) {
            Ok(true) => self.interrupt.trigger(VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(e) => {
                warn_limited!("vsock: queue {which}: {e}; interrupting anyway");
                self.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
            }
        }
    }

    /// Takes every packet the guest queued for sending.
    pub fn process_tx(&mut self) {
        if self.needs_reset() {
            return;
        }
        let mut used = false;
        let mut broken = None;
        loop {
            let mut chain = match Self::pop(&self.mem, &mut self.txq, TXQ) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            };
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(&self.mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    let hdr = hdr_of(&pkt);
                    self.tx_buf.clear();
                    if let Some(d) = pkt.data_slice() {
                        // At most MAX_PKT_DATA: longer packets are refused by the parser.
                        self.tx_buf.resize(d.len(), 0);
                        d.copy_to(&mut self.tx_buf[..]);
                    }
                    if self.tx_buf.len() != hdr.len as usize {
                        warn_limited!(
                            "vsock: TX packet data is {} bytes, header says {}; dropped",
                            self.tx_buf.len(),
                            hdr.len
                        );
                    } else {
                        self.muxer.recv(&hdr, &self.tx_buf);
                    }
                }
                Err(e) => warn_limited!("vsock: malformed TX packet dropped: {e}"),
            }
            if let Err(e) = self.txq.add_used(&self.mem, head, 0) {
                warn_limited!("vsock: TX used ring: {e}");
            }
            used = true;
        }
        if used {
            self.notify(TXQ);
        }
        if let Some(e) = broken {
            self.fail(e);
        }
    }

    /// Fills RX buffers with packets for the guest while there are both.
    pub fn process_rx(&mut self) {
        if self.needs_reset() {
            return;
        }
        let mut used = false;
        let mut broken = None;
        loop {
            let mut chain = match Self::pop(&self.mem, &mut self.rxq, RXQ) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(&self.mem, &mut chain, MAX_PKT_DATA) {
                Ok(p) => p,
                Err(e) => {
                    warn_limited!("vsock: malformed RX buffer returned unused: {e}");
                    if let Err(e) = self.rxq.add_used(&self.mem, head, 0) {
                        warn_limited!("vsock: RX used ring: {e}");
                    }
                    used = true;
                    continue;
                }
            };
            // However long the guest says the buffer is, a packet carries at most
            // MAX_PKT_DATA bytes (a header and its data may share one descriptor, whose
            // length the parser does not cap).
            let cap = pkt.data_slice().map_or(0, |d| d.len()).min(MAX_PKT_DATA as usize);
            let Some((h, n)) = self.muxer.next_rx(&mut self.rx_buf[..cap]) else {
                if cap == 0 {
                    // No room for data and no control packet for it: keeping it would
                    // leave the worker woken by pending host data it can never deliver.
                    warn_limited!("vsock: RX buffer {head} has no room for data; returned unused");
                    if let Err(e) = self.rxq.add_used(&self.mem, head, 0) {
                        warn_limited!("vsock: RX used ring: {e}");
                    }
                    used = true;
                    continue;
                }
                // Nothing to send: leave the buffer for later.
                self.rxq.go_to_previous_position();
                break;
            };
            pkt.set_src_cid(h.src_cid)
                .set_dst_cid(h.dst_cid)
                .set_src_port(h.src_port)
                .set_dst_port(h.dst_port)
                .set_len(h.len)
                .set_type(h.type_)
                .set_op(h.op)
                .set_flags(h.flags)
                .set_buf_alloc(h.buf_alloc)
                .set_fwd_cnt(h.fwd_cnt);
            if let (Some(d), true) = (pkt.data_slice(), n > 0) {
                // `n <= cap <= d.len()`: copies exactly the packet's data.
                d.copy_from(&self.rx_buf[..n]);
            }
            if let Err(e) = self.rxq.add_used(&self.mem, head, (PKT_HEADER_SIZE + n) as u32) {
                warn_limited!("vsock: RX used ring: {e}");
            }
            used = true;
        }
        if used {
            self.notify(RXQ);
        }
        if let Some(e) = broken {
            self.fail(e);
        }
    }

    /// Whether the guest has put RX buffers the device has not used yet (never, once the
    /// device is stopped).
    fn rx_room(&self) -> bool {
        !self.needs_reset()
            && self
                .rxq
                .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                .map(|i| i.0 != self.rxq.next_avail())
                .unwrap_or(false)
    }

    /// One round of work: guest TX, host writes, guest RX.
    pub fn step(&mut self) {
        self.process_tx();
        self.muxer.flush_to_host();
        self.process_rx();
    }

    fn run(mut self, kick: &EventFd, stop: &AtomicBool) {
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => return warn!("vsock: epoll: {e}; device disabled"),
        };
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KICK_TOKEN),
        ) {
            return warn!("vsock: epoll add: {e}; device disabled");
        }
        let mut watched: HashMap<RawFd, EventSet> = HashMap::new();
        let mut events = vec![EpollEvent::default(); 32];
        debug!(
            "vsock: worker started (guest cid {}, host {HOST_CID})",
            self.muxer.guest_cid()
        );
        while !stop.load(Ordering::Acquire) {
            self.rounds.fetch_add(1, Ordering::Relaxed);
            let _ = kick.read();
            self.step();
            self.watch(&epoll, &mut watched);
            // The timeout is a safety net only; every wake-up has an event behind it.
            if let Err(e) = epoll.wait(1000, &mut events) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    warn!("vsock: epoll wait: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        debug!("vsock: worker stopped");
    }

    /// Brings the epoll set in line with what the muxer wants to hear about. Stream fds of
    /// closed connections leave the epoll set by themselves (and may be reused by new
    /// connections), so a failed MOD falls back to ADD and vice versa.
    fn watch(&self, epoll: &Epoll, watched: &mut HashMap<RawFd, EventSet>) {
        let rx_room = self.rx_room();
        let mut want: HashMap<RawFd, EventSet> = HashMap::new();
        for i in self.muxer.interest(rx_room) {
            let mut set = EventSet::empty();
            if i.read {
                set |= EventSet::IN | EventSet::READ_HANG_UP;
            }
            if i.write {
                set |= EventSet::OUT;
            }
            if !set.is_empty() {
                want.insert(i.fd, set);
            }
        }
        for (fd, _) in watched.iter().filter(|(fd, _)| !want.contains_key(fd)) {
            let _ = epoll.ctl(ControlOperation::Delete, *fd, EpollEvent::default());
        }
        watched.retain(|fd, _| want.contains_key(fd));
        for (fd, set) in want {
            if watched.get(&fd) == Some(&set) {
                continue;
            }
            let ev = EpollEvent::new(set, fd as u64);
            let (first, second) = if watched.contains_key(&fd) {
                (ControlOperation::Modify, ControlOperation::Add)
            } else {
                (ControlOperation::Add, ControlOperation::Modify)
            };
            if epoll.ctl(first, fd, ev).is_err() {
                if let Err(e) = epoll.ctl(second, fd, ev) {
                    warn!("vsock: epoll for fd {fd}: {e}");
                    continue;
                }
            }
            watched.insert(fd, set);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::{Mutex, RwLock};

    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    use super::*;
    use crate::devices::virtio::muxer::*;

    const MEM_SIZE: usize = 0x40_0000;
    const QSIZE: u16 = 16;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const GUEST_CID: u64 = 3;
    const PORT: u32 = 1024;

    /// Hands out one end of a socket pair per connection; the test keeps the other.
    #[derive(Default)]
    struct Pairs {
        ends: Mutex<Vec<UnixStream>>,
    }

    impl PortListener for Pairs {
        fn connect(&self, port: u32) -> Option<UnixStream> {
            if port != PORT {
                return None;
            }
            let (a, b) = UnixStream::pair().ok()?;
            self.ends.lock().unwrap().push(a);
            Some(b)
        }
    }

    /// The driver side of a split virtqueue, written straight into guest memory.
    struct DriverQueue {
        desc: u64,
        avail: u64,
        used: u64,
        next_desc: u16,
        avail_idx: u16,
        used_seen: u16,
        /// Buffers of each chain, by head index.
        chains: HashMap<u16, Vec<(u64, u32)>>,
    }

    impl DriverQueue {
        fn new(base: u64) -> Self {
            Self {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
                chains: HashMap::new(),
            }
        }

        fn device_queue(&self) -> Queue {
            let mut q = Queue::new(QSIZE).unwrap();
            q.set_size(QSIZE);
            q.set_desc_table_address(Some(self.desc as u32), Some(0));
            q.set_avail_ring_address(Some(self.avail as u32), Some(0));
            q.set_used_ring_address(Some(self.used as u32), Some(0));
            q.set_ready(true);
            q
        }

        /// Publishes a chain of buffers (addr, len, flags).
        fn add_chain(&mut self, mem: &GuestMem, bufs: &[(u64, u32, u16)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
                let idx = self.next_desc;
                self.next_desc = (self.next_desc + 1) % QSIZE;
                let last = i + 1 == bufs.len();
                let d = self.desc + 16 * idx as u64;
                mem.write_obj(addr, GuestAddress(d)).unwrap();
                mem.write_obj(len, GuestAddress(d + 8)).unwrap();
                mem.write_obj(flags | if last { 0 } else { F_NEXT }, GuestAddress(d + 12))
                    .unwrap();
                mem.write_obj(self.next_desc, GuestAddress(d + 14)).unwrap();
            }
            self.chains.insert(head, bufs.iter().map(|&(a, l, _)| (a, l)).collect());
            let slot = self.avail + 4 + 2 * (self.avail_idx % QSIZE) as u64;
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
            head
        }

        /// Used entries (head, len) not seen yet.
        fn take_used(&mut self, mem: &GuestMem) -> Vec<(u16, u32)> {
            let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            let mut out = Vec::new();
            while self.used_seen != idx {
                let e = self.used + 4 + 8 * (self.used_seen % QSIZE) as u64;
                let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
                out.push((id as u16, len));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            out
        }
    }

    fn encode(h: &Hdr) -> Vec<u8> {
        let mut b = Vec::with_capacity(PKT_HEADER_SIZE);
        b.extend(h.src_cid.to_le_bytes());
        b.extend(h.dst_cid.to_le_bytes());
        b.extend(h.src_port.to_le_bytes());
        b.extend(h.dst_port.to_le_bytes());
        b.extend(h.len.to_le_bytes());
        b.extend(h.type_.to_le_bytes());
        b.extend(h.op.to_le_bytes());
        b.extend(h.flags.to_le_bytes());
        b.extend(h.buf_alloc.to_le_bytes());
        b.extend(h.fwd_cnt.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Hdr {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Hdr {
            src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            dst_cid: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// A vsock device with a fake guest driver around it.
    struct Harness {
        mem: GuestMem,
        dev: VsockBackend,
        rx: DriverQueue,
        tx: DriverQueue,
        irq: Arc<Interrupt>,
        pairs: Arc<Pairs>,
        next_buf: u64,
        /// What the guest driver has consumed (its fwd_cnt).
        fwd_cnt: u32,
    }

    impl Harness {
        fn new(listening: bool) -> Self {
            Self::with_memory(listening, MEM_SIZE)
        }

        fn with_memory(listening: bool, mem_size: usize) -> Self {
            let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
            let (rx, tx, ev) = (
                DriverQueue::new(0x1_0000),
                DriverQueue::new(0x2_0000),
                DriverQueue::new(0x3_0000),
            );
            let pairs = Arc::new(Pairs::default());
            let slot: ListenerSlot = Arc::new(RwLock::new(None));
            if listening {
                *slot.write().unwrap() = Some(pairs.clone() as Arc<dyn PortListener>);
            }
            let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
            let dev = VsockBackend::new(
                mem.clone(),
                [rx.device_queue(), tx.device_queue(), ev.device_queue()],
                irq.clone(),
                Muxer::new(GUEST_CID, slot),
            );
            Self {
                mem,
                dev,
                rx,
                tx,
                irq,
                pairs,
                next_buf: 0x10_0000,
                fwd_cnt: 0,
            }
        }

        fn alloc(&mut self, len: u32) -> u64 {
            let a = self.next_buf;
            self.next_buf += (len as u64 + 0xfff) & !0xfff;
            assert!(self.next_buf <= self.mem.last_addr().0 + 1);
            a
        }

        fn hdr(&self, op: u16, port: u32, len: u32) -> Hdr {
            Hdr {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port: 40000,
                dst_port: port,
                len,
                type_: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 64 * 1024,
                fwd_cnt: self.fwd_cnt,
            }
        }

        /// The guest sends a packet (header and data in separate descriptors, as Linux 6.1
        /// does); the device runs one round.
        fn send(&mut self, h: Hdr, data: &[u8]) {
            let ha = self.alloc(PKT_HEADER_SIZE as u32);
            self.mem.write_slice(&encode(&h), GuestAddress(ha)).unwrap();
            let mut bufs = vec![(ha, PKT_HEADER_SIZE as u32, 0)];
            if !data.is_empty() {
                let da = self.alloc(data.len() as u32);
                self.mem.write_slice(data, GuestAddress(da)).unwrap();
                bufs.push((da, data.len() as u32, 0));
            }
            let head = self.tx.add_chain(&self.mem, &bufs);
            self.dev.step();
            assert_eq!(self.tx.take_used(&self.mem), vec![(head, 0)]);
        }

        /// The guest posts `n` RX buffers (header + 4 KiB).
        fn give_rx(&mut self, n: usize) {
            for _ in 0..n {
                let ha = self.alloc(PKT_HEADER_SIZE as u32);
                let da = self.alloc(4096);
                self.rx
                    .add_chain(&self.mem, &[(ha, PKT_HEADER_SIZE as u32, F_WRITE), (da, 4096, F_WRITE)]);
            }
        }

        /// Runs the device and returns the packets it put in RX buffers.
        fn recv(&mut self) -> Vec<(Hdr, Vec<u8>)> {
            self.dev.step();
            let mut out = Vec::new();
            for (head, len) in self.rx.take_used(&self.mem) {
                let bufs = self.rx.chains[&head].clone();
                let mut hb = vec![0u8; PKT_HEADER_SIZE];
                self.mem.read_slice(&mut hb, GuestAddress(bufs[0].0)).unwrap();
                let h = decode(&hb);
                assert_eq!(len as usize, PKT_HEADER_SIZE + h.len as usize);
                let mut data = vec![0u8; h.len as usize];
                if h.len > 0 {
                    self.mem.read_slice(&mut data, GuestAddress(bufs[1].0)).unwrap();
                }
                self.fwd_cnt += h.len;
                out.push((h, data));
            }
            out
        }

        fn interrupts(&self) -> u64 {
            self.irq.eventfd().read().unwrap_or(0)
        }

        fn host_end(&self) -> UnixStream {
            self.pairs.ends.lock().unwrap()[0].try_clone().unwrap()
        }

        fn connect(&mut self) {
            self.give_rx(8);
            let h = self.hdr(OP_REQUEST, PORT, 0);
            self.send(h, &[]);
            let got = self.recv();
            assert_eq!(got.len(), 1, "{got:?}");
            let r = got[0].0;
            assert_eq!(r.op, OP_RESPONSE);
            assert_eq!(
                (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
                (HOST_CID, GUEST_CID, PORT, 40000)
            );
            assert_eq!((r.type_, r.buf_alloc), (TYPE_STREAM, BUF_ALLOC));
        }
    }

    #[test]
    fn request_response_data_both_ways_shutdown() {
        let mut t = Harness::new(true);
        t.connect();
        assert!(t.interrupts() > 0);
        assert_eq!(t.irq.status() & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING);
        let mut host = t.host_end();

        // Guest -> host.
        let h = t.hdr(OP_RW, PORT, 5);
        t.send(h, b"hello");
        let mut b = [0u8; 5];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");

        // Host -> guest, split over RX buffers of 4 KiB.
        let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        host.write_all(&big).unwrap();
        let got = t.recv();
        let data: Vec<u8> = got.iter().flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(data, big);
        assert!(got
            .iter()
            .all(|(h, _)| h.op == OP_RW && h.dst_port == 40000 && h.fwd_cnt == 5));

        // Clean close from the guest: SHUTDOWN both ways is answered with RST and the host
        // stream sees EOF.
        let mut h = t.hdr(OP_SHUTDOWN, PORT, 0);
        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        t.send(h, &[]);
        let got = t.recv();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, OP_RST);
        assert_eq!(host.read(&mut b).unwrap(), 0);
        assert_eq!(t.dev.muxer().connections(), 0);
    }

    #[test]
    fn host_close_and_half_close() {
        let mut t = Harness::new(true);
        t.connect();
        let mut host = t.host_end();
        // Guest is done sending: the host stream sees EOF after the data.
        let h = t.hdr(OP_RW, PORT, 3);
        t.send(h, b"req");
        let mut h = t.hdr(OP_SHUTDOWN, PORT, 0);
        h.flags = SHUTDOWN_SEND;
        t.send(h, &[]);
        assert!(t.recv().is_empty());
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"req");
        // The host answers and closes: data, then SHUTDOWN; the guest's RST ends it.
        host.write_all(b"resp").unwrap();
        drop(host);
        t.pairs.ends.lock().unwrap().clear();
        let got = t.recv();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].0.op, got[0].1.as_slice()), (OP_RW, &b"resp"[..]));
        assert_eq!(got[1].0.op, OP_SHUTDOWN);
        assert_eq!(got[1].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
        let h = t.hdr(OP_RST, PORT, 0);
        t.send(h, &[]);
        assert!(t.recv().is_empty());
        assert_eq!(t.dev.muxer().connections(), 0);
    }

    #[test]
    fn credit_updates() {
        let mut t = Harness::new(true);
        t.connect();
        let mut host = t.host_end();
        host.set_nonblocking(true).unwrap();
        // A credit request is answered at once.
        let h = t.hdr(OP_CREDIT_REQUEST, PORT, 0);
        t.send(h, &[]);
        let got = t.recv();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0.op, got[0].0.fwd_cnt, got[0].0.buf_alloc),
            (OP_CREDIT_UPDATE, 0, BUF_ALLOC)
        );
        // Enough consumed guest data triggers an unprompted update carrying fwd_cnt.
        let chunk = vec![0x5au8; 40_000];
        for _ in 0..2 {
            let h = t.hdr(OP_RW, PORT, chunk.len() as u32);
            t.send(h, &chunk);
        }
        let mut sink = vec![0u8; 100_000];
        let mut n = 0;
        while let Ok(k) = host.read(&mut sink[n..]) {
            if k == 0 {
                break;
            }
            n += k;
        }
        assert_eq!(n, 80_000);
        let got = t.recv();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0.op, got[0].0.fwd_cnt), (OP_CREDIT_UPDATE, 80_000));
        // A guest that overruns the advertised buffer is reset: stop reading on the host
        // so data piles up in the device.
        let mut reset = false;
        let big = vec![1u8; MAX_PKT_DATA as usize];
        for _ in 0..16 {
            let h = t.hdr(OP_RW, PORT, big.len() as u32);
            t.send(h, &big);
            if t.dev.muxer().connections() == 0 {
                reset = true;
                break;
            }
        }
        assert!(reset);
        assert!(t.recv().iter().any(|(h, _)| h.op == OP_RST));
    }

    #[test]
    fn unknown_port_or_no_listener_gets_rst() {
        let mut t = Harness::new(true);
        t.give_rx(4);
        let h = t.hdr(OP_REQUEST, 9999, 0);
        t.send(h, &[]);
        let got = t.recv();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0.op, got[0].0.src_port, got[0].0.dst_port),
            (OP_RST, 9999, 40000)
        );
        assert_eq!(t.dev.muxer().connections(), 0);

        let mut t = Harness::new(false);
        t.give_rx(4);
        let h = t.hdr(OP_REQUEST, PORT, 0);
        t.send(h, &[]);
        assert_eq!(t.recv()[0].0.op, OP_RST);
    }

    #[test]
    fn control_packets_wait_for_rx_buffers() {
        let mut t = Harness::new(true);
        let h = t.hdr(OP_REQUEST, PORT, 0);
        t.send(h, &[]);
        assert!(t.recv().is_empty());
        t.give_rx(1);
        assert_eq!(t.recv()[0].0.op, OP_RESPONSE);
    }

    #[test]
    fn malformed_descriptors_do_not_panic() {
        let mut t = Harness::new(true);
        t.give_rx(2);
        // Header descriptor too short.
        let a = t.alloc(16);
        let head = t.tx.add_chain(&t.mem, &[(a, 16, 0)]);
        t.dev.step();
        assert_eq!(t.tx.take_used(&t.mem), vec![(head, 0)]);
        // Header outside guest memory.
        let head = t.tx.add_chain(&t.mem, &[(0xffff_0000, 44, 0)]);
        t.dev.step();
        assert_eq!(t.tx.take_used(&t.mem), vec![(head, 0)]);
        // Header claims more data than the chain holds.
        let h = t.hdr(OP_RW, PORT, 5000);
        let ha = t.alloc(44);
        t.mem.write_slice(&encode(&h), GuestAddress(ha)).unwrap();
        let da = t.alloc(100);
        let head = t.tx.add_chain(&t.mem, &[(ha, 44, 0), (da, 100, 0)]);
        t.dev.step();
        assert_eq!(t.tx.take_used(&t.mem), vec![(head, 0)]);
        // Write-only TX buffer.
        let h = t.hdr(OP_REQUEST, PORT, 0);
        let ha = t.alloc(44);
        t.mem.write_slice(&encode(&h), GuestAddress(ha)).unwrap();
        let head = t.tx.add_chain(&t.mem, &[(ha, 44, F_WRITE)]);
        t.dev.step();
        assert_eq!(t.tx.take_used(&t.mem), vec![(head, 0)]);
        assert_eq!(t.dev.muxer().connections(), 0);
        assert!(t.recv().is_empty());

        // A read-only RX buffer is given back unused; a good one after it is used.
        let a = t.alloc(4096);
        let mut t2 = Harness::new(true);
        let bad = t2.rx.add_chain(&t2.mem, &[(a, 44, 0), (a + 64, 1024, 0)]);
        t2.give_rx(1);
        let h = t2.hdr(OP_REQUEST, PORT, 0);
        t2.send(h, &[]);
        t2.dev.step();
        let used = t2.rx.take_used(&t2.mem);
        assert_eq!(used.len(), 2);
        assert_eq!(used[0], (bad, 0));
        assert_eq!(used[1].1, PKT_HEADER_SIZE as u32);

        // A garbage avail index (more entries than the queue holds) is refused.
        t2.mem.write_obj(0x7fffu16, GuestAddress(t2.tx.avail + 2)).unwrap();
        t2.dev.step();
        assert_eq!(t2.tx.take_used(&t2.mem), vec![]);
    }

    /// The device behind its virtio-mmio transport, set up by a driver as Linux does (device
    /// id checked, VERSION_1 negotiated, the harness's queues, DRIVER_OK); returns the
    /// transport and the status bits before DRIVER_OK.
    fn driver_ready(t: &Harness) -> (crate::devices::virtio::mmio::MmioTransport, u32) {
        use crate::devices::virtio::mmio::*;
        use crate::devices::BusDevice;

        let slot: ListenerSlot = Arc::new(RwLock::new(Some(t.pairs.clone() as Arc<dyn PortListener>)));
        let mut tr = MmioTransport::new(Box::new(Vsock::new(GUEST_CID, slot)), t.mem.clone(), t.irq.clone());
        let wr = |tr: &mut MmioTransport, off: u64, v: u32| tr.write(off, &v.to_le_bytes());
        let mut b = [0u8; 4];
        tr.read(REG_DEVICE_ID, &mut b);
        assert_eq!(u32::from_le_bytes(b), 19);
        wr(&mut tr, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&mut tr, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut tr, REG_DRIVER_FEATURES, 1);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        wr(&mut tr, REG_STATUS, ok);
        for (i, q) in [&t.rx, &t.tx, &DriverQueue::new(0x3_0000)].iter().enumerate() {
            wr(&mut tr, REG_QUEUE_SEL, i as u32);
            wr(&mut tr, REG_QUEUE_NUM, QSIZE as u32);
            wr(&mut tr, REG_QUEUE_DESC_LOW, q.desc as u32);
            wr(&mut tr, REG_QUEUE_DRIVER_LOW, q.avail as u32);
            wr(&mut tr, REG_QUEUE_DEVICE_LOW, q.used as u32);
            wr(&mut tr, REG_QUEUE_READY, 1);
        }
        wr(&mut tr, REG_STATUS, ok | STATUS_DRIVER_OK);
        (tr, ok)
    }

    /// The whole device as the guest sees it: virtio-mmio registers, the worker thread woken
    /// by QueueNotify and by host stream readiness, interrupts, reset.
    #[test]
    fn through_the_mmio_transport_with_the_worker() {
        use crate::devices::virtio::mmio::*;
        use crate::devices::BusDevice;

        let mut t = Harness::new(true);
        let (mut tr, ok) = driver_ready(&t);
        let wr = |tr: &mut MmioTransport, off: u64, v: u32| tr.write(off, &v.to_le_bytes());
        let mut b = [0u8; 4];
        tr.read(REG_STATUS, &mut b);
        assert_eq!(u32::from_le_bytes(b), ok | STATUS_DRIVER_OK);

        let wait_rx = |t: &mut Harness| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let used = t.rx.take_used(&t.mem);
                if !used.is_empty() {
                    return used;
                }
                assert!(std::time::Instant::now() < deadline, "no RX packet from the worker");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        t.give_rx(4);
        wr(&mut tr, REG_QUEUE_NOTIFY, RXQ as u32);
        let h = t.hdr(OP_REQUEST, PORT, 0);
        let ha = t.alloc(PKT_HEADER_SIZE as u32);
        t.mem.write_slice(&encode(&h), GuestAddress(ha)).unwrap();
        t.tx.add_chain(&t.mem, &[(ha, PKT_HEADER_SIZE as u32, 0)]);
        wr(&mut tr, REG_QUEUE_NOTIFY, TXQ as u32);
        let used = wait_rx(&mut t);
        let mut hb = vec![0u8; PKT_HEADER_SIZE];
        t.mem
            .read_slice(&mut hb, GuestAddress(t.rx.chains[&used[0].0][0].0))
            .unwrap();
        assert_eq!(decode(&hb).op, OP_RESPONSE);
        tr.read(REG_INTERRUPT_STATUS, &mut b);
        assert_eq!(u32::from_le_bytes(b) & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING);
        wr(&mut tr, REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);

        // Host data wakes the worker through epoll, no notification needed.
        t.host_end().write_all(b"ping").unwrap();
        let used = wait_rx(&mut t);
        assert_eq!(used[0].1 as usize, PKT_HEADER_SIZE + 4);
        let mut d = [0u8; 4];
        t.mem
            .read_slice(&mut d, GuestAddress(t.rx.chains[&used[0].0][1].0))
            .unwrap();
        assert_eq!(&d, b"ping");

        // Reset stops the worker and drops the connection.
        wr(&mut tr, REG_STATUS, 0);
        tr.read(REG_STATUS, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        let mut host = t.host_end();
        host.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        assert_eq!(host.read(&mut d).unwrap(), 0);
    }

    /// A backend on its own worker thread, as [`Vsock::activate`] runs it.
    struct RunningWorker {
        kick: Arc<EventFd>,
        stop: Arc<AtomicBool>,
        rounds: Arc<AtomicU64>,
        needs_reset: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl RunningWorker {
        /// QueueNotify.
        fn notify(&self) {
            self.kick.write(1).unwrap();
        }

        /// Rounds the worker loop ran during `d`.
        fn rounds_during(&self, d: Duration) -> u64 {
            let before = self.rounds.load(Ordering::Relaxed);
            std::thread::sleep(d);
            self.rounds.load(Ordering::Relaxed) - before
        }
    }

    impl Drop for RunningWorker {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            let _ = self.kick.write(1);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    impl Harness {
        /// Moves the device (with its connections) onto a worker thread; `self.dev` becomes
        /// an idle stand-in that the test must not step.
        fn spawn_worker(&mut self) -> RunningWorker {
            let idle = VsockBackend::new(
                self.mem.clone(),
                [
                    self.rx.device_queue(),
                    self.tx.device_queue(),
                    DriverQueue::new(0x3_0000).device_queue(),
                ],
                self.irq.clone(),
                Muxer::new(GUEST_CID, Default::default()),
            );
            let dev = std::mem::replace(&mut self.dev, idle);
            let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
            let stop = Arc::new(AtomicBool::new(false));
            let (rounds, needs_reset) = (dev.rounds(), dev.needs_reset.clone());
            let (k, st) = (kick.clone(), stop.clone());
            let thread = std::thread::spawn(move || dev.run(&k, &st));
            RunningWorker {
                kick,
                stop,
                rounds,
                needs_reset,
                thread: Some(thread),
            }
        }

        /// Waits (up to 10 s) for the device to use RX buffers.
        fn wait_rx_used(&mut self) -> Vec<(u16, u32)> {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let used = self.rx.take_used(&self.mem);
                if !used.is_empty() {
                    return used;
                }
                assert!(Instant::now() < deadline, "the worker used no RX buffer");
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        /// Connects with exactly one RX buffer given (used by the RESPONSE), so that the RX
        /// queue is empty afterwards.
        fn connect_leaving_no_rx_buffer(&mut self) {
            self.give_rx(1);
            let h = self.hdr(OP_REQUEST, PORT, 0);
            self.send(h, &[]);
            assert_eq!(self.recv()[0].0.op, OP_RESPONSE);
        }
    }

    /// Security issue item 5: an RX chain whose data descriptor has length 0 cannot carry
    /// the host data waiting for the guest. The worker kept it, stayed woken by the
    /// readable host stream, and spun. It must use it (length 0) and sleep.
    #[test]
    fn rx_buffer_without_data_room_is_used_not_spun_on() {
        let mut t = Harness::new(true);
        t.connect_leaving_no_rx_buffer();
        let mut host = t.host_end();
        host.write_all(b"ping").unwrap();
        let w = t.spawn_worker();
        let ha = t.alloc(PKT_HEADER_SIZE as u32);
        let da = t.alloc(4096);
        let bad =
            t.rx.add_chain(&t.mem, &[(ha, PKT_HEADER_SIZE as u32, F_WRITE), (da, 0, F_WRITE)]);
        w.notify();
        let rounds = w.rounds_during(Duration::from_millis(300));
        assert!(rounds < 20, "worker busy-looped: {rounds} rounds in 300 ms");
        assert_eq!(t.wait_rx_used(), vec![(bad, 0)]);
        // A proper buffer still gets the data.
        t.give_rx(1);
        w.notify();
        let used = t.wait_rx_used();
        assert_eq!(used[0].1 as usize, PKT_HEADER_SIZE + 4);
        let mut d = [0u8; 4];
        t.mem
            .read_slice(&mut d, GuestAddress(t.rx.chains[&used[0].0][1].0))
            .unwrap();
        assert_eq!(&d, b"ping");
        assert!(!w.needs_reset.load(Ordering::Acquire));
    }

    /// Security issue item 5: an RX available index more than the queue size ahead made
    /// every pop fail (logging an error each time) while the worker, seeing "buffers
    /// available", stayed woken by the readable host stream. The device must stop with
    /// DEVICE_NEEDS_RESET, say so with a configuration interrupt, drop its connections
    /// and sleep.
    #[test]
    fn rx_avail_index_too_far_ahead_stops_the_device() {
        let mut t = Harness::new(true);
        t.connect_leaving_no_rx_buffer();
        let mut host = t.host_end();
        host.write_all(b"ping").unwrap();
        let w = t.spawn_worker();
        let idx = t.rx.avail_idx.wrapping_add(QSIZE + 5);
        t.mem.write_obj(idx, GuestAddress(t.rx.avail + 2)).unwrap();
        w.notify();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.needs_reset.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "device did not ask for a reset");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(t.irq.status() & VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_CONFIG);
        let rounds = w.rounds_during(Duration::from_millis(300));
        assert!(rounds < 20, "worker busy-looped: {rounds} rounds in 300 ms");
        // The connection is gone: the host end reads EOF (or a reset: "ping" was unread).
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 4];
        match host.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("host end still connected: {other:?}"),
        }
        // Further notifications do nothing; in particular the queue is not touched.
        t.give_rx(1);
        w.notify();
        std::thread::sleep(Duration::from_millis(50));
        assert!(t.rx.take_used(&t.mem).is_empty());
    }

    /// The transport shows the device's DEVICE_NEEDS_RESET in Status; a reset clears it.
    #[test]
    fn needs_reset_reaches_the_status_register() {
        use crate::devices::virtio::mmio::*;
        use crate::devices::BusDevice;

        let t = Harness::new(true);
        let (mut tr, ok) = driver_ready(&t);
        let wr = |tr: &mut MmioTransport, off: u64, v: u32| tr.write(off, &v.to_le_bytes());
        let status = |tr: &mut MmioTransport| {
            let mut b = [0u8; 4];
            tr.read(REG_STATUS, &mut b);
            u32::from_le_bytes(b)
        };
        // A garbage TX available index.
        t.mem.write_obj(0x7fffu16, GuestAddress(t.tx.avail + 2)).unwrap();
        wr(&mut tr, REG_QUEUE_NOTIFY, TXQ as u32);
        let deadline = Instant::now() + Duration::from_secs(10);
        while status(&mut tr) & STATUS_DEVICE_NEEDS_RESET == 0 {
            assert!(Instant::now() < deadline, "DEVICE_NEEDS_RESET never set");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(status(&mut tr), ok | STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET);
        wr(&mut tr, REG_STATUS, 0);
        assert_eq!(status(&mut tr), 0);
    }

    /// Security issue item 6: a header and its data may share one RX descriptor, and the
    /// parser does not cap that descriptor's length. A 200 MiB one made a 200 MiB device
    /// buffer, zeroed again on every TX packet (21.6 ms per 1-byte packet), and let one
    /// packet carry everything the host stream held. Packets stay within MAX_PKT_DATA and
    /// the device's buffers stay small whatever the guest gives.
    #[test]
    fn huge_rx_descriptor_is_capped_at_the_max_packet_size() {
        const BIG: u32 = 200 << 20;
        let mut t = Harness::with_memory(true, (BIG as usize) + (16 << 20));
        t.give_rx(1);
        // A guest with a large receive buffer: credit does not limit the packet size.
        let mut h = t.hdr(OP_REQUEST, PORT, 0);
        h.buf_alloc = 4 << 20;
        t.send(h, &[]);
        assert_eq!(t.recv()[0].0.op, OP_RESPONSE);
        let ha = t.alloc(BIG);
        let head = t.rx.add_chain(&t.mem, &[(ha, BIG, F_WRITE)]);
        // Nothing to send yet: every TX packet runs a round with the big buffer pending.
        let t0 = Instant::now();
        const PKTS: u32 = 20;
        for _ in 0..PKTS {
            let mut h = t.hdr(OP_CREDIT_UPDATE, PORT, 0);
            h.buf_alloc = 4 << 20;
            t.send(h, &[]);
        }
        let per_pkt = t0.elapsed() / PKTS;
        eprintln!("one TX packet with a 200 MiB RX buffer posted: {per_pkt:?}");
        assert!(
            t.dev.buffer_bytes() <= 2 * MAX_PKT_DATA as usize,
            "{}",
            t.dev.buffer_bytes()
        );
        assert!(per_pkt < Duration::from_millis(5), "{per_pkt:?} per TX packet");
        // More host data than one packet may carry.
        let mut host = t.host_end();
        host.set_nonblocking(true).unwrap();
        let data = vec![7u8; 3 * MAX_PKT_DATA as usize];
        let mut written = 0;
        while written < data.len() {
            match host.write(&data[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            written > MAX_PKT_DATA as usize,
            "only {written} bytes fit in the socket"
        );
        t.dev.step();
        let used = t.rx.take_used(&t.mem);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0], (head, PKT_HEADER_SIZE as u32 + MAX_PKT_DATA));
        let mut hb = vec![0u8; PKT_HEADER_SIZE];
        t.mem.read_slice(&mut hb, GuestAddress(ha)).unwrap();
        assert_eq!(decode(&hb).len, MAX_PKT_DATA);
        assert!(
            t.dev.buffer_bytes() <= 2 * MAX_PKT_DATA as usize,
            "{}",
            t.dev.buffer_bytes()
        );
    }

    #[test]
    fn config_space_is_the_cid() {
        let slot: ListenerSlot = Default::default();
        let v = Vsock::new(0x1_2345_6789, slot);
        let mut b = [0u8; 8];
        v.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x1_2345_6789);
        let mut w = [0u8; 4];
        v.read_config(4, &mut w);
        assert_eq!(u32::from_le_bytes(w), 1);
        v.read_config(6, &mut w);
        assert_eq!(w, [0, 0, 0, 0]);
        v.read_config(u64::MAX, &mut w);
        assert_eq!(w, [0; 4]);
        assert_eq!(v.device_type(), 19);
        assert_eq!(v.queue_max_sizes().len(), 3);
    }
}
