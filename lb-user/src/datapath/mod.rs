//! Loading, attaching and pinning the kernel programs, and opening their pinned maps.
//!
//! Layout under the pin directory: `maps/<MAP>`, `progs/<program>`, and one link per
//! attachment, `links/xdp-<ifname>` / `links/tc-<ifname>` / `links/sock-<hook>`. Maps are
//! opened (adopted) when already pinned, so an agent restart keeps conntrack and service
//! state. Attaching again replaces the pinned link of that interface or hook: programs
//! never stack.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

pub mod batch;
pub mod conntrack;
pub mod maps;
pub mod predict;
pub mod sockets;

use aya::{
    maps::{Array, Map, MapData, PerCpuArray},
    programs::{
        links::{CgroupAttachMode, FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
        CgroupSock, CgroupSockAddr, SchedClassifier, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use lb_common::{
    counters::{self, Counter},
    map_names, program_names, SockConfig,
};

/// The kernel object, built by this crate's build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

const BPF_FS: &str = "/sys/fs/bpf";

/// Prefixes of the links under `links/`: `<kind>-<ifname>` (and the socket hooks'
/// `program_names::SOCKET_HOOKS` names).
const LINK_KINDS: [&str; 4] = ["xdp", "tc", "tcup", "tceg"];
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mounting bpffs at {BPF_FS}: {0} (are you root with CAP_SYS_ADMIN?)")]
    MountBpffs(#[source] io::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {name}: its attachment is not a pinnable bpf_link: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("the datapath's log ring: {0}")]
    Logger(#[source] aya_log::Error),
    #[error(
        "{}: {field} is {pinned}, this agent (its build or its options) expects {expected}, so its state cannot be adopted; \
         `lb-user unload --pin-dir {}` starts over (tracked flows are lost), or use another --pin-dir",
        path.display(),
        path.parent().and_then(Path::parent).unwrap_or(path).display()
    )]
    IncompatiblePin { path: PathBuf, field: &'static str, pinned: u32, expected: u32 },
    #[error(
        "{}: the pinned conntrack table is {}, and --conntrack-memory asks for {}: a pinned table keeps the \
         memory kind it was created with (its flows live in it); start with --conntrack-memory {}, or \
         `lb-user unload --pin-dir {}` to start over (tracked flows are lost)",
        path.display(),
        pinned.name(),
        wanted.name(),
        pinned.name(),
        path.parent().and_then(Path::parent).unwrap_or(path).display()
    )]
    ConntrackMemoryKind { path: PathBuf, pinned: ConntrackMemory, wanted: ConntrackMemory },
    #[error("--pin-dir {} is not on a bpf filesystem (use a directory under {BPF_FS})", .0.display())]
    NotBpffs(PathBuf),
    #[error(
        "{}: not a pin of lb-user (a pin directory holds only maps/, progs/ and links/ with this \
         product's names); refusing to unload, nothing was removed",
        .0.display()
    )]
    ForeignPin(PathBuf),
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object (or is not a hash map)")]
    MissingMap { name: &'static str },
    #[error("this lb-user was built with LB_EBPF_STUB set: it has no kernel object to load; rebuild without it")]
    StubObject,
    #[error("pinning {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error(
        "--pin-dir {}: no such directory: no datapath is loaded there (`lb-user load` or the agent \
         creates it; the default is {})",
        .0.display(),
        lb_common::PIN_DIR
    )]
    NoPinDir(PathBuf),
    #[error(
        "--pin-dir {}: not a pin directory of lb-user (no maps/{}): no datapath is loaded there",
        .0.display(),
        map_names::SERVICES
    )]
    NotAPinDir(PathBuf),
    #[error("map {name}: {source} (is the datapath loaded with this pin directory?)")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("attaching the socket hooks to cgroup {}: {source}", cgroup.display())]
    Cgroup {
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

fn on_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs on a valid C string into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Mounts bpffs at /sys/fs/bpf unless it is mounted already.
pub fn ensure_bpffs() -> Result<()> {
    if on_bpffs(Path::new(BPF_FS)) {
        return Ok(());
    }
    let path = std::ffi::CString::new(BPF_FS).expect("no NUL");
    let fstype = std::ffi::CString::new("bpf").expect("no NUL");
    // SAFETY: mount(2) with valid C strings and no data.
    let rc = unsafe { libc::mount(fstype.as_ptr(), path.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(Error::MountBpffs(io::Error::last_os_error()));
    }
    Ok(())
}

/// How LB_CONNTRACK holds its memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConntrackMemory {
    /// Allocated per entry as flows start, given back as they end (BPF_F_NO_PREALLOC).
    #[default]
    OnDemand,
    /// All of it at creation, for the whole capacity: inserts take a preallocated element
    /// (new flows are cheaper), and the memory is held whether flows use it or not.
    Preallocated,
}

impl ConntrackMemory {
    /// As `--conntrack-memory` spells it.
    pub const fn name(self) -> &'static str {
        match self {
            ConntrackMemory::OnDemand => "on-demand",
            ConntrackMemory::Preallocated => "preallocated",
        }
    }

    /// The kind of a hash map with these flags.
    const fn of_flags(map_flags: u32) -> ConntrackMemory {
        if map_flags & BPF_F_NO_PREALLOC != 0 {
            ConntrackMemory::OnDemand
        } else {
            ConntrackMemory::Preallocated
        }
    }
}

