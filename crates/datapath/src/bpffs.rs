//! The bpf filesystem the maps and links are pinned on, and the few libc calls around it.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::Error;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Where bpffs is conventionally mounted; mounted by [`ensure`] if it is not.
pub(crate) const BPFFS_ROOT: &str = "/sys/fs/bpf";

fn c_path(path: &Path) -> Result<CString, Error> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}

fn is_bpffs(path: &Path) -> Result<bool, Error> {
    let c = c_path(path)?;
    #[allow(unsafe_code)]
    // SAFETY: `libc::statfs` is a plain C struct for which all-zero bytes is a valid value;
    // `c` is a NUL-terminated path that outlives the call and `st` is a valid, writable
    // `statfs` the kernel fills in.
    let (rc, st) = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        let rc = libc::statfs(c.as_ptr(), &raw mut st);
        (rc, st)
    };
    if rc != 0 {
        return Err(Error::io(path)(io::Error::last_os_error()));
    }
    // f_type's integer type differs between architectures; the magic fits in 32 bits.
    #[allow(clippy::cast_sign_loss, clippy::unnecessary_cast)]
    Ok(st.f_type as u32 == BPF_FS_MAGIC)
}

fn mount_bpffs(target: &Path) -> Result<(), Error> {
    let c = c_path(target)?;
    #[allow(unsafe_code)]
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; the data
    // argument may be null for bpffs.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::io(target)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes sure `pin_dir` can be created on bpffs: mounts bpffs on /sys/fs/bpf if `pin_dir` is
/// below it and it is not mounted yet, then creates `pin_dir`.
pub(crate) fn ensure(pin_dir: &Path) -> Result<(), Error> {
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) && root.is_dir() && !is_bpffs(root)? {
        mount_bpffs(root)?;
    }
    std::fs::create_dir_all(pin_dir).map_err(Error::io(pin_dir))?;
    if !is_bpffs(pin_dir)? {
        return Err(Error::NotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    Ok(())
}

/// The index of a network interface in the calling thread's network namespace.
pub(crate) fn ifindex(name: &str) -> Result<u32, Error> {
    let c = CString::new(name).map_err(|_| Error::InvalidInterfaceName(name.to_string()))?;
    #[allow(unsafe_code)]
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(Error::Interface {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(index)
}

/// Waits until `fd` is readable or `timeout_ms` passes. Returns whether it is readable.
pub(crate) fn poll_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    timeout_ms: i32,
) -> Result<bool, Error> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        #[allow(unsafe_code)]
        // SAFETY: `pfd` is one valid pollfd for the duration of the call and `fd` stays open
        // (it is borrowed).
        let rc = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
        if rc >= 0 {
            return Ok(rc > 0 && pfd.revents & libc::POLLIN != 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(Error::io(PathBuf::from("ring buffer"))(err));
        }
    }
}
