//! The virtio-mmio transport, version 2 (virtio 1.x "modern" register layout, section 4.2.2
//! of the spec). Linux finds the device through `virtio_mmio.device=<size>@<base>:<irq>`
//! on the kernel command line.
//!
//! The driver negotiates features through the DeviceFeatures/DriverFeatures windows, sets
//! FEATURES_OK (refused unless VIRTIO_F_VERSION_1 is accepted and nothing unoffered is
//! asked for), programs each queue's size and ring addresses and marks it ready, then
//! sets DRIVER_OK, at which point the queues are handed to the device. Writing 0 to Status
//! resets the device. Every malformed access (bad width, unknown register, out-of-range
//! queue, queue setup after DRIVER_OK) is logged and ignored; nothing the guest writes can
//! make the VMM panic.

use std::sync::Arc;

use log::{debug, info};
use virtio_queue::{Queue, QueueT};

use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;
use crate::memory::GuestMem;
use crate::warn_limited;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern virtio-mmio version.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("LUCO").
pub const VENDOR_ID: u32 = 0x4f43_554c;
/// Size of the register window.
pub const MMIO_WINDOW: u64 = 0x1000;

// Register offsets.
/// MagicValue (read-only): [`MMIO_MAGIC`].
pub const REG_MAGIC: u64 = 0x000;
/// Version (read-only): [`MMIO_VERSION`].
pub const REG_VERSION: u64 = 0x004;
/// DeviceID (read-only): the virtio device id (19 for vsock).
pub const REG_DEVICE_ID: u64 = 0x008;
/// VendorID (read-only): [`VENDOR_ID`].
pub const REG_VENDOR_ID: u64 = 0x00c;
/// DeviceFeatures (read-only): the 32 feature bits of the word chosen by DeviceFeaturesSel.
pub const REG_DEVICE_FEATURES: u64 = 0x010;
/// DeviceFeaturesSel (write-only): which 32-bit word of the device features to read (0 or 1).
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
/// DriverFeatures (write-only): the 32 accepted feature bits of the word chosen by
/// DriverFeaturesSel; frozen once FEATURES_OK is set.
pub const REG_DRIVER_FEATURES: u64 = 0x020;
/// DriverFeaturesSel (write-only): which 32-bit word of the driver features to write (0 or 1).
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
/// QueueSel (write-only): the queue that the Queue* registers refer to.
pub const REG_QUEUE_SEL: u64 = 0x030;
/// QueueNumMax (read-only): largest size of the selected queue (0 if it does not exist).
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
/// QueueNum (write-only): size of the selected queue, a power of two up to QueueNumMax.
pub const REG_QUEUE_NUM: u64 = 0x038;
/// QueueReady (read-write): 1 once the driver has set the selected queue up.
pub const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify (write-only): the driver has new buffers in the queue whose index it writes.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
/// InterruptStatus (read-only): [`VIRTIO_MMIO_INT_VRING`](super::VIRTIO_MMIO_INT_VRING) and
/// [`VIRTIO_MMIO_INT_CONFIG`](super::VIRTIO_MMIO_INT_CONFIG) bits pending.
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
/// InterruptACK (write-only): clears the InterruptStatus bits written.
pub const REG_INTERRUPT_ACK: u64 = 0x064;
/// Status (read-write): the `STATUS_*` bits; writing 0 resets the device.
pub const REG_STATUS: u64 = 0x070;
/// QueueDescLow (write-only): low 32 bits of the selected queue's descriptor table GPA.
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
/// QueueDescHigh (write-only): high 32 bits of the descriptor table GPA.
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
/// QueueDriverLow (write-only): low 32 bits of the selected queue's available ring GPA.
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
/// QueueDriverHigh (write-only): high 32 bits of the available ring GPA.
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
/// QueueDeviceLow (write-only): low 32 bits of the selected queue's used ring GPA.
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// QueueDeviceHigh (write-only): high 32 bits of the used ring GPA.
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// SHMSel (write-only): shared memory region selector; there are no regions, so ignored.
pub const REG_SHM_SEL: u64 = 0x0ac;
/// SHMLenLow (read-only): low 32 bits of the region length; all ones (no region).
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
/// SHMLenHigh (read-only): high 32 bits of the region length; all ones (no region).
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
/// SHMBaseLow (read-only): low 32 bits of the region base; all ones (no region).
pub const REG_SHM_BASE_LOW: u64 = 0x0b8;
/// SHMBaseHigh (read-only): high 32 bits of the region base; all ones (no region).
pub const REG_SHM_BASE_HIGH: u64 = 0x0bc;
/// ConfigGeneration (read-only): would change with the configuration space; always 0 here.
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space; accesses from here go to the device.
pub const REG_CONFIG: u64 = 0x100;

// Device status bits.
/// Status bit: the guest found the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Status bit: the guest has a driver for the device.
pub const STATUS_DRIVER: u32 = 2;
/// Status bit: the driver is set up; the transport activates the device.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Status bit: feature negotiation is done; refused (left clear) if the features are not
/// acceptable.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Status bit set by the device: it hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
/// Status bit set by the driver: it gave up on the device.
pub const STATUS_FAILED: u32 = 0x80;

