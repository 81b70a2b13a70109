//! The agent: desired state (store) → engine → datapath, driven by API requests.
//!
//! Every change follows the same path: validate (a bad batch changes nothing), store the new
//! desired state atomically, update the engine incrementally and commit, then
//! [`DatapathSync::sync`] the difference into the kernel maps; the time from the request's
//! arrival to the end of the sync is kept for `status`.
//!
//! On start the agent loads the store, rebuilds the engine by replaying the stored objects in
//! the order they were applied, opens the datapath on the same pin directory (which moves the
//! pinned links of the previous run onto the new programs), reads the kernel's maps back into
//! the sync's caches and syncs: only entries that differ from the engine are rewritten, and
//! how many is reported (`status`: `startup.reconcile`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use palisade_datapath::abi::{
    PAL_EP_F_AUDIT, PAL_EP_F_ENFORCE_EGRESS, PAL_EP_F_ENFORCE_INGRESS, PAL_REASON_FAIL_CLOSED,
    PAL_REASON_NONE, PAL_REASON_POLICY_DEFAULT, PAL_REASON_POLICY_DENY, PAL_REASON_SPOOFED,
};
use palisade_datapath::{Datapath, Direction as DpDirection};
use palisade_identity::{keys, Identity, CLUSTER_MIN, LOCAL_MIN};
use palisade_policy::model::AUDIT_ANNOTATION;
use palisade_policy::{Config, Engine, EngineError, NodeInfo};
use palisade_policy_api::load::{Bundle, Diagnostic};

