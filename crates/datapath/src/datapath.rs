//! Loading, attaching and the maps.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::lpm_trie::Key;
use aya::maps::{
    Array, HashMap, HashOfMaps, LpmTrie, MapData, MapError, MapInfo, PerCpuArray, RingBuf,
};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use palisade_abi::{
    CtKey, CtValue, EndpointKey, EndpointValue, FlowEvent, IpcacheKeyData, IpcacheValue,
    MetricsValue, PolicyKeyData, PolicyOuterKey, PolicyValue, RatelimitConfig, RatelimitState,
    PAL_EP_F_FAIL_CLOSED, PAL_FAMILY_IPV4, PAL_FAMILY_IPV6, PAL_REASON_MAX,
};

use crate::bpffs;
use crate::table::{lpm_entries, Direction, TableEntry};
use crate::Error;

/// `BPF_F_NO_PREALLOC`: the flag of every policy table (it must equal the inner-map
/// template's flags in bpf/lib/maps.h).
const BPF_F_NO_PREALLOC: u32 = 1;

/// Offset of `ifindex` in `struct __sk_buff` (linux/bpf.h), for BPF_PROG_TEST_RUN contexts.
const SKB_IFINDEX_OFFSET: usize = 40;
/// Size of the `struct __sk_buff` context passed to BPF_PROG_TEST_RUN; the kernel accepts a
/// longer buffer as long as the tail is zero.
const SKB_CTX_SIZE: usize = 192;

const MAP_ENDPOINTS: &str = "pal_endpoints";
const MAP_IPCACHE: &str = "pal_ipcache";
const MAP_POLICY: &str = "pal_policy";
const MAP_CONNTRACK: &str = "pal_conntrack";
const MAP_METRICS: &str = "pal_metrics";
const MAP_EVENTS: &str = "pal_events";
const MAP_RATELIMIT: &str = "pal_ratelimit";
const MAP_RATELIMIT_CONFIG: &str = "pal_ratelimit_config";
/// Every pinned map; both programs must use only these.
const PINNED_MAPS: [&str; 8] = [
    MAP_ENDPOINTS,
    MAP_IPCACHE,
    MAP_POLICY,
    MAP_CONNTRACK,
    MAP_METRICS,
    MAP_EVENTS,
    MAP_RATELIMIT,
    MAP_RATELIMIT_CONFIG,
];

/// The two programs, one per attach point of a pod's host-side veth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// TCX ingress of the host veth: packets the pod sends (its egress policy, anti-spoofing).
    FromContainer,
    /// TCX egress of the host veth: packets delivered to the pod (its ingress policy).
    ToContainer,
}

impl Hook {
    pub const BOTH: [Hook; 2] = [Hook::FromContainer, Hook::ToContainer];

    /// The program's name, also the suffix of its pinned links.
    pub fn program(self) -> &'static str {
        match self {
            Hook::FromContainer => palisade_bpf::FROM_CONTAINER_PROGRAM,
            Hook::ToContainer => palisade_bpf::TO_CONTAINER_PROGRAM,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::FromContainer => TcAttachType::Ingress,
            Hook::ToContainer => TcAttachType::Egress,
        }
    }
}

/// Overrides of the maps' `max_entries` (from bpf/lib/maps.h) for maps created by this open;
/// maps already pinned keep their size. Tests use small maps; the agent uses the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub endpoints: Option<u32>,
    pub ipcache: Option<u32>,
    pub policy_tables: Option<u32>,
    pub conntrack: Option<u32>,
    /// Ring buffer bytes: a power of two, a multiple of the page size.
    pub events_bytes: Option<u32>,
}

/// Counters summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Indexed by `PAL_REASON_*`, then `[ingress, egress]`. Reason 0 counts forwarded packets.
    pub counters: Vec<[MetricsValue; 2]>,
    /// Flow events lost to the rate limit or a full ring buffer.
    pub lost_events: u64,
}

impl Metrics {
    /// The counter of one reason (`PAL_REASON_*`) and direction.
    pub fn get(&self, reason: u8, direction: Direction) -> MetricsValue {
        self.counters
            .get(usize::from(reason))
            .map(|c| c[direction.abi() as usize])
            .unwrap_or_default()
    }
}

