use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Deserialize;

use super::*;

fn one(text: &str) -> Node {
    let mut docs = parse_documents(text).unwrap();
    assert_eq!(docs.len(), 1, "{docs:?}");
    docs.remove(0)
}

fn pos(line: u32, column: u32) -> Position {
    Position { line, column }
}

#[test]
fn scalar_resolution() {
    let doc = one(concat!(
        "a: ~\nb: null\nc:\nd: true\ne: FALSE\nf: 42\ng: -7\nh: 0x1F\ni: 0o17\n",
        "j: 1.5\nk: .inf\nl: -.Inf\nm: .nan\nn: 1e3\no: hello\np: '80'\nq: \"true\"\n",
        "r: |\n  block\ns: yes\nt: 0b11\nu: +12\nv: 99999999999999999999\nw: .5\nx: 1.\n",
        "y: !!str 80\nz: 010\n"
    ));
    let v = |k: &str| doc.get(k).unwrap().value.clone();
    assert_eq!(v("a"), Value::Null);
    assert_eq!(v("b"), Value::Null);
    assert_eq!(v("c"), Value::Null);
    assert_eq!(v("d"), Value::Bool(true));
    assert_eq!(v("e"), Value::Bool(false));
    assert_eq!(v("f"), Value::Int(42));
    assert_eq!(v("g"), Value::Int(-7));
    assert_eq!(v("h"), Value::Int(31));
    assert_eq!(v("i"), Value::Int(15));
    assert_eq!(v("j"), Value::Float(1.5));
    assert_eq!(v("k"), Value::Float(f64::INFINITY));
    assert_eq!(v("l"), Value::Float(f64::NEG_INFINITY));
    assert!(matches!(v("m"), Value::Float(f) if f.is_nan()));
    assert_eq!(v("n"), Value::Float(1000.0));
    assert_eq!(v("o"), Value::Str("hello".into()));
    assert_eq!(v("p"), Value::Str("80".into()));
    assert_eq!(v("q"), Value::Str("true".into()));
    assert_eq!(v("r"), Value::Str("block\n".into()));
    assert_eq!(v("s"), Value::Str("yes".into()));
    assert_eq!(v("t"), Value::Str("0b11".into()));
    assert_eq!(v("u"), Value::Int(12));
    assert_eq!(v("v"), Value::Float(1e20));
    assert_eq!(v("w"), Value::Float(0.5));
    assert_eq!(v("x"), Value::Float(1.0));
    assert_eq!(v("y"), Value::Str("80".into()));
    assert_eq!(v("z"), Value::Int(10));
    assert!(doc.get("f").unwrap().plain);
    assert!(!doc.get("p").unwrap().plain);
    assert_eq!(doc.get("h").unwrap().raw.as_deref(), Some("0x1F"));
    assert_eq!(doc.get("o").unwrap().raw, None);
    assert_eq!(doc.get("o").unwrap().as_str(), Some("hello"));
    assert_eq!(doc.get("f").unwrap().type_name(), "integer");
    assert_eq!(doc.type_name(), "mapping");
    assert!(parse_documents("a: !!int abc\n").is_err());
}

#[test]
fn positions_are_one_based() {
    let doc = one("# comment\nspec:\n  ingress:\n    - port: 80\n");
    assert_eq!(doc.pos, pos(2, 1));
    let spec = doc.get("spec").unwrap();
    assert_eq!(spec.pos, pos(3, 3));
    let item = &spec.get("ingress").unwrap().as_seq().unwrap()[0];
    let (key, value) = &item.as_map().unwrap()[0];
    assert_eq!(key.pos, pos(4, 7));
    assert_eq!(value.pos, pos(4, 13));
    let flow = one("{a: [1, \"x\"]}");
    assert_eq!(flow.pos, pos(1, 1));
    assert_eq!(flow.get("a").unwrap().as_seq().unwrap()[1].pos, pos(1, 9));
}

#[test]
fn multi_document_and_empty_documents() {
    assert!(parse_documents("").unwrap().is_empty());
    assert!(parse_documents("# just a comment\n\n# another\n")
        .unwrap()
        .is_empty());
    assert!(parse_documents("---\n---\n# c\n...\n").unwrap().is_empty());
    let docs = parse_documents("a: 1\n---\n# nothing\n---\nb: 2\n---\n").unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0].get("a").unwrap().value, Value::Int(1));
    assert_eq!(docs[1].get("b").unwrap().value, Value::Int(2));
    assert_eq!(docs[1].pos.line, 5);
    // An explicit null document is not empty.
    assert_eq!(parse_documents("null\n").unwrap().len(), 1);
}

