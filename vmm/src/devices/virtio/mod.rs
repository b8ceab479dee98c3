//! Virtio devices over the virtio-mmio transport.
//!
//! - [`mmio`]: the virtio-mmio (version 2, "modern") register block, feature negotiation,
//!   queue setup and device status; it drives any [`VirtioDevice`].
//! - [`vsock`]: the virtio-vsock device (device id 19) and its worker thread.
//! - [`muxer`]: vsock connection state machine between the guest and host-side streams.
//!
//! Queues and descriptor chains come from the rust-vmm `virtio-queue` crate, vsock packet
//! parsing from `virtio-vsock`.

pub mod mmio;
pub mod muxer;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMem;

/// `VIRTIO_F_VERSION_1`: the modern interface; virtio-mmio version 2 requires it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: the device used a buffer in some queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// A device's interrupt line: the InterruptStatus register and the irqfd that raises the
/// guest interrupt (a KVM irqfd registered on the device's IOAPIC pin).
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    /// An interrupt line that raises the guest interrupt through `evt`, status clear.
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.evt.write(1) {
            log::warn!("virtio: raising the interrupt failed: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// The eventfd behind the interrupt (tests read it to see interrupts).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
    /// The device's worker thread could not be spawned.
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (19 for vsock).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start processing `queues` (set up and validated by the
    /// transport) with the negotiated `features`.
    fn activate(
        &mut self,
        mem: GuestMem,
        features: u64,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index` (QueueNotify).
    fn queue_notify(&mut self, index: u32);
    /// The driver reset the device: stop processing and forget all queue state.
    fn reset(&mut self);
    /// Whether the device hit an error it cannot recover from without a reset (a queue
    /// the driver broke): the transport shows DEVICE_NEEDS_RESET in the status register.
    fn needs_reset(&self) -> bool {
        false
    }
}
