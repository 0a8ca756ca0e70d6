//! Per-vCPU CPUID: KVM's supported set with this vCPU's identity and the
//! VM's topology filled in.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Bits needed to number `count` cores: ceil(log2(count)).
fn id_bits(count: u32) -> u32 {
    count.next_power_of_two().trailing_zeros()
}

/// The guest sees one socket with `count` single-threaded cores; vCPU
/// `index` has APIC id `index`.
pub(crate) fn for_vcpu(supported: &CpuId, index: u32, count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors
                // per package, [15:8] CLFLUSH line size in 8-byte units.
                entry.ebx = (index << 24) | ((count & 0xff) << 16) | (8 << 8);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; [25:14]: threads sharing
                // this cache - 1 (one per core here).
                entry.eax &= 0x3fff;
                entry.eax |= (count - 1) << 26;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = index;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (TOPOLOGY_LEVEL_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = id_bits(count);
                        entry.ebx = count;
                        entry.ecx = (TOPOLOGY_LEVEL_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_AMD_SIZES => {
                // ECX[7:0]: cores per package - 1; [15:12]: APIC id bits.
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1);
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn identity_and_topology_are_per_vcpu() {
        let supported = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
        ])
        .unwrap();
        let c = for_vcpu(&supported, 2, 3);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].eax, e[1].ebx, e[1].edx), (0, 1, 2));
        assert_eq!(
            (e[2].eax, e[2].ebx, e[2].ecx >> 8),
            (2, 3, TOPOLOGY_LEVEL_CORE)
        );
        assert_eq!((e[3].ebx, e[3].ecx), (0, 2));
    }

    #[test]
    fn id_bits_round_up() {
        assert_eq!([1, 2, 3, 4, 5].map(id_bits), [0, 1, 2, 2, 3]);
    }
}