use crate::desired::{self, Item, Prepared, RuleIds};
use crate::netns;
use crate::protocol::{
    AgentStatus, ApplyTiming, AuditState, Change, ChangeAction, ChangeReport, DatapathMetrics,
    DatapathStatus, EndpointInfo, EndpointReport, Enforcement, FlowStatus, IdentityInfo,
    KernelReport, ObjectCounts, PolicyInfo, Request, ResourceKind, Response, SourceFile,
    StartupReport, SyncReport, WireDiagnostic,
};
use crate::store::{
    ObjectKey, ObjectKind, Settings, Store, StoreError, StoredEndpoint, StoredObject, OBJECTS_FILE,
};
use crate::sync::{Attachment, AuditConfig, DatapathSync, SyncError, SyncStats};
use crate::telemetry::{PollSchedule, RateLimit, Telemetry, EVENT_POLL, METRICS_POLL};

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub bpf_pin_dir: PathBuf,
    /// `Some`: set (and store) global audit mode; `None`: keep the stored setting.
    pub policy_audit_mode: Option<bool>,
    /// This node's name: pods without `spec.nodeName` run here; its addresses are `host`.
    pub node_name: String,
    /// `io.cilium.k8s.policy.cluster` of every pod.
    pub cluster_name: String,
    /// How many flows the agent keeps for `palisade observe`.
    pub flow_buffer: usize,
    /// The datapath's flow event rate limit (per CPU).
    pub events_rate_limit: RateLimit,
    /// Where to serve Prometheus metrics (`host:port`, `[v6]:port`, `:port`), if anywhere.
    pub prometheus_serve_addr: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "the agent needs root (it loads eBPF programs and attaches them to interfaces); run it \
         as root"
    )]
    NotRoot,
    #[error("state directory: {0}")]
    Store(#[from] StoreError),
    #[error("loading the datapath (pin directory {pin_dir}): {source}")]
    Datapath {
        pin_dir: PathBuf,
        source: palisade_datapath::Error,
    },
    #[error("reading the kernel's maps back: {0}")]
    Sync(#[from] SyncError),
    #[error("rebuilding the engine: {0}")]
    Engine(#[from] EngineError),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket {0}: another agent is serving on it")]
    AlreadyRunning(PathBuf),
    #[error("socket {0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{0}")]
    Other(String),
}

/// Prints one line of the agent's log (stderr).
pub(crate) fn log(message: &str) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!(
        "palisade agent [{}.{:03}]: {message}",
        now.as_secs(),
        now.subsec_millis()
    );
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A stored object with what it means to the engine (`None`: it no longer loads; it is kept
/// in the store but not enforced).
#[derive(Debug, Clone)]
struct Entry {
    stored: StoredObject,
    item: Option<Item>,
}

type PodKey = (String, String);

/// The running agent (owned by one thread; requests are handled one at a time).
pub struct Agent {
    options: Options,
    store: Store,
    revision: u64,
    objects: BTreeMap<ObjectKey, Entry>,
    endpoints: BTreeMap<PodKey, StoredEndpoint>,
    settings: Settings,
    engine: Engine,
    rule_ids: RuleIds,
    dp: Datapath,
    sync: DatapathSync,
    /// Endpoints whose interface could not be found (not synced until re-attached).
    missing: BTreeSet<PodKey>,
    started: Instant,
    started_at: u64,
    startup: StartupReport,
    last_sync: SyncReport,
    last_sync_error: Option<String>,
    timing: ApplyTiming,
    /// Flows and metrics, shared with the socket and HTTP threads.
    telemetry: Telemetry,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("options", &self.options)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

/// Builds an engine from stored objects, replaying them in the order they were applied
/// (batch by batch, each batch in `cluster::load`'s order) so identities and rule ids come out
/// as the live engine had them.
fn build_engine(
    options: &Options,
    objects: &BTreeMap<ObjectKey, Entry>,
) -> Result<(Engine, RuleIds), EngineError> {
    let mut engine = Engine::new(Config {
        cluster: options.cluster_name.clone(),
        ..Config::default()
    });
    engine.upsert_node(NodeInfo {
        name: options.node_name.clone(),
        labels: BTreeMap::new(),
        ips: Vec::new(),
    });
    let mut order: Vec<(&ObjectKey, &Entry)> = objects.iter().collect();
    order.sort_by_key(|(_, e)| (e.stored.revision, e.stored.index));
    let mut ids = RuleIds::new();
    let mut i = 0;
    while i < order.len() {
        let revision = order[i].1.stored.revision;
        let mut j = i;
        while j < order.len() && order[j].1.stored.revision == revision {
            j += 1;
        }
        desired::apply_items(
            &mut engine,
            order[i..j]
                .iter()
                .filter_map(|(k, e)| e.item.as_ref().map(|item| (*k, item, e.stored.first_rule))),
            &mut ids,
        )?;
        i = j;
    }
    engine.commit();
    Ok((engine, ids))
}

fn rejected(errors: &[Diagnostic], warnings: &[Diagnostic]) -> Response {
    Response::Rejected {
        diagnostics: errors
            .iter()
            .chain(warnings)
            .map(WireDiagnostic::from)
            .collect(),
    }
}

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

/// Reads every file of a request into one bundle (all errors together).
fn load_files(files: &[SourceFile]) -> Result<Bundle, Vec<Diagnostic>> {
    let mut bundle = Bundle::default();
    let mut errors = Vec::new();
    for f in files {
        match palisade_policy_api::load_str(&f.name, &f.text) {
            Ok(b) => {
                bundle.manifests.extend(b.manifests);
                bundle.warnings.extend(b.warnings);
            }
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(bundle)
    } else {
        Err(errors)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && !s.contains(['/', '\0'])
        && !s.chars().any(char::is_whitespace)
}

impl Agent {
    /// Loads the store, rebuilds the engine, opens the datapath and reconciles the kernel with
    /// the desired state.
    pub fn start(options: Options, telemetry: Telemetry) -> Result<Agent, AgentError> {
        let started = Instant::now();
        if !nix::unistd::geteuid().is_root() {
            return Err(AgentError::NotRoot);
        }
        let (store, state) = Store::open(&options.state_dir)?;
        let mut startup = StartupReport::default();
        let objects_file = options.state_dir.join(OBJECTS_FILE).display().to_string();
        let mut objects = BTreeMap::new();
        for (key, stored) in state.objects {
            let file = format!("{objects_file}#{key}");
            let item = match desired::reload(&key, &stored.document, &file, &options.node_name) {
                Ok(item) => {
                    startup.restored_objects += 1;
                    Some(item)
                }
                Err(e) => {
                    log(&format!(
                        "stored object {key} does not load, it is not enforced: {e}"
                    ));
                    startup.skipped_objects.push(format!("{key}: {e}"));
                    None
                }
            };
            objects.insert(key, Entry { stored, item });
        }
        let mut settings = state.settings;
        if let Some(global) = options.policy_audit_mode {
            if settings.policy_audit_mode != global {
                settings.policy_audit_mode = global;
                store.save_settings(&settings)?;
            }
        }
        let (engine, rule_ids) = build_engine(&options, &objects)?;
        let mut dp =
            Datapath::open(&options.bpf_pin_dir).map_err(|source| AgentError::Datapath {
                pin_dir: options.bpf_pin_dir.clone(),
                source,
            })?;
        let limit = options.events_rate_limit;
        dp.set_ratelimit(limit.rate, limit.burst)
            .map_err(|source| AgentError::Datapath {
                pin_dir: options.bpf_pin_dir.clone(),
                source,
            })?;
        let mut agent = Agent {
            store,
            revision: state.revision,
            objects,
            endpoints: state.endpoints,
            settings,
            engine,
            rule_ids,
            dp,
            sync: DatapathSync::new(),
            missing: BTreeSet::new(),
            started,
            started_at: unix_now(),
            startup,
            last_sync: SyncReport::default(),
            last_sync_error: None,
            timing: ApplyTiming::default(),
            telemetry,
            options,
        };
        agent.restore_endpoints()?;
        let attachments = agent.attachments();
        let (sync, kernel) = DatapathSync::from_kernel(&agent.dp, &attachments)?;
        agent.sync = sync;
        agent.startup.kernel = KernelReport {
            ipcache_entries: kernel.ipcache_entries,
            endpoints: kernel.endpoints,
            unknown_endpoints: kernel.unknown_endpoints,
            tables: kernel.tables,
            table_entries: kernel.table_entries,
        };
        let (stats, err) = agent.sync_now();
        agent.startup.reconcile = stats.into();
        agent.startup.restored_endpoints = agent.endpoints.len();
        agent.startup.duration_ms = ms(started.elapsed());
        log(&format!(
            "restored {} objects (revision {}), {} endpoints; the kernel held {} ipcache entries, \
             {} endpoints, {} tables; reconciling rewrote {} map entries ({} tables, {} endpoint \
             records, {} ipcache entries, {} removals){}",
            agent.startup.restored_objects,
            agent.revision,
            agent.endpoints.len(),
            kernel.ipcache_entries,
            kernel.endpoints,
            kernel.tables,
            stats.map_writes(),
            stats.tables_written,
            stats.endpoints_written,
            stats.ipcache_changes,
            stats.endpoints_removed + stats.tables_removed,
            err.map(|e| format!("; sync failed: {e}"))
                .unwrap_or_default()
        ));
        Ok(agent)
    }

    /// Checks every stored endpoint's interface: resolves its ifindex again, and attaches the
    /// programs where the pinned links are gone (or the interface was recreated).
    fn restore_endpoints(&mut self) -> Result<(), AgentError> {
        let linked: HashSet<String> = self
            .dp
            .attached()
            .map_err(|source| AgentError::Datapath {
                pin_dir: self.options.bpf_pin_dir.clone(),
                source,
            })?
            .into_iter()
            .collect();
        let mut changed = false;
        let keys: Vec<PodKey> = self.endpoints.keys().cloned().collect();
        for key in keys {
            let Some(e) = self.endpoints.get(&key).cloned() else {
                continue;
            };
            let found = netns::ifindex(e.netns.as_deref(), &e.host_ifname);
            match found {
                Ok(Some(ifindex)) => {
                    let recreated = ifindex != e.ifindex;
                    if recreated || !linked.contains(&e.host_ifname) {
                        if let Err(err) = self.attach_link(e.netns.as_deref(), &e.host_ifname) {
                            log(&format!(
                                "endpoint {}/{}: re-attaching to {}: {err}",
                                key.0, key.1, e.host_ifname
                            ));
                            self.missing.insert(key.clone());
                            continue;
                        }
                    }
                    if recreated {
                        if let Some(stored) = self.endpoints.get_mut(&key) {
                            stored.ifindex = ifindex;
                            changed = true;
                        }
                    }
                }
                Ok(None) => {
                    log(&format!(
                        "endpoint {}/{}: interface {} is gone{}; not enforced until attached again",
                        key.0,
                        key.1,
                        e.host_ifname,
                        e.netns
                            .as_deref()
                            .map(|n| format!(" (netns {n})"))
                            .unwrap_or_default()
                    ));
                    self.missing.insert(key.clone());
                }
                Err(err) => {
                    log(&format!("endpoint {}/{}: {err}", key.0, key.1));
                    self.missing.insert(key.clone());
                }
            }
        }
        if changed {
            self.store.save_endpoints(&self.endpoints)?;
        }
        Ok(())
    }

    /// Attaches both programs to `ifname` in `netns`; returns its ifindex there.
    fn attach_link(&mut self, netns: Option<&str>, ifname: &str) -> Result<u32, String> {
        let dp = &mut self.dp;
        netns::run_in(netns, || -> Result<u32, String> {
            let ifindex = nix::net::if_::if_nametoindex(ifname)
                .map_err(|e| format!("no interface {ifname}: {e}"))?;
            dp.attach(ifname).map_err(|e| e.to_string())?;
            Ok(ifindex)
        })
        .map_err(|e| e.to_string())?
    }

    /// Why an endpoint is not enforced, or `ready`.
    fn endpoint_state(&self, key: &PodKey) -> &'static str {
        if self.missing.contains(key) {
            return "interface-missing";
        }
        match self.engine.pod_location(&key.0, &key.1) {
            None => "waiting-for-pod",
            Some((_, _, true)) => "host-network",
            Some((_, node, _)) if node != self.options.node_name => "other-node",
            Some(_) => {
                if self.sync.written_endpoint(&key.0, &key.1).is_some() {
                    "ready"
                } else {
                    "not-synced"
                }
            }
        }
    }

    /// The endpoints the datapath enforces: attached, interface present, pod known, on this
    /// node, not host-network. (The others have no endpoint record: their traffic is dropped.)
    fn attachments(&self) -> Vec<Attachment> {
        self.endpoints
            .iter()
            .filter(|(key, _)| !self.missing.contains(*key))
            .filter(|(key, _)| {
                matches!(self.engine.pod_location(&key.0, &key.1),
                    Some((_, node, false)) if node == self.options.node_name)
            })
            .map(|(key, e)| Attachment {
                namespace: key.0.clone(),
                name: key.1.clone(),
                ifindex: e.ifindex,
            })
            .collect()
    }

    fn audit_config(&self) -> AuditConfig {
        AuditConfig {
            global: self.settings.policy_audit_mode,
            endpoints: self
                .settings
                .audit_endpoints
                .iter()
                .filter_map(|s| s.split_once('/'))
                .map(|(ns, pod)| (ns.to_owned(), pod.to_owned()))
                .collect(),
        }
    }

    /// Brings the datapath in line with the engine; the error (also kept for `status`) does
    /// not undo the stored change.
    fn sync_now(&mut self) -> (SyncStats, Option<String>) {
        let attachments = self.attachments();
        let audit = self.audit_config();
        match self.sync.sync(
            &mut self.dp,
            &self.engine,
            &self.options.node_name,
            &attachments,
            &audit,
        ) {
            Ok(stats) => {
                self.last_sync = stats.into();
                self.last_sync_error = None;
                self.telemetry.record_sync(
                    self.revision,
                    self.sync.table_sizes(),
                    attachments.len(),
                );
                (stats, None)
            }
            Err(e) => {
                let message = e.to_string();
                log(&format!("datapath sync failed: {message}"));
                self.last_sync_error = Some(message.clone());
                (SyncStats::default(), Some(message))
            }
        }
    }

    /// Syncs and records the time from `received` to the kernel holding the change.
    fn enforce(&mut self, received: Instant) -> (SyncReport, f64, Option<String>) {
        let (stats, err) = self.sync_now();
        let took = received.elapsed();
        let elapsed = ms(took);
        if err.is_none() {
            self.telemetry.metrics.observe_apply_to_enforced(took);
            self.timing.count += 1;
            self.timing.last_enforced_ms = Some(elapsed);
            self.timing.max_enforced_ms = Some(
                self.timing
                    .max_enforced_ms
                    .map_or(elapsed, |m| m.max(elapsed)),
            );
        }
        (stats.into(), elapsed, err)
    }

    /// Handles one request.
    pub fn handle(&mut self, request: Request, received: Instant) -> Response {
        match request {
            Request::Apply { files } => self.apply(&files, received),
            Request::Delete { files } => self.delete(&files, received),
            Request::Get { kind, namespace } => self.get(kind, namespace.as_deref()),
            Request::Status => Response::Status(Box::new(self.status())),
            Request::EndpointConfig {
                namespace,
                pod,
                audit,
            } => self.endpoint_config(namespace, pod, audit, received),
            Request::Attach {
                namespace,
                pod,
                host_ifname,
                netns,
            } => self.attach(namespace, pod, &host_ifname, netns.as_deref(), received),
            Request::Detach { namespace, pod } => self.detach(namespace, pod, received),
            // Served by the connection's thread from the flow buffer.
            Request::Flows(_) => error("flows are served by the connection, not the agent"),
        }
    }

    /// Reads the datapath when `schedule` says so: the flow events waiting (decoded into the
    /// flow buffer, counted in the metrics) every [`EVENT_POLL`], the counters every
    /// [`METRICS_POLL`]. Called by the agent thread between requests.
    pub fn poll_datapath(&mut self, schedule: &mut PollSchedule) {
        let now = Instant::now();
        if now >= schedule.next_events {
            let events = self.dp.take_events();
            self.telemetry
                .record_events(&events, &self.engine, &self.options.node_name);
            schedule.next_events = Instant::now() + EVENT_POLL;
        }
        if now >= schedule.next_metrics {
            match self.dp.metrics() {
                Ok(m) => self.telemetry.record_datapath(&m),
                Err(e) => log(&format!("reading the datapath's counters: {e}")),
            }
            schedule.next_metrics = Instant::now() + METRICS_POLL;
        }
    }

    /// The flow buffer and the metrics (for the socket and HTTP threads).
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    fn apply(&mut self, files: &[SourceFile], received: Instant) -> Response {
        let bundle = match load_files(files) {
            Ok(b) => b,
            Err(errors) => return rejected(&errors, &[]),
        };
        let mut warnings = bundle.warnings.clone();
        let prepared = match desired::prepare(&bundle, &self.options.node_name, &mut warnings) {
            Ok(p) => p,
            Err(errors) => return rejected(&errors, &warnings),
        };
        let pairs: Vec<(&Prepared, &palisade_policy_api::Manifest)> = prepared
            .iter()
            .map(|p| (p, &bundle.manifests[p.manifest]))
            .collect();
        let existing = self
            .objects
            .iter()
            .filter_map(|(k, e)| e.item.as_ref().map(|i| (k, i)));
        let errors = desired::check(&pairs, existing, &self.options.node_name);
        if !errors.is_empty() {
            return rejected(&errors, &warnings);
        }

        let mut changes = Vec::new();
        let mut changed = Vec::new();
        for p in prepared {
            let action = match self.objects.get(&p.key) {
                None => ChangeAction::Created,
                Some(e) if e.item.is_some() && e.stored.document == p.document => {
                    ChangeAction::Unchanged
                }
                Some(_) => ChangeAction::Configured,
            };
            changes.push(change(&p.key, action));
            if action != ChangeAction::Unchanged {
                changed.push(p);
            }
        }
        let warnings: Vec<WireDiagnostic> = warnings.iter().map(WireDiagnostic::from).collect();
        if changed.is_empty() {
            return Response::Applied(ChangeReport {
                changes,
                warnings,
                revision: self.revision,
                sync: None,
                enforced_ms: None,
                sync_error: None,
            });
        }

        // The engine first (in memory; a failure rebuilds it), then the store; the kernel
        // only ever gets what the store holds.
        let revision = self.revision + 1;
        let first_rules = match desired::apply_items(
            &mut self.engine,
            changed.iter().map(|p| (&p.key, &p.item, None)),
            &mut self.rule_ids,
        ) {
            Ok(f) => f.into_iter().collect::<HashMap<_, _>>(),
            Err(e) => return self.roll_back(Vec::new(), false, &e),
        };
        let now = unix_now();
        let mut previous: Vec<(ObjectKey, Option<Entry>)> = Vec::new();
        for (index, p) in changed.iter().enumerate() {
            let entry = Entry {
                stored: StoredObject {
                    key: p.key.clone(),
                    revision,
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    source: p.source.clone(),
                    applied_at: now,
                    first_rule: first_rules.get(&p.key).copied().flatten(),
                    document: p.document.clone(),
                },
                item: Some(p.item.clone()),
            };
            previous.push((p.key.clone(), self.objects.insert(p.key.clone(), entry)));
        }
        if let Err(e) = self
            .store
            .save_objects(revision, self.objects.values().map(|e| &e.stored))
        {
            return self.roll_back(previous, false, &e);
        }
        self.engine.commit();
        self.revision = revision;
        let (sync, enforced_ms, sync_error) = self.enforce(received);
        log(&format!(
            "revision {revision}: applied {} objects, enforced in {enforced_ms:.1} ms ({} map writes)",
            changed.len(),
            sync.map_writes
        ));
        Response::Applied(ChangeReport {
            changes,
            warnings,
            revision,
            sync: Some(sync),
            enforced_ms: Some(enforced_ms),
            sync_error,
        })
    }

    fn restore_objects(&mut self, previous: Vec<(ObjectKey, Option<Entry>)>) {
        for (key, old) in previous.into_iter().rev() {
            match old {
                Some(e) => {
                    self.objects.insert(key, e);
                }
                None => {
                    self.objects.remove(&key);
                }
            }
        }
    }

    /// A change failed half-way (the engine ran out of identities, or the store could not be
    /// written): the previous objects go back (into the store too, if it was written) and the
    /// engine is rebuilt from them.
    fn roll_back(
        &mut self,
        previous: Vec<(ObjectKey, Option<Entry>)>,
        store_written: bool,
        cause: &dyn std::fmt::Display,
    ) -> Response {
        self.restore_objects(previous);
        let saved = if store_written {
            self.store
                .save_objects(self.revision, self.objects.values().map(|e| &e.stored))
        } else {
            Ok(())
        };
        match build_engine(&self.options, &self.objects) {
            Ok((engine, ids)) => {
                self.engine = engine;
                self.rule_ids = ids;
            }
            Err(e) => log(&format!("rebuilding the engine after a failed change: {e}")),
        }
        let _ = self.sync_now();
        let mut message = format!("nothing was applied: {cause}");
        if let Err(e) = saved {
            let _ = write!(
                message,
                "; restoring the previous state in the store failed too: {e}"
            );
        }
        error(message)
    }

    fn delete(&mut self, files: &[SourceFile], received: Instant) -> Response {
        let bundle = match load_files(files) {
            Ok(b) => b,
            Err(errors) => return rejected(&errors, &[]),
        };
        let keys = match desired::keys(&bundle) {
            Ok(k) => k,
            Err(errors) => return rejected(&errors, &bundle.warnings),
        };
        let mut changes = Vec::new();
        let mut previous: Vec<(ObjectKey, Option<Entry>)> = Vec::new();
        for key in keys {
            match self.objects.remove(&key) {
                Some(e) => {
                    changes.push(change(&key, ChangeAction::Deleted));
                    previous.push((key, Some(e)));
                }
                None => {
                    let action = if previous.iter().any(|(k, _)| *k == key) {
                        ChangeAction::Deleted
                    } else {
                        ChangeAction::NotFound
                    };
                    changes.push(change(&key, action));
                }
            }
        }
        let warnings: Vec<WireDiagnostic> =
            bundle.warnings.iter().map(WireDiagnostic::from).collect();
        if previous.is_empty() {
            return Response::Deleted(ChangeReport {
                changes,
                warnings,
                revision: self.revision,
                sync: None,
                enforced_ms: None,
                sync_error: None,
            });
        }
        let revision = self.revision + 1;
        if let Err(e) = self
            .store
            .save_objects(revision, self.objects.values().map(|e| &e.stored))
        {
            self.restore_objects(previous);
            return error(format!("nothing was deleted: {e}"));
        }
        let mut failed = None;
        for (key, old) in &previous {
            if let Some(Entry {
                item: Some(item), ..
            }) = old
            {
                if let Err(e) = desired::remove_item(&mut self.engine, key, item) {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            return self.roll_back(previous, true, &e);
        }
        self.engine.commit();
        self.revision = revision;
        let (sync, enforced_ms, sync_error) = self.enforce(received);
        log(&format!(
            "revision {revision}: deleted {} objects, enforced in {enforced_ms:.1} ms ({} map writes)",
            previous.len(),
            sync.map_writes
        ));
        Response::Deleted(ChangeReport {
            changes,
            warnings,
            revision,
            sync: Some(sync),
            enforced_ms: Some(enforced_ms),
            sync_error,
        })
    }

    fn endpoint_info(&self, key: &PodKey) -> Option<EndpointInfo> {
        let e = self.endpoints.get(key)?;
        let written = self.sync.written_endpoint(&key.0, &key.1);
        let flags = written.map_or(0, |v| v.flags);
        let endpoint_audit = self
            .settings
            .audit_endpoints
            .contains(&format!("{}/{}", key.0, key.1));
        let identity = self.engine.pod_identity(&key.0, &key.1);
        let labels = identity
            .and_then(|id| self.engine.identity_labels(id))
            .map(|l| l.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        Some(EndpointInfo {
            namespace: key.0.clone(),
            pod: key.1.clone(),
            endpoint_id: written.map(|v| v.endpoint_id),
            identity,
            ip: self
                .engine
                .pod_location(&key.0, &key.1)
                .map(|(ip, _, _)| ip.to_string()),
            host_ifname: e.host_ifname.clone(),
            ifindex: e.ifindex,
            netns: e.netns.clone(),
            policy_enforcement: Enforcement {
                ingress: flags & PAL_EP_F_ENFORCE_INGRESS != 0,
                egress: flags & PAL_EP_F_ENFORCE_EGRESS != 0,
            },
            audit: AuditState {
                endpoint: endpoint_audit,
                global: self.settings.policy_audit_mode,
                effective: if written.is_some() {
                    flags & PAL_EP_F_AUDIT != 0
                } else {
                    endpoint_audit || self.settings.policy_audit_mode
                },
            },
            state: self.endpoint_state(key).to_owned(),
            labels,
        })
    }

    fn endpoint_report(
        &self,
        key: &PodKey,
        action: &str,
        synced: Option<(SyncReport, f64, Option<String>)>,
        fallback: Option<EndpointInfo>,
    ) -> Response {
        let Some(endpoint) = self.endpoint_info(key).or(fallback) else {
            return error(format!("no endpoint {}/{}", key.0, key.1));
        };
        let (sync, enforced_ms, sync_error) = match synced {
            Some((s, t, e)) => (Some(s), Some(t), e),
            None => (None, None, None),
        };
        Response::Endpoint(EndpointReport {
            endpoint,
            action: action.to_owned(),
            sync,
            enforced_ms,
            sync_error,
        })
    }

    fn endpoint_config(
        &mut self,
        namespace: String,
        pod: String,
        audit: Option<bool>,
        received: Instant,
    ) -> Response {
        let key = (namespace, pod);
        if !self.endpoints.contains_key(&key) {
            return error(format!(
                "no endpoint {}/{}: attach the pod first (palisade endpoint attach)",
                key.0, key.1
            ));
        }
        let Some(audit) = audit else {
            return self.endpoint_report(&key, "unchanged", None, None);
        };
        let id = format!("{}/{}", key.0, key.1);
        let before = self.settings.clone();
        let changed = if audit {
            self.settings.audit_endpoints.insert(id)
        } else {
            self.settings.audit_endpoints.remove(&id)
        };
        if !changed {
            return self.endpoint_report(&key, "unchanged", None, None);
        }
        if let Err(e) = self.store.save_settings(&self.settings) {
            self.settings = before;
            return error(format!("nothing was changed: {e}"));
        }
        let synced = self.enforce(received);
        log(&format!(
            "endpoint {}/{}: audit mode {}",
            key.0,
            key.1,
            if audit { "on" } else { "off" }
        ));
        self.endpoint_report(&key, "configured", Some(synced), None)
    }

    fn attach(
        &mut self,
        namespace: String,
        pod: String,
        host_ifname: &str,
        netns: Option<&str>,
        received: Instant,
    ) -> Response {
        if !valid_name(&namespace) || !valid_name(&pod) {
            return error(format!("invalid pod {namespace:?}/{pod:?}"));
        }
        if let Some(n) = netns {
            if let Err(e) = netns::path(n) {
                return error(e.to_string());
            }
        }
        let key = (namespace, pod);
        match self.engine.pod_location(&key.0, &key.1) {
            Some((_, _, true)) => {
                return error(format!(
                    "pod {}/{} uses the host network: it has no veth of its own to attach to",
                    key.0, key.1
                ))
            }
            Some((_, node, _)) if node != self.options.node_name => {
                return error(format!(
                    "pod {}/{} runs on node {node}, and this agent is node {}",
                    key.0, key.1, self.options.node_name
                ))
            }
            _ => {}
        }
        if let Some((other, _)) = self.endpoints.iter().find(|(k, e)| {
            **k != key && e.host_ifname == host_ifname && e.netns.as_deref() == netns
        }) {
            return error(format!(
                "interface {host_ifname} is already attached to pod {}/{}",
                other.0, other.1
            ));
        }
        let old = self.endpoints.get(&key).cloned();
        let ifindex = match self.attach_link(netns, host_ifname) {
            Ok(i) => i,
            Err(e) => return error(format!("attaching to {host_ifname}: {e}")),
        };
        let unchanged = old.as_ref().is_some_and(|o| {
            o.host_ifname == host_ifname && o.netns.as_deref() == netns && o.ifindex == ifindex
        }) && !self.missing.contains(&key);
        if unchanged {
            return self.endpoint_report(&key, "unchanged", None, None);
        }
        self.endpoints.insert(
            key.clone(),
            StoredEndpoint {
                namespace: key.0.clone(),
                pod: key.1.clone(),
                host_ifname: host_ifname.to_owned(),
                ifindex,
                netns: netns.map(str::to_owned),
                attached_at: unix_now(),
            },
        );
        if let Err(e) = self.store.save_endpoints(&self.endpoints) {
            match &old {
                Some(o) => {
                    self.endpoints.insert(key.clone(), o.clone());
                }
                None => {
                    self.endpoints.remove(&key);
                    let _ = self.dp.detach(host_ifname);
                }
            }
            return error(format!("not attached: {e}"));
        }
        self.missing.remove(&key);
        let synced = self.enforce(received);
        // A pod moved to another interface: the old one loses its programs.
        if let Some(o) = old {
            if o.host_ifname != host_ifname || o.netns.as_deref() != netns {
                if let Err(e) = self.dp.detach(&o.host_ifname) {
                    log(&format!("detaching {}: {e}", o.host_ifname));
                }
            }
        }
        log(&format!(
            "endpoint {}/{} attached to {host_ifname} (ifindex {ifindex}{})",
            key.0,
            key.1,
            netns.map(|n| format!(", netns {n}")).unwrap_or_default()
        ));
        self.endpoint_report(&key, "attached", Some(synced), None)
    }

    fn detach(&mut self, namespace: String, pod: String, received: Instant) -> Response {
        let key = (namespace, pod);
        let Some(info) = self.endpoint_info(&key) else {
            return error(format!("no endpoint {}/{}", key.0, key.1));
        };
        let Some(old) = self.endpoints.remove(&key) else {
            return error(format!("no endpoint {}/{}", key.0, key.1));
        };
        if let Err(e) = self.store.save_endpoints(&self.endpoints) {
            self.endpoints.insert(key, old);
            return error(format!("not detached: {e}"));
        }
        let id = format!("{}/{}", key.0, key.1);
        if self.settings.audit_endpoints.remove(&id) {
            if let Err(e) = self.store.save_settings(&self.settings) {
                log(&format!("forgetting the audit setting of {id}: {e}"));
            }
        }
        self.missing.remove(&key);
        // The endpoint record and its tables go first, then the programs.
        let synced = self.enforce(received);
        if let Err(e) = self.dp.detach(&old.host_ifname) {
            log(&format!("detaching {}: {e}", old.host_ifname));
        }
        log(&format!("endpoint {id} detached from {}", old.host_ifname));
        let mut info = info;
        "detached".clone_into(&mut info.state);
        self.endpoint_report(&key, "detached", Some(synced), Some(info))
    }

    fn get(&self, kind: ResourceKind, namespace: Option<&str>) -> Response {
        let in_ns = |ns: Option<&str>| match (namespace, ns) {
            (None, _) | (_, None) => true,
            (Some(want), Some(ns)) => want == ns,
        };
        match kind {
            ResourceKind::Endpoints => Response::Endpoints {
                items: self
                    .endpoints
                    .keys()
                    .filter(|k| in_ns(Some(&k.0)))
                    .filter_map(|k| self.endpoint_info(k))
                    .collect(),
            },
            ResourceKind::Policies => Response::Policies {
                items: self
                    .objects
                    .values()
                    .filter(|e| e.stored.key.kind.is_policy())
                    .filter(|e| in_ns(e.stored.key.namespace.as_deref()))
                    .map(|e| policy_info(&e.stored))
                    .collect(),
            },
            ResourceKind::Identities => {
                let mut pods: HashMap<Identity, usize> = HashMap::new();
                for id in self.engine.pod_addresses().filter_map(|(_, _, id)| id) {
                    *pods.entry(id).or_default() += 1;
                }
                let mut endpoints: HashMap<Identity, usize> = HashMap::new();
                for key in self.endpoints.keys() {
                    if let Some(id) = self.engine.pod_identity(&key.0, &key.1) {
                        *endpoints.entry(id).or_default() += 1;
                    }
                }
                let mut items: Vec<IdentityInfo> = self
                    .engine
                    .identities()
                    .map(|(id, labels)| {
                        let ns = labels
                            .get_from(palisade_identity::Source::K8s, keys::NAMESPACE)
                            .map(|l| l.value.to_string());
                        IdentityInfo {
                            id,
                            scope: if id < CLUSTER_MIN {
                                "reserved"
                            } else if id >= LOCAL_MIN {
                                "cidr"
                            } else {
                                "cluster"
                            }
                            .to_owned(),
                            namespace: ns,
                            labels: labels.iter().map(ToString::to_string).collect(),
                            pods: pods.get(&id).copied().unwrap_or(0),
                            endpoints: endpoints.get(&id).copied().unwrap_or(0),
                        }
                    })
                    .filter(|i| in_ns(i.namespace.as_deref()))
                    .collect();
                items.sort_by_key(|i| i.id);
                Response::Identities { items }
            }
        }
    }

    fn status(&self) -> AgentStatus {
        let mut counts = ObjectCounts::default();
        for key in self.objects.keys() {
            match key.kind {
                ObjectKind::Namespace => counts.namespaces += 1,
                ObjectKind::Node => counts.nodes += 1,
                ObjectKind::Pod => counts.pods += 1,
                _ => counts.policies += 1,
            }
        }
        let metrics = self.dp.metrics().ok().map(|m| {
            // Fresh numbers for the flow buffer's counters too.
            self.telemetry.ring.set_lost_in_kernel(m.lost_events);
            let sum = |reason: u8| {
                m.get(reason, DpDirection::Ingress).packets
                    + m.get(reason, DpDirection::Egress).packets
            };
            DatapathMetrics {
                forwarded_packets: sum(PAL_REASON_NONE),
                policy_denied_packets: sum(PAL_REASON_POLICY_DENY),
                default_denied_packets: sum(PAL_REASON_POLICY_DEFAULT),
                fail_closed_packets: sum(PAL_REASON_FAIL_CLOSED),
                spoofed_packets: sum(PAL_REASON_SPOOFED),
                lost_events: m.lost_events,
            }
        });
        AgentStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            node: self.options.node_name.clone(),
            cluster: self.options.cluster_name.clone(),
            state_dir: self.store.dir().display().to_string(),
            socket: self.options.socket.display().to_string(),
            bpf_pin_dir: self.options.bpf_pin_dir.display().to_string(),
            started_at: self.started_at,
            uptime_seconds: self.started.elapsed().as_secs(),
            revision: self.revision,
            policy_audit_mode: self.settings.policy_audit_mode,
            objects: counts,
            endpoints: self.endpoints.len(),
            identities: self.engine.identities().count(),
            datapath: DatapathStatus {
                in_sync: self.last_sync_error.is_none(),
                last_sync_error: self.last_sync_error.clone(),
                last_sync: self.last_sync,
                attached_interfaces: self.dp.attached().map_or(0, |a| a.len()),
                metrics,
            },
            flows: {
                let ring = self.telemetry.ring_stats();
                FlowStatus {
                    capacity: ring.capacity,
                    len: ring.len,
                    received: ring.received,
                    evicted: ring.evicted,
                    lost_in_kernel: ring.lost_in_kernel,
                    rate_limit: self.options.events_rate_limit.rate,
                    rate_burst: self.options.events_rate_limit.burst,
                    metrics_addr: self.options.prometheus_serve_addr.clone(),
                }
            },
            apply: self.timing,
            startup: self.startup.clone(),
        }
    }
}

fn change(key: &ObjectKey, action: ChangeAction) -> Change {
    Change {
        resource: key.resource(),
        kind: key.kind.as_str().to_owned(),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        action,
    }
}

fn policy_info(o: &StoredObject) -> PolicyInfo {
    let audit = o
        .document
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(AUDIT_ANNOTATION))
        .and_then(serde_json::Value::as_str)
        == Some("true");
    PolicyInfo {
        kind: o.key.kind.as_str().to_owned(),
        api_version: o
            .document
            .get("apiVersion")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        namespace: o.key.namespace.clone(),
        name: o.key.name.clone(),
        audit,
        revision: o.revision,
        source: o.source.clone(),
        applied_at: o.applied_at,
    }
}
