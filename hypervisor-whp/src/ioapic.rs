//! An I/O APIC, emulated in the backend: WHP emulates each vCPU's local
//! APIC but has no I/O APIC, and the guest finds one in the MP table at
//! the address every PC has it. Its redirection table routes each
//! interrupt line to a vector and a local APIC, which `WHvRequestInterrupt`
//! then delivers.
//!
//! Architecture facts: the 82093AA datasheet (IOREGSEL at +0x00, IOWIN at
//! +0x10; ID, VER, ARB, then two 32-bit halves per redirection entry).

use supermachine_hypervisor::x86_64::IoapicState;

/// Where the I/O APIC is, as on every PC.
pub(crate) const BASE: u64 = 0xfec0_0000;
/// The window the guest may touch.
pub(crate) const SIZE: u64 = 0x1000;
/// Interrupt lines.
pub(crate) const PINS: usize = 24;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_REDIRECTION: u32 = 0x10;
/// VER: version 0x11, highest redirection entry 23.
const VERSION: u32 = 0x11 | ((PINS as u32 - 1) << 16);

/// Redirection entry bits.
const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const DELIVERY_STATUS: u64 = 1 << 12;
const LOGICAL: u64 = 1 << 11;
/// Bits the guest cannot write: delivery status and remote IRR.
const READ_ONLY: u64 = DELIVERY_STATUS | REMOTE_IRR;

/// Where one line's interrupt goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub vector: u8,
    /// 0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT.
    pub mode: u8,
    pub logical: bool,
    pub level: bool,
    pub destination: u8,
}

impl Delivery {
    /// The `WHV_INTERRUPT_CONTROL` this delivery is: its first 64 bits
    /// (type 7:0, destination mode 11:8, trigger mode 15:12), destination
    /// and vector; `None` for a delivery mode WHP cannot request.
    pub fn interrupt_control(&self) -> Option<(u64, u32, u32)> {
        let kind: u64 = match self.mode {
            0 => 0, // WHvX64InterruptTypeFixed
            1 => 1, // WHvX64InterruptTypeLowestPriority
            4 => 4, // WHvX64InterruptTypeNmi
            _ => return None,
        };
        let bits = kind | (u64::from(self.logical) << 8) | (u64::from(self.level) << 12);
        Some((bits, u32::from(self.destination), u32::from(self.vector)))
    }
}

/// The I/O APIC's registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ioapic {
    id: u32,
    select: u32,
    redirection: [u64; PINS],
}

