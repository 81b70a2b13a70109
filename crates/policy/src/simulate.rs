//! Running a ConnectivityTest against the engine: every probe judged offline, with the same
//! report `lab run` produces from real packets.

use std::net::IpAddr;

use serde::Serialize;

use palisade_policy_api::load::{Diagnostic, Manifest};
use palisade_policy_api::meta::IntOrString;
use palisade_policy_api::scenario::{
    ConnectivityTest, DnsProbe, Expectation, HttpProbe, IcmpProbe, KafkaProbe, Probe,
};

use crate::engine::Engine;
use crate::eval::{self, describe, rule_name, FlowVerdict, Party};
use crate::l7::{HttpRequest, KafkaRequest, L7Request, L7Rules};
use crate::model::{proto, Direction};
use crate::table::{Decision, L7Decision};

/// The result of one probe, echoing its fields.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    pub from: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(rename = "toIP", skip_serializing_if = "Option::is_none")]
    pub to_ip: Option<String>,
    #[serde(rename = "toFQDN", skip_serializing_if = "Option::is_none")]
    pub to_fqdn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<serde_json::Value>,
    pub protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpProbe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsProbe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaProbe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<Expectation>,
    pub verdict: Expectation,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass: Option<bool>,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub unchecked: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub name: String,
    pub results: Vec<ProbeResult>,
    pub summary: Summary,
}

impl Report {
    /// A report named after the ConnectivityTests it ran (their names, comma-separated).
    pub fn for_tests(tests: &[(&Manifest, &ConnectivityTest)], results: Vec<ProbeResult>) -> Self {
        let name = tests
            .iter()
            .filter_map(|(_, t)| t.metadata.name.clone())
            .collect::<Vec<_>>()
            .join(",");
        Self::from_results(name, results)
    }

    pub fn from_results(name: String, results: Vec<ProbeResult>) -> Self {
        let mut summary = Summary::default();
        for r in &results {
            match r.pass {
                Some(true) => summary.passed += 1,
                Some(false) => summary.failed += 1,
                None => summary.unchecked += 1,
            }
        }
        Report {
            name,
            results,
            summary,
        }
    }
}

/// A probe made concrete: parties, protocol, port, request.
#[derive(Debug, Clone)]
pub struct PlannedProbe {
    pub src: Party,
    pub dst: Option<Party>,
    pub fqdn: Option<String>,
    pub proto: u8,
    /// Port, or ICMP type.
    pub port: u16,
    pub probe: Probe,
}

const DNS_NAMESPACE: &str = "kube-system";

