//! Kernel image detection, validation and loading (ELF vmlinux with or without a PVH note,
//! and bzImage). linux-loader does the loading; this module checks what linux-loader does
//! not (architecture, class, whether the image fits the guest) so that a bad image gets a
//! precise error instead of a generic one.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::layout::HIMEM_START;
use crate::GuestMemoryMmap;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
/// "HdrS" at offset 0x202 of a bzImage.
const BZIMAGE_MAGIC: u32 = 0x5372_6448;
/// xloadflags bit: the kernel has a 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry point from the protected-mode kernel's load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors from kernel loading. Each message names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel image {path}: {source}")]
    Open {
        /// The path given.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is neither ELF nor bzImage.
    #[error("kernel image {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat(String),
    /// An ELF file for another machine or class.
    #[error("kernel image {path} is an ELF for {what}, not x86_64")]
    WrongArch {
        /// The path given.
        path: String,
        /// What it is instead.
        what: String,
    },
    /// An ELF file whose headers are broken.
    #[error("kernel image {path} is a malformed ELF: {why}")]
    BadElf {
        /// The path given.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A bzImage that cannot be booted by the 64-bit protocol.
    #[error("kernel image {path} is an unsupported bzImage: {why}")]
    BadBzImage {
        /// The path given.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The kernel does not fit in guest memory.
    #[error(
        "kernel image {path} needs guest memory up to {needed_mib} MiB but the guest has \
         {have_mib} MiB below the MMIO gap: raise --memory"
    )]
    TooBig {
        /// The path given.
        path: String,
        /// Needed memory in MiB (rounded up).
        needed_mib: u64,
        /// Available memory in MiB.
        have_mib: u64,
    },
    /// PVH was asked for but the image has no PVH note.
    #[error("kernel image {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); use --boot-protocol linux64")]
    NoPvhNote(String),
    /// linux-loader refused the image.
    #[error("cannot load kernel image {path}: {source}")]
    Load {
        /// The path given.
        path: String,
        /// linux-loader's error.
        source: linux_loader::loader::Error,
    },
}

/// Which boot protocol the guest is entered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux x86_64 64-bit boot protocol: long mode, RSI = boot_params.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh,
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProtocolChoice {
    /// PVH when the ELF has the note, else the 64-bit protocol.
    #[default]
    Auto,
    /// Force the 64-bit Linux protocol.
    Linux64,
    /// Force PVH (the ELF must have the note).
    Pvh,
}

/// A loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Where the vCPU starts.
    pub entry: GuestAddress,
    /// The protocol to set up.
    pub protocol: BootProtocol,
    /// The bzImage setup header (None for ELF).
    pub setup_header: Option<setup_header>,
    /// First byte after the kernel image (including its bss / init_size).
    pub kernel_end: u64,
    /// Whether the image was a bzImage.
    pub is_bzimage: bool,
}

