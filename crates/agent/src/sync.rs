//! Engine state → datapath maps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use palisade_datapath::abi::{
    PAL_EP_F_AUDIT, PAL_EP_F_AUDIT_DEFAULT_EGRESS, PAL_EP_F_AUDIT_DEFAULT_INGRESS,
    PAL_EP_F_ENFORCE_EGRESS, PAL_EP_F_ENFORCE_INGRESS, PAL_IPCACHE_F_ENDPOINT,
};
use palisade_datapath::{endpoint_value, Datapath, Direction as DpDirection, TableEntry, Verdict};
use palisade_identity::{reserved, Identity};
use palisade_policy::engine::IpOwner;
use palisade_policy::model::{Action, Direction};
use palisade_policy::table::{Table, ANY_IDENTITY};
use palisade_policy::Engine;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("datapath: {0}")]
    Datapath(#[from] palisade_datapath::Error),
    #[error("pod {0} is attached but not known to the engine")]
    UnknownPod(String),
}

/// A pod whose host-side interface carries the programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub namespace: String,
    pub name: String,
    /// Ifindex of the host-side veth, in the node's network namespace.
    pub ifindex: u32,
}

/// What one sync changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub tables_written: usize,
    pub table_entries: usize,
    pub endpoints_written: usize,
    pub ipcache_changes: usize,
}

/// Audit settings: global (`--policy-audit-mode`) and per endpoint.
#[derive(Debug, Clone, Default)]
pub struct AuditConfig {
    pub global: bool,
    pub endpoints: HashSet<(String, String)>,
}

/// Remembers what was written so a sync rewrites only the differences.
#[derive(Debug, Default)]
pub struct DatapathSync {
    endpoint_ids: HashMap<(String, String), u32>,
    next_endpoint_id: u32,
    written_tables: HashMap<(u32, DpDirection), Vec<TableEntry>>,
    written_endpoints: HashMap<u32, palisade_datapath::abi::EndpointValue>,
    written_ipcache: BTreeMap<IpNet, (u32, u32)>,
    /// Addresses the engine does not know but the datapath must (e.g. a lab's made-up node
    /// address), with their identity and flags.
    extra_ipcache: BTreeMap<IpNet, (u32, u32)>,
}

/// The flat rows the datapath loads for one engine table. Each (identity, protocol, ports)
/// key gets one verdict: deny if any rule denies (audited only when every denying rule is in
/// audit mode), else a plain allow if any allowing rule has no L7 rules, else a redirect to
/// the proxy. A table that is not default-deny but holds entries (denies from policies with
/// `enableDefaultDeny: false`) gets an allow-everything row, so only its denies bite.
pub fn table_entries(table: &Table) -> Vec<TableEntry> {
    let mut out = Vec::new();
    let mut ids: Vec<&Identity> = table.entries.keys().collect();
    ids.sort_unstable();
    for id in ids {
        for e in &table.entries[id] {
            let denies: Vec<_> = e
                .contribs
                .iter()
                .filter(|c| c.action == Action::Deny)
                .collect();
            let (verdict, audit, rule_id) = if let Some(first) = denies.first() {
                (Verdict::Deny, denies.iter().all(|c| c.audit), first.rule)
            } else if let Some(plain) = e.contribs.iter().find(|c| c.l7.is_none()) {
                (Verdict::Allow, false, plain.rule)
            } else {
                let rule = e.contribs.first().map_or(0, |c| c.rule);
                (Verdict::Redirect { proxy_port: 0 }, false, rule)
            };
            out.push(TableEntry {
                identity: *id,
                proto: e.proto,
                port_lo: e.lo,
                port_hi: e.hi,
                verdict,
                audit,
                rule_id,
            });
        }
    }
    if !table.enforcing && !out.is_empty() {
        out.push(TableEntry {
            identity: ANY_IDENTITY,
            proto: 0,
            port_lo: 0,
            port_hi: u16::MAX,
            verdict: Verdict::Allow,
            audit: false,
            rule_id: 0,
        });
    }
    out
}

