//! Checks every struct, field and constant of `bpf/lib/abi.h` against the Rust mirrors.
//!
//! `layout.c` is compiled with the host C compiler (`$CC`, else `cc`) into a temporary
//! directory and run; its output (sizes, field offsets and sizes, `#define` values) must match
//! `size_of`/`offset_of!` and the Rust constants. The header itself is also scanned, so a new
//! struct, field or `#define` that the probe or the mirrors miss fails the test.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use palisade_abi::*;

struct Layout {
    c: &'static str,
    size: usize,
    fields: Vec<(&'static str, usize, usize)>,
}

fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

macro_rules! layout {
    ($c:literal => $t:ty { $($cf:literal : $f:ident),* $(,)? }) => {
        Layout {
            c: $c,
            size: size_of::<$t>(),
            fields: vec![$(($cf, offset_of!($t, $f), field_size(|s: &$t| &s.$f))),*],
        }
    };
}

fn rust_layouts() -> Vec<Layout> {
    vec![
        layout!("ipcache_key" => IpcacheKey { "prefixlen": prefixlen, "family": family, "addr": addr }),
        layout!("ipcache_value" => IpcacheValue { "identity": identity, "flags": flags }),
        layout!("endpoint_key" => EndpointKey { "ifindex": ifindex }),
        layout!("endpoint_value" => EndpointValue {
            "endpoint_id": endpoint_id, "identity": identity, "flags": flags,
            "family_mask": family_mask, "ipv4": ipv4, "ipv6": ipv6,
        }),
        layout!("policy_outer_key" => PolicyOuterKey { "endpoint_id": endpoint_id, "direction": direction }),
        layout!("policy_key" => PolicyKey {
            "prefixlen": prefixlen, "identity": identity, "protocol": protocol, "dport": dport, "pad": pad,
        }),
        layout!("policy_value" => PolicyValue {
            "verdict": verdict, "flags": flags, "proxy_port": proxy_port, "rule_id": rule_id,
        }),
        layout!("ct_key" => CtKey {
            "saddr": saddr, "daddr": daddr, "sport": sport, "dport": dport,
            "protocol": protocol, "family": family, "pad": pad,
        }),
        layout!("ct_value" => CtValue {
            "created_ns": created_ns, "last_seen_ns": last_seen_ns, "flags": flags,
            "rule_id": rule_id, "packets": packets, "bytes": bytes,
        }),
        layout!("metrics_value" => MetricsValue { "packets": packets, "bytes": bytes }),
        layout!("flow_event" => FlowEvent {
            "timestamp_ns": timestamp_ns, "type": r#type, "outcome": outcome, "reason": reason,
            "direction": direction, "protocol": protocol, "family": family, "tcp_flags": tcp_flags,
            "pad": pad, "endpoint_id": endpoint_id, "src_identity": src_identity,
            "dst_identity": dst_identity, "rule_id": rule_id, "saddr": saddr, "daddr": daddr,
            "sport": sport, "dport": dport, "ifindex": ifindex,
        }),
        layout!("ratelimit_state" => RatelimitState { "last_ns": last_ns, "tokens": tokens, "lost": lost }),
        layout!("ratelimit_config" => RatelimitConfig { "rate": rate, "burst": burst }),
    ]
}

fn rust_consts() -> BTreeMap<&'static str, i128> {
    let mut m = BTreeMap::new();
    macro_rules! c {
        ($($n:ident),* $(,)?) => { $(m.insert(stringify!($n), i128::from($n));)* };
    }
    c!(
        PAL_FAMILY_IPV4,
        PAL_FAMILY_IPV6,
        PAL_IPCACHE_F_ENDPOINT,
        PAL_EP_F_ENFORCE_INGRESS,
        PAL_EP_F_ENFORCE_EGRESS,
        PAL_EP_F_AUDIT,
        PAL_EP_F_FAIL_CLOSED,
        PAL_EP_F_AUDIT_DEFAULT_INGRESS,
        PAL_EP_F_AUDIT_DEFAULT_EGRESS,
        PAL_DIR_INGRESS,
        PAL_DIR_EGRESS,
        PAL_VERDICT_ALLOW,
        PAL_VERDICT_DENY,
        PAL_VERDICT_REDIRECT,
        PAL_POLICY_F_AUDIT,
        PAL_CT_F_EGRESS_OK,
        PAL_CT_F_INGRESS_OK,
        PAL_CT_F_AUDIT,
        PAL_CT_F_REDIRECT,
        PAL_REASON_NONE,
        PAL_REASON_POLICY_DENY,
        PAL_REASON_POLICY_DEFAULT,
        PAL_REASON_SPOOFED,
        PAL_REASON_FAIL_CLOSED,
        PAL_REASON_MALFORMED,
        PAL_REASON_MAX,
        PAL_METRICS_ENTRIES,
        PAL_EVENT_POLICY_VERDICT,
        PAL_EVENT_DROP,
        PAL_OUTCOME_FORWARDED,
        PAL_OUTCOME_DROPPED,
        PAL_OUTCOME_AUDIT,
    );
    m
}

fn header_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bpf/lib/abi.h")
}

#[derive(Default)]
struct Probe {
    sizes: BTreeMap<String, usize>,
    fields: BTreeMap<(String, String), (usize, usize)>,
    consts: BTreeMap<String, i128>,
}