impl Ioapic {
    /// An I/O APIC out of reset, every line masked, with APIC id `id`
    /// (the MP table's).
    pub fn new(id: u32) -> Self {
        Self {
            id: id & 0xf,
            select: 0,
            redirection: [MASKED; PINS],
        }
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            IOREGSEL => self.select,
            IOWIN => self.register(self.select),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value & 0xff,
            IOWIN => self.set_register(self.select, value),
            _ => {}
        }
    }

    fn register(&self, select: u32) -> u32 {
        match select {
            REG_ID | REG_ARBITRATION => self.id << 24,
            REG_VERSION => VERSION,
            r if r >= REG_REDIRECTION => {
                let pin = ((r - REG_REDIRECTION) / 2) as usize;
                match self.redirection.get(pin) {
                    Some(&entry) if r % 2 == 0 => entry as u32,
                    Some(&entry) => (entry >> 32) as u32,
                    None => 0,
                }
            }
            _ => 0,
        }
    }

    fn set_register(&mut self, select: u32, value: u32) {
        match select {
            REG_ID => self.id = (value >> 24) & 0xf,
            r if r >= REG_REDIRECTION => {
                let pin = ((r - REG_REDIRECTION) / 2) as usize;
                let Some(entry) = self.redirection.get_mut(pin) else {
                    return;
                };
                if r % 2 == 0 {
                    let low = u64::from(value) & !READ_ONLY;
                    *entry = (*entry & !0xffff_ffff) | (*entry & READ_ONLY) | low;
                } else {
                    *entry = (*entry & 0xffff_ffff) | (u64::from(value) << 32);
                }
            }
            _ => {}
        }
    }

    /// Where an edge on `pin` goes, or `None` if the line is masked or
    /// does not exist.
    pub fn route(&self, pin: usize) -> Option<Delivery> {
        let entry = *self.redirection.get(pin)?;
        if entry & MASKED != 0 {
            return None;
        }
        Some(Delivery {
            vector: entry as u8,
            mode: ((entry >> 8) & 0x7) as u8,
            logical: entry & LOGICAL != 0,
            level: entry & LEVEL != 0,
            destination: (entry >> 56) as u8,
        })
    }

    /// The state a snapshot keeps, in the shape KVM's I/O APIC has.
    pub fn state(&self) -> IoapicState {
        IoapicState {
            base_address: BASE,
            ioregsel: self.select,
            id: self.id,
            irr: 0,
            redirection: self.redirection,
        }
    }

    /// The I/O APIC a snapshot describes; refuses one at another address.
    pub fn from_state(state: &IoapicState) -> Result<Self, String> {
        if state.base_address != BASE {
            return Err(format!(
                "the saved I/O APIC is at {:#x}; this machine has it at {BASE:#x}",
                state.base_address
            ));
        }
        Ok(Self {
            id: state.id & 0xf,
            select: state.ioregsel & 0xff,
            redirection: state.redirection,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_reg(ioapic: &mut Ioapic, select: u32, value: u32) {
        ioapic.write(IOREGSEL, &select.to_le_bytes());
        ioapic.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(ioapic: &Ioapic, select: u32) -> u32 {
        let mut ioapic = ioapic.clone();
        ioapic.write(IOREGSEL, &select.to_le_bytes());
        let mut data = [0u8; 4];
        ioapic.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn a_line_routes_once_the_guest_unmasks_it() {
        let mut ioapic = Ioapic::new(1);
        assert_eq!(read_reg(&ioapic, REG_ID), 1 << 24);
        assert_eq!(read_reg(&ioapic, REG_VERSION), 0x0017_0011);
        assert_eq!(ioapic.route(4), None, "lines start masked");
        // Linux's setup of the serial line: vector 0x24, fixed, physical,
        // edge, to APIC 0; high half first, then the low half unmasks it.
        write_reg(&mut ioapic, REG_REDIRECTION + 9, 0);
        write_reg(&mut ioapic, REG_REDIRECTION + 8, 0x24);
        let delivery = ioapic.route(4).unwrap();
        assert_eq!(
            delivery,
            Delivery {
                vector: 0x24,
                mode: 0,
                logical: false,
                level: false,
                destination: 0
            }
        );
        assert_eq!(delivery.interrupt_control(), Some((0, 0, 0x24)));
        // Logical, lowest priority, level, to APICs 0b11.
        write_reg(&mut ioapic, REG_REDIRECTION + 11, 3 << 24);
        write_reg(
            &mut ioapic,
            REG_REDIRECTION + 10,
            0x31 | (1 << 8) | (1 << 11) | (1 << 15),
        );
        let (bits, destination, vector) = ioapic.route(5).unwrap().interrupt_control().unwrap();
        assert_eq!(
            (bits, destination, vector),
            (1 | (1 << 8) | (1 << 12), 3, 0x31)
        );
        // ExtINT has no WHP interrupt type.
        write_reg(&mut ioapic, REG_REDIRECTION + 12, 7 << 8);
        assert_eq!(ioapic.route(6).unwrap().interrupt_control(), None);
        assert_eq!(ioapic.route(PINS), None);
    }

    #[test]
    fn read_only_bits_and_unknown_registers_ignore_writes() {
        let mut ioapic = Ioapic::new(0);
        write_reg(&mut ioapic, REG_REDIRECTION, 0x30 | (1 << 12) | (1 << 14));
        assert_eq!(read_reg(&ioapic, REG_REDIRECTION), 0x30);
        write_reg(&mut ioapic, REG_VERSION, 0);
        assert_eq!(read_reg(&ioapic, REG_VERSION), VERSION);
        // Past the last entry: nothing there, nothing changes.
        write_reg(&mut ioapic, REG_REDIRECTION + 2 * PINS as u32, 0xffff_ffff);
        assert_eq!(read_reg(&ioapic, REG_REDIRECTION + 2 * PINS as u32), 0);
    }

    #[test]
    fn state_round_trips_and_another_address_is_refused() {
        let mut ioapic = Ioapic::new(2);
        write_reg(&mut ioapic, REG_REDIRECTION + 4, 0x41);
        let state = ioapic.state();
        assert_eq!(state.redirection[2], 0x41);
        assert_eq!(Ioapic::from_state(&state).unwrap(), ioapic);
        let moved = IoapicState {
            base_address: 0xfec1_0000,
            ..state
        };
        assert!(
            Ioapic::from_state(&moved)
                .unwrap_err()
                .contains("0xfec10000")
        );
    }
}
