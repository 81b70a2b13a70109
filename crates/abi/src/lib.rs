//! The datapath ABI: `#[repr(C)]` mirrors of every map key, map value and event struct of
//! `bpf/lib/abi.h`, and its `#define` constants.
//!
//! The C header is the source of truth. Field names are the C names; every struct is
//! explicitly padded in C, so none of these has implicit padding. `tests/layout.rs` compiles a
//! C probe against the header and checks every size, field offset and constant here.
//!
//! Byte order: addresses and ports marked "network order" hold the wire bytes. A `u16` port
//! field in network order (`CtKey::sport`, `FlowEvent::dport`, …) is read with
//! `u16::from_be(field)`; the helpers below do that.
//!
//! With the `aya` feature every struct implements `aya::Pod`, so it can be a map key or value.

#![cfg_attr(not(feature = "aya"), forbid(unsafe_code))]

pub const PAL_FAMILY_IPV4: u32 = 4;
pub const PAL_FAMILY_IPV6: u32 = 6;

pub const PAL_IPCACHE_F_ENDPOINT: u32 = 1;

pub const PAL_EP_F_ENFORCE_INGRESS: u32 = 1;
pub const PAL_EP_F_ENFORCE_EGRESS: u32 = 2;
pub const PAL_EP_F_AUDIT: u32 = 4;
pub const PAL_EP_F_FAIL_CLOSED: u32 = 8;
pub const PAL_EP_F_AUDIT_DEFAULT_INGRESS: u32 = 16;
pub const PAL_EP_F_AUDIT_DEFAULT_EGRESS: u32 = 32;

pub const PAL_DIR_INGRESS: u32 = 0;
pub const PAL_DIR_EGRESS: u32 = 1;

pub const PAL_VERDICT_ALLOW: u8 = 1;
pub const PAL_VERDICT_DENY: u8 = 2;
pub const PAL_VERDICT_REDIRECT: u8 = 3;

pub const PAL_POLICY_F_AUDIT: u8 = 1;

pub const PAL_CT_F_EGRESS_OK: u32 = 1;
pub const PAL_CT_F_INGRESS_OK: u32 = 2;
pub const PAL_CT_F_AUDIT: u32 = 4;
pub const PAL_CT_F_REDIRECT: u32 = 8;

pub const PAL_REASON_NONE: u8 = 0;
pub const PAL_REASON_POLICY_DENY: u8 = 1;
pub const PAL_REASON_POLICY_DEFAULT: u8 = 2;
pub const PAL_REASON_SPOOFED: u8 = 3;
pub const PAL_REASON_FAIL_CLOSED: u8 = 4;
pub const PAL_REASON_MALFORMED: u8 = 5;
pub const PAL_REASON_MAX: u8 = 6;

pub const PAL_METRICS_ENTRIES: u32 = PAL_REASON_MAX as u32 * 2;

pub const PAL_EVENT_POLICY_VERDICT: u8 = 1;
pub const PAL_EVENT_DROP: u8 = 2;

pub const PAL_OUTCOME_FORWARDED: u8 = 1;
pub const PAL_OUTCOME_DROPPED: u8 = 2;
pub const PAL_OUTCOME_AUDIT: u8 = 3;

/// Bits of an LPM key before the data: the `prefixlen` field of [`IpcacheKey`] and
/// [`PolicyKey`].
pub const LPM_PREFIXLEN_BITS: u32 = 32;

/// Policy LPM prefix length that matches an identity on every protocol and port.
pub const POLICY_PREFIX_IDENTITY: u32 = 32;
/// Policy LPM prefix length that matches an identity on one protocol, every port.
pub const POLICY_PREFIX_PROTO: u32 = 40;
/// Policy LPM prefix length of an exact (identity, protocol, port) key.
pub const POLICY_PREFIX_FULL: u32 = 56;

/// `struct ipcache_key`: LPM key, address prefix → identity. `prefixlen` counts the 32 bits of
/// `family` plus the address bits.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IpcacheKey {
    pub prefixlen: u32,
    pub family: u32,
    /// Network order; IPv4 uses the first 4 bytes.
    pub addr: [u8; 16],
}

/// The data part of [`IpcacheKey`] (everything after `prefixlen`): what
/// `aya::maps::lpm_trie::Key<IpcacheKeyData>` wraps. `Key::new(k.prefixlen, data)` has the
/// layout of `IpcacheKey` byte for byte (checked by the layout test).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IpcacheKeyData {
    pub family: u32,
    pub addr: [u8; 16],
}

impl IpcacheKey {
    /// Splits the key into `(prefixlen, data)` as aya's LPM `Key` wants them.
    pub fn split(&self) -> (u32, IpcacheKeyData) {
        (
            self.prefixlen,
            IpcacheKeyData {
                family: self.family,
                addr: self.addr,
            },
        )
    }

    pub fn join(prefixlen: u32, data: IpcacheKeyData) -> Self {
        Self {
            prefixlen,
            family: data.family,
            addr: data.addr,
        }
    }
}