/// The kernel image format, from its first bytes.
#[derive(Debug, PartialEq, Eq)]
enum Format {
    Elf,
    BzImage,
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    file.seek(SeekFrom::Start(offset))?;
    let mut done = 0;
    while done < buf.len() {
        let n = file.read(&mut buf[done..])?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

fn detect(file: &mut File, path: &str) -> Result<Format, LoaderError> {
    let io = |source| LoaderError::Open {
        path: path.to_string(),
        source,
    };
    let mut magic = [0u8; 4];
    if read_at(file, 0, &mut magic).map_err(io)? == 4 && magic == ELF_MAGIC {
        return Ok(Format::Elf);
    }
    let mut hdrs = [0u8; 4];
    if read_at(file, 0x202, &mut hdrs).map_err(io)? == 4
        && u32::from_le_bytes(hdrs) == BZIMAGE_MAGIC
    {
        return Ok(Format::BzImage);
    }
    Err(LoaderError::UnknownFormat(path.to_string()))
}

/// Checks an ELF header and returns the highest physical address its loadable segments
/// occupy.
fn check_elf(file: &mut File, path: &str) -> Result<u64, LoaderError> {
    let bad = |why: &str| LoaderError::BadElf {
        path: path.to_string(),
        why: why.to_string(),
    };
    let mut ehdr = [0u8; 64];
    let n = read_at(file, 0, &mut ehdr).map_err(|source| LoaderError::Open {
        path: path.to_string(),
        source,
    })?;
    if n < 20 {
        return Err(bad("file shorter than an ELF header"));
    }
    let machine = u16::from_le_bytes([ehdr[18], ehdr[19]]);
    if ehdr[4] != ELFCLASS64 || ehdr[5] != ELFDATA2LSB || machine != EM_X86_64 {
        let class = match ehdr[4] {
            1 => "32-bit",
            2 => "64-bit",
            _ => "unknown-class",
        };
        let endian = if ehdr[5] == ELFDATA2LSB {
            "little-endian"
        } else {
            "big-endian"
        };
        let arch = match machine {
            3 => "i386".to_string(),
            40 => "ARM".to_string(),
            62 => "x86_64".to_string(),
            183 => "aarch64".to_string(),
            243 => "RISC-V".to_string(),
            m => format!("machine {m}"),
        };
        return Err(LoaderError::WrongArch {
            path: path.to_string(),
            what: format!("{class} {endian} {arch}"),
        });
    }
    if n < 64 {
        return Err(bad("file shorter than an ELF64 header"));
    }
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([ehdr[54], ehdr[55]]) as u64;
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]) as u64;
    if phentsize != 56 {
        return Err(bad("program header entries are not 56 bytes"));
    }
    if phnum == 0 {
        return Err(bad("no program headers"));
    }
    let mut top = 0u64;
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        let off = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| bad("program header offset overflows"))?;
        let got = read_at(file, off, &mut ph).map_err(|source| LoaderError::Open {
            path: path.to_string(),
            source,
        })?;
        if got != 56 {
            return Err(bad("program headers run past the end of the file"));
        }
        let p_type = u32::from_le_bytes(ph[0..4].try_into().unwrap_or_default());
        if p_type != PT_LOAD {
            continue;
        }
        let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap_or_default());
        let memsz = u64::from_le_bytes(ph[40..48].try_into().unwrap_or_default());
        let end = paddr
            .checked_add(memsz)
            .ok_or_else(|| bad("segment address overflows"))?;
        if paddr < HIMEM_START {
            return Err(bad(&format!(
                "a loadable segment starts at {paddr:#x}, below 1 MiB where boot data lives"
            )));
        }
        top = top.max(end);
    }
    if top == 0 {
        return Err(bad("no loadable segments"));
    }
    Ok(top)
}

/// Opens a client-named kernel image without blocking and without following a symbolic link
/// (a FIFO opens at once, then is refused: it would freeze the thread reading it), and takes
/// only a regular file, as its `fstat` says.
fn open_kernel(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => {
                std::io::Error::other("it is a symbolic link: give the path of the file itself")
            }
            _ => e,
        })?;
    let t = file.metadata()?.file_type();
    let kind = if t.is_file() {
        return Ok(file);
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else {
        "block device"
    };
    Err(std::io::Error::other(format!(
        "is a {kind}, not a regular file"
    )))
}