/// One virtio device behind a virtio-mmio register block.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    interrupt: Arc<Interrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    activated: bool,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device` in its reset state, raising interrupts through `interrupt`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMem, interrupt: Arc<Interrupt>) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        Self {
            device,
            mem,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            activated: false,
            config_generation: 0,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .filter_map(|&m| match Queue::new(m) {
                Ok(q) => Some(q),
                Err(e) => {
                    warn_limited!("virtio-mmio: bad queue max size {m}: {e}");
                    None
                }
            })
            .collect()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        if self.activated || self.status & STATUS_DRIVER_OK != 0 {
            warn_limited!("virtio-mmio: queue setup after DRIVER_OK ignored");
            return None;
        }
        let sel = self.queue_sel as usize;
        let q = self.queues.get_mut(sel);
        if q.is_none() {
            warn_limited!("virtio-mmio: queue {sel} does not exist");
        }
        q
    }

    fn reset(&mut self) {
        debug!("virtio-mmio: reset (device type {})", self.device.device_type());
        self.device.reset();
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.activated = false;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (until a reset).
        if v & self.status != self.status {
            warn_limited!(
                "virtio-mmio: status {:#x} -> {v:#x} clears bits without a reset; ignored",
                self.status
            );
            return;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                warn_limited!(
                    "virtio-mmio: driver features {:#x} not acceptable (offered {offered:#x}, VERSION_1 required)",
                    self.driver_features
                );
                // FEATURES_OK stays clear: the driver sees it and gives up.
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        if new & STATUS_DRIVER_OK != 0 {
            if self.status & STATUS_FEATURES_OK == 0 && v & STATUS_FEATURES_OK == 0 {
                warn_limited!("virtio-mmio: DRIVER_OK without FEATURES_OK");
                self.status = v | STATUS_DEVICE_NEEDS_RESET;
                return;
            }
            self.status = v;
            self.activate();
            return;
        }
        self.status = v;
    }

    fn activate(&mut self) {
        if let Some((i, _)) = self
            .queues
            .iter()
            .enumerate()
            .find(|(_, q)| !q.ready() || !q.is_valid(&self.mem))
        {
            warn_limited!("virtio-mmio: DRIVER_OK but queue {i} is not ready or not valid");
            self.status |= STATUS_DEVICE_NEEDS_RESET;
            self.interrupt.trigger(super::VIRTIO_MMIO_INT_CONFIG);
            return;
        }
        let queues = std::mem::replace(&mut self.queues, Self::fresh_queues(self.device.as_ref()));
        // Keep what the driver configured visible in the registers.
        for (fresh, used) in self.queues.iter_mut().zip(&queues) {
            fresh.set_size(used.size());
            fresh.set_ready(true);
        }
        match self
            .device
            .activate(self.mem.clone(), self.driver_features, queues, self.interrupt.clone())
        {
            Ok(()) => {
                self.activated = true;
                info!("virtio-mmio: device type {} activated", self.device.device_type());
            }
            Err(e) => {
                warn_limited!("virtio-mmio: device activation failed: {e}");
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                self.interrupt.trigger(super::VIRTIO_MMIO_INT_CONFIG);
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let sel = self.queue_sel as usize;
        match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.queues.get(sel).map_or(0, |q| q.max_size() as u32),
            REG_QUEUE_READY => self.queues.get(sel).map_or(0, |q| q.ready() as u32),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS if self.activated && self.device.needs_reset() => self.status | STATUS_DEVICE_NEEDS_RESET,
            REG_STATUS => self.status,
            // No shared memory regions: length -1 means "does not exist".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                warn_limited!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    warn_limited!("virtio-mmio: driver features written after FEATURES_OK; ignored");
                    return;
                }
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | ((v as u64) << 32),
                    s => warn_limited!("virtio-mmio: driver features word {s} does not exist"),
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.queue() {
                    if let Err(e) = q.try_set_size(v.min(u16::MAX as u32 + 1) as u16) {
                        warn_limited!("virtio-mmio: queue size {v}: {e}");
                    }
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_DRIVER_LOW => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_DRIVER_HIGH => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_DEVICE_LOW => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_DEVICE_HIGH => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(None, Some(v))),
            REG_QUEUE_NOTIFY => {
                if self.activated {
                    self.device.queue_notify(v);
                } else {
                    debug!("virtio-mmio: notify of queue {v} before DRIVER_OK ignored");
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            REG_SHM_SEL => {}
            _ => warn_limited!("virtio-mmio: write of unknown or read-only register {offset:#x} = {v:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            warn_limited!(
                "virtio-mmio: {}-byte read at {offset:#x} (registers are 32-bit)",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn_limited!(
                "virtio-mmio: {}-byte write at {offset:#x} (registers are 32-bit)",
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            warn_limited!("virtio-mmio: unaligned write at {offset:#x}");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::virtio::ActivateError;

    /// A queue's size, descriptor table, avail ring and used ring.
    type QueueRegs = (u16, u64, u64, u64);

    /// What the dummy device saw.
    #[derive(Default)]
    struct Seen {
        activated: Option<(u64, Vec<QueueRegs>)>,
        notified: Vec<u32>,
        resets: u32,
    }

    struct Dummy(Arc<Mutex<Seen>>);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            19
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMem,
            features: u64,
            queues: Vec<Queue>,
            _interrupt: Arc<Interrupt>,
        ) -> Result<(), ActivateError> {
            let qs = queues
                .iter()
                .map(|q| (q.size(), q.desc_table(), q.avail_ring(), q.used_ring()))
                .collect();
            self.0.lock().unwrap().activated = Some((features, qs));
            Ok(())
        }
        fn queue_notify(&mut self, index: u32) {
            self.0.lock().unwrap().notified.push(index);
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Seen>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let irq = Arc::new(Interrupt::new(
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        (MmioTransport::new(Box::new(Dummy(seen.clone())), mem, irq), seen)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
        wr(t, REG_QUEUE_SEL, sel);
        wr(t, REG_QUEUE_NUM, size);
        wr(t, REG_QUEUE_DESC_LOW, base as u32);
        wr(t, REG_QUEUE_DESC_HIGH, 0);
        wr(t, REG_QUEUE_DRIVER_LOW, base as u32 + 0x1000);
        wr(t, REG_QUEUE_DRIVER_HIGH, 0);
        wr(t, REG_QUEUE_DEVICE_LOW, base as u32 + 0x2000);
        wr(t, REG_QUEUE_DEVICE_HIGH, 0);
        wr(t, REG_QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), 19);
        assert_eq!(rd(&mut t, REG_VENDOR_ID), VENDOR_ID);
        assert_eq!(rd(&mut t, REG_SHM_LEN_LOW), u32::MAX);
        // Bad widths and unknown registers read as zero, never panic.
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(rd(&mut t, 0x0f0), 0);
        t.write(REG_STATUS, &[1, 2]);
        wr(&mut t, 0x0f0, 5);
        assert_eq!(t.status(), 0);
        // Config space goes to the device, any width.
        let mut c = [0u8; 8];
        t.read(REG_CONFIG + 4, &mut c);
        assert_eq!(c, [4, 5, 6, 7, 8, 9, 10, 11]);
    }

    #[test]
    fn feature_negotiation() {
        let (mut t, _) = transport();
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 0);

        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Without VERSION_1 FEATURES_OK does not stick.
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        wr(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(rd(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // Asking for an unoffered feature is refused too.
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 3);
        wr(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(rd(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        wr(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(rd(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // Features are frozen once accepted.
        wr(&mut t, REG_DRIVER_FEATURES, 0);
        assert_eq!(t.driver_features, VIRTIO_F_VERSION_1 | 1);
    }

    #[test]
    fn queue_setup_activation_and_reset() {
        let (mut t, seen) = transport();
        let irq = t.interrupt.clone();
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 16);
        wr(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 8);
        wr(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0);
        wr(&mut t, REG_QUEUE_NUM, 4); // no such queue: ignored

        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        let feat_ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        wr(&mut t, REG_STATUS, feat_ok);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        wr(&mut t, REG_QUEUE_SEL, 1);
        wr(&mut t, REG_QUEUE_NUM, 3); // not a power of two: ignored
        setup_queue(&mut t, 1, 4, 0x2_0000);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
        wr(&mut t, REG_QUEUE_NOTIFY, 0); // before DRIVER_OK: ignored
        wr(&mut t, REG_STATUS, feat_ok | STATUS_DRIVER_OK);
        assert_eq!(rd(&mut t, REG_STATUS), feat_ok | STATUS_DRIVER_OK);
        let (features, qs) = seen.lock().unwrap().activated.clone().expect("activated");
        assert_eq!(features, VIRTIO_F_VERSION_1);
        assert_eq!(
            qs,
            vec![(8, 0x1_0000, 0x1_1000, 0x1_2000), (4, 0x2_0000, 0x2_1000, 0x2_2000)]
        );
        // Queue setup after DRIVER_OK is ignored; notifies reach the device.
        wr(&mut t, REG_QUEUE_DESC_LOW, 0x9000);
        wr(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(seen.lock().unwrap().notified, vec![1]);

        irq.trigger(1);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 1);
        wr(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);

        // Clearing bits without a reset is ignored; writing 0 resets.
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(rd(&mut t, REG_STATUS), feat_ok | STATUS_DRIVER_OK);
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(seen.lock().unwrap().resets, 1);
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        wr(&mut t, REG_QUEUE_NOTIFY, 0); // not active any more
        assert_eq!(seen.lock().unwrap().notified, vec![1]);
    }

    #[test]
    fn driver_ok_with_bad_queues_needs_reset() {
        let (mut t, seen) = transport();
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        let feat_ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        wr(&mut t, REG_STATUS, feat_ok);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        // Queue 1 lies outside guest memory.
        setup_queue(&mut t, 1, 8, 0xfff0_0000);
        wr(&mut t, REG_STATUS, feat_ok | STATUS_DRIVER_OK);
        assert_ne!(rd(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert!(seen.lock().unwrap().activated.is_none());
    }
}