/// The ipcache the datapath on `node` needs: pod addresses → their identity, node addresses →
/// host (this node) or remote-node, CIDR prefixes named by policy → their CIDR identity.
pub fn desired_ipcache(engine: &Engine, node: &str) -> BTreeMap<IpNet, (u32, u32)> {
    let mut out = BTreeMap::new();
    for (net, id) in engine.cidr_identities() {
        out.insert(net, (id, 0));
    }
    for n in engine.nodes() {
        let id = if n.name == node {
            reserved::HOST
        } else {
            reserved::REMOTE_NODE
        };
        for ip in &n.ips {
            out.insert(IpNet::from(*ip), (id, 0));
        }
    }
    for p in engine.pods() {
        let id = match engine.ip_owner(p.ip) {
            Some(IpOwner::Pod(..)) | None => engine.identity_of_ip(p.ip, node),
            Some(IpOwner::Node(_)) => continue,
        };
        let flags = if p.host_network {
            0
        } else {
            PAL_IPCACHE_F_ENDPOINT
        };
        out.insert(IpNet::from(p.ip), (id, flags));
    }
    out
}

fn dp_direction(d: Direction) -> DpDirection {
    match d {
        Direction::Ingress => DpDirection::Ingress,
        Direction::Egress => DpDirection::Egress,
    }
}

impl DatapathSync {
    pub fn new() -> Self {
        DatapathSync {
            next_endpoint_id: 1,
            ..Self::default()
        }
    }

    /// Sets ipcache entries to write beside the engine's.
    pub fn set_extra_ipcache(&mut self, extra: BTreeMap<IpNet, (u32, u32)>) {
        self.extra_ipcache = extra;
    }

    /// The endpoint id of an attached pod (stable for the life of this sync state).
    pub fn endpoint_id(&self, namespace: &str, name: &str) -> Option<u32> {
        self.endpoint_ids
            .get(&(namespace.to_owned(), name.to_owned()))
            .copied()
    }

