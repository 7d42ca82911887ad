//! The kernel side, seen from user space: load the programs, attach them to
//! the enforced cgroup parent, pin programs' links and maps in bpffs, re-adopt
//! them after a restart, and read and write the maps.
//!
//! Links are pinned, never held only by this process: a link that dies with
//! the daemon would detach the programs and let sandboxes out. With pins, a
//! stopped daemon leaves the redirection in place towards ports nobody
//! listens on, so sandboxed connects fail. Only [`teardown`] detaches.

mod events;
mod sys;
mod watch;

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf},
    programs::{
        links::FdLink, BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        LsmCgroup, SockOps, TracePoint,
    },
    Btf, Ebpf, EbpfLoader,
};
use sluice_common::{
    ip_to_words, names, Counters, EndpointKey, Flow, FlowKey, SandboxEntry, Target, MAX_SANDBOX_SLOTS, PROTO_TCP,
    PROTO_UDP,
};

pub use events::{EventStream, KernelEvent, RefusalReason};
pub use sys::{cgroup2_mount, ensure_bpffs, BPFFS};

/// The compiled kernel programs, built by `build.rs`.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {source}")]
    Ebpf { what: String, source: Box<dyn std::error::Error + Send + Sync> },
}

fn ebpf_err<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Ebpf { what, source: Box::new(source) }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Io { what, source }
}

/// The cgroup-attached programs, by name, in attach order: the socket
/// creation filters first, so no socket of a sandbox exists unchecked.
const SOCK_ADDR_PROGRAMS: [&str; 10] = [
    names::BIND4,
    names::BIND6,
    names::CONNECT4,
    names::CONNECT6,
    names::SENDMSG4,
    names::SENDMSG6,
    names::RECVMSG4,
    names::RECVMSG6,
    names::GETPEERNAME4,
    names::GETPEERNAME6,
];
const MAPS: [&str; 11] = [
    names::RESERVED_PORTS,
    names::ENFORCED_PARENTS,
    names::TASKS,
    names::EXEMPT,
    names::SANDBOXES,
    names::FLOWS_BY_COOKIE,
    names::FLOWS_BY_ADDR,
    names::ENDPOINTS,
    names::DEFAULT_TARGET,
    names::COUNTERS,
    names::EVENTS,
];

/// How a daemon came by its kernel state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Loaded and attached now.
    Loaded,
    /// Found pinned by an earlier daemon and adopted as it was.
    Adopted,
}

/// Handles to the pinned maps.
pub struct Datapath {
    pin_dir: PathBuf,
    /// The cgroup the programs are attached to.
    cgroup_parent: PathBuf,
    origin: Origin,
    lsm_enabled: bool,
    default_target: Target,
    parents: Mutex<HashMap<MapData, u64, Target>>,
    exempt: Mutex<HashMap<MapData, u64, u8>>,
    sandboxes: Mutex<HashMap<MapData, u64, SandboxEntry>>,
    flows_by_addr: Mutex<HashMap<MapData, FlowKey, Flow>>,
    endpoints: Mutex<HashMap<MapData, EndpointKey, u8>>,
    /// Ports of the endpoints, which host-netns sandboxes may not bind.
    reserved_ports: Mutex<HashMap<MapData, u32, u8>>,
    /// Every pinned link, held open while the daemon runs (see `watch`).
    held_links: Mutex<Vec<watch::HeldLink>>,
    /// Set once the daemon stops: the watchdog then pins nothing again,
    /// so a teardown that follows removes everything.
    closed: AtomicBool,
    counters: Mutex<PerCpuArray<MapData, Counters>>,
    events: Mutex<Option<RingBuf<MapData>>>,
}

impl Datapath {
    /// Adopts the pinned state under `pin_dir` if there is one, else loads
    /// the programs, attaches them to `cgroup_parent`, and pins everything.
    /// `default_target` applies to unregistered cgroups; when adopting, the
    /// pinned one stays in force (sandboxes already point at it).
    pub fn open(cgroup_parent: &Path, pin_dir: &Path, default_target: Target) -> Result<Self, DatapathError> {
        ensure_bpffs()?;
        if pin_dir.join("maps").join(names::SANDBOXES).exists() {
            return Self::adopt(cgroup_parent, pin_dir);
        }
        Self::load(cgroup_parent, pin_dir, default_target).inspect_err(|_| {
            // Half-attached state would keep redirecting to nobody: remove it.
            let _ = teardown(pin_dir);
        })
    }

