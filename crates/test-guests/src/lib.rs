//! Tiny bare-metal guests for tests and benchmarks, as ELF `vmlinux`
//! files that any VMM booting Linux the 64-bit way can load and enter
//! (one `PT_LOAD` at 1 MiB, entered in long mode with paging on): our
//! `supermachine boot` and Firecracker alike, natively even where a Linux
//! kernel cannot boot.
//!
//! The **counting guest** increments a 64-bit counter in guest memory
//! forever and, each time the counter reaches a multiple of
//! 2^`report_shift`, writes `counter >> report_shift` as eight hex digits
//! and a newline to the COM1 data port (0x3f8). Its whole state is in
//! memory and registers, so a snapshot restored correctly continues with
//! exactly the next number.

use iced_x86::code_asm::*;

/// Where the guest program is loaded and entered.
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Where the counter lives in guest memory.
pub const COUNTER_ADDR: u64 = 0x20_0000;
/// The port the reports go to (COM1's data register).
pub const REPORT_PORT: u16 = 0x3f8;

/// The counting guest as an ELF vmlinux.
pub fn counting_guest(report_shift: u32) -> Vec<u8> {
    elf_vmlinux(&counting_code(report_shift))
}

/// The counting guest's code alone, to be entered at [`LOAD_ADDR`] in 64-bit mode.
pub fn counting_code(report_shift: u32) -> Vec<u8> {
    assert!((1..32).contains(&report_shift), "report_shift out of range");
    let build = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        let mut top = a.create_label();
        let mut digit = a.create_label();
        let mut decimal = a.create_label();
        a.mov(rdi, COUNTER_ADDR)?;
        a.set_label(&mut top)?;
        a.inc(qword_ptr(rdi))?;
        a.mov(rax, qword_ptr(rdi))?;
        a.test(eax, ((1u64 << report_shift) - 1) as u32)?;
        a.jnz(top)?;
        a.mov(rbx, rax)?;
        a.shr(rbx, report_shift)?;
        a.mov(ecx, 8u32)?;
        a.mov(edx, u32::from(REPORT_PORT))?;
        a.set_label(&mut digit)?;
        a.rol(ebx, 4)?;
        a.mov(eax, ebx)?;
        a.and(eax, 0xfu32)?;
        a.cmp(eax, 10u32)?;
        a.jb(decimal)?;
        a.add(eax, i32::from(b'a' - b'0' - 10))?;
        a.set_label(&mut decimal)?;
        a.add(eax, i32::from(b'0'))?;
        a.out(dx, al)?;
        a.dec(ecx)?;
        a.jnz(digit)?;
        a.mov(al, b'\n' as u32)?;
        a.out(dx, al)?;
        a.jmp(top)
    };
    let mut a = CodeAssembler::new(64).expect("64-bit assembler");
    build(&mut a).expect("the counting guest assembles");
    a.assemble(LOAD_ADDR).expect("the counting guest assembles")
}

/// Wraps 64-bit code entered at its first byte into an ELF executable
/// whose one segment loads at [`LOAD_ADDR`].
fn elf_vmlinux(code: &[u8]) -> Vec<u8> {
    const CODE_OFFSET: u64 = 0x1000;
    let mut elf = Vec::with_capacity(CODE_OFFSET as usize + code.len());
    // ELF header.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    // The one program header: PT_LOAD, read + execute.
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    elf.extend_from_slice(&CODE_OFFSET.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(code);
    elf
}

/// The numbers in a counting guest's console output, in order (a partial
/// last line is left out).
pub fn reports(console: &str) -> Vec<u64> {
    console
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .filter_map(|l| u64::from_str_radix(l.trim(), 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_has_one_segment_at_one_mib() {
        let elf = counting_guest(20);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(
            u64::from_le_bytes(elf[24..32].try_into().unwrap_or_default()),
            LOAD_ADDR
        );
        assert!(elf.len() > 0x1000);
    }

    #[test]
    fn reports_skip_a_partial_line() {
        assert_eq!(reports("00000001\n0000000a\n000"), vec![1, 10]);
    }
}
