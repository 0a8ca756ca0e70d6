//! Decoding what a WHP exit reports, and completing port reads.

/// `WHV_RUN_VP_EXIT_REASON`s the backend handles.
pub(crate) mod reason {
    pub const MEMORY_ACCESS: i32 = 1;
    pub const IO_PORT_ACCESS: i32 = 2;
    pub const UNRECOVERABLE_EXCEPTION: i32 = 4;
    pub const INVALID_VP_REGISTER_VALUE: i32 = 5;
    pub const UNSUPPORTED_FEATURE: i32 = 6;
    pub const INTERRUPT_WINDOW: i32 = 7;
    pub const HALT: i32 = 8;
    pub const APIC_EOI: i32 = 9;
    pub const MSR_ACCESS: i32 = 0x1000;
    pub const CANCELED: i32 = 0x2001;
}

/// A port access as `WHV_X64_IO_PORT_ACCESS_INFO` describes it: is-write
/// (0), access size (3:1), string instruction (4), REP prefix (5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PortAccess {
    pub port: u16,
    pub size: usize,
    pub write: bool,
    pub string: bool,
}

impl PortAccess {
    pub fn decode(port: u16, info: u32) -> Self {
        Self {
            port,
            size: ((info >> 1) & 0x7) as usize,
            write: info & 1 != 0,
            string: info & ((1 << 4) | (1 << 5)) != 0,
        }
    }

    /// Whether this is an access a single `IoIn`/`IoOut` can carry.
    pub fn is_simple(&self) -> bool {
        !self.string && matches!(self.size, 1 | 2 | 4)
    }

    /// The bytes an OUT writes, from RAX.
    pub fn out_data(&self, rax: u64) -> [u8; 4] {
        (rax as u32).to_le_bytes()
    }

    /// RAX after an IN of `data`: IN AL and IN AX keep the rest of RAX;
    /// IN EAX writes EAX, which clears the upper half.
    pub fn rax_after_in(&self, rax: u64, data: &[u8]) -> u64 {
        let mut bytes = [0u8; 4];
        let n = self.size.min(data.len()).min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u64::from(u32::from_le_bytes(bytes));
        match self.size {
            1 => (rax & !0xff) | (value & 0xff),
            2 => (rax & !0xffff) | (value & 0xffff),
            _ => value,
        }
    }
}

/// The instruction length in a `WHV_VP_EXIT_CONTEXT` (bits 3:0 of the
/// byte after the execution state).
pub(crate) fn instruction_length(bitfield: u8) -> u64 {
    u64::from(bitfield & 0xf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_accesses_decode_and_complete_as_the_instruction_would() {
        // OUT DX, AL to the serial port.
        let out = PortAccess::decode(0x3f8, 1 | (1 << 1));
        assert_eq!(
            out,
            PortAccess {
                port: 0x3f8,
                size: 1,
                write: true,
                string: false
            }
        );
        assert!(out.is_simple());
        assert_eq!(out.out_data(0x1234_5678_9abc_de41)[0], 0x41);
        // IN AL keeps the rest of RAX.
        let in_al = PortAccess::decode(0x3fd, 1 << 1);
        assert_eq!(
            in_al.rax_after_in(0xffff_ffff_ffff_ff00, &[0x60]),
            0xffff_ffff_ffff_ff60
        );
        // IN AX likewise.
        let in_ax = PortAccess::decode(0x60, 2 << 1);
        assert_eq!(
            in_ax.rax_after_in(0xaaaa_aaaa_aaaa_aaaa, &[1, 2]),
            0xaaaa_aaaa_aaaa_0201
        );
        // IN EAX clears the upper half.
        let in_eax = PortAccess::decode(0xcfc, 4 << 1);
        assert_eq!(in_eax.rax_after_in(u64::MAX, &[1, 2, 3, 4]), 0x0403_0201);
        // REP INSB is not one access.
        let rep_ins = PortAccess::decode(0x1f0, (1 << 1) | (1 << 4) | (1 << 5));
        assert!(!rep_ins.is_simple());
    }

    #[test]
    fn exit_context_fields_decode() {
        assert_eq!(instruction_length(0x23), 3);
    }
}
