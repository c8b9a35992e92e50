//! The `Uffd` memory backend of `PUT /snapshot/load` (Firecracker's handshake): guest memory
//! is anonymous and registered with a userfaultfd; cinder connects to the page-fault
//! handler's Unix socket and sends it the uffd (SCM_RIGHTS) with a JSON list of the regions
//! (`base_host_virt_addr`, `size`, `offset` in the memory file, `page_size`,
//! `page_size_kib`). The handler fills each page on its first touch (UFFDIO_COPY). A socket
//! that does not exist or has no listener is refused with one line before any guest runs; a
//! handler that goes away later ends cinder with one line (the runtime watches the socket).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use arch::GuestMemoryMmap;
use userfaultfd::{Uffd, UffdBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{MemRegion, SnapshotError};

/// Guest memory served by a page-fault handler, and what keeps it served.
pub struct UffdMemory {
    /// Guest memory (anonymous, registered with the uffd).
    pub mem: GuestMemoryMmap,
    /// The connection to the handler: its end means nobody serves faults any more.
    pub handler: UnixStream,
    /// cinder's reference to the uffd (the handler has its own).
    pub uffd: Uffd,
}

/// One region as Firecracker's handlers expect it.
#[derive(serde::Serialize)]
struct Mapping {
    base_host_virt_addr: u64,
    size: usize,
    offset: u64,
    page_size: usize,
    page_size_kib: usize,
}

fn err(path: &Path, why: String) -> SnapshotError {
    SnapshotError::Io {
        what: "mem_backend Uffd: the page-fault handler's socket",
        path: path.into(),
        why,
    }
}

/// Maps anonymous guest memory for `regions`, registers it with a new userfaultfd, and hands
/// the uffd and the region list to the handler listening on `sock`.
pub fn connect(sock: &Path, regions: &[MemRegion]) -> Result<UffdMemory, SnapshotError> {
    let handler = UnixStream::connect(sock).map_err(|e| err(sock, e.to_string()))?;
    let ranges = regions
        .iter()
        .map(|r| Ok((GuestAddress(r.gpa), usize::try_from(r.len)?)))
        .collect::<Result<Vec<_>, std::num::TryFromIntError>>()
        .map_err(|e| err(sock, e.to_string()))?;
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| SnapshotError::Map {
        path: sock.into(),
        why: e.to_string(),
    })?;
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        // KVM's own accesses to guest memory fault in kernel mode: they must reach the
        // handler too.
        .user_mode_only(false)
        .create()
        .map_err(|e| err(sock, format!("cannot create a userfaultfd: {e}")))?;
    let mut mappings = Vec::with_capacity(regions.len());
    for (region, r) in mem.iter().zip(regions) {
        let len = usize::try_from(region.len()).map_err(|e| err(sock, e.to_string()))?;
        let host = region.as_ptr();
        uffd.register(host.cast(), len)
            .map_err(|e| err(sock, format!("UFFDIO_REGISTER: {e}")))?;
        mappings.push(Mapping {
            base_host_virt_addr: host as u64,
            size: len,
            offset: r.offset,
            page_size: 4096,
            page_size_kib: 4,
        });
    }
    let json = serde_json::to_vec(&mappings).map_err(|e| err(sock, e.to_string()))?;
    handler
        .send_with_fd(&json[..], uffd.as_raw_fd())
        .map_err(|e| err(sock, format!("cannot send the uffd: {e}")))?;
    Ok(UffdMemory { mem, handler, uffd })
}

/// Whether the handler closed its end of the socket (checked without blocking).
pub fn handler_gone(handler: &UnixStream) -> bool {
    let mut p = libc::pollfd {
        fd: handler.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}