/// Builds an endpoint value from its addresses.
pub fn endpoint_value(
    endpoint_id: u32,
    identity: u32,
    flags: u32,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
) -> EndpointValue {
    EndpointValue {
        endpoint_id,
        identity,
        flags,
        family_mask: u32::from(ipv4.is_some()) | (u32::from(ipv6.is_some()) << 1),
        ipv4: ipv4.map(|a| a.octets()).unwrap_or_default(),
        ipv6: ipv6.map(|a| a.octets()).unwrap_or_default(),
    }
}

type PolicyTable = LpmTrie<MapData, PolicyKeyData, PolicyValue>;

/// At most this many table swaps (threads) in flight at once in [`Datapath::write_tables`].
const CONCURRENT_SWAPS: usize = 64;

/// The loaded datapath: both programs and every pinned map.
///
/// Maps and TCX links are pinned under the pin directory (`<pin_dir>/<map>`,
/// `<pin_dir>/links/<ifname>.<program>`), so enforcement continues when the process exits;
/// [`Datapath::open`] on the same directory picks everything up again.
pub struct Datapath {
    pin_dir: PathBuf,
    from: Ebpf,
    to: Ebpf,
    endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    ipcache: LpmTrie<MapData, IpcacheKeyData, IpcacheValue>,
    policy: HashOfMaps<MapData, PolicyOuterKey, PolicyTable>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    metrics: PerCpuArray<MapData, MetricsValue>,
    ratelimit: PerCpuArray<MapData, RatelimitState>,
    ratelimit_config: Array<MapData, RatelimitConfig>,
    events: RingBuf<MapData>,
    /// Tables whose last write failed (this process): their endpoint stays fail-closed.
    failed: HashSet<(u32, Direction)>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    T::try_from(map).map_err(Error::map(name))
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    object: &'static str,
    hook: Hook,
) -> Result<&'a mut SchedClassifier, Error> {
    let name = hook.program();
    let prog = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram { object, name })?;
    prog.try_into().map_err(|source| Error::Program {
        name,
        source: Box::new(source),
    })
}

fn program_error(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> Error {
    move |source| Error::Program {
        name,
        source: Box::new(source),
    }
}

fn ipcache_key(net: IpNet) -> Key<IpcacheKeyData> {
    let net = net.trunc();
    let mut addr = [0u8; 16];
    let family = match net.network() {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            PAL_FAMILY_IPV4
        }
        IpAddr::V6(a) => {
            addr.copy_from_slice(&a.octets());
            PAL_FAMILY_IPV6
        }
    };
    Key::new(
        palisade_abi::LPM_PREFIXLEN_BITS + u32::from(net.prefix_len()),
        IpcacheKeyData { family, addr },
    )
}

fn ipnet_of(key: &Key<IpcacheKeyData>) -> Option<IpNet> {
    let data = key.data();
    let len = key
        .prefix_len()
        .checked_sub(palisade_abi::LPM_PREFIXLEN_BITS)?;
    let len = u8::try_from(len).ok()?;
    match data.family {
        PAL_FAMILY_IPV4 => {
            let a = Ipv4Addr::new(data.addr[0], data.addr[1], data.addr[2], data.addr[3]);
            IpNet::new(IpAddr::V4(a), len).ok()
        }
        PAL_FAMILY_IPV6 => IpNet::new(IpAddr::V6(Ipv6Addr::from(data.addr)), len).ok(),
        _ => None,
    }
}

fn valid_ifname(name: &str) -> Result<(), Error> {
    // IFNAMSIZ is 16 including the NUL; names never contain '/' or whitespace.
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
        && !name.chars().any(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInterfaceName(name.to_string()))
    }
}

impl Datapath {
    /// Loads both programs with the maps pinned in `pin_dir` (creating and pinning the maps
    /// that are not there yet; mounting bpffs on /sys/fs/bpf if needed), checks that both
    /// programs use exactly those pinned maps, and moves every pinned TCX link of an earlier
    /// run onto the newly loaded programs (dropping links whose interface is gone).
    pub fn open(pin_dir: &Path) -> Result<Self, Error> {
        Self::open_with(pin_dir, &Limits::default())
    }