    /// Brings the datapath in line with the engine for the pods attached on `node`.
    ///
    /// Order, so no change opens a gap: new ipcache entries first; then each endpoint's tables
    /// (each swapped in whole) before its endpoint record turns enforcement on; endpoint records
    /// that turn enforcement off before their tables go; stale ipcache entries last.
    pub fn sync(
        &mut self,
        dp: &mut Datapath,
        engine: &Engine,
        node: &str,
        attachments: &[Attachment],
        audit: &AuditConfig,
    ) -> Result<SyncStats, SyncError> {
        let mut stats = SyncStats::default();
        let mut desired_ipcache = desired_ipcache(engine, node);
        for (net, v) in &self.extra_ipcache {
            desired_ipcache.entry(*net).or_insert(*v);
        }
        for (net, v) in &desired_ipcache {
            if self.written_ipcache.get(net) != Some(v) {
                dp.set_ipcache(*net, v.0, v.1)?;
                self.written_ipcache.insert(*net, *v);
                stats.ipcache_changes += 1;
            }
        }

        let mut live: HashSet<u32> = HashSet::new();
        for a in attachments {
            let key = (a.namespace.clone(), a.name.clone());
            let endpoint_id = match self.endpoint_ids.get(&key) {
                Some(id) => *id,
                None => {
                    let id = self.next_endpoint_id;
                    self.next_endpoint_id += 1;
                    self.endpoint_ids.insert(key.clone(), id);
                    id
                }
            };
            live.insert(endpoint_id);
            let pod = engine
                .pod(&a.namespace, &a.name)
                .ok_or_else(|| SyncError::UnknownPod(format!("{}/{}", a.namespace, a.name)))?;
            let identity = engine
                .pod_identity(&a.namespace, &a.name)
                .unwrap_or(reserved::HOST);
            let mut flags = 0;
            let mut tables = Vec::new();
            for dir in Direction::BOTH {
                let table = engine
                    .pod_table(&a.namespace, &a.name, dir)
                    .unwrap_or_default();
                let rows = table_entries(&table);
                if !rows.is_empty() || table.enforcing {
                    flags |= match dir {
                        Direction::Ingress => PAL_EP_F_ENFORCE_INGRESS,
                        Direction::Egress => PAL_EP_F_ENFORCE_EGRESS,
                    };
                }
                if table.enforcing && table.default_deny_audited {
                    flags |= match dir {
                        Direction::Ingress => PAL_EP_F_AUDIT_DEFAULT_INGRESS,
                        Direction::Egress => PAL_EP_F_AUDIT_DEFAULT_EGRESS,
                    };
                }
                tables.push((dp_direction(dir), rows));
            }
            if audit.global || audit.endpoints.contains(&key) {
                flags |= PAL_EP_F_AUDIT;
            }
            let (v4, v6) = match pod.ip {
                IpAddr::V4(a) => (Some(a), None),
                IpAddr::V6(a) => (None, Some(a)),
            };
            let value = endpoint_value(endpoint_id, identity, flags, v4, v6);
            let enforcing_before = self.written_endpoints.get(&endpoint_id).map_or(0, |v| {
                v.flags & (PAL_EP_F_ENFORCE_INGRESS | PAL_EP_F_ENFORCE_EGRESS)
            });
            let turning_off = enforcing_before & !flags != 0;
            if turning_off {
                dp.set_endpoint(a.ifindex, &value)?;
                self.written_endpoints.insert(endpoint_id, value);
                stats.endpoints_written += 1;
            }
            for (dir, rows) in tables {
                let key = (endpoint_id, dir);
                if self.written_tables.get(&key) == Some(&rows) {
                    continue;
                }
                if rows.is_empty() {
                    dp.remove_table(endpoint_id, dir)?;
                } else {
                    stats.table_entries += dp.write_table(endpoint_id, dir, &rows)?;
                }
                stats.tables_written += 1;
                self.written_tables.insert(key, rows);
            }
            if self.written_endpoints.get(&endpoint_id) != Some(&value) {
                dp.set_endpoint(a.ifindex, &value)?;
                self.written_endpoints.insert(endpoint_id, value);
                stats.endpoints_written += 1;
            }
        }

        // Endpoints that went away.
        let gone: Vec<u32> = self
            .written_endpoints
            .keys()
            .copied()
            .filter(|id| !live.contains(id))
            .collect();
        for id in gone {
            self.written_endpoints.remove(&id);
            for dir in [DpDirection::Ingress, DpDirection::Egress] {
                if self.written_tables.remove(&(id, dir)).is_some() {
                    dp.remove_table(id, dir)?;
                }
            }
        }
        self.endpoint_ids.retain(|_, id| live.contains(id));

        let stale: Vec<IpNet> = self
            .written_ipcache
            .keys()
            .filter(|n| !desired_ipcache.contains_key(n))
            .copied()
            .collect();
        for net in stale {
            dp.remove_ipcache(net)?;
            self.written_ipcache.remove(&net);
            stats.ipcache_changes += 1;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::table::Contribution;

    fn contrib(rule: u32, action: Action, audit: bool) -> Contribution {
        Contribution {
            rule,
            peer: 0,
            action,
            l7: None,
            audit,
        }
    }

    #[test]
    fn verdicts_per_key() {
        let mut t = Table {
            enforcing: true,
            ..Table::default()
        };
        t.add(300, 6, 80, 80, contrib(1, Action::Allow, false));
        t.add(300, 6, 80, 80, contrib(2, Action::Deny, true));
        t.add(301, 17, 53, 53, contrib(3, Action::Allow, false));
        let rows = table_entries(&t);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].verdict, Verdict::Deny);
        assert!(rows[0].audit);
        assert_eq!(rows[0].rule_id, 2);
        assert_eq!(rows[1].verdict, Verdict::Allow);
    }

    #[test]
    fn non_default_deny_table_allows_the_rest() {
        let mut t = Table::default();
        t.add(300, 6, 22, 22, contrib(7, Action::Deny, false));
        let rows = table_entries(&t);
        assert_eq!(rows.len(), 2);
        assert!(rows
            .iter()
            .any(|r| r.identity == 0 && r.proto == 0 && r.verdict == Verdict::Allow));
        assert!(table_entries(&Table::default()).is_empty());
    }
}
