//! Comparing a saved guest's CPUID with a host's: the checks every x86_64
//! backend makes before it restores a snapshot.

use super::CpuidEntry;

fn find(entries: &[CpuidEntry], function: u32, index: u32) -> Option<CpuidEntry> {
    entries
        .iter()
        .find(|e| e.function == function && (e.flags & 1 == 0 || e.index == index))
        .copied()
}

/// (vendor, family, model, stepping) as CPUID leaves 0 and 1 give them.
fn cpu_model(entries: &[CpuidEntry]) -> (String, u32, u32, u32) {
    let vendor = find(entries, 0, 0).map_or_else(String::new, |e| {
        let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let sig = find(entries, 1, 0).map_or(0, |e| e.eax);
    let family = ((sig >> 8) & 0xf) + ((sig >> 20) & 0xff);
    let model = ((sig >> 4) & 0xf) | ((sig >> 12) & 0xf0);
    (vendor, family, model, sig & 0xf)
}

/// Checks that vCPUs saved with `saved` CPUID were running on this CPU
/// vendor, family, model and stepping as `host` (CPUID leaves 0 and 1).
pub fn check_cpu_model(saved: &[CpuidEntry], host: &[CpuidEntry]) -> crate::Result<()> {
    let (sv, sf, sm, ss) = cpu_model(saved);
    let (hv_, hf, hm, hs) = cpu_model(host);
    if (sv.as_str(), sf, sm, ss) != (hv_.as_str(), hf, hm, hs) {
        return Err(crate::Error::Invalid(format!(
            "the snapshot was taken on a {sv} CPU family {sf:#x} model {sm:#x} stepping {ss}; this host is {hv_} family {hf:#x} model {hm:#x} stepping {hs}"
        )));
    }
    Ok(())
}

/// Checks that no feature flag the saved guest was shown is missing from
/// `fresh`, the CPUID the host gives a new vCPU: a guest that uses an
/// instruction the host lacks would fault at some later point. Leaves 1
/// (ECX, EDX), 7.0 (EBX, ECX, EDX) and 0x80000001 (ECX, EDX).
pub fn check_cpu_features(saved: &[CpuidEntry], fresh: &[CpuidEntry]) -> crate::Result<()> {
    const HYPERVISOR: u32 = 1 << 31;
    const HTT: u32 = 1 << 28;
    // Bits that mirror what the guest OS enabled (CR4.OSXSAVE, CR4.PKE),
    // which KVM updates in the vCPU's CPUID as the guest sets them: a
    // fresh vCPU shows them clear.
    const OSXSAVE: u32 = 1 << 27;
    const OSPKE: u32 = 1 << 4;
    for (function, index) in [(1, 0), (7, 0), (0x8000_0001, 0)] {
        let (Some(s), Some(h)) = (find(saved, function, index), find(fresh, function, index))
        else {
            continue;
        };
        let regs: &[(&str, u32, u32, u32)] = match function {
            // The hypervisor bit and HTT follow the VM's own topology.
            1 => &[
                ("ecx", s.ecx, h.ecx, HYPERVISOR | OSXSAVE),
                ("edx", s.edx, h.edx, HTT),
            ],
            7 => &[
                ("ebx", s.ebx, h.ebx, 0),
                ("ecx", s.ecx, h.ecx, OSPKE),
                ("edx", s.edx, h.edx, 0),
            ],
            _ => &[("ecx", s.ecx, h.ecx, 0), ("edx", s.edx, h.edx, 0)],
        };
        for &(reg, saved_bits, host_bits, ours) in regs {
            let missing = saved_bits & !host_bits & !ours;
            if missing != 0 {
                return Err(crate::Error::Invalid(format!(
                    "the snapshot's guest uses CPU features this host lacks (CPUID {function:#x}.{index} {reg} bits {missing:#x})"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index: 0,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    /// "GenuineIntel" in EBX, EDX, ECX; family 6 model 0x55 stepping 7.
    fn intel(features_ecx: u32) -> Vec<CpuidEntry> {
        vec![
            leaf(0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            leaf(1, 0x0005_0657, 0, features_ecx, 0),
        ]
    }

    #[test]
    fn another_model_or_a_missing_feature_is_refused() {
        let saved = intel(0b1010);
        assert!(check_cpu_model(&saved, &intel(0)).is_ok());
        let mut other = intel(0b1010);
        other[1].eax = 0x0005_0656; // stepping 6
        let e = check_cpu_model(&saved, &other).unwrap_err().to_string();
        assert!(
            e.contains("GenuineIntel CPU family 0x6 model 0x55 stepping 7"),
            "{e}"
        );
        assert!(check_cpu_features(&saved, &intel(0b1110)).is_ok());
        let e = check_cpu_features(&saved, &intel(0b0010))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ecx bits 0x8"), "{e}");
        // The hypervisor bit follows the VM, not the host.
        assert!(check_cpu_features(&intel(1 << 31), &intel(0)).is_ok());
    }
}