#[test]
fn json_input() {
    let text = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x","labels":{"a.b/c":"d"}},
        "spec":{"ports":[80,443],"ratio":0.5,"on":true,"none":null}}"#;
    let doc = one(text);
    assert_eq!(doc.get("kind").unwrap().as_str(), Some("Pod"));
    let spec = doc.get("spec").unwrap();
    let ports: Vec<u16> = from_node(spec.get("ports").unwrap(), "spec.ports").unwrap();
    assert_eq!(ports, vec![80, 443]);
    let json = doc.to_json();
    let expected: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(json, expected);
    let err = parse_documents(r#"{"a": 1, "a": 2}"#).unwrap_err();
    assert!(err.message.contains("duplicate mapping key \"a\""), "{err}");
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Port {
    port: u16,
    #[serde(default)]
    protocol: Option<Protocol>,
}

#[derive(Debug, Deserialize, PartialEq, Clone, Copy)]
#[serde(rename_all = "UPPERCASE")]
enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ToPorts {
    ports: Vec<Port>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    to_ports: Vec<ToPorts>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    ingress: Option<Vec<Rule>>,
    #[serde(default)]
    egress: Option<Vec<Rule>>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Meta {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Policy {
    api_version: String,
    kind: String,
    metadata: Meta,
    spec: Spec,
}

const POLICY: &str = "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: p
  labels:
    app.kubernetes.io/name: web
    80: port
spec:
  ingress:
    - toPorts:
        - ports:
            - port: 80
              protocol: TCP
            - port: 443
";

#[test]
fn deserialize_policy() {
    let p: Policy = from_node(&one(POLICY), "").unwrap();
    assert_eq!(p.metadata.labels["app.kubernetes.io/name"], "web");
    assert_eq!(p.metadata.labels["80"], "port");
    let ports = &p.spec.ingress.as_ref().unwrap()[0].to_ports[0].ports;
    assert_eq!(
        ports[0],
        Port {
            port: 80,
            protocol: Some(Protocol::Tcp)
        }
    );
    assert_eq!(ports[1].protocol, None);
    assert_eq!(p.spec.egress, None);
}

fn policy_error(text: &str) -> SourceError {
    from_node::<Policy>(&one(text), "").unwrap_err()
}

#[test]
fn unknown_field_path_and_position() {
    let text = "\
apiVersion: v2
kind: X
metadata: {name: p}
spec:
  egress:
    - description: d
      bandwidth: 10
";
    let err = policy_error(text);
    assert_eq!(err.path, "spec.egress[0].bandwidth");
    assert_eq!(err.pos, pos(7, 7));
    assert!(
        err.message.starts_with("unknown field \"bandwidth\""),
        "{err}"
    );
    assert!(err
        .to_string()
        .starts_with("line 7, column 7: spec.egress[0].bandwidth: unknown field \"bandwidth\""));
}

#[test]
fn wrong_type_in_nested_seq() {
    let err = policy_error(&POLICY.replace("port: 443", "port: [443]"));
    assert_eq!(err.path, "spec.ingress[0].toPorts[0].ports[1].port");
    assert_eq!(err.pos, pos(14, 21));
    assert_eq!(err.message, "expected an integer (u16), found sequence");
}

#[test]
fn u16_out_of_range() {
    let err = policy_error(&POLICY.replace("port: 443", "port: 70000"));
    assert_eq!(err.path, "spec.ingress[0].toPorts[0].ports[1].port");
    assert_eq!(err.pos, pos(14, 21));
    assert!(
        err.message.contains("70000 is out of range for u16"),
        "{err}"
    );
}

#[test]
fn strict_scalars() {
    let err = policy_error(&POLICY.replace("port: 443", "port: \"443\""));
    assert_eq!(
        err.message,
        "expected an integer (u16), found string \"443\""
    );
    let err = policy_error(&POLICY.replace("name: p", "name: 80"));
    assert_eq!(err.path, "metadata.name");
    assert_eq!(err.message, "expected a string, found integer 80");
    let err = policy_error(&POLICY.replace("web", "true"));
    assert_eq!(err.path, "metadata.labels[\"app.kubernetes.io/name\"]");
    assert_eq!(err.message, "expected a string, found boolean true");
    let err = policy_error(&POLICY.replace("TCP", "SCTP"));
    assert_eq!(err.path, "spec.ingress[0].toPorts[0].ports[0].protocol");
    assert!(err.message.starts_with("unknown variant \"SCTP\""), "{err}");
}

#[test]
fn deny_unknown_fields_inside_vec_of_structs() {
    let err = policy_error(&POLICY.replace("- port: 443", "- port: 443\n              extra: 1"));
    assert_eq!(err.path, "spec.ingress[0].toPorts[0].ports[1].extra");
    assert_eq!(err.pos, pos(15, 15));
}

#[test]
fn missing_field() {
    let err = policy_error(&POLICY.replace("  name: p\n", ""));
    assert_eq!(err.path, "metadata");
    assert_eq!(err.message, "missing field \"name\"");
    assert_eq!(err.pos, pos(4, 3));
}

#[test]
fn option_fields_and_null() {
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct S {
        a: Option<u32>,
        b: Option<String>,
        #[serde(default)]
        c: Option<Vec<u8>>,
        d: Vec<u8>,
        e: (),
    }
    let s: S = from_node(&one("a: 5\nb: ~\nd:\ne: null\n"), "").unwrap();
    assert_eq!(s.a, Some(5));
    assert_eq!(s.b, None);
    assert_eq!(s.c, None);
    assert!(s.d.is_empty());
    assert_eq!(s.e, ());
    let err = from_node::<S>(&one("a: x\nb: ~\nd: []\ne:\n"), "items[2]").unwrap_err();
    assert_eq!(err.path, "items[2].a");
    assert_eq!(err.message, "expected an integer (u32), found string \"x\"");
}

#[test]
fn duplicate_keys_cilium_case() {
    let text = "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
spec:
  endpointSelector: {}
  ingress:
    - {}
  egress: []
  ingress:
    - fromEndpoints: []
";
    let err = parse_documents(text).unwrap_err();
    assert_eq!(err.pos, pos(8, 3));
    assert_eq!(err.path, "spec");
    assert_eq!(
        err.message,
        "duplicate mapping key \"ingress\" (first at line 5)"
    );
    // Keys compare by text: `80` and "80" collide.
    assert!(parse_documents("80: a\n\"80\": b\n").is_err());
    // Large mappings (hash-based check).
    let mut big = String::new();
    for i in 0..40 {
        writeln!(big, "k{i}: {i}").unwrap();
    }
    assert_eq!(one(&big).as_map().unwrap().len(), 40);
    big.push_str("k7: again\n");
    let err = parse_documents(&big).unwrap_err();
    assert_eq!(
        err.message,
        "duplicate mapping key \"k7\" (first at line 8)"
    );
    assert_eq!((err.pos, err.path.as_str()), (pos(41, 1), ""));
    // Same key in different mappings is fine.
    assert!(parse_documents("a: {x: 1}\nb: {x: 2}\n").is_ok());
}

#[derive(Debug, Deserialize)]
struct List {
    #[allow(dead_code)]
    items: Vec<Policy>,
}

#[test]
fn list_kind_nested_seq() {
    let text = "\
apiVersion: v1
kind: List
items:
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: a}
    spec: {}
  - apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: b}
    spec:
      ingress:
        - toPorts:
            - ports: [{port: 80}, {port: -1}]
";
    let doc = one(text);
    let items = doc.get("items").unwrap().as_seq().unwrap();
    let first: Policy = from_node(&items[0], "items[0]").unwrap();
    assert_eq!(first.metadata.name, "a");
    let err = from_node::<Policy>(&items[1], "items[1]").unwrap_err();
    assert_eq!(
        err.path,
        "items[1].spec.ingress[0].toPorts[0].ports[1].port"
    );
    assert_eq!(err.pos, pos(14, 42));
    // Same through a Vec at the top.
    let err2 = from_node::<List>(&doc, "").unwrap_err();
    assert_eq!(err2.path, err.path);
    assert_eq!(err2.pos, err.pos);
}

#[test]
fn deserialize_any_natural_types() {
    let doc = one("a: 80\nb: '80'\nc: true\nd: ~\ne: 1.5\nf: [1, x]\n7: {k: v}\n");
    let json: serde_json::Value = from_node(&doc, "").unwrap();
    assert_eq!(
        json,
        serde_json::json!({"a": 80, "b": "80", "c": true, "d": null, "e": 1.5,
                           "f": [1, "x"], "7": {"k": "v"}})
    );
    assert_eq!(json, doc.to_json());
}

#[derive(Debug, PartialEq)]
struct IntOrString(String);

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer or a port name")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntOrString, E> {
                if v.is_empty() {
                    return Err(E::custom("port name must not be empty"));
                }
                Ok(IntOrString(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(try_from = "u32")]
struct Even(u32);

impl TryFrom<u32> for Even {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, String> {
        if v == 5 {
            Err(format!("{v} is not allowed"))
        } else {
            Ok(Even(v))
        }
    }
}

#[derive(Debug, Deserialize, PartialEq)]
enum Action {
    Allow,
    Deny { reason: String },
    Limit(u32),
    Pair(u8, u8),
}

#[derive(Debug, Deserialize, PartialEq)]
struct Newtype(String);

#[test]
fn custom_deserialize_enums_and_newtypes() {
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct S {
        ports: Vec<IntOrString>,
        even: Option<Even>,
        actions: Vec<Action>,
        name: Newtype,
        pair: (u8, String),
        counts: BTreeMap<u16, bool>,
    }
    let text = "\
ports: [80, http]
even: 4
actions: [Allow, {Deny: {reason: r}}, {Limit: 3}, {Pair: [1, 2]}]
name: n
pair: [1, x]
counts: {80: true}
";
    let s: S = from_node(&one(text), "").unwrap();
    assert_eq!(
        s.ports,
        [IntOrString("80".into()), IntOrString("http".into())]
    );
    assert_eq!(s.even, Some(Even(4)));
    assert_eq!(
        s.actions,
        [
            Action::Allow,
            Action::Deny { reason: "r".into() },
            Action::Limit(3),
            Action::Pair(1, 2)
        ]
    );
    assert_eq!(s.name, Newtype("n".into()));
    assert_eq!(s.pair, (1, "x".into()));
    assert!(s.counts[&80]);

    let err = from_node::<S>(&one(&text.replace("http", "''")), "").unwrap_err();
    assert_eq!((err.path.as_str(), err.pos), ("ports[1]", pos(1, 13)));
    assert_eq!(err.message, "port name must not be empty");
    let err = from_node::<S>(&one(&text.replace("[80", "[{}")), "").unwrap_err();
    assert_eq!(err.path, "ports[0]");
    assert_eq!(
        err.message,
        "expected an integer or a port name, found mapping"
    );
    let err = from_node::<S>(&one(&text.replace("even: 4", "even: 5")), "").unwrap_err();
    assert_eq!(
        (err.path.as_str(), err.message.as_str()),
        ("even", "5 is not allowed")
    );
    assert_eq!(err.pos, pos(2, 7));
    let err = from_node::<S>(&one(&text.replace("reason: r", "reason: 1")), "").unwrap_err();
    assert_eq!(err.path, "actions[1].Deny.reason");
    let err = from_node::<S>(&one(&text.replace("Limit", "Limt")), "").unwrap_err();
    assert_eq!(err.path, "actions[2].Limt");
    assert!(err.message.starts_with("unknown variant \"Limt\""), "{err}");
    let err = from_node::<S>(&one(&text.replace("name: n", "name: 1")), "").unwrap_err();
    assert_eq!(err.path, "name");
    let err = from_node::<S>(&one(&text.replace("[1, x]", "[1, x, 2]")), "").unwrap_err();
    assert_eq!(err.path, "pair");
    let err = from_node::<S>(&one(&text.replace("80: true", "80000: true")), "").unwrap_err();
    assert_eq!(err.path, "counts.80000");
    assert!(err.message.contains("out of range for u16"), "{err}");
}

#[test]
fn aliases() {
    let doc = one("base: &b {port: 80}\nuse: *b\nkey: &k name\n*k : 1\n");
    assert_eq!(
        doc.get("use").unwrap().get("port").unwrap().value,
        Value::Int(80)
    );
    assert_eq!(doc.get("use").unwrap().pos, pos(2, 6));
    assert_eq!(doc.get("name").unwrap().value, Value::Int(1));
    // Alias key duplicating a literal key.
    assert!(parse_documents("a: &k x\nx: 1\n*k : 2\n").is_err());
    // Anchors do not leak across documents.
    assert!(parse_documents("a: &x 1\n---\nb: *x\n").is_err());
}

#[test]
fn alias_bomb_rejected() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let prev = i - 1;
        let _ = writeln!(
            text,
            "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, \
             *a{prev}, *a{prev}, *a{prev}]"
        );
    }
    let err = parse_documents(&text).unwrap_err();
    assert!(err.message.contains("alias expansion exceeds"), "{err}");
    // Depth bomb through aliases.
    let mut deep = String::from("a0: &a0 ");
    deep.push_str(&"[".repeat(100));
    deep.push_str(&"]".repeat(100));
    deep.push_str("\na1: &a1 ");
    deep.push_str(&"[".repeat(100));
    deep.push_str("*a0");
    deep.push_str(&"]".repeat(100));
    deep.push('\n');
    let err = parse_documents(&deep).unwrap_err();
    assert!(err.message.contains("maximum nesting depth"), "{err}");
}