    /// [`Datapath::open`] with map sizes for maps created now.
    pub fn open_with(pin_dir: &Path, limits: &Limits) -> Result<Self, Error> {
        palisade_bpf::check()?;
        bpffs::ensure(pin_dir)?;
        let links = pin_dir.join("links");
        fs::create_dir_all(&links).map_err(Error::io(&links))?;

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        for (name, size) in [
            (MAP_ENDPOINTS, limits.endpoints),
            (MAP_IPCACHE, limits.ipcache),
            (MAP_POLICY, limits.policy_tables),
            (MAP_CONNTRACK, limits.conntrack),
            (MAP_EVENTS, limits.events_bytes),
        ] {
            if let Some(size) = size {
                loader.map_max_entries(name, size);
            }
        }
        let load = |loader: &mut EbpfLoader<'_>, object: &'static str, bytes: &[u8]| {
            loader.load(bytes).map_err(|source| Error::Load {
                object,
                source: Box::new(source),
            })
        };
        // The second load finds every map pinned by the first and reuses it.
        let mut from = load(&mut loader, "from_container", palisade_bpf::FROM_CONTAINER)?;
        let mut to = load(&mut loader, "to_container", palisade_bpf::TO_CONTAINER)?;
        classifier(&mut from, "from_container", Hook::FromContainer)?
            .load()
            .map_err(program_error(Hook::FromContainer.program()))?;
        classifier(&mut to, "to_container", Hook::ToContainer)?
            .load()
            .map_err(program_error(Hook::ToContainer.program()))?;

        let mut dp = Datapath {
            pin_dir: pin_dir.to_path_buf(),
            endpoints: take_map(&mut from, MAP_ENDPOINTS)?,
            ipcache: take_map(&mut from, MAP_IPCACHE)?,
            policy: take_map(&mut from, MAP_POLICY)?,
            conntrack: take_map(&mut from, MAP_CONNTRACK)?,
            metrics: take_map(&mut from, MAP_METRICS)?,
            ratelimit: take_map(&mut from, MAP_RATELIMIT)?,
            ratelimit_config: take_map(&mut from, MAP_RATELIMIT_CONFIG)?,
            events: take_map(&mut from, MAP_EVENTS)?,
            from,
            to,
            failed: HashSet::new(),
        };
        dp.check_shared_maps()?;
        dp.refresh_links()?;
        Ok(dp)
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn program(&self, hook: Hook) -> Result<&SchedClassifier, Error> {
        let (ebpf, object) = match hook {
            Hook::FromContainer => (&self.from, "from_container"),
            Hook::ToContainer => (&self.to, "to_container"),
        };
        let name = hook.program();
        let prog = ebpf
            .program(name)
            .ok_or(Error::MissingProgram { object, name })?;
        prog.try_into().map_err(program_error(name))
    }

    fn program_mut(&mut self, hook: Hook) -> Result<&mut SchedClassifier, Error> {
        match hook {
            Hook::FromContainer => classifier(&mut self.from, "from_container", hook),
            Hook::ToContainer => classifier(&mut self.to, "to_container", hook),
        }
    }

    /// The kernel ids of the pinned maps, by name.
    pub fn pinned_map_ids(&self) -> Result<Vec<(&'static str, u32)>, Error> {
        PINNED_MAPS
            .into_iter()
            .map(|name| {
                let info = MapInfo::from_pin(self.pin_dir.join(name)).map_err(Error::map(name))?;
                Ok((name, info.id()))
            })
            .collect()
    }

    /// The kernel ids of the maps a program uses.
    pub fn program_map_ids(&self, hook: Hook) -> Result<Vec<u32>, Error> {
        let name = hook.program();
        let info = self.program(hook)?.info().map_err(program_error(name))?;
        Ok(info
            .map_ids()
            .map_err(program_error(name))?
            .unwrap_or_default())
    }

    /// Both programs must use only the pinned maps (so they share them, including the
    /// map-of-maps `pal_policy`), and maps pinned by an earlier run must have this ABI's key
    /// and value sizes (the loader reuses pinned maps without comparing them).
    fn check_shared_maps(&self) -> Result<(), Error> {
        for (name, key, value) in [
            (
                MAP_ENDPOINTS,
                size_of::<EndpointKey>(),
                size_of::<EndpointValue>(),
            ),
            (
                MAP_IPCACHE,
                size_of::<palisade_abi::IpcacheKey>(),
                size_of::<IpcacheValue>(),
            ),
            // The value of a map of maps is the inner map's id.
            (MAP_POLICY, size_of::<PolicyOuterKey>(), size_of::<u32>()),
            (MAP_CONNTRACK, size_of::<CtKey>(), size_of::<CtValue>()),
            (MAP_METRICS, size_of::<u32>(), size_of::<MetricsValue>()),
            (MAP_EVENTS, 0, 0),
            (MAP_RATELIMIT, size_of::<u32>(), size_of::<RatelimitState>()),
            (
                MAP_RATELIMIT_CONFIG,
                size_of::<u32>(),
                size_of::<RatelimitConfig>(),
            ),
        ] {
            let info = MapInfo::from_pin(self.pin_dir.join(name)).map_err(Error::map(name))?;
            let found = (info.key_size() as usize, info.value_size() as usize);
            if found != (key, value) {
                return Err(Error::IncompatiblePinnedMap {
                    name,
                    found,
                    expected: (key, value),
                });
            }
        }
        let pinned: HashSet<u32> = self
            .pinned_map_ids()?
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        for hook in Hook::BOTH {
            for map_id in self.program_map_ids(hook)? {
                if !pinned.contains(&map_id) {
                    return Err(Error::MapsNotShared {
                        program: hook.program(),
                        map_id,
                        pin_dir: self.pin_dir.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn link_dir(&self, ifname: &str) -> PathBuf {
        self.pin_dir.join("links").join(encode_ifname(ifname))
    }

    fn link_path(&self, ifname: &str, hook: Hook) -> PathBuf {
        self.link_dir(ifname).join(hook.program())
    }

    /// Moves a pinned link onto this process's program. `Ok(false)` if the link is defunct
    /// (its interface is gone), in which case its pin is removed.
    fn adopt_link(&mut self, path: &Path, hook: Hook) -> Result<bool, Error> {
        let link_err = |source| Error::Link {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let pinned = PinnedLink::from_pin(path).map_err(link_err)?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
        let prog = self.program_mut(hook)?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                // The pin keeps the link; our descriptor can go.
                let link = prog.take_link(id).map_err(program_error(hook.program()))?;
                drop(link);
                Ok(true)
            }
            // bpf_link_update fails with ENOLINK once the link's netdev is gone.
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOLINK) =>
            {
                remove_file(path)?;
                Ok(false)
            }
            Err(e) => Err(program_error(hook.program())(e)),
        }
    }

    fn refresh_links(&mut self) -> Result<(), Error> {
        for (ifname, hook, path) in self.pinned_links()? {
            self.adopt_link(&path, hook)?;
            remove_dir_if_empty(&self.link_dir(&ifname))?;
        }
        Ok(())
    }

    /// `(ifname, hook, pin path)` of every pinned link.
    fn pinned_links(&self) -> Result<Vec<(String, Hook, PathBuf)>, Error> {
        let dir = self.pin_dir.join("links");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(Error::io(&dir))? {
            let entry = entry.map_err(Error::io(&dir))?;
            let Some(ifname) = entry.file_name().to_str().and_then(decode_ifname) else {
                continue;
            };
            for hook in Hook::BOTH {
                let path = entry.path().join(hook.program());
                if path.exists() {
                    out.push((ifname.clone(), hook, path));
                }
            }
        }
        out.sort_by(|a, b| a.2.cmp(&b.2));
        Ok(out)
    }

    /// Interfaces with pinned links (either hook).
    pub fn attached(&self) -> Result<Vec<String>, Error> {
        let mut names: Vec<String> = self.pinned_links()?.into_iter().map(|l| l.0).collect();
        names.dedup();
        Ok(names)
    }

    /// Attaches `from_container` at TCX ingress and `to_container` at TCX egress of a pod's
    /// host-side veth, and pins both links. Idempotent: an existing live link is moved onto
    /// the current programs atomically; a stale one (interface recreated) is replaced.
    pub fn attach(&mut self, host_ifname: &str) -> Result<(), Error> {
        valid_ifname(host_ifname)?;
        bpffs::ifindex(host_ifname)?;
        let dir = self.link_dir(host_ifname);
        fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        for hook in Hook::BOTH {
            let path = self.link_path(host_ifname, hook);
            if path.exists() && self.adopt_link(&path, hook)? {
                continue;
            }
            let name = hook.program();
            let prog = self.program_mut(hook)?;
            let id = prog
                .attach_with_options(
                    host_ifname,
                    hook.attach_type(),
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(program_error(name))?;
            let link = prog.take_link(id).map_err(program_error(name))?;
            let fd_link = FdLink::try_from(link).map_err(|source| Error::Link {
                path: path.clone(),
                source: Box::new(source),
            })?;
            fd_link.pin(&path).map_err(|source| Error::Pin {
                path: path.clone(),
                source: Box::new(source),
            })?;
        }
        Ok(())
    }

    /// Detaches both programs from a veth (removes the pinned links; the kernel detaches
    /// them when the last reference goes). Not an error if nothing was attached.
    pub fn detach(&mut self, host_ifname: &str) -> Result<(), Error> {
        valid_ifname(host_ifname)?;
        for hook in Hook::BOTH {
            remove_file(&self.link_path(host_ifname, hook))?;
        }
        remove_dir_if_empty(&self.link_dir(host_ifname))
    }

    /// Sets the endpoint behind a host-side veth. If one of the endpoint's tables failed to
    /// be written in this process, `PAL_EP_F_FAIL_CLOSED` is kept set.
    pub fn set_endpoint(&mut self, ifindex: u32, value: &EndpointValue) -> Result<(), Error> {
        let mut v = *value;
        if self.failed.iter().any(|(id, _)| *id == v.endpoint_id) {
            v.flags |= PAL_EP_F_FAIL_CLOSED;
        }
        self.endpoints
            .insert(EndpointKey { ifindex }, v, 0)
            .map_err(Error::map(MAP_ENDPOINTS))
    }

    pub fn endpoint(&self, ifindex: u32) -> Result<Option<EndpointValue>, Error> {
        match self.endpoints.get(&EndpointKey { ifindex }, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Error::map(MAP_ENDPOINTS)(e)),
        }
    }

    /// Removes an endpoint; packets on that ifindex then fail closed. Not an error if absent.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), Error> {
        match self.endpoints.remove(&EndpointKey { ifindex }) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(Error::map(MAP_ENDPOINTS)(e)),
        }
    }

    /// Every endpoint, by ifindex.
    pub fn endpoints(&self) -> Result<Vec<(u32, EndpointValue)>, Error> {
        let mut out = Vec::new();
        for item in &self.endpoints {
            let (k, v) = item.map_err(Error::map(MAP_ENDPOINTS))?;
            out.push((k.ifindex, v));
        }
        out.sort_by_key(|(i, _)| *i);
        Ok(out)
    }

    fn set_endpoint_flag(&mut self, endpoint_id: u32, flag: u32, on: bool) -> Result<(), Error> {
        for (ifindex, mut v) in self.endpoints()? {
            if v.endpoint_id != endpoint_id {
                continue;
            }
            let flags = if on { v.flags | flag } else { v.flags & !flag };
            if flags != v.flags {
                v.flags = flags;
                self.endpoints
                    .insert(EndpointKey { ifindex }, v, 0)
                    .map_err(Error::map(MAP_ENDPOINTS))?;
            }
        }
        Ok(())
    }

    /// Maps an address prefix to a security identity.
    pub fn set_ipcache(&mut self, net: IpNet, identity: u32, flags: u32) -> Result<(), Error> {
        self.ipcache
            .insert(&ipcache_key(net), IpcacheValue { identity, flags }, 0)
            .map_err(Error::map(MAP_IPCACHE))
    }

    /// Not an error if absent.
    pub fn remove_ipcache(&mut self, net: IpNet) -> Result<(), Error> {
        match self.ipcache.remove(&ipcache_key(net)) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(Error::map(MAP_IPCACHE)(e)),
        }
    }

    /// Every ipcache entry, sorted by prefix.
    pub fn ipcache_entries(&self) -> Result<Vec<(IpNet, IpcacheValue)>, Error> {
        let mut out = Vec::new();
        for item in &self.ipcache {
            let (k, v) = item.map_err(Error::map(MAP_IPCACHE))?;
            if let Some(net) = ipnet_of(&k) {
                out.push((net, v));
            }
        }
        out.sort_by_key(|(n, _)| *n);
        Ok(out)
    }

    /// Replaces the table of one endpoint and direction, atomically: a new LPM map sized to
    /// the entries is created and filled, then swapped into `pal_policy` with one update; the
    /// kernel never sees a partial table. Returns the number of LPM entries written. On
    /// failure the endpoint gets `PAL_EP_F_FAIL_CLOSED` (dropping all its traffic) until a
    /// later write of the failed table succeeds.
    pub fn write_table(
        &mut self,
        endpoint_id: u32,
        direction: Direction,
        entries: &[TableEntry],
    ) -> Result<usize, Error> {
        let lpm = lpm_entries(entries);
        match self.swap_table(endpoint_id, direction, &lpm) {
            Ok(()) => {
                let was_failed = self.failed.remove(&(endpoint_id, direction));
                if was_failed && !self.failed.iter().any(|(id, _)| *id == endpoint_id) {
                    self.set_endpoint_flag(endpoint_id, PAL_EP_F_FAIL_CLOSED, false)?;
                }
                Ok(lpm.len())
            }
            Err(source) => {
                self.failed.insert((endpoint_id, direction));
                // Best effort: the table error is the one to report.
                let _ = self.set_endpoint_flag(endpoint_id, PAL_EP_F_FAIL_CLOSED, true);
                Err(Error::Table {
                    endpoint_id,
                    direction,
                    entries: lpm.len(),
                    source: Box::new(source),
                })
            }
        }
    }

    /// Writes (or, for an empty row list, removes) several tables at once. Every table is built
    /// first; the swaps then run concurrently on separate handles of the pinned outer map,
    /// because each swap waits in the kernel for an RCU grace period (so that no running
    /// program still reads the old table) and those waits overlap. Each table still changes
    /// atomically; failures fail their endpoint closed as [`Self::write_table`] does.
    pub fn write_tables(
        &mut self,
        batch: &[(u32, Direction, &[TableEntry])],
    ) -> Vec<Result<usize, Error>> {
        type Built = Result<Option<(PolicyTable, usize)>, MapError>;
        let built: Vec<Built> = batch
            .iter()
            .map(|(_, _, entries)| {
                if entries.is_empty() {
                    return Ok(None);
                }
                let lpm = lpm_entries(entries);
                let table = Self::build_table(&lpm)?;
                Ok(Some((table, lpm.len())))
            })
            .collect();
        let path = self.pin_dir.join(MAP_POLICY);
        let mut swapped: Vec<Result<(), MapError>> = Vec::with_capacity(batch.len());
        for (chunk, built_chunk) in batch
            .chunks(CONCURRENT_SWAPS)
            .zip(built.chunks(CONCURRENT_SWAPS))
        {
            swapped.extend(std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .zip(built_chunk)
                    .map(|((endpoint_id, direction, _), b)| {
                        let path = &path;
                        let key = PolicyOuterKey {
                            endpoint_id: *endpoint_id,
                            direction: direction.abi(),
                        };
                        scope.spawn(move || -> Result<(), MapError> {
                            let table = match b {
                                Ok(t) => t,
                                Err(e) => {
                                    return Err(MapError::IoError(io::Error::other(e.to_string())))
                                }
                            };
                            let data = MapData::from_pin(path)?;
                            let mut outer: HashOfMaps<MapData, PolicyOuterKey, PolicyTable> =
                                HashOfMaps::try_from(aya::maps::Map::HashOfMaps(data))?;
                            match table {
                                Some((t, _)) => outer.insert(key, t, 0),
                                None => match outer.remove(&key) {
                                    Err(e) if is_not_found(&e) => Ok(()),
                                    other => other,
                                },
                            }
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(MapError::IoError(io::Error::other(
                                "table swap thread panicked",
                            )))
                        })
                    })
                    .collect::<Vec<_>>()
            }));
        }
        let mut out = Vec::with_capacity(batch.len());
        for (((endpoint_id, direction, _), b), result) in batch.iter().zip(&built).zip(swapped) {
            let entries = match b {
                Ok(Some((_, n))) => *n,
                _ => 0,
            };
            out.push(match result {
                Ok(()) => {
                    let was_failed = self.failed.remove(&(*endpoint_id, *direction));
                    if was_failed && !self.failed.iter().any(|(id, _)| id == endpoint_id) {
                        if let Err(e) =
                            self.set_endpoint_flag(*endpoint_id, PAL_EP_F_FAIL_CLOSED, false)
                        {
                            out.push(Err(e));
                            continue;
                        }
                    }
                    Ok(entries)
                }
                Err(source) => {
                    self.failed.insert((*endpoint_id, *direction));
                    let _ = self.set_endpoint_flag(*endpoint_id, PAL_EP_F_FAIL_CLOSED, true);
                    Err(Error::Table {
                        endpoint_id: *endpoint_id,
                        direction: *direction,
                        entries,
                        source: Box::new(source),
                    })
                }
            });
        }
        out
    }

