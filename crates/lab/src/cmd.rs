//! iproute2 invocations: every change the lab makes goes through `ip -n <netns>` (or
//! `ip netns add|delete`), never through the machine's own namespace.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::LabError;

/// The `ip` binary (overridable for unusual installs).
fn ip_binary() -> String {
    std::env::var("PALISADE_IP").unwrap_or_else(|_| "ip".to_owned())
}

fn describe(args: &[&str]) -> String {
    format!("ip {}", args.join(" "))
}

/// Runs `ip ARGS…`, returning stdout.
pub(crate) fn ip(args: &[&str]) -> Result<String, LabError> {
    let output = Command::new(ip_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(LabError::NoIpCommand)?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command: describe(args),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs a batch of `ip` commands (one per line) in one process: `ip [-n NETNS] [-force] -batch -`.
/// Without `force`, the first failing line stops the batch and is reported.
pub(crate) fn ip_batch(netns: Option<&str>, lines: &[String], force: bool) -> Result<(), LabError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    if force {
        args.push("-force");
    }
    args.extend(["-batch", "-"]);
    let mut child = Command::new(ip_binary())
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(LabError::NoIpCommand)?;
    let script = lines.join("\n") + "\n";
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| LabError::io("writing to ip -batch", e))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| LabError::io("waiting for ip -batch", e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command: format!("{} <<< {script:?}", describe(&args)),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Every interface of `netns` with its ifindex.
pub(crate) fn ifindexes(netns: &str) -> Result<BTreeMap<String, u32>, LabError> {
    let args = ["-n", netns, "-j", "link", "show"];
    let out = ip(&args)?;
    let parsed: Vec<serde_json::Value> =
        serde_json::from_str(&out).map_err(|e| LabError::Command {
            command: describe(&args),
            stderr: format!("unreadable JSON: {e}"),
        })?;
    Ok(parsed
        .iter()
        .filter_map(|l| {
            let name = l.get("ifname")?.as_str()?.to_owned();
            let index = u32::try_from(l.get("ifindex")?.as_u64()?).ok()?;
            Some((name, index))
        })
        .collect())
}