#[test]
fn deep_nesting_rejected() {
    for text in [
        "[".repeat(100_000),
        "{a: ".repeat(100_000),
        "- ".repeat(100_000),
    ] {
        let err = parse_documents(&text).unwrap_err();
        assert!(err.message.contains("nesting too deep"), "{err}");
    }
    let mut block = String::new();
    for i in 0..1000 {
        block.push_str(&" ".repeat(i));
        block.push_str("a:\n");
    }
    let err = parse_documents(&block).unwrap_err();
    assert!(err.message.contains("nesting too deep"), "{err}");
    // Just below the limit is fine.
    let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
    let node = one(&ok);
    let _: serde_json::Value = from_node(&node, "").unwrap();
}

#[test]
fn syntax_errors_are_located() {
    let err = parse_documents("a: 1\nb: [1, 2\n").unwrap_err();
    assert!(err.message.starts_with("YAML syntax error"), "{err}");
    assert!(err.pos.line >= 2, "{err}");
    let err = parse_documents("a:\n  b: 1\n c: 2\n").unwrap_err();
    assert!(err.message.starts_with("YAML syntax error"), "{err}");
}

#[test]
fn many_documents_parse_fast() {
    let mut text = String::new();
    for i in 0..10_000 {
        let _ = writeln!(
            text,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  labels: {{app: web}}\n\
             spec:\n  ports: [80, 443]"
        );
    }
    let start = std::time::Instant::now();
    let docs = parse_documents(&text).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(docs.len(), 10_000);
    // Generous bound so debug builds pass too; release is far faster.
    assert!(elapsed.as_secs() < 10, "{elapsed:?}");
}

