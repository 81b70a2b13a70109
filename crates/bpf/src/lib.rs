//! The datapath's eBPF objects, compiled from `bpf/progs/*.bpf.c` by `build.rs` (clang,
//! `-O2 -g -target bpf -mcpu=v3`) and embedded, one object per attach point.
//!
//! Both objects declare the same maps with `LIBBPF_PIN_BY_NAME`, so loading them with the same
//! pin directory makes them share every map. If clang or the libbpf headers were missing at
//! build time the objects are empty; [`check`] reports that.

#![forbid(unsafe_code)]

/// Aligns embedded bytes to 8, as ELF parsing wants (like `aya::include_bytes_aligned!`).
#[repr(C, align(8))]
struct Aligned<B: ?Sized> {
    bytes: B,
}

static FROM_CONTAINER_ALIGNED: &Aligned<[u8]> = &Aligned {
    bytes: *include_bytes!(concat!(env!("OUT_DIR"), "/from_container.o")),
};
static TO_CONTAINER_ALIGNED: &Aligned<[u8]> = &Aligned {
    bytes: *include_bytes!(concat!(env!("OUT_DIR"), "/to_container.o")),
};

/// `bpf/progs/from_container.bpf.c`: program `from_container` (section
/// `classifier/from_container`), for TCX ingress of a pod's host-side veth — the pod's egress
/// policy and anti-spoofing.
pub const FROM_CONTAINER: &[u8] = &FROM_CONTAINER_ALIGNED.bytes;

/// `bpf/progs/to_container.bpf.c`: program `to_container` (section `classifier/to_container`),
/// for TCX egress of a pod's host-side veth — the pod's ingress policy.
pub const TO_CONTAINER: &[u8] = &TO_CONTAINER_ALIGNED.bytes;

/// Name of the program in [`FROM_CONTAINER`].
pub const FROM_CONTAINER_PROGRAM: &str = "from_container";
/// Name of the program in [`TO_CONTAINER`].
pub const TO_CONTAINER_PROGRAM: &str = "to_container";

/// The objects were not built (clang or libbpf-dev missing at build time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotBuilt;

impl std::fmt::Display for NotBuilt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the eBPF objects were not built: install clang and libbpf-dev (scripts/install-deps.sh) and rebuild",
        )
    }
}

impl std::error::Error for NotBuilt {}

/// `Ok` if the embedded objects are real ELF files.
pub fn check() -> Result<(), NotBuilt> {
    let elf = |b: &[u8]| b.starts_with(b"\x7fELF");
    if elf(FROM_CONTAINER) && elf(TO_CONTAINER) {
        Ok(())
    } else {
        Err(NotBuilt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_built_and_aligned() {
        check().expect("clang and libbpf-dev are needed to build the eBPF objects");
        assert_eq!(FROM_CONTAINER.as_ptr() as usize % 8, 0);
        assert_eq!(TO_CONTAINER.as_ptr() as usize % 8, 0);
    }
}