    fn build_table(
        lpm: &[(palisade_abi::PolicyKey, PolicyValue)],
    ) -> Result<PolicyTable, MapError> {
        let size = u32::try_from(lpm.len().max(1)).map_err(|_| {
            MapError::IoError(io::Error::new(
                io::ErrorKind::InvalidInput,
                "table too large",
            ))
        })?;
        let mut table = PolicyTable::create(size, BPF_F_NO_PREALLOC)?;
        for (k, v) in lpm {
            let (len, data) = k.split();
            table.insert(&Key::new(len, data), *v, 0)?;
        }
        Ok(table)
    }

    fn swap_table(
        &mut self,
        endpoint_id: u32,
        direction: Direction,
        lpm: &[(palisade_abi::PolicyKey, PolicyValue)],
    ) -> Result<(), MapError> {
        let size = u32::try_from(lpm.len().max(1)).map_err(|_| {
            MapError::IoError(io::Error::new(
                io::ErrorKind::InvalidInput,
                "table too large",
            ))
        })?;
        let mut table = PolicyTable::create(size, BPF_F_NO_PREALLOC)?;
        for (k, v) in lpm {
            let (len, data) = k.split();
            table.insert(&Key::new(len, data), *v, 0)?;
        }
        let key = PolicyOuterKey {
            endpoint_id,
            direction: direction.abi(),
        };
        self.policy.insert(key, &table, 0)
    }

