//! L7 rules as the proxy enforces them: HTTP (Cilium's Envoy translation), Kafka and DNS.

use std::fmt;

use regex::Regex;

use palisade_policy_api::cilium;
use palisade_policy_api::kafka as kafka_keys;

use crate::model::FqdnPattern;

/// The L7 rules attached to one port of one rule. An allow on a port with L7 rules sends the
/// connection to the proxy, which lets a request through when any one rule matches it.
#[derive(Debug, Clone)]
pub enum L7Rules {
    Http(Vec<HttpRule>),
    Kafka(Vec<KafkaRule>),
    Dns(Vec<FqdnPattern>),
    /// A generic `l7proto` parser; Palisade has no proxy for it and denies its requests.
    Other(String),
}

impl PartialEq for L7Rules {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl L7Rules {
    pub fn kind(&self) -> &'static str {
        match self {
            L7Rules::Http(_) => "http",
            L7Rules::Kafka(_) => "kafka",
            L7Rules::Dns(_) => "dns",
            L7Rules::Other(_) => "l7proto",
        }
    }

    /// Compiles the rules of one `toPorts` entry. Validation has already checked the regexes;
    /// a regex that still fails to compile matches nothing (fail closed).
    pub fn from_cilium(rules: &cilium::L7Rules) -> Option<Self> {
        if let Some(http) = &rules.http {
            return Some(L7Rules::Http(http.iter().map(HttpRule::compile).collect()));
        }
        if let Some(kafka) = &rules.kafka {
            return Some(L7Rules::Kafka(
                kafka.iter().map(KafkaRule::compile).collect(),
            ));
        }
        if let Some(dns) = &rules.dns {
            return Some(L7Rules::Dns(
                dns.iter()
                    .filter_map(|d| match (&d.match_name, &d.match_pattern) {
                        (Some(n), _) => Some(FqdnPattern::MatchName(n.clone())),
                        (None, Some(p)) => Some(FqdnPattern::MatchPattern(p.clone())),
                        _ => None,
                    })
                    .collect(),
            ));
        }
        rules.l7proto.as_ref().map(|p| L7Rules::Other(p.clone()))
    }
}

impl fmt::Display for L7Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            L7Rules::Http(rules) => {
                let parts: Vec<String> = rules.iter().map(ToString::to_string).collect();
                write!(f, "http[{}]", parts.join("; "))
            }
            L7Rules::Kafka(rules) => {
                let parts: Vec<String> = rules.iter().map(ToString::to_string).collect();
                write!(f, "kafka[{}]", parts.join("; "))
            }
            L7Rules::Dns(p) => {
                let parts: Vec<String> = p.iter().map(ToString::to_string).collect();
                write!(f, "dns[{}]", parts.join("; "))
            }
            L7Rules::Other(p) => write!(f, "l7proto[{p}]"),
        }
    }
}

/// A regex that must match the whole value, as Envoy's `safe_regex` does.
#[derive(Debug, Clone)]
pub struct FullRegex {
    source: String,
    re: Option<Regex>,
}

impl FullRegex {
    pub fn new(source: &str) -> Self {
        FullRegex {
            source: source.to_owned(),
            re: Regex::new(&format!("^(?:{source})$")).ok(),
        }
    }
    pub fn is_match(&self, s: &str) -> bool {
        self.re.as_ref().is_some_and(|r| r.is_match(s))
    }
}

#[derive(Debug, Clone)]
pub enum HeaderCheck {
    Present(String),
    Exact(String, String),
}

#[derive(Debug, Clone)]
pub struct HttpRule {
    pub method: Option<FullRegex>,
    pub path: Option<FullRegex>,
    pub host: Option<FullRegex>,
    pub headers: Vec<HeaderCheck>,
}

impl HttpRule {
    pub fn compile(r: &cilium::HttpRule) -> Self {
        let mut headers = Vec::new();
        // Cilium's Envoy translation: "Name value" (an optional ':' after the name) is an exact
        // match on the literal value; a lone "Name" requires presence.
        for h in &r.headers {
            match h.split_once(' ') {
                Some((name, value)) => headers.push(HeaderCheck::Exact(
                    name.trim_end_matches(':').to_owned(),
                    value.to_owned(),
                )),
                None => headers.push(HeaderCheck::Present(h.clone())),
            }
        }
        for m in &r.header_matches {
            // A mismatch action (LOG, ADD, …) makes the match advisory, never a denial.
            if m.mismatch.is_some() {
                continue;
            }
            match &m.value {
                Some(v) => headers.push(HeaderCheck::Exact(m.name.clone(), v.clone())),
                None => headers.push(HeaderCheck::Present(m.name.clone())),
            }
        }
        HttpRule {
            method: r.method.as_deref().map(FullRegex::new),
            path: r.path.as_deref().map(FullRegex::new),
            host: r.host.as_deref().map(FullRegex::new),
            headers,
        }
    }

    pub fn matches(&self, req: &HttpRequest<'_>) -> bool {
        self.method.as_ref().is_none_or(|m| m.is_match(req.method))
            && self.path.as_ref().is_none_or(|p| p.is_match(req.path))
            && self.host.as_ref().is_none_or(|h| h.is_match(req.host))
            && self.headers.iter().all(|h| match h {
                HeaderCheck::Present(name) => req.header(name).is_some(),
                HeaderCheck::Exact(name, value) => req.header(name) == Some(value.as_str()),
            })
    }
}

