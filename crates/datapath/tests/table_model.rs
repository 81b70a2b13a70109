//! Property: for any table and any probe, the kernel's lookup over the flattened LPM entries
//! (`lookup_model(lpm_entries(..))`) gives the engine's answer computed directly from the rows:
//! any covering deny wins (audited only if every covering deny is), then any plain allow, then
//! a redirect (the lowest rule id's proxy port), else no entry.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;

use palisade_abi::{
    PolicyKey, PolicyValue, PAL_POLICY_F_AUDIT, PAL_VERDICT_ALLOW, PAL_VERDICT_DENY,
    PAL_VERDICT_REDIRECT,
};
use palisade_datapath::{lookup_model, lpm_entries, TableEntry, Verdict};
use proptest::prelude::*;

/// The reference answer: (verdict, flags, proxy port) and the rule ids that may be reported.
fn reference(
    entries: &[TableEntry],
    identity: u32,
    proto: u8,
    port: u16,
) -> Option<((u8, u8, u16), BTreeSet<u32>)> {
    let covering: Vec<&TableEntry> = entries
        .iter()
        .filter(|e| (e.identity == identity || e.identity == 0) && e.covers(proto, port))
        .collect();
    let rules = |f: &dyn Fn(&TableEntry) -> bool| -> BTreeSet<u32> {
        covering
            .iter()
            .filter(|e| f(e))
            .map(|e| e.rule_id)
            .collect()
    };
    let enforced = rules(&|e| e.verdict == Verdict::Deny && !e.audit);
    if !enforced.is_empty() {
        return Some(((PAL_VERDICT_DENY, 0, 0), enforced));
    }
    let audited = rules(&|e| e.verdict == Verdict::Deny);
    if !audited.is_empty() {
        return Some(((PAL_VERDICT_DENY, PAL_POLICY_F_AUDIT, 0), audited));
    }
    let allowed = rules(&|e| e.verdict == Verdict::Allow);
    if !allowed.is_empty() {
        return Some(((PAL_VERDICT_ALLOW, 0, 0), allowed));
    }
    let redirect = covering
        .iter()
        .filter_map(|e| match e.verdict {
            Verdict::Redirect { proxy_port } => Some((e.rule_id, proxy_port)),
            _ => None,
        })
        .min()?;
    let redirects = rules(&|e| matches!(e.verdict, Verdict::Redirect { .. }));
    Some(((PAL_VERDICT_REDIRECT, 0, redirect.1), redirects))
}

fn verdict() -> impl Strategy<Value = Verdict> {
    prop_oneof![
        Just(Verdict::Allow),
        Just(Verdict::Deny),
        prop_oneof![Just(15001u16), Just(15002u16)]
            .prop_map(|p| Verdict::Redirect { proxy_port: p }),
    ]
}

fn entry() -> impl Strategy<Value = TableEntry> {
    let ports = prop_oneof![
        // Small ranges that overlap a lot.
        (0u16..96, 0u16..40).prop_map(|(lo, len)| (lo, lo + len)),
        Just((0u16, 65535u16)),
        (1u16..200).prop_map(|p| (p, 65535)),
        (0u16..96).prop_map(|p| (p, p)),
    ];
    (
        prop_oneof![Just(0u32), Just(7), Just(8), Just(0x0100_0001)],
        prop_oneof![Just(0u8), Just(6), Just(6), Just(17)],
        ports,
        verdict(),
        any::<bool>(),
        1u32..12,
    )
        .prop_map(
            |(identity, proto, (lo, hi), verdict, audit, rule_id)| TableEntry {
                identity,
                proto,
                port_lo: lo,
                port_hi: hi,
                verdict,
                audit,
                rule_id,
            },
        )
}

fn probe() -> impl Strategy<Value = (u32, u8, u16)> {
    (
        prop_oneof![Just(0u32), Just(7), Just(8), Just(9), Just(0x0100_0001)],
        prop_oneof![Just(6u8), Just(17), Just(1)],
        prop_oneof![0u16..140, Just(65535u16), 150u16..300],
    )
}

fn check(
    entries: &[TableEntry],
    lpm: &[(PolicyKey, PolicyValue)],
    identity: u32,
    proto: u8,
    port: u16,
) -> Result<(), TestCaseError> {
    let got = lookup_model(lpm, identity, proto, port);
    let want = reference(entries, identity, proto, port);
    match (got, want) {
        (None, None) => Ok(()),
        (Some(v), Some((obs, rules))) => {
            let PolicyValue {
                verdict,
                flags,
                proxy_port,
                rule_id,
            } = v;
            prop_assert_eq!(
                (verdict, flags, proxy_port),
                obs,
                "probe {:?}",
                (identity, proto, port)
            );
            prop_assert!(
                rules.contains(&rule_id),
                "rule {} not among {:?} for probe {:?}",
                rule_id,
                rules,
                (identity, proto, port)
            );
            Ok(())
        }
        (got, want) => Err(TestCaseError::fail(format!(
            "probe {:?}: kernel model {got:?}, reference {want:?}",
            (identity, proto, port)
        ))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn flattened_lpm_lookup_matches_the_engine_semantics(
        entries in prop::collection::vec(entry(), 0..14),
        probes in prop::collection::vec(probe(), 1..40),
    ) {
        let lpm = lpm_entries(&entries);
        for (identity, proto, port) in probes {
            check(&entries, &lpm, identity, proto, port)?;
        }
    }

    #[test]
    fn lpm_keys_are_unique_and_masked(entries in prop::collection::vec(entry(), 0..14)) {
        let lpm = lpm_entries(&entries);
        let keys: BTreeSet<_> = lpm.iter().map(|(k, _)| *k).collect();
        prop_assert_eq!(keys.len(), lpm.len());
        for (k, _) in &lpm {
            prop_assert!(k.prefixlen == 32 || (40..=56).contains(&k.prefixlen));
            prop_assert_eq!(k.pad, 0);
            if k.prefixlen == 32 {
                prop_assert_eq!((k.protocol, k.dport), (0, [0, 0]));
            } else {
                let bits = k.prefixlen - 40;
                let mask = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
                prop_assert_eq!(k.port() & !mask, 0);
            }
        }
    }
}

/// Exhaustive over every port for one tricky table (ranges straddling alignment boundaries,
/// denies for every peer inside an identity's allow, redirects under allows).
#[test]
fn every_port_of_a_dense_table() {
    let row = |identity, proto, lo, hi, verdict, audit, rule_id| TableEntry {
        identity,
        proto,
        port_lo: lo,
        port_hi: hi,
        verdict,
        audit,
        rule_id,
    };
    let entries = [
        row(
            7,
            6,
            1,
            65535,
            Verdict::Redirect { proxy_port: 1 },
            false,
            1,
        ),
        row(7, 6, 1000, 3000, Verdict::Allow, false, 2),
        row(0, 6, 2047, 2049, Verdict::Deny, true, 3),
        row(7, 6, 2048, 2048, Verdict::Deny, false, 4),
        row(0, 6, 2990, 3010, Verdict::Allow, false, 5),
        row(0, 17, 53, 53, Verdict::Allow, false, 6),
        row(8, 0, 0, 0, Verdict::Allow, false, 7),
        row(0, 6, 443, 443, Verdict::Deny, false, 8),
    ];
    let lpm = lpm_entries(&entries);
    for identity in [0, 7, 8, 9] {
        for proto in [6u8, 17] {
            for port in (0..=3100)
                .chain((3101..=u16::MAX).step_by(97))
                .chain([u16::MAX])
            {
                check(&entries, &lpm, identity, proto, port).expect("model matches reference");
            }
        }
    }
}