    fn load(cgroup_parent: &Path, pin_dir: &Path, default_target: Target) -> Result<Self, DatapathError> {
        let links_dir = pin_dir.join("links");
        let maps_dir = pin_dir.join("maps");
        for dir in [&links_dir, &maps_dir] {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let (pidns_dev, pidns_ino) = sys::init_pid_namespace()?;
        let fork_child_pid = sys::fork_child_pid_offset()?;
        let netns_cookie = sys::init_netns_cookie()?;
        let mut ebpf = EbpfLoader::new()
            .override_global("INIT_PIDNS_DEV", &pidns_dev, true)
            .override_global("INIT_PIDNS_INO", &pidns_ino, true)
            .override_global("FORK_CHILD_PID_OFFSET", &fork_child_pid, true)
            .override_global("INIT_NETNS_COOKIE", &netns_cookie, true)
            .load(KERNEL_OBJECT)
            .map_err(ebpf_err("loading sluice's kernel programs"))?;

        // Maps first, so a partial failure below leaves something teardown
        // can find and remove.
        for name in MAPS {
            let map =
                ebpf.map(name).ok_or_else(|| DatapathError::Setup(format!("map {name} missing from kernel object")))?;
            map.pin(maps_dir.join(name)).map_err(ebpf_err(format!("pinning map {name}")))?;
        }
        {
            let map = ebpf
                .map_mut(names::DEFAULT_TARGET)
                .ok_or_else(|| DatapathError::Setup("map DEFAULT_TARGET missing".into()))?;
            let mut default_map: Array<&mut MapData, Target> =
                Array::try_from(map).map_err(ebpf_err("map DEFAULT_TARGET has an unexpected type"))?;
            default_map.set(0, default_target, 0).map_err(ebpf_err("writing the default target"))?;
        }

        {
            let map = ebpf
                .map_mut(names::ENFORCED_PARENTS)
                .ok_or_else(|| DatapathError::Setup("map ENFORCED_PARENTS missing".into()))?;
            let mut parents: HashMap<&mut MapData, u64, Target> =
                HashMap::try_from(map).map_err(ebpf_err("map ENFORCED_PARENTS has an unexpected type"))?;
            let parent_id = cgroup_id(cgroup_parent)?;
            parents.insert(parent_id, default_target, 0).map_err(ebpf_err("recording the enforced parent"))?;
        }

        let cgroup =
            File::open(cgroup_parent).map_err(io_err(format!("opening cgroup {}", cgroup_parent.display())))?;
        // Parsed once: both the cgroup programs and the guard need it.
        let btf = Btf::from_sys_fs().map_err(ebpf_err("reading kernel BTF"))?;
        let lsm_enabled = attach_all(&mut ebpf, &cgroup, &links_dir, &btf)?;
        attach_guard(&mut ebpf, &links_dir, &btf)?;
        Self::from_maps(cgroup_parent, pin_dir, Origin::Loaded, lsm_enabled, |name| {
            ebpf.take_map(name).ok_or_else(|| DatapathError::Setup(format!("map {name} missing")))
        })
    }

    fn adopt(cgroup_parent: &Path, pin_dir: &Path) -> Result<Self, DatapathError> {
        let links_dir = pin_dir.join("links");
        for name in SOCK_ADDR_PROGRAMS
            .iter()
            .chain(&[names::SOCK_OPS, names::SOCK_CREATE, names::EGRESS, names::SYS_ENTER])
            .chain(&GUARD_PROGRAMS)
        {
            let pin = links_dir.join(name);
            if !pin.exists() {
                return Err(DatapathError::Setup(format!(
                    "pinned state under {} is incomplete (no link {name}); run `sluice teardown` and start again",
                    pin_dir.display()
                )));
            }
        }
        let lsm_enabled = links_dir.join(names::SOCKET_CREATE_LSM).exists();
        let maps_dir = pin_dir.join("maps");
        let datapath = Self::from_maps(cgroup_parent, pin_dir, Origin::Adopted, lsm_enabled, |name| {
            if !maps_dir.join(name).exists() {
                return Err(DatapathError::Setup(format!(
                    "pinned state under {} was made by another sluice build (no map {name}); \
                     run `sluice teardown` and start again",
                    pin_dir.display()
                )));
            }
            let data =
                MapData::from_pin(maps_dir.join(name)).map_err(ebpf_err(format!("opening pinned map {name}")))?;
            Map::from_map_data(data).map_err(ebpf_err(format!("pinned map {name}")))
        })?;
        Ok(datapath)
    }

    fn from_maps(
        cgroup_parent: &Path,
        pin_dir: &Path,
        origin: Origin,
        lsm_enabled: bool,
        mut open: impl FnMut(&str) -> Result<Map, DatapathError>,
    ) -> Result<Self, DatapathError> {
        let mut typed = |name: &str| open(name);
        let default_map: Array<MapData, Target> = convert(typed(names::DEFAULT_TARGET)?, names::DEFAULT_TARGET)?;
        let default_target = default_map.get(&0, 0).map_err(ebpf_err("reading the default target"))?;
        let links_dir = pin_dir.join("links");
        let mut held_links = Vec::new();
        for entry in std::fs::read_dir(&links_dir).map_err(io_err(format!("listing {}", links_dir.display())))? {
            let pin = entry.map_err(io_err(format!("listing {}", links_dir.display())))?.path();
            held_links.push(watch::HeldLink::hold(&pin).map_err(io_err(format!("opening link {}", pin.display())))?);
        }
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            cgroup_parent: cgroup_parent.to_owned(),
            origin,
            lsm_enabled,
            default_target,
            parents: Mutex::new(convert(typed(names::ENFORCED_PARENTS)?, names::ENFORCED_PARENTS)?),
            exempt: Mutex::new(convert(typed(names::EXEMPT)?, names::EXEMPT)?),
            sandboxes: Mutex::new(convert(typed(names::SANDBOXES)?, names::SANDBOXES)?),
            flows_by_addr: Mutex::new(convert(typed(names::FLOWS_BY_ADDR)?, names::FLOWS_BY_ADDR)?),
            endpoints: Mutex::new(convert(typed(names::ENDPOINTS)?, names::ENDPOINTS)?),
            reserved_ports: Mutex::new(convert(typed(names::RESERVED_PORTS)?, names::RESERVED_PORTS)?),
            held_links: Mutex::new(held_links),
            closed: AtomicBool::new(false),
            counters: Mutex::new(convert(typed(names::COUNTERS)?, names::COUNTERS)?),
            events: Mutex::new(Some(convert(typed(names::EVENTS)?, names::EVENTS)?)),
        })
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Whether packet and other non-IP sockets are refused by the BPF LSM
    /// hook (IPv4/IPv6 raw sockets are refused either way).
    pub fn lsm_enabled(&self) -> bool {
        self.lsm_enabled
    }