impl fmt::Display for HttpRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(m) = &self.method {
            parts.push(format!("method={}", m.source));
        }
        if let Some(p) = &self.path {
            parts.push(format!("path={}", p.source));
        }
        if let Some(h) = &self.host {
            parts.push(format!("host={}", h.source));
        }
        for h in &self.headers {
            match h {
                HeaderCheck::Present(n) => parts.push(format!("header {n}")),
                HeaderCheck::Exact(n, v) => parts.push(format!("header {n}={v:?}")),
            }
        }
        if parts.is_empty() {
            f.write_str("any request")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// One HTTP request as the proxy sees it.
#[derive(Debug, Clone)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a [(String, String)],
}

impl HttpRequest<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct KafkaRule {
    /// API keys allowed; empty = every key.
    pub api_keys: Vec<i16>,
    pub api_version: Option<i16>,
    pub client_id: Option<String>,
    pub topic: Option<String>,
    label: String,
}

impl KafkaRule {
    pub fn compile(r: &cilium::KafkaRule) -> Self {
        let api_keys = match (&r.role, &r.api_key) {
            (Some(role), _) if role == "produce" => kafka_keys::PRODUCE_ROLE_KEYS.to_vec(),
            (Some(_), _) => kafka_keys::CONSUME_ROLE_KEYS.to_vec(),
            (None, Some(k)) => kafka_keys::api_key_by_name(k).into_iter().collect(),
            (None, None) => Vec::new(),
        };
        let mut label = Vec::new();
        if let Some(role) = &r.role {
            label.push(format!("role={role}"));
        }
        if let Some(k) = &r.api_key {
            label.push(format!("apiKey={k}"));
        }
        if let Some(t) = &r.topic {
            label.push(format!("topic={t}"));
        }
        if let Some(c) = &r.client_id {
            label.push(format!("clientID={c}"));
        }
        KafkaRule {
            api_keys,
            api_version: r.api_version.as_deref().and_then(|v| v.parse().ok()),
            client_id: r.client_id.clone(),
            topic: r.topic.clone(),
            label: label.join(" "),
        }
    }

    pub fn matches(&self, req: &KafkaRequest<'_>) -> bool {
        (self.api_keys.is_empty() || self.api_keys.contains(&req.api_key))
            && self.api_version.is_none_or(|v| v == req.api_version)
            && self
                .client_id
                .as_deref()
                .is_none_or(|c| Some(c) == req.client_id)
            && self
                .topic
                .as_deref()
                .is_none_or(|t| req.topics.iter().all(|rt| rt == t) && !req.topics.is_empty())
    }
}

impl fmt::Display for KafkaRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// One Kafka request as the proxy sees it.
#[derive(Debug, Clone)]
pub struct KafkaRequest<'a> {
    pub api_key: i16,
    pub api_version: i16,
    pub client_id: Option<&'a str>,
    pub topics: &'a [String],
}

/// What an L7 request is, for judging it against rules.
#[derive(Debug, Clone)]
pub enum L7Request<'a> {
    Http(HttpRequest<'a>),
    Kafka(KafkaRequest<'a>),
    Dns(&'a str),
}

impl L7Rules {
    /// Whether the proxy lets this request through. A request of another protocol than the
    /// rules' parser is refused (the parser cannot read it).
    pub fn allows(&self, req: &L7Request<'_>) -> bool {
        match (self, req) {
            (L7Rules::Http(rules), L7Request::Http(r)) => rules.iter().any(|rule| rule.matches(r)),
            (L7Rules::Kafka(rules), L7Request::Kafka(r)) => {
                rules.iter().any(|rule| rule.matches(r))
            }
            (L7Rules::Dns(p), L7Request::Dns(name)) => p.iter().any(|p| p.matches(name)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(method: Option<&str>, path: Option<&str>, headers: &[&str]) -> HttpRule {
        HttpRule::compile(&cilium::HttpRule {
            method: method.map(Into::into),
            path: path.map(Into::into),
            host: None,
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            header_matches: vec![],
        })
    }

    fn req<'a>(method: &'a str, path: &'a str, headers: &'a [(String, String)]) -> HttpRequest<'a> {
        HttpRequest {
            method,
            path,
            host: "svc",
            headers,
        }
    }

    #[test]
    fn paths_are_full_regexes() {
        let r = http(Some("GET"), Some("/api/v1/*"), &[]);
        assert!(r.matches(&req("GET", "/api/v1/", &[])));
        assert!(r.matches(&req("GET", "/api/v1//", &[])));
        assert!(!r.matches(&req("GET", "/api/v1/users", &[])));
        assert!(!r.matches(&req("POST", "/api/v1/", &[])));
        let r = http(None, Some("/api/v1/.*"), &[]);
        assert!(r.matches(&req("DELETE", "/api/v1/users", &[])));
    }

    #[test]
    fn header_values_are_literal() {
        let r = http(None, None, &["X-API-Key: .*"]);
        let literal = [("x-api-key".to_owned(), ".*".to_owned())];
        let real = [("X-API-Key".to_owned(), "secret".to_owned())];
        assert!(r.matches(&req("GET", "/", &literal)));
        assert!(!r.matches(&req("GET", "/", &real)));
        let presence = http(None, None, &["X-API-Key"]);
        assert!(presence.matches(&req("GET", "/", &real)));
        assert!(!presence.matches(&req("GET", "/", &[])));
    }

    #[test]
    fn kafka_roles() {
        let r = KafkaRule::compile(&cilium::KafkaRule {
            role: Some("produce".into()),
            topic: Some("orders".into()),
            ..Default::default()
        });
        let topics = ["orders".to_owned()];
        let other = ["payments".to_owned()];
        let produce = KafkaRequest {
            api_key: 0,
            api_version: 0,
            client_id: None,
            topics: &topics,
        };
        assert!(r.matches(&produce));
        assert!(!r.matches(&KafkaRequest {
            topics: &other,
            ..produce.clone()
        }));
        assert!(!r.matches(&KafkaRequest {
            api_key: 1,
            ..produce
        }));
    }
}
