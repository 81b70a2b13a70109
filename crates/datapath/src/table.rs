//! Policy tables as the kernel holds them: flat [`TableEntry`] rows in, LPM entries out.
//!
//! The kernel (`bpf/lib/policy.h`) answers a (peer identity, protocol, port) question with two
//! longest-prefix lookups, one for the peer's identity and one for identity 0 ("any peer"),
//! and picks: a deny from either, else a plain allow from either, else a redirect, else no
//! entry. The engine's semantics (`policy/src/table.rs`) look at *every* entry covering the
//! peer and port: any deny wins whatever its specificity, otherwise any plain allow, otherwise
//! a redirect (an allow with L7 rules). A longest-prefix match only sees the most specific
//! entry, so [`lpm_entries`] "flattens" the table: the value written at each key is the
//! combination of every entry that covers that key, and where an identity-0 entry lies inside
//! an identity's own keys it is copied into that identity's keys so both lookups agree.
//! Keys whose value equals that of their nearest enclosing key are dropped again.
//!
//! Combination at one point, given the set of covering entries (the same rule in
//! [`lookup_model`]'s reference, checked by the property test):
//! - any deny → deny; it is audited (passes, reported as AUDIT) only if *every* covering deny
//!   is audited; its `rule_id` is a non-audited deny's if there is one;
//! - else any plain allow → allow (an allow's `audit` flag has no effect);
//! - else any redirect → redirect to the proxy port of the redirect with the lowest rule id;
//! - else no entry (the endpoint's default decides).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use palisade_abi::{
    PolicyKey, PolicyValue, PAL_POLICY_F_AUDIT, PAL_VERDICT_ALLOW, PAL_VERDICT_DENY,
    PAL_VERDICT_REDIRECT, POLICY_PREFIX_IDENTITY, POLICY_PREFIX_PROTO,
};

/// Traffic direction of a table, from the endpoint's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Packets delivered to the endpoint (`to_container`, TCX egress of the host veth).
    Ingress,
    /// Packets the endpoint sends (`from_container`, TCX ingress of the host veth).
    Egress,
}

impl Direction {
    /// `PAL_DIR_*`.
    pub fn abi(self) -> u32 {
        match self {
            Direction::Ingress => palisade_abi::PAL_DIR_INGRESS,
            Direction::Egress => palisade_abi::PAL_DIR_EGRESS,
        }
    }
}

/// What a table entry does to the traffic it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Allowed, no L7 rules.
    Allow,
    /// Denied (beats every allow).
    Deny,
    /// Allowed through the L7 proxy listening on `proxy_port` (host order).
    Redirect { proxy_port: u16 },
}

/// One row of a table, independent of the policy crate: a peer identity (0 = every peer),
/// a protocol (0 = every protocol and port) and an inclusive port range (ignored when
/// `proto` is 0; an empty range `port_lo > port_hi` covers nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TableEntry {
    pub identity: u32,
    pub proto: u8,
    pub port_lo: u16,
    pub port_hi: u16,
    pub verdict: Verdict,
    /// A deny from an audited policy: it passes and is reported as AUDIT.
    pub audit: bool,
    /// The engine's rule, reported in flow events.
    pub rule_id: u32,
}

impl TableEntry {
    /// True if the entry covers (`proto`, `port`) for its identity (the engine's `covers`).
    pub fn covers(&self, proto: u8, port: u16) -> bool {
        self.proto == 0 || (self.proto == proto && self.port_lo <= port && port <= self.port_hi)
    }
}

/// The prefix lengths a policy key can have: the identity alone, then protocol plus 0–16
/// port bits.
const LENS: [u8; 18] = [
    32, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56,
];

/// A policy LPM prefix with every bit past `len` cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Prefix {
    len: u8,
    identity: u32,
    proto: u8,
    port: u16,
}

impl Prefix {
    fn new(identity: u32, proto: u8, port: u16, len: u8) -> Self {
        let (proto, port) = if u32::from(len) < POLICY_PREFIX_PROTO {
            (0, 0)
        } else {
            let bits = u32::from(len) - POLICY_PREFIX_PROTO;
            let mask = if bits == 0 {
                0
            } else {
                u16::MAX << (16 - bits)
            };
            (proto, port & mask)
        };
        Self {
            len,
            identity,
            proto,
            port,
        }
    }

    /// This prefix and every shorter prefix containing it, shortest first.
    fn ancestors(self) -> impl Iterator<Item = Prefix> {
        LENS.into_iter()
            .filter(move |l| *l <= self.len)
            .map(move |l| Prefix::new(self.identity, self.proto, self.port, l))
    }