    pub fn default_target(&self) -> Target {
        self.default_target
    }

    /// Sends the unregistered cgroups under `cgroup` (a directory below the
    /// attached parent, already covered by the programs) to `target` instead
    /// of the default one: containers in their own network namespaces must
    /// be refused on an address they can reach. Idempotent.
    pub fn add_parent(&self, cgroup: &Path, target: Target) -> Result<(), DatapathError> {
        let id = cgroup_id(cgroup)?;
        self.parents
            .lock()
            .expect("lock poisoned")
            .insert(id, target, 0)
            .map_err(ebpf_err("adding a cgroup parent"))?;
        self.add_endpoint(target, target.proxy_port, PROTO_TCP)?;
        self.add_endpoint(target, target.dns_port, PROTO_UDP)?;
        self.add_endpoint(target, target.dns_port, PROTO_TCP)
    }

    /// Exempts a cgroup below an enforced parent (a container that is not to
    /// be enforced): no program touches its processes or those of its child
    /// cgroups any more. Idempotent.
    pub fn exempt(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        self.exempt.lock().expect("lock poisoned").insert(cgroup_id, 1, 0).map_err(ebpf_err("exempting a cgroup"))
    }

    /// Enforces an exempted cgroup again.
    pub fn unexempt(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        removed(self.exempt.lock().expect("lock poisoned").remove(&cgroup_id), "removing an exemption")
    }