/// BPF_F_NO_PREALLOC (uapi/linux/bpf.h).
const BPF_F_NO_PREALLOC: u32 = 1;

/// What the maps are sized to at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// LB_CONNTRACK entries: two per flow.
    pub conntrack_entries: u32,
    /// LB_CONNTRACK's kind (taken when the table is created; a pinned one keeps its own).
    pub conntrack_memory: ConntrackMemory,
    /// Frontend ids: their per-CPU counters.
    pub frontends: u32,
    /// Backend ids: the backend table, per-CPU counters and open-flow counts.
    pub backends: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            conntrack_entries: lb_common::DEFAULT_CONNTRACK_ENTRIES,
            conntrack_memory: ConntrackMemory::OnDemand,
            frontends: lb_common::DEFAULT_FRONTENDS,
            backends: lb_common::DEFAULT_BACKENDS,
        }
    }
}

/// The loaded programs of one datapath instance, pinned under `pin_dir`.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Datapath {
    /// Loads the object, adopting maps already pinned under `pin_dir`, and pins programs.
    pub fn load(pin_dir: &Path, capacity: Capacity) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            return Err(Error::StubObject);
        }
        ensure_bpffs()?;
        for sub in ["maps", "progs", "links"] {
            let dir = pin_dir.join(sub);
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        if !on_bpffs(pin_dir) {
            return Err(Error::NotBpffs(pin_dir.to_path_buf()));
        }
        check_pinned_shapes(pin_dir, capacity)?;
        let conntrack = pin_dir.join("maps").join(map_names::CONNTRACK);
        if capacity.conntrack_memory == ConntrackMemory::Preallocated && !conntrack.exists() {
            create_preallocated_conntrack(&conntrack, capacity.conntrack_entries)?;
        }
        let mut loader = EbpfLoader::new();
        for name in map_names::ALL {
            loader.map_pin_path(name, pin_dir.join("maps").join(name));
        }
        loader.map_max_entries(map_names::CONNTRACK, capacity.conntrack_entries);
        loader.map_max_entries(map_names::FRONTEND_STATS, capacity.frontends);
        loader.map_max_entries(map_names::RR_CURSORS, capacity.frontends);
        for name in [map_names::BACKENDS, map_names::BACKEND_STATS, map_names::BACKEND_LIVE] {
            loader.map_max_entries(name, capacity.backends);
        }
        let ebpf = loader.load(EBPF_OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        let mut datapath = Datapath { ebpf, pin_dir: pin_dir.to_path_buf() };
        for name in [program_names::XDP_UPLINK, program_names::CT_REAP] {
            let xdp: &mut Xdp = datapath.program(name)?;
            xdp.load().map_err(|source| Error::Program { name, source })?;
        }
        for name in [program_names::TC_POD, program_names::TC_UPLINK, program_names::TC_EGRESS] {
            let tc: &mut SchedClassifier = datapath.program(name)?;
            tc.load().map_err(|source| Error::Program { name, source })?;
        }
        for (name, _) in program_names::SOCKET_HOOKS {
            if name == program_names::SOCK_RELEASE {
                let hook: &mut CgroupSock = datapath.program(name)?;
                hook.load().map_err(|source| Error::Program { name, source })?;
            } else {
                let hook: &mut CgroupSockAddr = datapath.program(name)?;
                hook.load().map_err(|source| Error::Program { name, source })?;
            }
        }
        for name in program_names::PINNED {
            let program = datapath.ebpf.program_mut(name).ok_or(Error::MissingProgram { name })?;
            let path = pin_dir.join("progs").join(name);
            remove_if_present(&path)?;
            program.pin(&path).map_err(|source| Error::Pin { path, source })?;
        }
        Ok(datapath)
    }

    /// Attaches the north-south programs to an uplink (XDP, and tc ingress to forward what
    /// XDP hands over). Where our link is still pinned, the new program replaces the old
    /// one in it atomically: a restart or an upgrade drops no packet.
    pub fn attach_uplink(&mut self, iface: &str) -> Result<()> {
        let name = program_names::XDP_UPLINK;
        let link_path = self.link_path("xdp", iface);
        let program: &mut Xdp = self.program(name)?;
        let program_err = |source| Error::Program { name, source };
        let replaced = take_pinned::<XdpLink>(&link_path)?.and_then(|old| program.attach_to_link(old).ok());
        let id = match replaced {
            Some(id) => id,
            None => program.attach(iface, XdpMode::default()).map_err(program_err)?,
        };
        let link = program.take_link(id).map_err(program_err)?;
        pin_link(link.try_into(), link_path, name)?;
        self.attach_tc(program_names::TC_UPLINK, "tcup", iface, TcAttachType::Ingress)?;
        self.attach_tc(program_names::TC_EGRESS, "tceg", iface, TcAttachType::Egress)
    }

    /// Attaches the east-west program at tc ingress (tcx) of a pod-facing or tunnel device,
    /// and the egress program.
    pub fn attach_pod_device(&mut self, iface: &str) -> Result<()> {
        self.attach_tc(program_names::TC_POD, "tc", iface, TcAttachType::Ingress)?;
        self.attach_tc(program_names::TC_EGRESS, "tceg", iface, TcAttachType::Egress)
    }

    fn attach_tc(&mut self, name: &'static str, kind: &str, iface: &str, direction: TcAttachType) -> Result<()> {
        let link_path = self.link_path(kind, iface);
        let program: &mut SchedClassifier = self.program(name)?;
        let program_err = |source| Error::Program { name, source };
        let replaced = take_pinned::<SchedClassifierLink>(&link_path)?.and_then(|old| program.attach_to_link(old).ok());
        let id = match replaced {
            Some(id) => id,
            None => program.attach(iface, direction).map_err(program_err)?,
        };
        let link = program.take_link(id).map_err(program_err)?;
        pin_link(link.try_into(), link_path, name)
    }

    /// Socket-level load balancing: writes how the hooks run, then attaches them to the
    /// cgroup at `cgroup` (every socket of its processes and their descendants' meets them).
    /// A hook already attached (an agent restart, an upgrade, another cgroup) is replaced
    /// after its successor is in place, never before: for a moment both run, which changes
    /// nothing (the second finds a backend's address, which is no frontend, or a frontend's
    /// where the first showed it). Attached as bpf_links, which the kernel always runs beside
    /// other programs of the cgroup (multi mode) and which take no attach flags.
    pub fn attach_sockets(&mut self, cgroup: &Path, config: SockConfig) -> Result<()> {
        let name = map_names::SOCK_CONFIG;
        let mut map: Array<_, SockConfig> =
            open_map(&self.pin_dir, name)?.try_into().map_err(|source| Error::Map { name, source })?;
        map.set(0, config, 0).map_err(|source| Error::Map { name, source })?;
        let dir = fs::File::open(cgroup).map_err(|source| Error::Cgroup { cgroup: cgroup.to_path_buf(), source })?;
        for (name, link_name) in program_names::SOCKET_HOOKS {
            let link_path = self.pin_dir.join("links").join(link_name);
            let old = take_pinned::<FdLink>(&link_path)?;
            let program_err = |source| Error::Program { name, source };
            let link: FdLink = if name == program_names::SOCK_RELEASE {
                let hook: &mut CgroupSock = self.program(name)?;
                let id = hook.attach(&dir, CgroupAttachMode::Single).map_err(program_err)?;
                hook.take_link(id).map_err(program_err)?.try_into().map_err(|source| Error::Link { name, source })?
            } else {
                let hook: &mut CgroupSockAddr = self.program(name)?;
                let id = hook.attach(&dir, CgroupAttachMode::Single).map_err(program_err)?;
                hook.take_link(id).map_err(program_err)?.try_into().map_err(|source| Error::Link { name, source })?
            };
            pin_link(Ok(link), link_path, name)?;
            drop(old);
        }
        Ok(())
    }

    /// Detaches the socket hooks (`--socket-lb off`), if attached; the pods' and the node's
    /// Service traffic is then the packet path's alone. The release hook stays while sockets
    /// it counts as open flows are still tracked (their backends' counts would otherwise
    /// never come down); the next start without any removes it. Returns how many are.
    pub fn detach_sockets(&mut self) -> Result<usize> {
        let tracked = sockets::connections(&self.pin_dir)?.len();
        for (name, link_name) in program_names::SOCKET_HOOKS {
            if name != program_names::SOCK_RELEASE || tracked == 0 {
                remove_if_present(&self.pin_dir.join("links").join(link_name))?;
            }
        }
        Ok(tracked)
    }

    /// Removes the pinned links of pod devices not in `present` (deleted while we ran, or
    /// while we were down); returns their names.
    pub fn prune_pod_links(&self, present: &std::collections::BTreeSet<String>) -> Result<Vec<String>> {
        let dir = self.pin_dir.join("links");
        let mut pruned = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let device = name.strip_prefix("tc-").or_else(|| name.strip_prefix("tceg-"));
            // An uplink's egress link (beside its xdp- link) is not a pod device's.
            let uplink = self.pin_dir.join("links").join(format!("xdp-{}", device.unwrap_or_default())).exists();
            if let Some(device) = device.filter(|d| !present.contains(*d) && !uplink) {
                if name.starts_with("tc-") {
                    pruned.push(device.to_string());
                }
                remove_if_present(&path)?;
            }
        }
        Ok(pruned)
    }

    /// The datapath's log ring (rare events only), for the agent to drain.
    pub fn take_logger(&mut self) -> Result<EbpfLogger<&'static dyn log::Log>> {
        EbpfLogger::init(&mut self.ebpf).map_err(Error::Logger)
    }

    /// The loaded object, for BPF_PROG_TEST_RUN in tests and benchmarks.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn program<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let program = self.ebpf.program_mut(name).ok_or(Error::MissingProgram { name })?;
        program.try_into().map_err(|source| Error::Program { name, source })
    }

    fn link_path(&self, kind: &str, iface: &str) -> PathBuf {
        self.pin_dir.join("links").join(format!("{kind}-{iface}"))
    }
}