/// Loads the kernel at `path` into `mem`, whose RAM below the MMIO gap ends at `low_end`.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    low_end: u64,
    choice: ProtocolChoice,
) -> Result<LoadedKernel, LoaderError> {
    let p = path.display().to_string();
    let mut file = open_kernel(path).map_err(|source| LoaderError::Open {
        path: p.clone(),
        source,
    })?;
    let too_big = |needed: u64| LoaderError::TooBig {
        path: p.clone(),
        needed_mib: needed.div_ceil(1 << 20),
        have_mib: low_end >> 20,
    };
    match detect(&mut file, &p)? {
        Format::Elf => {
            let top = check_elf(&mut file, &p)?;
            if top > low_end {
                return Err(too_big(top));
            }
            let res = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(
                |source| LoaderError::Load {
                    path: p.clone(),
                    source,
                },
            )?;
            let pvh = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => Some(addr),
                _ => None,
            };
            let (entry, protocol) = match (choice, pvh) {
                (ProtocolChoice::Pvh, None) => return Err(LoaderError::NoPvhNote(p)),
                (ProtocolChoice::Auto | ProtocolChoice::Pvh, Some(addr)) => {
                    (addr, BootProtocol::Pvh)
                }
                (ProtocolChoice::Linux64, _) | (ProtocolChoice::Auto, None) => {
                    (res.kernel_load, BootProtocol::Linux64)
                }
            };
            Ok(LoadedKernel {
                entry,
                protocol,
                setup_header: None,
                kernel_end: res.kernel_end.max(top),
                is_bzimage: false,
            })
        }
        Format::BzImage => {
            if choice == ProtocolChoice::Pvh {
                return Err(LoaderError::BadBzImage {
                    path: p,
                    why: "a bzImage has no PVH entry; use an ELF vmlinux for PVH".into(),
                });
            }
            let bad = |why: &str| LoaderError::BadBzImage {
                path: p.clone(),
                why: why.to_string(),
            };
            let mut hdr_bytes = [0u8; 0x300];
            let n = read_at(&mut file, 0, &mut hdr_bytes).map_err(|source| LoaderError::Open {
                path: p.clone(),
                source,
            })?;
            if n < 0x268 {
                return Err(bad("file too short for a setup header"));
            }
            let version = u16::from_le_bytes([hdr_bytes[0x206], hdr_bytes[0x207]]);
            if version < 0x020c {
                return Err(bad(&format!(
                    "boot protocol {}.{:02} is older than 2.12 (no 64-bit entry)",
                    version >> 8,
                    version & 0xff
                )));
            }
            let xloadflags = u16::from_le_bytes([hdr_bytes[0x236], hdr_bytes[0x237]]);
            if xloadflags & XLF_KERNEL_64 == 0 {
                return Err(bad("no 64-bit entry point (XLF_KERNEL_64 unset)"));
            }
            let code32_start =
                u32::from_le_bytes(hdr_bytes[0x214..0x218].try_into().unwrap_or_default());
            let init_size =
                u32::from_le_bytes(hdr_bytes[0x260..0x264].try_into().unwrap_or_default());
            let pref = u64::from_le_bytes(hdr_bytes[0x258..0x260].try_into().unwrap_or_default());
            // Load at the preferred address when it is sane, else where code32_start says.
            let load = if pref >= HIMEM_START {
                pref
            } else {
                u64::from(code32_start)
            };
            let needed = load.saturating_add(u64::from(init_size));
            if needed > low_end {
                return Err(too_big(needed));
            }
            let res = BzImage::load(
                mem,
                Some(GuestAddress(load)),
                &mut file,
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(|source| LoaderError::Load {
                path: p.clone(),
                source,
            })?;
            if mem.address_in_range(GuestAddress(needed.saturating_sub(1))) {
                Ok(LoadedKernel {
                    entry: GuestAddress(load + BZIMAGE_64BIT_ENTRY_OFFSET),
                    protocol: BootProtocol::Linux64,
                    setup_header: res.setup_header,
                    kernel_end: needed.max(res.kernel_end),
                    is_bzimage: true,
                })
            } else {
                Err(too_big(needed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&crate::layout::ram_regions(mib << 20)).unwrap()
    }

    fn tmpfile(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("cinder-arch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    /// A minimal x86_64 ELF with one PT_LOAD segment at `paddr`, and optionally a PVH note.
    fn elf(machine: u16, paddr: u64, memsz: u64, pvh_entry: Option<u32>) -> Vec<u8> {
        let mut v = vec![0u8; 0x200];
        v[0..4].copy_from_slice(&ELF_MAGIC);
        v[4] = ELFCLASS64;
        v[5] = ELFDATA2LSB;
        v[6] = 1;
        v[16..18].copy_from_slice(&2u16.to_le_bytes());
        v[18..20].copy_from_slice(&machine.to_le_bytes());
        v[24..32].copy_from_slice(&paddr.to_le_bytes());
        v[32..40].copy_from_slice(&64u64.to_le_bytes());
        v[52..54].copy_from_slice(&64u16.to_le_bytes());
        v[54..56].copy_from_slice(&56u16.to_le_bytes());
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        v[56..58].copy_from_slice(&phnum.to_le_bytes());
        // PT_LOAD at file offset 0x180, 16 bytes.
        let ph = 64;
        v[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        v[ph + 8..ph + 16].copy_from_slice(&0x180u64.to_le_bytes());
        v[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        v[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        v[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes());
        v[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        if let Some(entry) = pvh_entry {
            let ph = 120;
            v[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
            v[ph + 8..ph + 16].copy_from_slice(&0x1a0u64.to_le_bytes());
            v[ph + 32..ph + 40].copy_from_slice(&20u64.to_le_bytes());
            v[ph + 40..ph + 48].copy_from_slice(&20u64.to_le_bytes());
            let n = 0x1a0;
            v[n..n + 4].copy_from_slice(&4u32.to_le_bytes()); // namesz
            v[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes()); // descsz
            v[n + 8..n + 12].copy_from_slice(&18u32.to_le_bytes()); // type
            v[n + 12..n + 16].copy_from_slice(b"Xen\0");
            v[n + 16..n + 20].copy_from_slice(&entry.to_le_bytes());
        }
        v
    }

    #[test]
    fn elf_with_pvh_note_prefers_pvh() {
        let p = tmpfile("pvh.elf", &elf(62, 0x100000, 0x1000, Some(0x100010)));
        let m = mem(16);
        let k = load_kernel(&m, &p, 16 << 20, ProtocolChoice::Auto).unwrap();
        assert_eq!(k.protocol, BootProtocol::Pvh);
        assert_eq!(k.entry, GuestAddress(0x100010));
        let k = load_kernel(&m, &p, 16 << 20, ProtocolChoice::Linux64).unwrap();
        assert_eq!(k.protocol, BootProtocol::Linux64);
        assert_eq!(k.entry, GuestAddress(0x100000));
    }

    #[test]
    fn elf_without_note_uses_linux64_and_refuses_forced_pvh() {
        let p = tmpfile("nopvh.elf", &elf(62, 0x100000, 0x1000, None));
        let m = mem(16);
        let k = load_kernel(&m, &p, 16 << 20, ProtocolChoice::Auto).unwrap();
        assert_eq!(k.protocol, BootProtocol::Linux64);
        let e = load_kernel(&m, &p, 16 << 20, ProtocolChoice::Pvh).unwrap_err();
        assert!(matches!(e, LoaderError::NoPvhNote(_)), "{e}");
    }

    #[test]
    fn foreign_elf_is_refused() {
        let p = tmpfile("arm.elf", &elf(183, 0x100000, 0x1000, None));
        let e = load_kernel(&mem(16), &p, 16 << 20, ProtocolChoice::Auto).unwrap_err();
        assert!(e.to_string().contains("aarch64"), "{e}");
    }

    #[test]
    fn kernel_larger_than_memory_is_refused() {
        let p = tmpfile("big.elf", &elf(62, 0x1000000, 0x2000000, None));
        let e = load_kernel(&mem(16), &p, 16 << 20, ProtocolChoice::Auto).unwrap_err();
        assert!(
            matches!(e, LoaderError::TooBig { needed_mib: 48, .. }),
            "{e}"
        );
    }

    #[test]
    fn garbage_is_neither_elf_nor_bzimage() {
        let p = tmpfile("garbage", b"hello, this is not a kernel at all");
        let e = load_kernel(&mem(16), &p, 16 << 20, ProtocolChoice::Auto).unwrap_err();
        assert!(matches!(e, LoaderError::UnknownFormat(_)), "{e}");
    }

    #[test]
    fn old_bzimage_is_refused() {
        let mut v = vec![0u8; 0x1000];
        v[0x1f1] = 1;
        v[0x202..0x206].copy_from_slice(&BZIMAGE_MAGIC.to_le_bytes());
        v[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
        let p = tmpfile("old.bzimage", &v);
        let e = load_kernel(&mem(16), &p, 16 << 20, ProtocolChoice::Auto).unwrap_err();
        assert!(e.to_string().contains("older than 2.12"), "{e}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = load_kernel(
            &mem(16),
            Path::new("/nonexistent/vmlinux"),
            16 << 20,
            ProtocolChoice::Auto,
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
    }

    #[test]
    fn fifo_or_symlink_kernel_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("cinder-arch-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("vmlinux");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path and touches no memory of ours.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // A FIFO with no writer: a blocking open would never return, so the load runs on a
        // thread and the test waits (bounded) for its answer.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = fifo.clone();
        std::thread::spawn(move || {
            let r = load_kernel(&mem(16), &p, 16 << 20, ProtocolChoice::Auto).map(|_| ());
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("load_kernel blocked on a FIFO");
        let e = r.expect_err("a FIFO is not a kernel");
        assert_eq!(
            e,
            format!(
                "cannot read kernel image {}: is a FIFO, not a regular file",
                fifo.display()
            )
        );
        let target = tmpfile("linked", &elf(62, 0x100000, 0x1000, None));
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = load_kernel(&mem(16), &link, 16 << 20, ProtocolChoice::Auto).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