    /// The exempted cgroups as the kernel sees them.
    pub fn exempted(&self) -> Vec<u64> {
        let map = self.exempt.lock().expect("lock poisoned");
        map.keys().filter_map(Result::ok).collect()
    }

    /// Enrolls a sandbox cgroup: from now on its processes (and those of its
    /// child cgroups) are redirected to `entry.target` and counted in
    /// `entry.slot`. The counters of the slot start again from zero.
    pub fn enroll(&self, cgroup_id: u64, entry: SandboxEntry) -> Result<(), DatapathError> {
        if entry.slot >= MAX_SANDBOX_SLOTS {
            return Err(DatapathError::Setup(format!("counter slot {} out of range", entry.slot)));
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, error)| io_err("counting CPUs")(error))?;
        let zero =
            aya::maps::PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(ebpf_err("zeroing counters"))?;
        self.counters.lock().expect("lock poisoned").set(entry.slot, zero, 0).map_err(ebpf_err("zeroing counters"))?;
        self.sandboxes
            .lock()
            .expect("lock poisoned")
            .insert(cgroup_id, entry, 0)
            .map_err(ebpf_err("enrolling sandbox"))?;
        self.add_endpoint(entry.target, entry.target.dns_port, PROTO_UDP)?;
        self.add_endpoint(entry.target, entry.target.dns_port, PROTO_TCP)
    }

    /// Removes a sandbox; processes still in its cgroup fall back to the
    /// default target and are denied as unknown.
    pub fn unenroll(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        let entry = self.sandboxes.lock().expect("lock poisoned").get(&cgroup_id, 0).ok();
        removed(self.sandboxes.lock().expect("lock poisoned").remove(&cgroup_id), "removing sandbox")?;
        if let Some(entry) = entry {
            self.remove_endpoint(entry.target, entry.target.dns_port, PROTO_UDP)?;
            self.remove_endpoint(entry.target, entry.target.dns_port, PROTO_TCP)?;
        }
        Ok(())
    }

    /// Enrolled sandboxes as the kernel sees them.
    pub fn enrolled(&self) -> Vec<(u64, SandboxEntry)> {
        let map = self.sandboxes.lock().expect("lock poisoned");
        map.iter().filter_map(Result::ok).collect()
    }

    /// Lets sandboxed sockets send packets to `target`'s addresses on `port`.
    pub fn add_endpoint(&self, target: Target, port: u16, proto: u8) -> Result<(), DatapathError> {
        let mut endpoints = self.endpoints.lock().expect("lock poisoned");
        self.reserved_ports
            .lock()
            .expect("lock poisoned")
            .insert(u32::from(port), 1, 0)
            .map_err(ebpf_err("reserving a port"))?;
        for key in endpoint_keys(target, port, proto) {
            endpoints.insert(key, 1, 0).map_err(ebpf_err("adding endpoint"))?;
        }
        Ok(())
    }

    fn remove_endpoint(&self, target: Target, port: u16, proto: u8) -> Result<(), DatapathError> {
        let mut endpoints = self.endpoints.lock().expect("lock poisoned");
        for key in endpoint_keys(target, port, proto) {
            removed(endpoints.remove(&key), "removing endpoint")?;
        }
        // The port stays reserved while any endpoint still uses it.
        if !endpoints.keys().filter_map(Result::ok).any(|key| key.port == port) {
            removed(self.reserved_ports.lock().expect("lock poisoned").remove(&u32::from(port)), "releasing a port")?;
        }
        Ok(())
    }

    /// The flow the kernel recorded for a connection the proxy accepted from
    /// `peer`, removed from the map so it cannot be claimed twice.
    pub fn take_flow(&self, peer: SocketAddr) -> Option<Flow> {
        let key = FlowKey { ip: ip_to_words(canonical_ip(peer.ip())), port: peer.port(), _pad: [0; 6] };
        let mut flows = self.flows_by_addr.lock().expect("lock poisoned");
        let flow = flows.get(&key, 0).ok()?;
        let _ = flows.remove(&key);
        Some(flow)
    }

    /// A sandbox's counters, summed over CPUs.
    pub fn counters(&self, slot: u32) -> Counters {
        let Ok(values) = self.counters.lock().expect("lock poisoned").get(&slot, 0) else {
            return Counters::default();
        };
        values.iter().fold(Counters::default(), |sum, c| Counters {
            redirected: sum.redirected + c.redirected,
            dns: sum.dns + c.dns,
            refused: sum.refused + c.refused,
            dropped_packets: sum.dropped_packets + c.dropped_packets,
        })
    }

    /// Attaches again every cgroup link someone detached and pins again
    /// every link whose pin someone removed or replaced (the guard's
    /// tracing links too), with every sandbox frozen until all are back;
    /// returns the links it healed.
    pub fn heal(&self) -> Result<Vec<String>, DatapathError> {
        let mut held = self.held_links.lock().expect("lock poisoned");
        if self.closed.load(Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        let links_dir = self.pin_dir.join("links");
        let detached = watch::detached_links(&links_dir).map_err(io_err("checking the pinned links"))?;
        let unpinned: Vec<usize> = (0..held.len()).filter(|&i| !held[i].is_pinned()).collect();
        if detached.is_empty() && unpinned.is_empty() {
            return Ok(Vec::new());
        }
        let parent = &self.cgroup_parent;
        watch::freeze(parent, true).map_err(io_err(format!("freezing {}", parent.display())))?;
        let repinned = unpinned.iter().map(|&i| {
            let link = &held[i];
            link.repin().map_err(io_err(format!("pinning link {} again", link.name())))?;
            Ok(link.name())
        });
        let reattached = detached.iter().map(|link| {
            watch::reattach(link, parent).map_err(io_err(format!("attaching {} again", link.name())))?;
            Ok(link.name())
        });
        let healed = repinned.collect::<Result<Vec<_>, DatapathError>>().and_then(|mut healed| {
            healed.extend(reattached.collect::<Result<Vec<_>, DatapathError>>()?);
            Ok(healed)
        });
        // A re-attached cgroup link is a new link: hold that one from now on.
        for link in &detached {
            let pin = links_dir.join(link.name());
            if let (Some(slot), Ok(new)) =
                (held.iter_mut().find(|h| h.name() == link.name()), watch::HeldLink::hold(&pin))
            {
                *slot = new;
            }
        }
        // Thawed only when every link is back: a failure keeps the
        // sandboxes frozen, which is closed.
        if healed.is_ok() {
            watch::freeze(parent, false).map_err(io_err(format!("thawing {}", parent.display())))?;
        }
        healed
    }

    /// Lets go of the links: the daemon stops, and what it pinned is left
    /// to the pins (or to a teardown). The watchdog pins nothing after this.
    pub fn close(&self) {
        let mut held = self.held_links.lock().expect("lock poisoned");
        self.closed.store(true, Ordering::SeqCst);
        held.clear();
    }

    /// The stream of refused attempts. Can be taken once.
    pub fn take_events(&self) -> Option<events::EventStream> {
        self.events.lock().expect("lock poisoned").take().map(events::EventStream::new)
    }
}

