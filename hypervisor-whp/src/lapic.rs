//! The local APIC's state between WHP and the state types.
//!
//! `WHvGetVirtualProcessorInterruptControllerState2` gives the xAPIC
//! register page (4 KiB, each 32-bit register on a 16-byte stride). The
//! state types keep the page's first KiB, as KVM's `kvm_lapic_state` does:
//! every register the architecture defines lies below 0x400.

/// The page WHP reads and writes.
pub(crate) const PAGE_SIZE: usize = 4096;
/// What a snapshot keeps of it.
pub(crate) const SAVED_SIZE: usize = 1024;

/// The saved form of the APIC page WHP returned.
pub(crate) fn saved(page: &[u8]) -> Result<Vec<u8>, String> {
    page.get(..SAVED_SIZE).map(<[u8]>::to_vec).ok_or_else(|| {
        format!(
            "WHP returned {} bytes of APIC state, not a page",
            page.len()
        )
    })
}

/// The APIC page to give WHP for saved registers.
pub(crate) fn page(saved: &[u8]) -> Result<Vec<u8>, String> {
    if saved.len() != SAVED_SIZE {
        return Err(format!(
            "the saved local APIC has {} bytes, not {SAVED_SIZE}",
            saved.len()
        ));
    }
    let mut page = vec![0u8; PAGE_SIZE];
    page[..SAVED_SIZE].copy_from_slice(saved);
    Ok(page)
}

/// The APIC id in a saved page (xAPIC ID register, offset 0x20, bits
/// 31:24).
pub(crate) fn apic_id(saved: &[u8]) -> Option<u8> {
    saved.get(0x23).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_keeps_its_registers_across_the_conversion() {
        let mut whp = vec![0u8; PAGE_SIZE];
        whp[0x20..0x24].copy_from_slice(&(3u32 << 24).to_le_bytes()); // ID
        whp[0xf0..0xf4].copy_from_slice(&0x1ffu32.to_le_bytes()); // SVR
        whp[0x380..0x384].copy_from_slice(&1_000_000u32.to_le_bytes()); // timer
        let kept = saved(&whp).unwrap();
        assert_eq!(kept.len(), SAVED_SIZE);
        assert_eq!(apic_id(&kept), Some(3));
        assert_eq!(page(&kept).unwrap(), whp);
        assert!(saved(&whp[..512]).is_err());
        assert!(page(&whp).unwrap_err().contains("4096 bytes"));
    }
}