/// Cheap deterministic mutation fuzzing: nothing may panic.
#[test]
fn mutated_inputs_never_panic() {
    let seeds = [
        POLICY,
        "a: &x [1, {b: *x}]\n---\n- !!int 3\n- ? [a]\n  : b\n",
        "{\"a\": [1, 2.5, \"x\", null, true], \"b\": {}}",
        "k: |\n  text\n  more\nj: >-\n  folded\n",
        "%YAML 1.2\n--- !foo\na: 'q''s'\nb: \"\\u263A\\x\"\n...\n",
    ];
    let alphabet: &[u8] = b"[]{}:,-?&*!|>'\"#%@` \n\t.~0a\\";
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..3000 {
        let seed = seeds[round % seeds.len()];
        let mut bytes = seed.as_bytes().to_vec();
        for _ in 0..=(next() % 6) {
            let at = (next() as usize) % (bytes.len() + 1);
            let c = alphabet[(next() as usize) % alphabet.len()];
            match next() % 3 {
                0 => bytes.insert(at, c),
                1 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ if at < bytes.len() => bytes[at] = c,
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(docs) = parse_documents(&text) {
            for doc in &docs {
                let _ = from_node::<serde_json::Value>(doc, "");
                let _ = from_node::<Policy>(doc, "x");
                let _ = doc.to_json();
            }
        }
    }
}