    /// Removes a table: an enforcing endpoint without one fails closed. Not an error if absent.
    pub fn remove_table(&mut self, endpoint_id: u32, direction: Direction) -> Result<(), Error> {
        let key = PolicyOuterKey {
            endpoint_id,
            direction: direction.abi(),
        };
        match self.policy.remove(&key) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(Error::map(MAP_POLICY)(e)),
        }
    }

    /// The LPM entries of a table as the kernel holds them (`None` if there is no table).
    pub fn read_table(
        &self,
        endpoint_id: u32,
        direction: Direction,
    ) -> Result<Option<Vec<(palisade_abi::PolicyKey, PolicyValue)>>, Error> {
        let key = PolicyOuterKey {
            endpoint_id,
            direction: direction.abi(),
        };
        let table: PolicyTable = match self.policy.get(&key, 0) {
            Ok(t) => t,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(Error::map(MAP_POLICY)(e)),
        };
        let mut out = Vec::new();
        for item in &table {
            let (k, v) = item.map_err(Error::map(MAP_POLICY))?;
            out.push((palisade_abi::PolicyKey::join(k.prefix_len(), k.data()), v));
        }
        out.sort_by_key(|(k, _)| (k.identity, k.protocol, k.dport, k.prefixlen));
        Ok(Some(out))
    }

    /// The tracked connections.
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtValue)>, Error> {
        self.conntrack
            .iter()
            .map(|item| item.map_err(Error::map(MAP_CONNTRACK)))
            .collect()
    }

    /// Limits flow events to `rate` per second per CPU with bursts of `burst`; `rate` 0
    /// lifts the limit.
    pub fn set_ratelimit(&mut self, rate: u64, burst: u64) -> Result<(), Error> {
        self.ratelimit_config
            .set(0, RatelimitConfig { rate, burst }, 0)
            .map_err(Error::map(MAP_RATELIMIT_CONFIG))
    }

    /// Packet and byte counters per reason and direction, and lost events, summed over CPUs.
    pub fn metrics(&self) -> Result<Metrics, Error> {
        let mut counters = vec![[MetricsValue::default(); 2]; usize::from(PAL_REASON_MAX)];
        for (reason, slot) in counters.iter_mut().enumerate() {
            for (dir, counter) in slot.iter_mut().enumerate() {
                let idx = (reason * 2 + dir) as u32;
                let per_cpu = self.metrics.get(&idx, 0).map_err(Error::map(MAP_METRICS))?;
                for v in per_cpu.iter() {
                    counter.packets += v.packets;
                    counter.bytes += v.bytes;
                }
            }
        }
        let lost_events = self
            .ratelimit
            .get(&0, 0)
            .map_err(Error::map(MAP_RATELIMIT))?
            .iter()
            .map(|s| s.lost)
            .sum();
        Ok(Metrics {
            counters,
            lost_events,
        })
    }

    /// Every flow event waiting in the ring buffer, without blocking.
    pub fn take_events(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if let Some(e) = FlowEvent::from_bytes(&item) {
                out.push(e);
            }
        }
        out
    }

    /// Waits up to `timeout` for flow events, then takes every waiting one.
    pub fn wait_events(&mut self, timeout: Duration) -> Result<Vec<FlowEvent>, Error> {
        let events = self.take_events();
        if !events.is_empty() {
            return Ok(events);
        }
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        bpffs::poll_readable(self.events.as_fd(), ms)?;
        Ok(self.take_events())
    }

    /// The ring buffer's descriptor, readable when events wait (for an event loop).
    pub fn events_fd(&self) -> BorrowedFd<'_> {
        self.events.as_fd()
    }

    /// Runs one frame (Ethernet onwards) through a program with BPF_PROG_TEST_RUN, as if it
    /// passed the hook on interface `ifindex`, and returns the program's verdict (`TC_ACT_*`).
    /// The kernel resolves `ifindex` in the caller's network namespace; 0 and 1 mean the
    /// loopback device (ifindex 1). Maps are the live ones.
    pub fn test_run(&self, hook: Hook, ifindex: u32, frame: &[u8]) -> Result<i32, Error> {
        let mut ctx = [0u8; SKB_CTX_SIZE];
        ctx[SKB_IFINDEX_OFFSET..SKB_IFINDEX_OFFSET + 4].copy_from_slice(&ifindex.to_ne_bytes());
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        };
        let name = hook.program();
        let result = self
            .program(hook)?
            .test_run(opts)
            .map_err(|source| Error::TestRun {
                name,
                source: Box::new(source),
            })?;
        // TC_ACT_* values are small signed integers (TC_ACT_UNSPEC is -1).
        Ok(i32::from_ne_bytes(result.return_value.to_ne_bytes()))
    }
}

