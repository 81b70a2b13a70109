//! Real enforcement for a lab: the eBPF programs on every pod's host-side veth, maps kept in
//! step with the engine by the agent's sync.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use palisade_agent::sync::{Attachment, AuditConfig, DatapathSync};
use palisade_datapath::abi::FlowEvent;
use palisade_datapath::Datapath;
use palisade_identity::reserved;
use palisade_policy::Engine;

use crate::enforcer::{Enforcer, EnforcerError};
use crate::lab::PodAttachment;
use crate::netns;

/// The datapath of one lab: its own bpffs pin directory, removed when the lab ends.
pub struct DatapathEnforcer {
    dp: Option<Datapath>,
    sync: DatapathSync,
    pin_dir: PathBuf,
    node: String,
    node_netns: String,
    attachments: Vec<Attachment>,
    attached_ifnames: Vec<String>,
    audit: AuditConfig,
}

impl DatapathEnforcer {
    /// Loads the programs with maps pinned under `pin_dir`. `node` is the engine's name of the
    /// lab's node; `node_netns` its network namespace; `extra_host_ips` node addresses the
    /// engine does not know (the lab made them up), which are the host too.
    pub fn open(
        pin_dir: &Path,
        node: &str,
        node_netns: &str,
        extra_host_ips: &[std::net::IpAddr],
        audit: AuditConfig,
    ) -> Result<Self, EnforcerError> {
        let dp = Datapath::open(pin_dir)?;
        let mut sync = DatapathSync::new();
        let extra: BTreeMap<IpNet, (u32, u32)> = extra_host_ips
            .iter()
            .map(|ip| (IpNet::from(*ip), (reserved::HOST, 0)))
            .collect();
        sync.set_extra_ipcache(extra);
        Ok(DatapathEnforcer {
            dp: Some(dp),
            sync,
            pin_dir: pin_dir.to_path_buf(),
            node: node.to_owned(),
            node_netns: node_netns.to_owned(),
            attachments: Vec::new(),
            attached_ifnames: Vec::new(),
            audit,
        })
    }

    /// The datapath endpoint id of a pod attached through this enforcer.
    pub fn endpoint_id(&self, namespace: &str, name: &str) -> Option<u32> {
        self.sync.endpoint_id(namespace, name)
    }

    pub fn datapath(&mut self) -> Option<&mut Datapath> {
        self.dp.as_mut()
    }

    /// Every flow event the datapath sent that was not taken yet (none once closed); the
    /// datapath of a lab sends them without a rate limit.
    pub fn take_events(&mut self) -> Vec<FlowEvent> {
        self.dp
            .as_mut()
            .map(Datapath::take_events)
            .unwrap_or_default()
    }

    /// Flow events the kernel could not send (its ring buffer was full), 0 once closed.
    pub fn lost_events(&self) -> u64 {
        self.dp
            .as_ref()
            .and_then(|dp| dp.metrics().ok())
            .map_or(0, |m| m.lost_events)
    }

    /// Detaches every program and removes the pinned maps and links.
    pub fn close(&mut self) {
        if let Some(mut dp) = self.dp.take() {
            let names = std::mem::take(&mut self.attached_ifnames);
            let ns = self.node_netns.clone();
            let _ = netns::with_netns(&ns, || {
                for n in &names {
                    let _ = dp.detach(n);
                }
            });
            drop(dp);
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

impl Drop for DatapathEnforcer {
    fn drop(&mut self) {
        self.close();
    }
}

impl Enforcer for DatapathEnforcer {
    fn endpoint_added(&mut self, pod: &PodAttachment) -> Result<(), EnforcerError> {
        let Some(dp) = self.dp.as_mut() else {
            return Err("the datapath is closed".into());
        };
        // TCX attaches by interface name in the current namespace: the node's.
        netns::with_netns(&pod.node_netns, || dp.attach(&pod.host_ifname))??;
        self.attached_ifnames.push(pod.host_ifname.clone());
        self.attachments.push(Attachment {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            ifindex: pod.host_ifindex,
        });
        Ok(())
    }

    fn sync(&mut self, engine: &Engine) -> Result<(), EnforcerError> {
        let Some(dp) = self.dp.as_mut() else {
            return Err("the datapath is closed".into());
        };
        self.sync
            .sync(dp, engine, &self.node, &self.attachments, &self.audit)?;
        Ok(())
    }
}
