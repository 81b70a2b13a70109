//! Helpers of the privileged tests: the root gate, private pin directories, private network
//! namespaces and packet builders.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use palisade_datapath::{Datapath, Limits};

pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// Whether privileged tests run. They need root (BPF, bpffs, TCX); without it they fail,
/// unless PALISADE_SKIP_PRIVILEGED=1 asks explicitly to skip them.
pub fn privileged() -> bool {
    if std::env::var("PALISADE_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("PALISADE_SKIP_PRIVILEGED=1: skipping a privileged test");
        return false;
    }
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("Uid line");
    assert!(
        euid == "0",
        "privileged datapath tests need root (BPF maps and programs, bpffs, TCX); \
         run them as root, or set PALISADE_SKIP_PRIVILEGED=1 to skip them explicitly"
    );
    true
}

/// A pin directory of its own under /sys/fs/bpf, removed (maps, links and all) on drop.
pub struct PinDir(PathBuf);

static NEXT: AtomicU32 = AtomicU32::new(0);

impl PinDir {
    pub fn new(test: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/palisade-test-{}-{n}-{test}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        PinDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Small maps: every test creates its own set.
pub const LIMITS: Limits = Limits {
    endpoints: Some(64),
    ipcache: Some(256),
    policy_tables: Some(64),
    conntrack: Some(1024),
    events_bytes: Some(256 * 1024),
};

pub fn open(pin: &PinDir) -> Datapath {
    Datapath::open_with(pin.path(), &LIMITS).expect("open the datapath")
}

/// Runs `f` on a new thread in a new network namespace of its own (it goes away with the
/// thread). Child processes the closure starts inherit that namespace.
pub fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        unshare_net();
        f()
    })
    .join()
    .expect("netns thread")
}

/// Moves the calling thread into a new network namespace.
pub fn unshare_net() {
    #[allow(unsafe_code)]
    // SAFETY: unshare takes no pointers; CLONE_NEWNET affects only the calling thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
}

/// The kernel id of the calling thread.
pub fn gettid() -> i32 {
    #[allow(unsafe_code)]
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe {
        libc::gettid()
    }
}

pub fn ip(args: &str) {
    let out = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- packets ----

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet (no Ethernet header).
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

pub fn tcp_header(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

pub fn udp_header(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

pub fn icmp_header(ty: u8, code: u8, id: u16, rest: &[u8]) -> Vec<u8> {
    let mut i = vec![ty, code, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&1u16.to_be_bytes());
    i.extend_from_slice(rest);
    let c = checksum(&i);
    i[2..4].copy_from_slice(&c.to_be_bytes());
    i
}

pub fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    eth(
        0x0800,
        &ipv4(src, dst, TCP, &tcp_header(sport, dport, flags)),
    )
}

pub fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    eth(
        0x0800,
        &ipv4(src, dst, UDP, &udp_header(sport, dport, b"hello")),
    )
}

pub fn icmp4(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, id: u16) -> Vec<u8> {
    eth(
        0x0800,
        &ipv4(src, dst, ICMP, &icmp_header(ty, 0, id, b"ping")),
    )
}

/// An ICMP error from `src` to `dst` quoting `quoted` (an IPv4 packet, no Ethernet header).
pub fn icmp4_error(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let quote = &quoted[..quoted.len().min(28)];
    let mut i = vec![ty, code, 0, 0, 0, 0, 0, 0];
    i.extend_from_slice(quote);
    let c = checksum(&i);
    i[2..4].copy_from_slice(&c.to_be_bytes());
    eth(0x0800, &ipv4(src, dst, ICMP, &i))
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(l4);
    h
}

pub fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    eth(
        0x86dd,
        &ipv6(src, dst, TCP, &tcp_header(sport, dport, flags)),
    )
}

pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, ty: u8, id: u16) -> Vec<u8> {
    // Checksums are not verified by the programs; leave the pseudo-header sum out.
    eth(
        0x86dd,
        &ipv6(src, dst, ICMPV6, &icmp_header(ty, 0, id, &[0; 16])),
    )
}

pub fn arp() -> Vec<u8> {
    eth(
        0x0806,
        &[
            0, 1, 8, 0, 6, 4, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    )
}