    fn with_identity(self, identity: u32) -> Self {
        Self { identity, ..self }
    }

    fn key(self) -> PolicyKey {
        PolicyKey {
            prefixlen: u32::from(self.len),
            identity: self.identity,
            protocol: self.proto,
            dport: self.port.to_be_bytes(),
            pad: 0,
        }
    }
}

/// The aligned prefixes an entry covers exactly.
fn entry_prefixes(e: &TableEntry) -> Vec<Prefix> {
    if e.proto == 0 {
        return vec![Prefix::new(e.identity, 0, 0, POLICY_PREFIX_IDENTITY as u8)];
    }
    if e.port_lo > e.port_hi {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut lo = u32::from(e.port_lo);
    let hi = u32::from(e.port_hi);
    while lo <= hi {
        // The largest aligned block starting at `lo` that stays within `hi`.
        let mut k = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while lo + (1u32 << k) - 1 > hi {
            k -= 1;
        }
        out.push(Prefix::new(e.identity, e.proto, lo as u16, (56 - k) as u8));
        lo += 1u32 << k;
    }
    out
}

/// Accumulates covering entries into the value the kernel should see.
#[derive(Default)]
struct Combined {
    deny_enforced: Option<u32>,
    deny_audited: Option<u32>,
    allow: Option<u32>,
    redirect: Option<(u32, u16)>,
}

fn min_some<T: Ord + Copy>(a: Option<T>, b: T) -> T {
    a.map_or(b, |a| a.min(b))
}

impl Combined {
    fn add(&mut self, e: &TableEntry) {
        match e.verdict {
            Verdict::Deny if e.audit => {
                self.deny_audited = Some(min_some(self.deny_audited, e.rule_id));
            }
            Verdict::Deny => self.deny_enforced = Some(min_some(self.deny_enforced, e.rule_id)),
            Verdict::Allow => self.allow = Some(min_some(self.allow, e.rule_id)),
            Verdict::Redirect { proxy_port } => {
                self.redirect = Some(min_some(self.redirect, (e.rule_id, proxy_port)));
            }
        }
    }

    fn value(&self) -> Option<PolicyValue> {
        let v = |verdict, flags, proxy_port, rule_id| PolicyValue {
            verdict,
            flags,
            proxy_port,
            rule_id,
        };
        if let Some(rule) = self.deny_enforced {
            Some(v(PAL_VERDICT_DENY, 0, 0, rule))
        } else if let Some(rule) = self.deny_audited {
            Some(v(PAL_VERDICT_DENY, PAL_POLICY_F_AUDIT, 0, rule))
        } else if let Some(rule) = self.allow {
            Some(v(PAL_VERDICT_ALLOW, 0, 0, rule))
        } else {
            self.redirect
                .map(|(rule, port)| v(PAL_VERDICT_REDIRECT, 0, port, rule))
        }
    }
}

/// What a lookup's answer means; `rule_id` is informational and may come from any rule of
/// the deciding kind.
fn observable(v: PolicyValue) -> (u8, u8, u16) {
    (v.verdict, v.flags, v.proxy_port)
}

/// The LPM entries of one table, sorted by key, such that the kernel's two-lookup algorithm
/// ([`lookup_model`]) gives the engine's answer for every (identity, protocol, port).
/// Identity 0 means every peer. Port ranges become minimal aligned prefixes; protocol 0 is a
/// prefix of 32 bits, a protocol with every port 40 bits.
pub fn lpm_entries(entries: &[TableEntry]) -> Vec<(PolicyKey, PolicyValue)> {
    // identity -> exact prefix -> the entries that cover exactly that prefix.
    let mut by_identity: BTreeMap<u32, HashMap<Prefix, Vec<usize>>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        let own = by_identity.entry(e.identity).or_default();
        for p in entry_prefixes(e) {
            own.entry(p).or_default().push(i);
        }
    }
    let empty = HashMap::new();
    let any = by_identity.get(&0).unwrap_or(&empty);

    let mut out = Vec::new();
    for (&identity, own) in &by_identity {
        // Every prefix of this identity, plus the "any peer" prefixes nested inside one.
        let mut keys: BTreeSet<Prefix> = own.keys().copied().collect();
        if identity != 0 {
            for q in any.keys() {
                let q = q.with_identity(identity);
                if q.ancestors().any(|a| own.contains_key(&a)) {
                    keys.insert(q);
                }
            }
        }
        // Shortest first (`Prefix` orders by length first), so the nearest kept ancestor of
        // a key is final when the key is examined.
        let mut kept: HashMap<Prefix, PolicyValue> = HashMap::new();
        let mut ordered = Vec::new();
        for k in keys {
            let mut c = Combined::default();
            for a in k.ancestors() {
                for &i in own.get(&a).into_iter().flatten() {
                    c.add(&entries[i]);
                }
                if identity != 0 {
                    for &i in any.get(&a.with_identity(0)).into_iter().flatten() {
                        c.add(&entries[i]);
                    }
                }
            }
            let Some(value) = c.value() else { continue };
            let parent = k
                .ancestors()
                .filter(|a| a.len < k.len)
                .filter_map(|a| kept.get(&a))
                .last();
            if parent.is_some_and(|p| observable(*p) == observable(value)) {
                continue;
            }
            kept.insert(k, value);
            ordered.push((k.key(), value));
        }
        out.extend(ordered);
    }
    out.sort_by_key(|(k, _)| (k.identity, k.protocol, k.dport, k.prefixlen));
    out
}

