//! Per-endpoint verdict tables and their lookup.
//!
//! A table holds, for one endpoint and one direction, every (peer identity, protocol, port
//! range) the policies mention, each with the rules that contributed to it. Identity `0`
//! stands for every peer. Lookup semantics are the ones every dialect here shares: a deny from
//! any rule wins over any allow, whatever their specificity; otherwise any allow admits the
//! connection; otherwise the endpoint's default decides (deny once a policy selects it in that
//! direction).

use std::collections::HashMap;
use std::sync::Arc;

use palisade_identity::Identity;
use serde::Serialize;

use crate::l7::{L7Request, L7Rules};
use crate::model::{Action, Direction, FqdnPattern};

/// Index of a rule in the engine's rule store.
pub type RuleId = u32;

/// The identity that stands for every peer.
pub const ANY_IDENTITY: Identity = 0;

#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub rule: RuleId,
    /// Which of the rule's peers matched (the same rule may match through several).
    pub peer: u16,
    pub action: Action,
    /// L7 rules the proxy applies; `None` means the whole port is allowed.
    pub l7: Option<Arc<L7Rules>>,
    /// From a policy in audit mode.
    pub audit: bool,
}

/// One (protocol, port range) key of a peer with its contributions.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// IP protocol; 0 = every protocol.
    pub proto: u8,
    pub lo: u16,
    pub hi: u16,
    pub contribs: Vec<Contribution>,
}

impl Entry {
    fn covers(&self, proto: u8, port: u16) -> bool {
        if self.proto == 0 {
            return true;
        }
        self.proto == proto && self.lo <= port && port <= self.hi
    }

    pub fn verdict(&self) -> Action {
        if self.contribs.iter().any(|c| c.action == Action::Deny) {
            Action::Deny
        } else {
            Action::Allow
        }
    }
}

/// The resolved policy of one endpoint in one direction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// Changes whenever the engine rebuilds or patches this table (never 0 once built), so a
    /// consumer can skip tables it has already loaded.
    pub version: u64,
    /// True once any policy puts the direction into default-deny.
    pub enforcing: bool,
    /// The rules (default-deny markers) that made it so.
    pub default_deny_by: Vec<RuleId>,
    /// Every policy causing the default deny is in audit mode: it passes as AUDIT.
    pub default_deny_audited: bool,
    pub entries: HashMap<Identity, Vec<Entry>>,
    /// `toFQDNs` peers: they match addresses learned from DNS answers for those names.
    pub fqdn: Vec<(FqdnPattern, Vec<Entry>)>,
}

/// How the proxy treats an allowed connection.
#[derive(Debug, Clone, PartialEq)]
pub enum L7Decision {
    /// No L7 rule applies: every request passes.
    Unrestricted,
    /// The connection goes through the proxy; a request passes if any of these rules allows it.
    Restricted(Vec<(RuleId, Arc<L7Rules>)>),
}

impl L7Decision {
    pub fn allows(&self, req: &L7Request<'_>) -> Option<RuleId> {
        match self {
            L7Decision::Unrestricted => None,
            L7Decision::Restricted(rules) => {
                rules.iter().find(|(_, r)| r.allows(req)).map(|(id, _)| *id)
            }
        }
    }
}

/// The L3/L4 verdict of one direction.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Allowed by these rules.
    Allowed { by: Vec<RuleId>, l7: L7Decision },
    /// Denied by these deny rules; `audit` when all of them are in audit mode (it passes).
    Denied { by: Vec<RuleId>, audit: bool },
    /// No rule allows it and these policies put the endpoint into default deny; `audit` when
    /// all of them are in audit mode (it passes).
    DefaultDenied { by: Vec<RuleId>, audit: bool },
    /// No policy selects the endpoint in this direction: allowed.
    NotEnforced,
}

impl Decision {
    /// Allowed by policy (audited denials are not allowed, though they pass).
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. } | Decision::NotEnforced)
    }

    /// Whether traffic passes: allowed, or denied only by policies in audit mode.
    pub fn passes(&self) -> bool {
        self.is_allowed() || self.is_audited()
    }

    /// A denial that passes because every policy behind it is in audit mode.
    pub fn is_audited(&self) -> bool {
        matches!(
            self,
            Decision::Denied { audit: true, .. } | Decision::DefaultDenied { audit: true, .. }
        )
    }
}

/// The DNS name through which a connection's destination was learned, if any.
pub type DnsName<'a> = Option<&'a str>;

impl Table {
    /// Adds one contribution for `identity` on (proto, lo..=hi).
    pub fn add(&mut self, identity: Identity, proto: u8, lo: u16, hi: u16, c: Contribution) {
        add_entry(self.entries.entry(identity).or_default(), proto, lo, hi, c);
    }