fn pin_link(link: Result<FdLink, aya::programs::links::LinkError>, path: PathBuf, name: &'static str) -> Result<()> {
    let link = link.map_err(|source| Error::Link { name, source })?;
    link.pin(&path).map_err(|source| Error::Pin { path, source })?;
    Ok(())
}

/// Our link pinned at `path`, unpinned but held open (so still attached), if there is one
/// of the expected type. A link whose device went away fails the later update, and the
/// caller attaches afresh; dropping it then releases it.
fn take_pinned<L: TryFrom<FdLink>>(path: &Path) -> Result<Option<L>> {
    let Ok(pinned) = PinnedLink::from_pin(path) else {
        // Nothing pinned (or not a link): nothing to reuse.
        remove_if_present(path)?;
        return Ok(None);
    };
    let link = pinned.unpin().map_err(io_err(path))?;
    Ok(L::try_from(link).ok())
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Detaches everything pinned under `pin_dir` (removing a link's last pin detaches it)
/// and removes the programs, the maps and the directory. Only this product's own pins go:
/// the directory must be on bpffs and hold nothing but the names `load` and the agent
/// create, else nothing is removed and the error names the first stranger.
pub fn unload(pin_dir: &Path) -> Result<()> {
    if fs::symlink_metadata(pin_dir).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) {
        return Ok(());
    }
    if !on_bpffs(pin_dir) {
        return Err(Error::NotBpffs(pin_dir.to_path_buf()));
    }
    let mut pins = Vec::new();
    let mut dirs = Vec::new();
    for (sub, subpath) in entries(pin_dir)? {
        let known: fn(&str) -> bool = match sub.as_str() {
            "maps" => |n| map_names::ALL.contains(&n),
            "progs" => |n| program_names::PINNED.contains(&n),
            "links" => is_link_name,
            _ => return Err(Error::ForeignPin(subpath)),
        };
        if !fs::symlink_metadata(&subpath).map_err(io_err(&subpath))?.is_dir() {
            return Err(Error::ForeignPin(subpath));
        }
        for (name, path) in entries(&subpath)? {
            // Pins are files; a directory in there is someone else's.
            if !known(&name) || !fs::symlink_metadata(&path).map_err(io_err(&path))?.is_file() {
                return Err(Error::ForeignPin(path));
            }
            pins.push(path);
        }
        dirs.push(subpath);
    }
    // Links first, so the programs are detached before anything else goes.
    pins.sort_by_key(|p| !p.starts_with(pin_dir.join("links")));
    for pin in &pins {
        fs::remove_file(pin).map_err(io_err(pin))?;
    }
    for dir in dirs.iter().map(PathBuf::as_path).chain([pin_dir]) {
        fs::remove_dir(dir).map_err(io_err(dir))?;
    }
    Ok(())
}

/// `<kind>-<ifname>` (`xdp`, `tc`, `tcup`, `tceg`) with a name the kernel could give a
/// device, or `sock-<hook>`.
fn is_link_name(name: &str) -> bool {
    program_names::SOCKET_HOOKS.iter().any(|(_, link)| *link == name)
        || name.split_once('-').is_some_and(|(kind, ifname)| {
            LINK_KINDS.contains(&kind) && !ifname.is_empty() && ifname.len() < libc::IFNAMSIZ && !ifname.contains('/')
        })
}

/// (name, path) of each entry of a directory; a name that is not UTF-8 is no name of ours.
fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| Error::ForeignPin(path.clone()))?;
        out.push((name.to_string(), path));
    }
    out.sort();
    Ok(out)
}

