//! Engine state → datapath maps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use palisade_datapath::abi::{
    EndpointValue, PolicyKey, PolicyValue, PAL_EP_F_AUDIT, PAL_EP_F_AUDIT_DEFAULT_EGRESS,
    PAL_EP_F_AUDIT_DEFAULT_INGRESS, PAL_EP_F_ENFORCE_EGRESS, PAL_EP_F_ENFORCE_INGRESS,
    PAL_IPCACHE_F_ENDPOINT,
};
use palisade_datapath::{
    endpoint_value, lpm_entries, Datapath, Direction as DpDirection, TableEntry, Verdict,
};
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

/// What one sync changed. Every count is a map write (or removal) the sync had to make.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Policy tables swapped in (or removed because the endpoint no longer needs one).
    pub tables_written: usize,
    /// LPM entries in the tables swapped in.
    pub table_entries: usize,
    /// Endpoint records written.
    pub endpoints_written: usize,
    /// Ipcache entries written or removed.
    pub ipcache_changes: usize,
    /// Endpoint records removed (endpoint detached, or unknown to this agent).
    pub endpoints_removed: usize,
    /// Tables removed with their endpoint.
    pub tables_removed: usize,
}

impl SyncStats {
    /// Map entries written or removed, all maps together (a table swap counts once).
    pub fn map_writes(&self) -> usize {
        self.tables_written
            + self.endpoints_written
            + self.ipcache_changes
            + self.endpoints_removed
            + self.tables_removed
    }
}

/// What [`DatapathSync::from_kernel`] found in the maps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelState {
    pub ipcache_entries: usize,
    pub endpoints: usize,
    /// Endpoints whose interface is not among the attachments (removed by the next sync).
    pub unknown_endpoints: usize,
    pub tables: usize,
    pub table_entries: usize,
}

/// Audit settings: global (`--policy-audit-mode`) and per endpoint.
#[derive(Debug, Clone, Default)]
pub struct AuditConfig {
    pub global: bool,
    pub endpoints: HashSet<(String, String)>,
}

/// A table as the kernel holds it: its LPM entries in a canonical order, `None` for no table.
type LpmRows = Option<Vec<(PolicyKey, PolicyValue)>>;

/// Remembers what was written so a sync rewrites only the differences.
#[derive(Debug, Default)]
pub struct DatapathSync {
    endpoint_ids: HashMap<(String, String), u32>,
    next_endpoint_id: u32,
    written_tables: HashMap<(u32, DpDirection), LpmRows>,
    /// The engine table version last loaded for (endpoint, direction), with the enforcement
    /// flags it implied: an unchanged table is not converted again.
    table_seen: HashMap<(u32, DpDirection), (u64, u32)>,
    /// Endpoint id → (ifindex, record).
    written_endpoints: HashMap<u32, (u32, EndpointValue)>,
    written_ipcache: BTreeMap<IpNet, (u32, u32)>,
    /// Addresses the engine does not know but the datapath must (e.g. a lab's made-up node
    /// address), with their identity and flags.
    extra_ipcache: BTreeMap<IpNet, (u32, u32)>,
    /// Ifindexes of kernel endpoint records that repeat another record's endpoint id (found by
    /// [`DatapathSync::from_kernel`]): the next sync removes them.
    stray_endpoints: Vec<u32>,
}

/// The LPM entries of flat rows, in the order [`canonical`] gives (`None`: no rows, no table).
fn desired_lpm(rows: &[TableEntry]) -> LpmRows {
    if rows.is_empty() {
        None
    } else {
        Some(canonical(lpm_entries(rows)))
    }
}