    pub fn add_fqdn(
        &mut self,
        pattern: &FqdnPattern,
        proto: u8,
        lo: u16,
        hi: u16,
        c: Contribution,
    ) {
        let idx = match self.fqdn.iter().position(|(p, _)| p == pattern) {
            Some(i) => i,
            None => {
                self.fqdn.push((pattern.clone(), Vec::new()));
                self.fqdn.len() - 1
            }
        };
        if let Some((_, entries)) = self.fqdn.get_mut(idx) {
            add_entry(entries, proto, lo, hi, c);
        }
    }

    /// Adds every entry of `other` (used to patch a table in place).
    pub fn merge(&mut self, other: Table) {
        for (identity, entries) in other.entries {
            for e in entries {
                for c in e.contribs {
                    self.add(identity, e.proto, e.lo, e.hi, c);
                }
            }
        }
        for (pattern, entries) in other.fqdn {
            for e in entries {
                for c in e.contribs {
                    self.add_fqdn(&pattern, e.proto, e.lo, e.hi, c);
                }
            }
        }
    }

    /// Removes what one peer of one rule contributed for `identity`.
    pub fn remove_contributions(&mut self, identity: Identity, rule: RuleId, peer: u16) {
        let Some(entries) = self.entries.get_mut(&identity) else {
            return;
        };
        for e in entries.iter_mut() {
            e.contribs.retain(|c| !(c.rule == rule && c.peer == peer));
        }
        entries.retain(|e| !e.contribs.is_empty());
        if entries.is_empty() {
            self.entries.remove(&identity);
        }
    }

    /// Number of (peer, protocol, port range) keys.
    pub fn len(&self) -> usize {
        self.entries.values().map(Vec::len).sum::<usize>()
            + self.fqdn.iter().map(|(_, e)| e.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The verdict for a peer identity on (proto, port). `dns_name` is the name the
    /// destination address was resolved from, for `toFQDNs` peers.
    pub fn decide(
        &self,
        identity: Identity,
        proto: u8,
        port: u16,
        dns_name: DnsName<'_>,
    ) -> Decision {
        let mut matching: Vec<&Entry> = Vec::new();
        for id in [identity, ANY_IDENTITY] {
            if let Some(entries) = self.entries.get(&id) {
                matching.extend(entries.iter().filter(|e| e.covers(proto, port)));
            }
            if identity == ANY_IDENTITY {
                break;
            }
        }
        if let Some(name) = dns_name {
            for (pattern, entries) in &self.fqdn {
                if pattern.matches(name) {
                    matching.extend(entries.iter().filter(|e| e.covers(proto, port)));
                }
            }
        }
        let mut denied_by: Vec<RuleId> = Vec::new();
        let mut deny_audited = true;
        let mut allowed_by: Vec<RuleId> = Vec::new();
        let mut unrestricted = !self.enforcing;
        let mut l7: Vec<(RuleId, Arc<L7Rules>)> = Vec::new();
        for e in &matching {
            for c in &e.contribs {
                match c.action {
                    Action::Deny => {
                        denied_by.push(c.rule);
                        deny_audited &= c.audit;
                    }
                    Action::Allow => {
                        allowed_by.push(c.rule);
                        match &c.l7 {
                            None => unrestricted = true,
                            Some(r) => l7.push((c.rule, r.clone())),
                        }
                    }
                }
            }
        }
        dedup(&mut denied_by);
        dedup(&mut allowed_by);
        if !denied_by.is_empty() {
            return Decision::Denied {
                by: denied_by,
                audit: deny_audited,
            };
        }
        if !self.enforcing {
            return if allowed_by.is_empty() {
                Decision::NotEnforced
            } else {
                Decision::Allowed {
                    by: allowed_by,
                    l7: L7Decision::Unrestricted,
                }
            };
        }
        if allowed_by.is_empty() {
            return Decision::DefaultDenied {
                by: self.default_deny_by.clone(),
                audit: self.default_deny_audited,
            };
        }
        let l7 = if unrestricted {
            L7Decision::Unrestricted
        } else {
            L7Decision::Restricted(l7)
        };
        Decision::Allowed { by: allowed_by, l7 }
    }
}

fn dedup(v: &mut Vec<RuleId>) {
    v.sort_unstable();
    v.dedup();
}

fn add_entry(entries: &mut Vec<Entry>, proto: u8, lo: u16, hi: u16, c: Contribution) {
    if let Some(e) = entries
        .iter_mut()
        .find(|e| e.proto == proto && e.lo == lo && e.hi == hi)
    {
        if !e.contribs.contains(&c) {
            e.contribs.push(c);
        }
        return;
    }
    entries.push(Entry {
        proto,
        lo,
        hi,
        contribs: vec![c],
    });
}

/// A flat row of a table, for printing and JSON.
#[derive(Debug, Clone, Serialize)]
pub struct TableRow {
    pub direction: Direction,
    pub identity: Identity,
    pub peer: String,
    pub protocol: &'static str,
    pub ports: String,
    pub verdict: &'static str,
    pub l7: Option<String>,
    pub rules: Vec<String>,
}