/// Longest-prefix match over the entries, comparing the key bytes MSB first as the kernel's
/// LPM trie does.
fn lpm_match(
    lpm: &[(PolicyKey, PolicyValue)],
    data: [u8; 8],
    max_bits: u32,
) -> Option<PolicyValue> {
    let mut best: Option<(u32, PolicyValue)> = None;
    for (k, v) in lpm {
        if k.prefixlen > max_bits {
            continue;
        }
        let kd = k.data_bytes();
        let matches = (0..k.prefixlen as usize).all(|bit| {
            let m = 0x80u8 >> (bit % 8);
            kd[bit / 8] & m == data[bit / 8] & m
        });
        if matches && best.is_none_or(|(l, _)| k.prefixlen > l) {
            best = Some((k.prefixlen, *v));
        }
    }
    best.map(|(_, v)| v)
}

/// What the kernel's `policy_lookup` returns for these LPM entries: `None` for no entry.
pub fn lookup_model(
    lpm: &[(PolicyKey, PolicyValue)],
    identity: u32,
    proto: u8,
    port: u16,
) -> Option<PolicyValue> {
    let probe = |id: u32| {
        PolicyKey {
            prefixlen: 56,
            identity: id,
            protocol: proto,
            dport: port.to_be_bytes(),
            pad: 0,
        }
        .data_bytes()
    };
    let exact = lpm_match(lpm, probe(identity), 56);
    let any = lpm_match(lpm, probe(0), 56);
    let is = |v: &Option<PolicyValue>, verdict| v.is_some_and(|v| v.verdict == verdict);
    if is(&exact, PAL_VERDICT_DENY) {
        exact
    } else if is(&any, PAL_VERDICT_DENY) {
        any
    } else if is(&exact, PAL_VERDICT_ALLOW) {
        exact
    } else if is(&any, PAL_VERDICT_ALLOW) {
        any
    } else if exact.is_some() {
        exact
    } else {
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(identity: u32, proto: u8, lo: u16, hi: u16, verdict: Verdict, rule_id: u32) -> TableEntry {
        TableEntry {
            identity,
            proto,
            port_lo: lo,
            port_hi: hi,
            verdict,
            audit: false,
            rule_id,
        }
    }

    fn ranges(entry: &TableEntry) -> Vec<(u16, u32)> {
        entry_prefixes(entry)
            .into_iter()
            .map(|p| (p.port, u32::from(p.len)))
            .collect()
    }

    #[test]
    fn port_ranges_split_into_minimal_aligned_prefixes() {
        let r = |lo, hi| ranges(&e(5, 6, lo, hi, Verdict::Allow, 1));
        assert_eq!(r(80, 80), vec![(80, 56)]);
        assert_eq!(r(0, 65535), vec![(0, 40)]);
        assert_eq!(r(0, 32767), vec![(0, 41)]);
        assert_eq!(r(1024, 2047), vec![(1024, 46)]);
        // 1..=65535: 1, 2-3, 4-7, …, 32768-65535.
        let all_but_zero = r(1, 65535);
        assert_eq!(all_but_zero.len(), 16);
        assert_eq!(all_but_zero[0], (1, 56));
        assert_eq!(all_but_zero[15], (32768, 41));
        assert_eq!(r(8000, 8080), vec![(8000, 50), (8064, 52), (8080, 56)]);
        assert!(r(10, 9).is_empty());
        // Protocol 0: the identity alone, ports ignored.
        assert_eq!(ranges(&e(5, 0, 80, 80, Verdict::Allow, 1)), vec![(0, 32)]);
    }

    #[test]
    fn keys_are_masked_and_in_network_order() {
        let out = lpm_entries(&[e(300, 6, 8000, 8063, Verdict::Allow, 1)]);
        assert_eq!(out.len(), 1);
        let (k, v) = out[0];
        assert_eq!(k.prefixlen, 50);
        assert_eq!(k.identity, 300);
        assert_eq!(k.protocol, 6);
        assert_eq!(k.dport, 8000u16.to_be_bytes());
        assert_eq!(v.verdict, PAL_VERDICT_ALLOW);
        assert_eq!(v.rule_id, 1);
    }

    #[test]
    fn deny_is_pushed_into_a_more_specific_allow() {
        // Deny TCP for identity 7, allow 7 on TCP/80: the allow's key must say deny.
        let t = [
            e(7, 6, 0, 65535, Verdict::Deny, 1),
            e(7, 6, 80, 80, Verdict::Allow, 2),
        ];
        let lpm = lpm_entries(&t);
        let v = lookup_model(&lpm, 7, 6, 80).expect("entry");
        assert_eq!((v.verdict, v.rule_id), (PAL_VERDICT_DENY, 1));
        // The narrower allow key is redundant once it says deny.
        assert_eq!(lpm.len(), 1);
    }

    #[test]
    fn deny_for_any_peer_beats_an_identity_allow() {
        let t = [
            e(0, 6, 22, 22, Verdict::Deny, 1),
            e(7, 0, 0, 0, Verdict::Allow, 2),
        ];
        let lpm = lpm_entries(&t);
        assert_eq!(
            lookup_model(&lpm, 7, 6, 22).map(|v| v.verdict),
            Some(PAL_VERDICT_DENY)
        );
        assert_eq!(
            lookup_model(&lpm, 7, 6, 23).map(|v| v.verdict),
            Some(PAL_VERDICT_ALLOW)
        );
        assert_eq!(lookup_model(&lpm, 8, 6, 23), None);
    }

    #[test]
    fn plain_allow_beats_a_narrower_redirect() {
        let t = [
            e(7, 6, 0, 65535, Verdict::Allow, 1),
            e(7, 6, 80, 80, Verdict::Redirect { proxy_port: 15001 }, 2),
        ];
        let lpm = lpm_entries(&t);
        assert_eq!(
            lookup_model(&lpm, 7, 6, 80).map(|v| v.verdict),
            Some(PAL_VERDICT_ALLOW)
        );
        // Identity 0's allow also beats an identity's redirect, across the two lookups.
        let t = [
            e(0, 6, 80, 80, Verdict::Allow, 1),
            e(7, 6, 80, 80, Verdict::Redirect { proxy_port: 15001 }, 2),
        ];
        let lpm = lpm_entries(&t);
        assert_eq!(
            lookup_model(&lpm, 7, 6, 80).map(|v| v.verdict),
            Some(PAL_VERDICT_ALLOW)
        );
        let t = [e(7, 6, 80, 80, Verdict::Redirect { proxy_port: 15001 }, 2)];
        let v = lookup_model(&lpm_entries(&t), 7, 6, 80).expect("entry");
        assert_eq!((v.verdict, v.proxy_port), (PAL_VERDICT_REDIRECT, 15001));
    }

    #[test]
    fn an_enforced_deny_is_not_hidden_by_an_audited_one() {
        let mut audited = e(7, 6, 80, 80, Verdict::Deny, 1);
        audited.audit = true;
        let t = [audited, e(0, 6, 0, 65535, Verdict::Deny, 2)];
        let v = lookup_model(&lpm_entries(&t), 7, 6, 80).expect("entry");
        assert_eq!((v.verdict, v.flags, v.rule_id), (PAL_VERDICT_DENY, 0, 2));
        let v = lookup_model(&lpm_entries(&[audited]), 7, 6, 80).expect("entry");
        assert_eq!((v.verdict, v.flags), (PAL_VERDICT_DENY, PAL_POLICY_F_AUDIT));
    }

    #[test]
    fn any_peer_entries_are_copied_only_where_they_change_the_answer() {
        // Identity 7 may use everything; every peer may use TCP/80. The copy of the identity-0
        // key into identity 7 says "allow" like its parent and is dropped.
        let t = [
            e(7, 0, 0, 0, Verdict::Allow, 1),
            e(0, 6, 80, 80, Verdict::Allow, 2),
        ];
        assert_eq!(lpm_entries(&t).len(), 2);
        let t = [
            e(7, 0, 0, 0, Verdict::Allow, 1),
            e(0, 6, 80, 80, Verdict::Redirect { proxy_port: 1 }, 2),
        ];
        assert_eq!(lpm_entries(&t).len(), 2);
    }

    #[test]
    fn empty_table_has_no_entries() {
        assert!(lpm_entries(&[]).is_empty());
        assert_eq!(lookup_model(&[], 7, 6, 80), None);
    }
}