/// aya reports a missing key as `KeyNotFound` on lookups but as ENOENT on deletes.
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// bpffs reserves names with a dot (EPERM), and interface names may have one (VLANs):
/// every byte outside `[A-Za-z0-9_-]` becomes `%XX`.
fn encode_ifname(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn decode_ifname(encoded: &str) -> Option<String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn remove_dir_if_empty(path: &Path) -> Result<(), Error> {
    match fs::read_dir(path) {
        Ok(mut entries) => {
            if entries.next().is_none() {
                fs::remove_dir(path).map_err(Error::io(path))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path)(e)),
    }
}

fn remove_file(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipcache_keys_round_trip() {
        for net in [
            "10.1.2.0/24",
            "10.1.2.3/32",
            "0.0.0.0/0",
            "fd00::/64",
            "fd00::1/128",
        ] {
            let net: IpNet = net.parse().expect("net");
            assert_eq!(ipnet_of(&ipcache_key(net)), Some(net));
        }
        // Host bits are cleared.
        let k = ipcache_key("10.1.2.3/24".parse().expect("net"));
        assert_eq!(k.prefix_len(), 32 + 24);
        assert_eq!(&k.data().addr[..4], &[10, 1, 2, 0]);
        assert_eq!(k.data().family, PAL_FAMILY_IPV4);
    }

    #[test]
    fn endpoint_value_sets_the_family_mask() {
        let v = endpoint_value(1, 2, 3, Some(Ipv4Addr::new(10, 0, 0, 1)), None);
        assert_eq!(v.family_mask, 1);
        assert_eq!(v.ipv4, [10, 0, 0, 1]);
        let v = endpoint_value(1, 2, 3, None, Some(Ipv6Addr::LOCALHOST));
        assert_eq!(v.family_mask, 2);
    }

    #[test]
    fn interface_names_are_encoded_for_bpffs() {
        for name in ["lxc12345", "eth0.100", "a%b", "vlan-1_x"] {
            let enc = encode_ifname(name);
            assert!(!enc.contains('.'), "{enc}");
            assert_eq!(decode_ifname(&enc).as_deref(), Some(name));
        }
        assert_eq!(encode_ifname("eth0.100"), "eth0%2E100");
        assert_eq!(decode_ifname("bad%zz"), None);
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(valid_ifname("lxc12345").is_ok());
        for bad in ["", "..", "a/b", "0123456789abcdef", "a b"] {
            assert!(valid_ifname(bad).is_err(), "{bad:?}");
        }
    }
}
