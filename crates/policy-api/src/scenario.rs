//! `palisade.dev/v1alpha1` ConnectivityTest: the scenario format `simulate` and `lab run` share.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::{IntOrString, ObjectMeta};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectivityTest {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ConnectivityTestSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectivityTestSpec {
    #[serde(default)]
    pub external_hosts: Vec<ExternalHost>,
    pub dns: Option<DnsConfig>,
    #[serde(default)]
    pub probes: Vec<Probe>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalHost {
    pub name: String,
    pub ip: String,
    #[serde(default)]
    pub ports: Vec<HostPort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPort {
    pub port: i64,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    #[serde(default)]
    pub records: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Probe {
    pub from: String,
    pub to: Option<String>,
    #[serde(rename = "toIP")]
    pub to_ip: Option<String>,
    #[serde(rename = "toFQDN")]
    pub to_fqdn: Option<String>,
    pub port: Option<IntOrString>,
    pub protocol: Option<String>,
    pub icmp: Option<IcmpProbe>,
    pub http: Option<HttpProbe>,
    pub dns: Option<DnsProbe>,
    pub kafka: Option<KafkaProbe>,
    pub expect: Option<Expectation>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpProbe {
    #[serde(rename = "type")]
    pub icmp_type: Option<u8>,
    pub code: Option<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsProbe {
    pub name: String,
    #[serde(rename = "type")]
    pub record_type: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KafkaProbe {
    pub role: Option<String>,
    pub api_key: Option<String>,
    pub api_version: Option<i64>,
    pub topic: Option<String>,
    #[serde(rename = "clientID")]
    pub client_id: Option<String>,
}

/// What a probe must observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Expectation {
    #[serde(rename = "allow")]
    Allow,
    #[serde(rename = "drop")]
    Drop,
    #[serde(rename = "l7-deny")]
    L7Deny,
    #[serde(rename = "dns-refused")]
    DnsRefused,
}

impl Expectation {
    pub fn as_str(self) -> &'static str {
        match self {
            Expectation::Allow => "allow",
            Expectation::Drop => "drop",
            Expectation::L7Deny => "l7-deny",
            Expectation::DnsRefused => "dns-refused",
        }
    }
}
