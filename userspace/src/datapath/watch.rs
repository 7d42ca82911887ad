//! The link watchdog: finds cgroup links that someone detached (a host
//! process with `CAP_BPF`; sandboxes cannot, see the kernel guard) and
//! attaches their programs again, with every sandbox frozen in between so
//! nothing leaves unredirected while it heals.
//!
//! The guard's tracing links (`sys_enter`, fork, exit, cgroup moves) cannot
//! be detached on this kernel (`BPF_LINK_DETACH` answers EOPNOTSUPP for
//! them), but removing a pin that is a link's only reference destroys the
//! link and with it its program: the guard, or a cgroup program. So the
//! daemon holds a descriptor of every link ([`HeldLink`]) for as long as it
//! runs, which keeps them attached whatever happens to the pins, and pins a
//! link again where it belongs when its pin is gone or replaced (the pins
//! carry everything across a daemon restart).
//!
//! Raw `bpf()` calls: aya keeps link info and link creation to itself.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// The head of `struct bpf_link_info` and its `cgroup` member; the rest of
/// the kernel's struct stays zero, as the kernel requires.
#[repr(C)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u32; 57],
}

impl Default for LinkInfo {
    fn default() -> Self {
        Self { link_type: 0, id: 0, prog_id: 0, _pad: 0, cgroup_id: 0, attach_type: 0, _rest: [0; 57] }
    }
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zeroed bpf_attr-sized buffer the command reads and
    // writes within.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: a descriptor the kernel just returned to us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn path_arg(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a pin path"))
}

fn obj_get(pin: &Path) -> std::io::Result<OwnedFd> {
    let path = path_arg(pin)?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

fn link_info(link: &OwnedFd) -> std::io::Result<LinkInfo> {
    let mut info = LinkInfo::default();
    let mut attr = [0u64; 16];
    attr[0] = u64::from(link.as_raw_fd() as u32) | ((std::mem::size_of::<LinkInfo>() as u64) << 32);
    attr[1] = std::ptr::from_mut(&mut info) as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// A pinned cgroup link that no longer has a cgroup: what detached it left.
pub(super) struct Detached {
    pin: PathBuf,
    prog_id: u32,
    attach_type: u32,
}

impl Detached {
    pub(super) fn name(&self) -> String {
        self.pin.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// The pinned cgroup links under `links_dir` that are detached.
pub(super) fn detached_links(links_dir: &Path) -> std::io::Result<Vec<Detached>> {
    let mut detached = Vec::new();
    for entry in std::fs::read_dir(links_dir)? {
        let pin = entry?.path();
        let link = match obj_get(&pin) {
            // Removed meanwhile: a guard pin is restored below, a cgroup
            // link's pin is the next check's business.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            link => link?,
        };
        let info = link_info(&link)?;
        if info.link_type == BPF_LINK_TYPE_CGROUP && info.cgroup_id == 0 {
            detached.push(Detached { pin, prog_id: info.prog_id, attach_type: info.attach_type });
        }
    }
    Ok(detached)
}

/// Attaches a detached link's program to `cgroup` again, with a new link
/// pinned where the old one was.
pub(super) fn reattach(link: &Detached, cgroup: &Path) -> std::io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(link.prog_id);
    let prog = owned(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?);
    let cgroup = std::fs::File::open(cgroup)?;
    let mut attr = [0u64; 16];
    attr[0] = u64::from(prog.as_raw_fd() as u32) | (u64::from(cgroup.as_raw_fd() as u32) << 32);
    attr[1] = u64::from(link.attach_type);
    let new = owned(bpf(BPF_LINK_CREATE, &mut attr)?);
    // The old pin holds a link that stays detached: replace it.
    std::fs::remove_file(&link.pin)?;
    let path = path_arg(&link.pin)?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    attr[1] = u64::from(new.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}

/// A link the daemon holds open, and where it is pinned.
pub(super) struct HeldLink {
    pin: PathBuf,
    id: u32,
    link: OwnedFd,
}

impl HeldLink {
    /// Holds the link pinned at `pin`.
    pub(super) fn hold(pin: &Path) -> std::io::Result<Self> {
        let link = obj_get(pin)?;
        let id = link_info(&link)?.id;
        Ok(Self { pin: pin.to_owned(), id, link })
    }

    pub(super) fn name(&self) -> String {
        self.pin.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// Whether its pin still names this link.
    pub(super) fn is_pinned(&self) -> bool {
        obj_get(&self.pin).and_then(|fd| link_info(&fd)).is_ok_and(|info| info.id == self.id)
    }

    /// Pins the link where it belongs again, replacing whatever is there.
    pub(super) fn repin(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.pin) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        let path = path_arg(&self.pin)?;
        let mut attr = [0u64; 16];
        attr[0] = path.as_ptr() as u64;
        attr[1] = u64::from(self.link.as_raw_fd() as u32);
        bpf(BPF_OBJ_PIN, &mut attr)?;
        Ok(())
    }
}

/// Freezes (or thaws) every process below `cgroup`.
pub(super) fn freeze(cgroup: &Path, frozen: bool) -> std::io::Result<()> {
    std::fs::write(cgroup.join("cgroup.freeze"), if frozen { "1" } else { "0" })
}

#[cfg(test)]
mod tests {
    #[test]
    fn link_info_head_matches_the_kernel_layout() {
        // type, id, prog_id, then the union at 16: cgroup_id, attach_type.
        assert_eq!(std::mem::offset_of!(super::LinkInfo, cgroup_id), 16);
        assert_eq!(std::mem::offset_of!(super::LinkInfo, attach_type), 24);
    }
}