/// Checks that `pin_dir` holds a loaded datapath, for commands that read its maps: the error
/// names the directory and what is wrong with it.
pub fn check_pin_dir(pin_dir: &Path) -> Result<()> {
    if !pin_dir.is_dir() {
        return Err(Error::NoPinDir(pin_dir.to_path_buf()));
    }
    if !on_bpffs(pin_dir) {
        return Err(Error::NotBpffs(pin_dir.to_path_buf()));
    }
    if !pin_dir.join("maps").join(map_names::SERVICES).exists() {
        return Err(Error::NotAPinDir(pin_dir.to_path_buf()));
    }
    Ok(())
}

/// Is a link pinned for this interface (XDP uplink or tc pod device)?
pub fn is_attached(pin_dir: &Path, kind: &str, iface: &str) -> bool {
    pin_dir.join("links").join(format!("{kind}-{iface}")).exists()
}

/// What the datapath counted: (label, totals over CPUs), in `lb_common::counters` order.
pub fn read_counters(pin_dir: &Path) -> Result<Vec<(&'static str, Counter)>> {
    let name = map_names::COUNTERS;
    let map: PerCpuArray<_, Counter> =
        open_map(pin_dir, name)?.try_into().map_err(|source| Error::Map { name, source })?;
    counters::ALL
        .iter()
        .map(|(index, label)| {
            let per_cpu = map.get(index, 0).map_err(|source| Error::Map { name, source })?;
            let total = per_cpu
                .iter()
                .fold(Counter::default(), |t, c| Counter { packets: t.packets + c.packets, bytes: t.bytes + c.bytes });
            Ok((*label, total))
        })
        .collect()
}