fn cgroup_id(cgroup: &Path) -> Result<u64, DatapathError> {
    std::fs::metadata(cgroup)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .map_err(io_err(format!("reading cgroup {}", cgroup.display())))
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The endpoint keys for a target's IPv4 and IPv6 addresses (one key when
/// the IPv6 address is the IPv4-mapped form of the IPv4 one).
fn endpoint_keys(target: Target, port: u16, proto: u8) -> Vec<EndpointKey> {
    let v4 = IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(target.ip4)));
    let mut keys = vec![EndpointKey { ip: ip_to_words(v4), port, proto, _pad: [0; 5] }];
    if target.ip6 != keys[0].ip {
        keys.push(EndpointKey { ip: target.ip6, port, proto, _pad: [0; 5] });
    }
    keys
}

/// Removing a key that is already gone is not an error.
fn removed(result: Result<(), aya::maps::MapError>, what: &str) -> Result<(), DatapathError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(ref error)) if error.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        Err(error) => Err(ebpf_err(what.to_owned())(error)),
    }
}

fn convert<T: TryFrom<Map, Error = aya::maps::MapError>>(map: Map, name: &str) -> Result<T, DatapathError> {
    T::try_from(map).map_err(ebpf_err(format!("map {name} has an unexpected type")))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program, DatapathError> {
    ebpf.program_mut(name).ok_or_else(|| DatapathError::Setup(format!("program {name} missing from kernel object")))
}

/// Loads every program, attaches it to `cgroup` and pins its link. Returns
/// whether the LSM socket hook could be used.
fn attach_all(ebpf: &mut Ebpf, cgroup: &File, links_dir: &Path, btf: &Btf) -> Result<bool, DatapathError> {
    let pin = |link: FdLink, name: &str| -> Result<(), DatapathError> {
        link.pin(links_dir.join(name)).map_err(ebpf_err(format!("pinning link {name}")))?;
        Ok(())
    };

    // Socket creation first: from here on no raw or packet socket can be
    // made in a sandbox. The LSM hook refuses non-IP sockets with EPERM
    // where the kernel allows BPF LSM programs; elsewhere the sys_enter
    // backstop kills a process that makes one (and `sluice run` refuses them
    // earlier with seccomp).
    let lsm_enabled = match attach_lsm(ebpf, cgroup, btf) {
        Ok(link) => {
            pin(link, names::SOCKET_CREATE_LSM)?;
            true
        }
        Err(error) => {
            tracing::info!(%error, "BPF LSM programs cannot be loaded on this kernel; using the sys_enter backstop for non-IP sockets");
            false
        }
    };
    let sys_enter: &mut BtfTracePoint = program(ebpf, names::SYS_ENTER)?.try_into().map_err(ebpf_err("sys_enter"))?;
    sys_enter.load("sys_enter", btf).map_err(ebpf_err("loading the sys_enter backstop"))?;
    let id = sys_enter.attach().map_err(ebpf_err("attaching the sys_enter backstop"))?;
    pin(sys_enter.take_link(id).map_err(ebpf_err("sys_enter link"))?.into(), names::SYS_ENTER)?;
    let sock_create: &mut CgroupSock =
        program(ebpf, names::SOCK_CREATE)?.try_into().map_err(ebpf_err("sock_create"))?;
    sock_create.load().map_err(ebpf_err("loading sock_create"))?;
    let id = sock_create.attach(cgroup, CgroupAttachMode::Single).map_err(ebpf_err("attaching sock_create"))?;
    pin(
        sock_create
            .take_link(id)
            .map_err(ebpf_err("sock_create link"))?
            .try_into()
            .map_err(ebpf_err("sock_create link"))?,
        names::SOCK_CREATE,
    )?;

    let release: &mut CgroupSock =
        program(ebpf, "sluice_sock_release")?.try_into().map_err(ebpf_err("sock_release"))?;
    release.load().map_err(ebpf_err("loading sock_release"))?;
    let id = release.attach(cgroup, CgroupAttachMode::Single).map_err(ebpf_err("attaching sock_release"))?;
    pin(
        release
            .take_link(id)
            .map_err(ebpf_err("sock_release link"))?
            .try_into()
            .map_err(ebpf_err("sock_release link"))?,
        "sluice_sock_release",
    )?;

    // sock_ops before connect: an established redirected connection must
    // always be re-keyed for the proxy.
    let sock_ops: &mut SockOps = program(ebpf, names::SOCK_OPS)?.try_into().map_err(ebpf_err("sock_ops"))?;
    sock_ops.load().map_err(ebpf_err("loading sock_ops"))?;
    let id = sock_ops.attach(cgroup, CgroupAttachMode::Single).map_err(ebpf_err("attaching sock_ops"))?;
    pin(
        sock_ops.take_link(id).map_err(ebpf_err("sock_ops link"))?.try_into().map_err(ebpf_err("sock_ops link"))?,
        names::SOCK_OPS,
    )?;

    let egress: &mut CgroupSkb = program(ebpf, names::EGRESS)?.try_into().map_err(ebpf_err("egress"))?;
    egress.load().map_err(ebpf_err("loading egress"))?;
    let id = egress
        .attach(cgroup, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
        .map_err(ebpf_err("attaching egress"))?;
    pin(
        egress.take_link(id).map_err(ebpf_err("egress link"))?.try_into().map_err(ebpf_err("egress link"))?,
        names::EGRESS,
    )?;

    for name in SOCK_ADDR_PROGRAMS {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?.try_into().map_err(ebpf_err(name))?;
        prog.load().map_err(ebpf_err(format!("loading {name}")))?;
        let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(ebpf_err(format!("attaching {name}")))?;
        pin(prog.take_link(id).map_err(ebpf_err(name))?.try_into().map_err(ebpf_err(name))?, name)?;
    }
    Ok(lsm_enabled)
}

fn attach_lsm(ebpf: &mut Ebpf, cgroup: &File, btf: &Btf) -> Result<FdLink, DatapathError> {
    let prog: &mut LsmCgroup = ebpf
        .program_mut(names::SOCKET_CREATE_LSM)
        .ok_or_else(|| DatapathError::Setup("LSM program missing".into()))?
        .try_into()
        .map_err(ebpf_err("socket_create"))?;
    prog.load("socket_create", btf).map_err(ebpf_err("loading the LSM socket_create hook"))?;
    let id = prog.attach(cgroup).map_err(ebpf_err("attaching the LSM socket_create hook"))?;
    Ok(prog.take_link(id).map_err(ebpf_err("socket_create link"))?.into())
}

/// The guard's programs besides `sys_enter` (see the kernel crate's `guard`
/// module), all attached to the whole host.
const GUARD_PROGRAMS: [&str; 3] = [names::GUARD_FORK, names::GUARD_EXIT, names::GUARD_CGROUP_MOVE];

/// Loads the rest of the tamper guard and pins its links. Any failure is an
/// error: a guard that is half there would be believed.
fn attach_guard(ebpf: &mut Ebpf, links_dir: &Path, btf: &Btf) -> Result<(), DatapathError> {
    let mut links: Vec<(&str, FdLink)> = Vec::new();
    for (name, function) in
        [(names::GUARD_EXIT, "sched_process_exit"), (names::GUARD_CGROUP_MOVE, "cgroup_attach_task")]
    {
        let prog: &mut BtfTracePoint = program(ebpf, name)?.try_into().map_err(ebpf_err(name))?;
        prog.load(function, btf).map_err(ebpf_err(format!("loading guard program {name}")))?;
        let id = prog.attach().map_err(ebpf_err(format!("attaching guard program {name}")))?;
        links.push((name, prog.take_link(id).map_err(ebpf_err(name))?.into()));
    }
    let fork: &mut TracePoint = program(ebpf, names::GUARD_FORK)?.try_into().map_err(ebpf_err(names::GUARD_FORK))?;
    fork.load().map_err(ebpf_err("loading the guard's fork tracepoint"))?;
    let id = fork.attach("sched", "sched_process_fork").map_err(ebpf_err("attaching the guard's fork tracepoint"))?;
    let link = fork.take_link(id).map_err(ebpf_err(names::GUARD_FORK))?;
    links.push((names::GUARD_FORK, link.try_into().map_err(ebpf_err("the guard's fork tracepoint link"))?));
    for (name, link) in links {
        link.pin(links_dir.join(name)).map_err(ebpf_err(format!("pinning link {name}")))?;
    }
    Ok(())
}

/// Removes every pin under `pin_dir`: links first (which detaches the
/// programs from the cgroup once nothing else holds them), then maps.
/// Returns how many pins were removed.
pub fn teardown(pin_dir: &Path) -> Result<usize, DatapathError> {
    let mut removed = 0;
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let entry = entry.map_err(io_err(format!("listing {}", dir.display())))?;
            std::fs::remove_file(entry.path()).map_err(io_err(format!("removing pin {}", entry.path().display())))?;
            removed += 1;
        }
        let _ = std::fs::remove_dir(&dir);
    }
    let _ = std::fs::remove_dir(pin_dir);
    Ok(removed)
}