fn canonical(mut lpm: Vec<(PolicyKey, PolicyValue)>) -> Vec<(PolicyKey, PolicyValue)> {
    lpm.sort_unstable();
    lpm
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
    for (ip, host_network, _) in engine.pod_addresses() {
        let id = match engine.ip_owner(ip) {
            Some(IpOwner::Pod(..)) | None => engine.identity_of_ip(ip, node),
            Some(IpOwner::Node(_)) => continue,
        };
        let flags = if host_network {
            0
        } else {
            PAL_IPCACHE_F_ENDPOINT
        };
        out.insert(IpNet::from(ip), (id, flags));
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

    /// A sync state that believes what the kernel holds: the ipcache, every endpoint record
    /// and the tables of those endpoints, read back from the pinned maps. Endpoints are matched
    /// to `attachments` by ifindex and keep their endpoint ids; records on other interfaces
    /// are remembered too, so the first [`sync`](Self::sync) removes them. The first sync then
    /// rewrites only the entries that differ from the engine's (tables compared by their LPM
    /// entries), which is how an agent restart avoids rewriting the world.
    pub fn from_kernel(
        dp: &Datapath,
        attachments: &[Attachment],
    ) -> Result<(Self, KernelState), SyncError> {
        let mut state = KernelState::default();
        let mut sync = DatapathSync::new();
        for (net, v) in dp.ipcache_entries()? {
            sync.written_ipcache.insert(net, (v.identity, v.flags));
            state.ipcache_entries += 1;
        }
        let by_ifindex: HashMap<u32, &Attachment> =
            attachments.iter().map(|a| (a.ifindex, a)).collect();
        let mut max_id = 0;
        for (ifindex, value) in dp.endpoints()? {
            let id = value.endpoint_id;
            // Two records with one id would be a corrupted map: keep the first, remove the
            // others at the next sync.
            if sync.written_endpoints.contains_key(&id) {
                sync.stray_endpoints.push(ifindex);
                state.unknown_endpoints += 1;
                continue;
            }
            state.endpoints += 1;
            max_id = max_id.max(id);
            match by_ifindex.get(&ifindex) {
                Some(a) => {
                    sync.endpoint_ids
                        .insert((a.namespace.clone(), a.name.clone()), id);
                }
                None => state.unknown_endpoints += 1,
            }
            sync.written_endpoints.insert(id, (ifindex, value));
            for dir in [DpDirection::Ingress, DpDirection::Egress] {
                let table = dp.read_table(id, dir)?.map(canonical);
                if let Some(rows) = &table {
                    state.tables += 1;
                    state.table_entries += rows.len();
                }
                sync.written_tables.insert((id, dir), table);
            }
        }
        sync.next_endpoint_id = max_id.saturating_add(1).max(1);
        Ok((sync, state))
    }

    /// Sets ipcache entries to write beside the engine's.
    pub fn set_extra_ipcache(&mut self, extra: BTreeMap<IpNet, (u32, u32)>) {
        self.extra_ipcache = extra.into_iter().map(|(n, v)| (n.trunc(), v)).collect();
    }

    /// The endpoint id of an attached pod (stable for the life of this sync state).
    pub fn endpoint_id(&self, namespace: &str, name: &str) -> Option<u32> {
        self.endpoint_ids
            .get(&(namespace.to_owned(), name.to_owned()))
            .copied()
    }

    /// The endpoint record last written for a pod (as the kernel holds it).
    pub fn written_endpoint(&self, namespace: &str, name: &str) -> Option<EndpointValue> {
        let id = self.endpoint_id(namespace, name)?;
        self.written_endpoints.get(&id).map(|(_, v)| *v)
    }

    /// The policy tables last written: how many, their LPM entries together, and the entries
    /// of the largest.
    pub fn table_sizes(&self) -> (usize, usize, usize) {
        self.written_tables
            .values()
            .flatten()
            .fold((0, 0, 0), |(n, total, max), rows| {
                (n + 1, total + rows.len(), max.max(rows.len()))
            })
    }

    /// Brings the datapath in line with the engine for the pods attached on `node`.
    ///
    /// Order, so no change opens a gap: new ipcache entries first; then each endpoint's tables
    /// (each swapped in whole) before its endpoint record turns enforcement on; endpoint records
    /// that turn enforcement off before their tables go; endpoints that went away (record, then
    /// tables); stale ipcache entries last.
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
        let mut pending_tables = Vec::new();
        let mut pending_endpoints = Vec::new();
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
            let (pod_ip, _, _) = engine
                .pod_location(&a.namespace, &a.name)
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
                let seen_key = (endpoint_id, dp_direction(dir));
                if let Some((version, bits)) = self.table_seen.get(&seen_key) {
                    if *version == table.version
                        && table.version != 0
                        && self.written_tables.contains_key(&seen_key)
                    {
                        flags |= bits;
                        continue;
                    }
                }
                let rows = table_entries(&table);
                let mut bits = 0;
                if !rows.is_empty() || table.enforcing {
                    bits |= match dir {
                        Direction::Ingress => PAL_EP_F_ENFORCE_INGRESS,
                        Direction::Egress => PAL_EP_F_ENFORCE_EGRESS,
                    };
                }
                if table.enforcing && table.default_deny_audited {
                    bits |= match dir {
                        Direction::Ingress => PAL_EP_F_AUDIT_DEFAULT_INGRESS,
                        Direction::Egress => PAL_EP_F_AUDIT_DEFAULT_EGRESS,
                    };
                }
                flags |= bits;
                tables.push((dp_direction(dir), rows, table.version, bits));
            }
            if audit.global || audit.endpoints.contains(&key) {
                flags |= PAL_EP_F_AUDIT;
            }
            let (v4, v6) = match pod_ip {
                IpAddr::V4(a) => (Some(a), None),
                IpAddr::V6(a) => (None, Some(a)),
            };
            let value = endpoint_value(endpoint_id, identity, flags, v4, v6);
            let written = self.written_endpoints.get(&endpoint_id).copied();
            let enforcing_before = written.map_or(0, |(_, v)| {
                v.flags & (PAL_EP_F_ENFORCE_INGRESS | PAL_EP_F_ENFORCE_EGRESS)
            });
            let turning_off = enforcing_before & !flags != 0;
            if turning_off {
                self.write_endpoint(dp, a.ifindex, value, &mut stats)?;
            }
            for (dir, rows, version, bits) in tables {
                let key = (endpoint_id, dir);
                let lpm = desired_lpm(&rows);
                if self.written_tables.get(&key) == Some(&lpm) {
                    self.table_seen.insert(key, (version, bits));
                    continue;
                }
                pending_tables.push((key, rows, lpm, version, bits));
            }
            if self.written_endpoints.get(&endpoint_id) != Some(&(a.ifindex, value)) {
                pending_endpoints.push((a.ifindex, value));
            }
        }

        // Every changed table at once (the kernel's per-swap waits overlap), then the endpoint
        // records that may turn enforcement on.
        let batch: Vec<(u32, DpDirection, &[TableEntry])> = pending_tables
            .iter()
            .map(|((id, dir), rows, lpm, _, _)| {
                let rows: &[TableEntry] = if lpm.is_none() { &[] } else { rows };
                (*id, *dir, rows)
            })
            .collect();
        let results = dp.write_tables(&batch);
        let mut first_error = None;
        for ((key, _, lpm, version, bits), result) in pending_tables.into_iter().zip(results) {
            match result {
                Ok(n) => {
                    stats.table_entries += n;
                    stats.tables_written += 1;
                    self.written_tables.insert(key, lpm);
                    self.table_seen.insert(key, (version, bits));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e.into());
        }
        for (ifindex, value) in pending_endpoints {
            self.write_endpoint(dp, ifindex, value, &mut stats)?;
        }

        for ifindex in std::mem::take(&mut self.stray_endpoints) {
            // An attached interface's record was just rewritten above.
            if attachments.iter().any(|a| a.ifindex == ifindex) {
                continue;
            }
            dp.remove_endpoint(ifindex)?;
            stats.endpoints_removed += 1;
        }
        // Endpoints that went away (and tables nobody's record points at).
        let mut gone: Vec<u32> = self
            .written_endpoints
            .keys()
            .chain(self.written_tables.keys().map(|(id, _)| id))
            .copied()
            .filter(|id| !live.contains(id))
            .collect();
        gone.sort_unstable();
        gone.dedup();
        for id in gone {
            if let Some((ifindex, _)) = self.written_endpoints.remove(&id) {
                dp.remove_endpoint(ifindex)?;
                stats.endpoints_removed += 1;
            }
            for dir in [DpDirection::Ingress, DpDirection::Egress] {
                self.table_seen.remove(&(id, dir));
                if let Some(table) = self.written_tables.remove(&(id, dir)) {
                    if table.is_some() {
                        dp.remove_table(id, dir)?;
                        stats.tables_removed += 1;
                    }
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

    /// Writes an endpoint record; if the endpoint moved to another interface, the record on
    /// the old one goes.
    fn write_endpoint(
        &mut self,
        dp: &mut Datapath,
        ifindex: u32,
        value: EndpointValue,
        stats: &mut SyncStats,
    ) -> Result<(), SyncError> {
        dp.set_endpoint(ifindex, &value)?;
        stats.endpoints_written += 1;
        let old = self
            .written_endpoints
            .insert(value.endpoint_id, (ifindex, value));
        if let Some((old_ifindex, _)) = old {
            if old_ifindex != ifindex {
                dp.remove_endpoint(old_ifindex)?;
                stats.endpoints_removed += 1;
            }
        }
        Ok(())
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