/// Resolves every probe's names against the cluster. Errors are input errors, located.
pub fn plan(
    engine: &Engine,
    manifest: &Manifest,
    test: &ConnectivityTest,
) -> Result<Vec<PlannedProbe>, Vec<Diagnostic>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, probe) in test.spec.probes.iter().enumerate() {
        let path = format!("spec.probes[{i}]");
        match plan_one(engine, test, probe) {
            Ok(p) => out.push(p),
            Err((field, msg)) => {
                errors.push(manifest.diagnostic(&format!("{path}.{field}"), msg, None));
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn party(engine: &Engine, test: &ConnectivityTest, text: &str) -> Result<Party, String> {
    let (kind, name) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?}: expected namespace/pod, node/NAME or external/NAME"))?;
    match kind {
        "node" => engine
            .node(name)
            .map(|_| Party::Node(name.to_owned()))
            .ok_or_else(|| format!("no node named {name:?}")),
        "external" => test
            .spec
            .external_hosts
            .iter()
            .find(|h| h.name == name)
            .and_then(|h| h.ip.parse().ok())
            .map(Party::Ip)
            .ok_or_else(|| format!("no externalHosts entry named {name:?}")),
        ns => engine
            .pod(ns, name)
            .map(|_| Party::Pod {
                namespace: ns.to_owned(),
                name: name.to_owned(),
            })
            .ok_or_else(|| format!("no pod {ns}/{name}")),
    }
}

fn plan_one(
    engine: &Engine,
    test: &ConnectivityTest,
    probe: &Probe,
) -> Result<PlannedProbe, (&'static str, String)> {
    let src = party(engine, test, &probe.from).map_err(|m| ("from", m))?;
    let mut fqdn = None;
    let dst = if let Some(to) = &probe.to {
        Some(party(engine, test, to).map_err(|m| ("to", m))?)
    } else if let Some(ip) = &probe.to_ip {
        Some(Party::Ip(ip.parse::<IpAddr>().map_err(|_| {
            ("toIP", format!("invalid IP address {ip:?}"))
        })?))
    } else if let Some(name) = &probe.to_fqdn {
        fqdn = Some(name.clone());
        None
    } else {
        return Err((
            "to",
            "exactly one of to, toIP and toFQDN must be set".to_owned(),
        ));
    };
    let is_v6 = match &dst {
        Some(Party::Ip(ip)) => ip.is_ipv6(),
        Some(Party::Pod { namespace, name }) => {
            engine.pod(namespace, name).is_some_and(|p| p.ip.is_ipv6())
        }
        _ => false,
    };
    let protocol = probe.protocol.as_deref().unwrap_or("TCP");
    let (proto, port) = match protocol {
        "ICMP" => {
            let default = if is_v6 { 128 } else { 8 };
            let t = probe
                .icmp
                .as_ref()
                .and_then(|i| i.icmp_type)
                .unwrap_or(default);
            (
                if is_v6 { proto::ICMPV6 } else { proto::ICMP },
                u16::from(t),
            )
        }
        "UDP" | "TCP" => {
            let pr = if protocol == "UDP" {
                proto::UDP
            } else {
                proto::TCP
            };
            let port = match &probe.port {
                Some(IntOrString::Int(n)) => {
                    u16::try_from(*n).map_err(|_| ("port", format!("invalid port {n}")))?
                }
                Some(IntOrString::Str(name)) => {
                    let Some(Party::Pod {
                        namespace,
                        name: pod,
                    }) = &dst
                    else {
                        return Err((
                            "port",
                            format!("a named port ({name:?}) needs a pod as the target"),
                        ));
                    };
                    engine
                        .pod(namespace, pod)
                        .and_then(|p| {
                            p.ports
                                .iter()
                                .find(|np| np.name == name.to_ascii_lowercase() && np.proto == pr)
                                .map(|np| np.port)
                        })
                        .ok_or_else(|| {
                            (
                                "port",
                                format!(
                                    "pod {namespace}/{pod} has no {protocol} port named {name:?}"
                                ),
                            )
                        })?
                }
                None => return Err(("port", "missing port".to_owned())),
            };
            (pr, port)
        }
        other => return Err(("protocol", format!("unsupported protocol {other:?}"))),
    };
    if fqdn.is_some() {
        dns_server(engine).ok_or((
            "toFQDN",
            format!("a toFQDN probe needs the cluster DNS: a pod {DNS_NAMESPACE}/kube-dns"),
        ))?;
        let name = fqdn.as_deref().unwrap_or_default();
        if dns_answer(test, name).is_none() {
            return Err((
                "toFQDN",
                format!("spec.dns.records has no address for {name:?}"),
            ));
        }
    }
    Ok(PlannedProbe {
        src,
        dst,
        fqdn,
        proto,
        port,
        probe: probe.clone(),
    })
}

fn dns_server(engine: &Engine) -> Option<Party> {
    engine.pod(DNS_NAMESPACE, "kube-dns").map(|_| Party::Pod {
        namespace: DNS_NAMESPACE.to_owned(),
        name: "kube-dns".to_owned(),
    })
}

fn dns_answer(test: &ConnectivityTest, name: &str) -> Option<IpAddr> {
    let dns = test.spec.dns.as_ref()?;
    let key = name.trim_end_matches('.');
    dns.records
        .iter()
        .find(|(n, _)| n.trim_end_matches('.').eq_ignore_ascii_case(key))
        .and_then(|(_, ips)| ips.first())
        .and_then(|ip| ip.parse().ok())
}

/// Judges one planned probe.
pub fn judge(engine: &Engine, test: &ConnectivityTest, p: &PlannedProbe) -> (Expectation, String) {
    // toFQDN: the lookup first, through the cluster DNS.
    let mut learned_name = None;
    let dst = match (&p.dst, &p.fqdn) {
        (Some(d), _) => d.clone(),
        (None, Some(name)) => {
            let Some(server) = dns_server(engine) else {
                return (Expectation::Drop, "no cluster DNS".to_owned());
            };
            let Ok(v) = eval::evaluate(engine, &p.src, &server, proto::UDP, 53, None) else {
                return (
                    Expectation::Drop,
                    "cannot evaluate the DNS lookup".to_owned(),
                );
            };
            if !v.allowed() {
                return (
                    Expectation::Drop,
                    format!(
                        "the DNS lookup of {name} is dropped: {}",
                        reason_for(engine, &v)
                    ),
                );
            }
            if let Err(by) = v.l7_allows(&L7Request::Dns(name)) {
                let rules = by
                    .iter()
                    .map(|r| rule_name(engine, *r))
                    .collect::<Vec<_>>()
                    .join(", ");
                return (
                    Expectation::DnsRefused,
                    format!("DNS proxy refuses {name}: no DNS rule matches it ({rules})"),
                );
            }
            // toFQDNs learns addresses only from lookups the source's DNS proxy saw.
            let proxied = v.egress.as_ref().is_some_and(|(_, d)| {
                matches!(d, Decision::Allowed { l7: L7Decision::Restricted(r), .. } if r.iter().any(|(_, x)| matches!(**x, L7Rules::Dns(_))))
            });
            if proxied {
                learned_name = Some(name.clone());
            }
            match dns_answer(test, name) {
                Some(ip) => Party::Ip(ip),
                None => return (Expectation::Drop, format!("{name} does not resolve")),
            }
        }
        (None, None) => return (Expectation::Drop, "no target".to_owned()),
    };
    let v = match eval::evaluate(
        engine,
        &p.src,
        &dst,
        p.proto,
        p.port,
        learned_name.as_deref(),
    ) {
        Ok(v) => v,
        Err(e) => return (Expectation::Drop, e.to_string()),
    };
    if v.same_endpoint {
        return (
            Expectation::Allow,
            "a pod reaches itself without leaving it".to_owned(),
        );
    }
    if !v.allowed() {
        return (Expectation::Drop, reason_for(engine, &v));
    }
    let headers: Vec<(String, String)> = p
        .probe
        .http
        .as_ref()
        .map(|h| {
            h.headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    let topics: Vec<String> = p
        .probe
        .kafka
        .as_ref()
        .and_then(|k| k.topic.clone())
        .into_iter()
        .collect();
    let request = if let Some(h) = &p.probe.http {
        Some(L7Request::Http(HttpRequest {
            method: h.method.as_deref().unwrap_or("GET"),
            path: h.path.as_deref().unwrap_or("/"),
            host: h.host.as_deref().unwrap_or(""),
            headers: &headers,
        }))
    } else if let Some(k) = &p.probe.kafka {
        let api_key = match (k.role.as_deref(), k.api_key.as_deref()) {
            (_, Some(key)) => palisade_policy_api::kafka::api_key_by_name(key).unwrap_or(-1),
            (Some("consume"), None) => 1,
            _ => 0,
        };
        Some(L7Request::Kafka(KafkaRequest {
            api_key,
            api_version: k
                .api_version
                .and_then(|v| i16::try_from(v).ok())
                .unwrap_or(0),
            client_id: k.client_id.as_deref(),
            topics: &topics,
        }))
    } else {
        p.probe.dns.as_ref().map(|d| L7Request::Dns(&d.name))
    };
    let allowed_reason = reason_for(engine, &v);
    if let Some(req) = request {
        if let Err(by) = v.l7_allows(&req) {
            let rules = by
                .iter()
                .map(|r| rule_name(engine, *r))
                .collect::<Vec<_>>()
                .join(", ");
            let verdict = if matches!(req, L7Request::Dns(_)) {
                Expectation::DnsRefused
            } else {
                Expectation::L7Deny
            };
            return (
                verdict,
                format!("the proxy refuses the request: it matches no L7 rule of {rules}"),
            );
        }
    }
    (Expectation::Allow, allowed_reason)
}

/// The reason for a verdict: the failing direction if dropped, else what allowed it.
pub fn reason_for(engine: &Engine, v: &FlowVerdict) -> String {
    let parts: Vec<(Direction, &(String, Decision))> = v
        .egress
        .iter()
        .map(|e| (Direction::Egress, e))
        .chain(v.ingress.iter().map(|i| (Direction::Ingress, i)))
        .collect();
    if let Some((dir, (who, d))) = parts.iter().find(|(_, (_, d))| !d.passes()) {
        return describe(engine, who, *dir, d);
    }
    if let Some((dir, (who, d))) = parts.iter().find(|(_, (_, d))| d.is_audited()) {
        return describe(engine, who, *dir, d);
    }
    // Prefer the sentence of the direction that was actually decided by a rule.
    let decided: Vec<String> = parts
        .iter()
        .filter(|(_, (_, d))| matches!(d, Decision::Allowed { .. }))
        .map(|(dir, (who, d))| describe(engine, who, *dir, d))
        .collect();
    if decided.is_empty() {
        "no policy applies".to_owned()
    } else {
        decided.join("; ")
    }
}

/// Runs one ConnectivityTest.
pub fn run(engine: &Engine, test: &ConnectivityTest, planned: &[PlannedProbe]) -> Vec<ProbeResult> {
    planned
        .iter()
        .map(|p| {
            let (verdict, reason) = judge(engine, test, p);
            result(&p.probe, verdict, reason)
        })
        .collect()
}

/// Builds the report entry for a probe (shared with the lab runner).
pub fn result(probe: &Probe, verdict: Expectation, reason: String) -> ProbeResult {
    ProbeResult {
        from: probe.from.clone(),
        to: probe.to.clone(),
        to_ip: probe.to_ip.clone(),
        to_fqdn: probe.to_fqdn.clone(),
        port: probe.port.as_ref().map(|p| match p {
            IntOrString::Int(n) => serde_json::Value::from(*n),
            IntOrString::Str(s) => serde_json::Value::from(s.clone()),
        }),
        protocol: probe.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
        icmp: probe.icmp.clone(),
        http: probe.http.clone(),
        dns: probe.dns.clone(),
        kafka: probe.kafka.clone(),
        expect: probe.expect,
        verdict,
        pass: probe.expect.map(|e| e == verdict),
        reason,
    }
}