/// `struct ipcache_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IpcacheValue {
    pub identity: u32,
    /// `PAL_IPCACHE_F_*`.
    pub flags: u32,
}

/// `struct endpoint_key`: host-side veth ifindex.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EndpointKey {
    pub ifindex: u32,
}

/// `struct endpoint_value`: the pod behind a host-side veth.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EndpointValue {
    pub endpoint_id: u32,
    pub identity: u32,
    /// `PAL_EP_F_*`.
    pub flags: u32,
    /// Bit 0: `ipv4` is set; bit 1: `ipv6` is set.
    pub family_mask: u32,
    /// Network order.
    pub ipv4: [u8; 4],
    /// Network order.
    pub ipv6: [u8; 16],
}

/// `struct policy_outer_key`: (endpoint, direction) → that direction's table.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PolicyOuterKey {
    pub endpoint_id: u32,
    /// `PAL_DIR_*`.
    pub direction: u32,
}

/// `struct policy_key`, the whole LPM key of a policy table: identity (32 bits, host order,
/// matched whole), protocol (8 bits), destination port (16 bits, network order). See
/// [`POLICY_PREFIX_IDENTITY`], [`POLICY_PREFIX_PROTO`], [`POLICY_PREFIX_FULL`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PolicyKey {
    pub prefixlen: u32,
    pub identity: u32,
    pub protocol: u8,
    /// Network order.
    pub dport: [u8; 2],
    pub pad: u8,
}

/// The data part of [`PolicyKey`] (everything after `prefixlen`): what
/// `aya::maps::lpm_trie::Key<PolicyKeyData>` wraps. aya's `Key<K>` is `repr(C, packed)`
/// `{ prefix_len: u32, data: K }`, so `Key::new(k.prefixlen, data)` has the layout of
/// `PolicyKey` byte for byte (checked by the layout test).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PolicyKeyData {
    pub identity: u32,
    pub protocol: u8,
    /// Network order.
    pub dport: [u8; 2],
    pub pad: u8,
}

impl PolicyKey {
    /// The destination port in host order.
    pub fn port(&self) -> u16 {
        u16::from_be_bytes(self.dport)
    }

    /// Splits the key into `(prefixlen, data)` as aya's LPM `Key` wants them.
    pub fn split(&self) -> (u32, PolicyKeyData) {
        (
            self.prefixlen,
            PolicyKeyData {
                identity: self.identity,
                protocol: self.protocol,
                dport: self.dport,
                pad: self.pad,
            },
        )
    }

    pub fn join(prefixlen: u32, data: PolicyKeyData) -> Self {
        Self {
            prefixlen,
            identity: data.identity,
            protocol: data.protocol,
            dport: data.dport,
            pad: data.pad,
        }
    }

    /// The key's data bytes in memory order, as the kernel's LPM trie compares them.
    pub fn data_bytes(&self) -> [u8; 8] {
        let id = self.identity.to_ne_bytes();
        [
            id[0],
            id[1],
            id[2],
            id[3],
            self.protocol,
            self.dport[0],
            self.dport[1],
            self.pad,
        ]
    }
}

/// `struct policy_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PolicyValue {
    /// `PAL_VERDICT_*`.
    pub verdict: u8,
    /// `PAL_POLICY_F_*`.
    pub flags: u8,
    /// Host order; for `PAL_VERDICT_REDIRECT`.
    pub proxy_port: u16,
    /// The engine's rule that decided, for flows.
    pub rule_id: u32,
}

/// `struct ct_key`: the 5-tuple in the direction of the first packet.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network order; ICMP: echo id.
    pub sport: u16,
    /// Network order; ICMP: 0.
    pub dport: u16,
    pub protocol: u8,
    /// `PAL_FAMILY_*`.
    pub family: u8,
    pub pad: [u8; 2],
}

/// `struct ct_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// `PAL_CT_F_*`.
    pub flags: u32,
    pub rule_id: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// `struct metrics_value`: one per-CPU slot of the metrics array, indexed by
/// `reason * 2 + direction`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}

/// `struct flow_event`: one ring-buffer record.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FlowEvent {
    pub timestamp_ns: u64,
    /// `PAL_EVENT_*`.
    pub r#type: u8,
    /// `PAL_OUTCOME_*`.
    pub outcome: u8,
    /// `PAL_REASON_*`.
    pub reason: u8,
    /// `PAL_DIR_*`.
    pub direction: u8,
    pub protocol: u8,
    /// `PAL_FAMILY_*`.
    pub family: u8,
    pub tcp_flags: u8,
    pub pad: u8,
    pub endpoint_id: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub rule_id: u32,
    /// Network order.
    pub saddr: [u8; 16],
    /// Network order.
    pub daddr: [u8; 16],
    /// Network order; ICMP: echo id.
    pub sport: u16,
    /// Network order; ICMP: the type, in host order's low byte after conversion.
    pub dport: u16,
    pub ifindex: u32,
}

