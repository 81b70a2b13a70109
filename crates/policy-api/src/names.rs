//! Kubernetes name and label syntax (apimachinery's `validation` package), and Cilium's
//! label-source prefixes.

/// RFC 1123 label: namespace names, port names' charset base.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: object names, label-key prefixes.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn is_label_name_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A qualified name (`prefix/name` or `name`), the syntax of label keys.
pub fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_label_name_part(name),
        None => is_label_name_part(s),
    }
}

/// A label value: empty, or up to 63 characters of the label-name charset.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name_part(s)
}

/// IANA service name, the syntax of named ports: at most 15 characters, lowercase letters,
/// digits and single hyphens, at least one letter, no hyphen at either end.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// Cilium label sources that may prefix a selector key (`k8s:app`, `any:app`, `reserved:host`).
pub const LABEL_SOURCES: &[&str] = &[
    "any",
    "k8s",
    "reserved",
    "cidr",
    "container",
    "unspec",
    "fqdn",
    "cilium-generated",
];

/// Splits `source:key` into its source and key. Keys without a known source prefix are `any`,
/// as Cilium's selector parser treats them.
pub fn split_label_source(key: &str) -> (&str, &str) {
    if let Some((source, rest)) = key.split_once(':') {
        if LABEL_SOURCES.contains(&source) {
            return (source, rest);
        }
    }
    ("any", key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_dns1123_label("production"));
        assert!(!is_dns1123_label("$ns"));
        assert!(!is_dns1123_label("Prod"));
        assert!(is_dns1123_subdomain("allow-dns.v1"));
        assert!(is_qualified_name("app.kubernetes.io/name"));
        assert!(is_qualified_name("io.cilium.k8s.policy.serviceaccount"));
        assert!(!is_qualified_name("-bad"));
        assert!(is_label_value(""));
        assert!(!is_label_value("has space"));
        assert!(is_port_name("http"));
        assert!(is_port_name("http-alt"));
        assert!(!is_port_name("8080"));
        assert!(!is_port_name("a--b"));
        assert!(!is_port_name("much-too-long-port-name"));
        assert_eq!(split_label_source("k8s:app"), ("k8s", "app"));
        assert_eq!(split_label_source("app"), ("any", "app"));
        assert_eq!(split_label_source("reserved:host"), ("reserved", "host"));
    }
}