/// (name, key size, value size, max entries) of every pinned map, as this build defines them.
fn expected_shapes(capacity: Capacity) -> [(&'static str, usize, usize, u32); 22] {
    use lb_common::*;
    use std::mem::size_of;
    [
        (map_names::SERVICES, size_of::<ServiceKey>(), size_of::<ServiceValue>(), MAX_SERVICES),
        (map_names::SLOTS, size_of::<SlotKey>(), size_of::<u32>(), MAX_BACKEND_SLOTS),
        (map_names::BACKENDS, size_of::<u32>(), size_of::<Backend>(), capacity.backends),
        (map_names::CONNTRACK, size_of::<CtKey>(), size_of::<CtValue>(), capacity.conntrack_entries),
        (map_names::CT_STATE, size_of::<u32>(), size_of::<CtState>(), 1),
        // LPM trie keys carry a u32 prefix length in front.
        (map_names::SRC_RANGES, size_of::<u32>() + size_of::<SourceRange>(), size_of::<u32>(), MAX_SOURCE_RANGES),
        (map_names::CONFIG, size_of::<u32>(), size_of::<Config>(), 1),
        (map_names::COUNTERS, size_of::<u32>(), size_of::<Counter>(), counters::COUNT),
        (map_names::FRONT_BITS, size_of::<u32>(), size_of::<u64>(), FRONT_FILTER_BITS / 64),
        (map_names::FRAGMENTS, size_of::<FragKey>(), size_of::<FragValue>(), MAX_FRAGMENTS),
        (map_names::RATE_LIMIT, size_of::<u32>(), size_of::<Bucket>(), MAX_RATE_LIMITED),
        (map_names::REAP_QUEUE, size_of::<u32>(), size_of::<CtKey>(), REAP_BATCH),
        (map_names::FRONTEND_STATS, size_of::<u32>(), size_of::<FrontendStats>(), capacity.frontends),
        (map_names::BACKEND_STATS, size_of::<u32>(), size_of::<BackendStats>(), capacity.backends),
        (map_names::BACKEND_LIVE, size_of::<u32>(), size_of::<u64>(), capacity.backends),
        (map_names::RR_CURSORS, size_of::<u32>(), size_of::<u64>(), capacity.frontends),
        (map_names::AFFINITY, size_of::<AffinityKey>(), size_of::<AffinityValue>(), MAX_AFFINITY),
        (map_names::FRONTEND_META, size_of::<ServiceKey>(), size_of::<FrontendMeta>(), MAX_SERVICES),
        (map_names::AGENT, size_of::<u32>(), size_of::<AgentStatus>(), 1),
        (map_names::SOCK_CONFIG, size_of::<u32>(), size_of::<SockConfig>(), 1),
        (map_names::SOCK_CONN, size_of::<u64>(), size_of::<SockConn>(), MAX_SOCK_CONNS),
        (map_names::SOCK_UDP, size_of::<SockUdpKey>(), size_of::<SockUdpValue>(), MAX_SOCK_UDP),
    ]
}

/// Adopting a pinned map of another layout (left by an older build) would let the programs
/// misread it: refuse, naming the map and what differs. The conntrack capacity is the
/// agent's option, and a pinned table cannot be resized in place: the same refusal says so.
fn check_pinned_shapes(pin_dir: &Path, capacity: Capacity) -> Result<()> {
    for (name, key, value, entries) in expected_shapes(capacity) {
        let path = pin_dir.join("maps").join(name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path).and_then(|m| m.info()).map_err(|source| Error::Map { name, source })?;
        let fields = [
            ("key size", info.key_size(), key as u32),
            ("value size", info.value_size(), value as u32),
            ("max entries", info.max_entries(), entries),
        ];
        if let Some((field, pinned, expected)) = fields.into_iter().find(|(_, pinned, expected)| pinned != expected) {
            return Err(Error::IncompatiblePin { path, field, pinned, expected });
        }
        if name == map_names::CONNTRACK {
            let pinned = ConntrackMemory::of_flags(info.map_flags());
            if pinned != capacity.conntrack_memory {
                return Err(Error::ConntrackMemoryKind { path, pinned, wanted: capacity.conntrack_memory });
            }
        }
    }
    Ok(())
}

/// Creates the preallocated kind of LB_CONNTRACK and pins it where the load adopts it. aya
/// sets a map's size at load but not its flags, so the object also defines the table
/// preallocated, under another name, used by no program: a load that makes only that map
/// big (every other map one entry, its programs never loaded) creates it, with its BTF, and
/// it is pinned as LB_CONNTRACK.
fn create_preallocated_conntrack(path: &Path, entries: u32) -> Result<()> {
    let mut loader = EbpfLoader::new();
    for name in map_names::ALL {
        loader.map_max_entries(name, 1);
    }
    loader.map_max_entries(map_names::CT_PREALLOC, entries);
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
    let name = map_names::CT_PREALLOC;
    let map = ebpf.take_map(name).ok_or(Error::MissingMap { name })?;
    let data = match &map {
        Map::HashMap(data) => data,
        _ => return Err(Error::MissingMap { name }),
    };
    data.pin(path).map_err(|source| Error::Pin { path: path.to_path_buf(), source })
}

/// Opens a pinned map of the datapath under `pin_dir`.
pub fn open_map(pin_dir: &Path, name: &'static str) -> Result<Map> {
    let data = MapData::from_pin(pin_dir.join("maps").join(name)).map_err(|source| Error::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| Error::Map { name, source })
}