impl FlowEvent {
    /// Parses a ring-buffer record; `None` if it is too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..std::mem::size_of::<Self>())?;
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[0..8]);
        let mut saddr = [0u8; 16];
        saddr.copy_from_slice(&b[32..48]);
        let mut daddr = [0u8; 16];
        daddr.copy_from_slice(&b[48..64]);
        Some(Self {
            timestamp_ns: u64::from_ne_bytes(ts),
            r#type: b[8],
            outcome: b[9],
            reason: b[10],
            direction: b[11],
            protocol: b[12],
            family: b[13],
            tcp_flags: b[14],
            pad: b[15],
            endpoint_id: u32_at(16),
            src_identity: u32_at(20),
            dst_identity: u32_at(24),
            rule_id: u32_at(28),
            saddr,
            daddr,
            sport: u16_at(64),
            dport: u16_at(66),
            ifindex: u32_at(68),
        })
    }

    /// Source port in host order.
    pub fn sport_host(&self) -> u16 {
        u16::from_be(self.sport)
    }

    /// Destination port in host order (for ICMP: the type).
    pub fn dport_host(&self) -> u16 {
        u16::from_be(self.dport)
    }
}

/// `struct ratelimit_state`: per-CPU token bucket of the event rate limit.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RatelimitState {
    pub last_ns: u64,
    pub tokens: u64,
    /// Events dropped by the limit or a full ring buffer.
    pub lost: u64,
}

/// `struct ratelimit_config`: tokens refill at `rate` per second up to `burst`; `rate` 0 means
/// unlimited.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RatelimitConfig {
    pub rate: u64,
    pub burst: u64,
}

#[cfg(feature = "aya")]
mod pod {
    use super::{
        CtKey, CtValue, EndpointKey, EndpointValue, FlowEvent, IpcacheKey, IpcacheKeyData,
        IpcacheValue, MetricsValue, PolicyKey, PolicyKeyData, PolicyOuterKey, PolicyValue,
        RatelimitConfig, RatelimitState,
    };

    macro_rules! pod {
        ($($t:ty),+ $(,)?) => {
            $(
                // SAFETY: `aya::Pod` types are copied to and from kernel map memory as raw
                // bytes. Each type here is `#[repr(C)]`, `Copy`, built only from integers and
                // integer arrays (every bit pattern is a valid value) and has no implicit
                // padding (the C header pads explicitly; tests/layout.rs checks that each size
                // equals the sum of its fields), so no uninitialised byte is ever read.
                #[allow(unsafe_code)]
                unsafe impl aya::Pod for $t {}
            )+
        };
    }

    pod!(
        IpcacheKey,
        IpcacheKeyData,
        IpcacheValue,
        EndpointKey,
        EndpointValue,
        PolicyOuterKey,
        PolicyKey,
        PolicyKeyData,
        PolicyValue,
        CtKey,
        CtValue,
        MetricsValue,
        FlowEvent,
        RatelimitState,
        RatelimitConfig,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_event_round_trips_through_bytes() {
        let e = FlowEvent {
            timestamp_ns: 0x0102_0304_0506_0708,
            r#type: PAL_EVENT_DROP,
            outcome: PAL_OUTCOME_DROPPED,
            reason: PAL_REASON_SPOOFED,
            direction: 1,
            protocol: 6,
            family: 4,
            tcp_flags: 2,
            pad: 0,
            endpoint_id: 7,
            src_identity: 300,
            dst_identity: 400,
            rule_id: 9,
            saddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport: 1234u16.to_be(),
            dport: 80u16.to_be(),
            ifindex: 42,
        };
        // Build the bytes field by field at the C offsets.
        let mut b = vec![0u8; std::mem::size_of::<FlowEvent>()];
        b[0..8].copy_from_slice(&e.timestamp_ns.to_ne_bytes());
        b[8..16].copy_from_slice(&[2, 2, 3, 1, 6, 4, 2, 0]);
        b[16..20].copy_from_slice(&7u32.to_ne_bytes());
        b[20..24].copy_from_slice(&300u32.to_ne_bytes());
        b[24..28].copy_from_slice(&400u32.to_ne_bytes());
        b[28..32].copy_from_slice(&9u32.to_ne_bytes());
        b[32..48].copy_from_slice(&e.saddr);
        b[48..64].copy_from_slice(&e.daddr);
        b[64..66].copy_from_slice(&e.sport.to_ne_bytes());
        b[66..68].copy_from_slice(&e.dport.to_ne_bytes());
        b[68..72].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(FlowEvent::from_bytes(&b), Some(e));
        assert_eq!(e.sport_host(), 1234);
        assert_eq!(e.dport_host(), 80);
        assert_eq!(FlowEvent::from_bytes(&b[..71]), None);
    }

    #[test]
    fn policy_key_split_join() {
        let k = PolicyKey {
            prefixlen: 48,
            identity: 0x0102_0304,
            protocol: 6,
            dport: 443u16.to_be_bytes(),
            pad: 0,
        };
        let (len, data) = k.split();
        assert_eq!(PolicyKey::join(len, data), k);
        assert_eq!(k.port(), 443);
    }
}