fn run_probe() -> Probe {
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = dir.path().join("layout");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/layout.c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let out = Command::new(&cc)
        .args(["-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(
        out.status.success(),
        "compiling {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().expect("run probe");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut p = Probe::default();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["size", s, n] => {
                p.sizes.insert((*s).to_string(), n.parse().expect("size"));
            }
            ["field", s, f, o, n] => {
                p.fields.insert(
                    ((*s).to_string(), (*f).to_string()),
                    (o.parse().expect("offset"), n.parse().expect("size")),
                );
            }
            ["const", c, v] => {
                p.consts.insert((*c).to_string(), v.parse().expect("value"));
            }
            _ => panic!("unexpected probe line {line:?}"),
        }
    }
    p
}

/// Struct names with their field names, and `#define` names, as the header spells them.
fn scan_header() -> (BTreeMap<String, Vec<String>>, BTreeSet<String>) {
    let text = std::fs::read_to_string(header_path()).expect("read abi.h");
    let mut structs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut defines = BTreeSet::new();
    let mut current: Option<String> = None;
    for raw in text.lines() {
        let line = raw.split("/*").next().unwrap_or("").trim();
        if let Some(rest) = line.strip_prefix("#define ") {
            let name = rest.split_whitespace().next().unwrap_or("");
            if name.starts_with("PAL_") {
                defines.insert(name.to_string());
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("struct ") {
            if let Some(name) = rest.strip_suffix(" {") {
                current = Some(name.to_string());
                structs.insert(name.to_string(), Vec::new());
                continue;
            }
        }
        if line.starts_with('}') {
            current = None;
            continue;
        }
        if let Some(s) = &current {
            if let Some(decl) = line.strip_suffix(';') {
                let name = decl
                    .split_whitespace()
                    .last()
                    .expect("field name")
                    .split('[')
                    .next()
                    .expect("field name");
                structs.get_mut(s).expect("struct").push(name.to_string());
            }
        }
    }
    (structs, defines)
}

#[test]
fn structs_match_the_c_header() {
    let probe = run_probe();
    let (header_structs, _) = scan_header();
    let layouts = rust_layouts();

    let rust_names: BTreeSet<&str> = layouts.iter().map(|l| l.c).collect();
    let header_names: BTreeSet<&str> = header_structs.keys().map(String::as_str).collect();
    assert_eq!(
        rust_names, header_names,
        "structs mirrored vs structs in abi.h"
    );

    for l in &layouts {
        let c_size = probe.sizes[l.c];
        assert_eq!(l.size, c_size, "size of struct {}", l.c);
        let header_fields: Vec<&str> = header_structs[l.c].iter().map(String::as_str).collect();
        let rust_fields: Vec<&str> = l.fields.iter().map(|f| f.0).collect();
        assert_eq!(rust_fields, header_fields, "fields of struct {}", l.c);
        for (name, off, size) in &l.fields {
            let key = (l.c.to_string(), (*name).to_string());
            let (c_off, c_fsize) = probe
                .fields
                .get(&key)
                .unwrap_or_else(|| panic!("layout.c does not print {}.{name}", l.c));
            assert_eq!(off, c_off, "offset of {}.{name}", l.c);
            assert_eq!(size, c_fsize, "size of {}.{name}", l.c);
        }
        // No implicit padding: the mirrors are aya::Pod and copied as raw bytes.
        let sum: usize = l.fields.iter().map(|f| f.2).sum();
        assert_eq!(sum, l.size, "struct {} has implicit padding", l.c);
    }
}

#[test]
fn constants_match_the_c_header() {
    let probe = run_probe();
    let (_, header_defines) = scan_header();
    let rust = rust_consts();
    let rust_names: BTreeSet<String> = rust.keys().map(|s| (*s).to_string()).collect();
    assert_eq!(
        rust_names, header_defines,
        "constants mirrored vs #defines in abi.h"
    );
    let probe_names: BTreeSet<String> = probe.consts.keys().cloned().collect();
    assert_eq!(
        probe_names, header_defines,
        "layout.c must print every #define"
    );
    for (name, value) in &rust {
        assert_eq!(Some(value), probe.consts.get(*name), "value of {name}");
    }
}

/// The data-only LPM key structs are the C key minus its leading `prefixlen`: aya's
/// `lpm_trie::Key<K>` is `repr(C, packed) { prefix_len: u32, data: K }`.
#[test]
fn lpm_data_structs_are_the_key_after_prefixlen() {
    assert_eq!(size_of::<PolicyKeyData>() + 4, size_of::<PolicyKey>());
    assert_eq!(
        offset_of!(PolicyKeyData, identity) + 4,
        offset_of!(PolicyKey, identity)
    );
    assert_eq!(
        offset_of!(PolicyKeyData, protocol) + 4,
        offset_of!(PolicyKey, protocol)
    );
    assert_eq!(
        offset_of!(PolicyKeyData, dport) + 4,
        offset_of!(PolicyKey, dport)
    );
    assert_eq!(
        offset_of!(PolicyKeyData, pad) + 4,
        offset_of!(PolicyKey, pad)
    );
    assert_eq!(size_of::<IpcacheKeyData>() + 4, size_of::<IpcacheKey>());
    assert_eq!(
        offset_of!(IpcacheKeyData, family) + 4,
        offset_of!(IpcacheKey, family)
    );
    assert_eq!(
        offset_of!(IpcacheKeyData, addr) + 4,
        offset_of!(IpcacheKey, addr)
    );
    assert_eq!(offset_of!(PolicyKey, prefixlen), 0);
    assert_eq!(offset_of!(IpcacheKey, prefixlen), 0);
}

#[cfg(feature = "aya")]
#[test]
fn aya_lpm_keys_have_the_c_layout() {
    use aya::maps::lpm_trie::Key;
    assert_eq!(size_of::<Key<PolicyKeyData>>(), size_of::<PolicyKey>());
    assert_eq!(size_of::<Key<IpcacheKeyData>>(), size_of::<IpcacheKey>());
}
