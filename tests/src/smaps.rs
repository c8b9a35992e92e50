//! A process's memory as `/proc/PID/smaps` shows it, split into guest RAM and the VMM's own:
//! what the memory tests and `bench_density` report (issue 17 items 5 and 6).

use std::path::Path;

/// Memory of one VMM process, in KiB.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemUse {
    /// Resident set size, every mapping.
    pub rss_kib: u64,
    /// Proportional set size, every mapping (shared pages divided among their users).
    pub pss_kib: u64,
    /// Resident pages of the guest's RAM mappings.
    pub guest_rss_kib: u64,
    /// Private_Clean + Private_Dirty of the anonymous mappings that are not guest RAM (heap,
    /// thread stacks, malloc arenas, channels): the VMM's own memory per VM.
    pub private_anon_kib: u64,
}

impl MemUse {
    /// RSS minus guest RAM: the VMM's overhead, shared library and binary pages included.
    pub fn overhead_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_rss_kib)
    }
}

#[derive(Default)]
struct Mapping {
    anon: bool,
    size_kib: u64,
    rss: u64,
    pss: u64,
    private: u64,
    dontdump: bool,
}

/// Reads `/proc/<pid>/smaps`. A mapping is guest RAM when it is anonymous and either marked
/// `MADV_DONTDUMP` (cinder marks its guest RAM so) or at least `guest_mib` MiB long (another
/// VMM's guest RAM, e.g. Firecracker's, which is one mapping per region).
pub fn measure(pid: u32, guest_mib: u64) -> std::io::Result<MemUse> {
    let text = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("smaps"))?;
    Ok(parse(&text, guest_mib))
}

/// [`measure`] on the text of an smaps file.
pub fn parse(text: &str, guest_mib: u64) -> MemUse {
    let mut out = MemUse::default();
    let mut cur: Option<Mapping> = None;
    let finish = |m: Mapping, out: &mut MemUse| {
        out.rss_kib += m.rss;
        out.pss_kib += m.pss;
        let guest = m.anon && (m.dontdump || (guest_mib > 0 && m.size_kib >= guest_mib * 1024));
        if guest {
            out.guest_rss_kib += m.rss;
        } else if m.anon {
            out.private_anon_kib += m.private;
        }
    };
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            if let Some(m) = cur.take() {
                finish(m, &mut out);
            }
            let path: Vec<&str> = words.skip(4).collect();
            let path = path.join(" ");
            let anon = path.is_empty()
                || path == "[heap]"
                || path == "[stack]"
                || path.starts_with("[anon");
            cur = Some(Mapping {
                anon,
                ..Mapping::default()
            });
            continue;
        }
        let Some(m) = cur.as_mut() else { continue };
        let kib = || -> u64 {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        match first {
            "Size:" => m.size_kib = kib(),
            "Rss:" => m.rss = kib(),
            "Pss:" => m.pss = kib(),
            "Private_Clean:" | "Private_Dirty:" => m.private += kib(),
            "VmFlags:" => m.dontdump = line.split_whitespace().any(|f| f == "dd"),
            _ => {}
        }
    }
    if let Some(m) = cur.take() {
        finish(m, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_guest_ram_from_the_vmm() {
        let text = "\
55d0-55e0 r-xp 00000000 08:01 123 /usr/bin/cinder
Size: 64 kB
Rss: 40 kB
Pss: 20 kB
Private_Clean: 0 kB
Private_Dirty: 0 kB
VmFlags: rd ex mr mw me
7f00-7f80 rw-p 00000000 00:00 0 
Size: 131072 kB
Rss: 1000 kB
Pss: 1000 kB
Private_Clean: 0 kB
Private_Dirty: 1000 kB
VmFlags: rd wr mr mw me dd ac
7f90-7f91 rw-p 00000000 00:00 0 
Size: 2048 kB
Rss: 12 kB
Pss: 12 kB
Private_Clean: 4 kB
Private_Dirty: 8 kB
VmFlags: rd wr mr mw me ac
7fa0-7fa1 rw-p 00000000 00:00 0                          [heap]
Size: 132 kB
Rss: 100 kB
Pss: 100 kB
Private_Clean: 0 kB
Private_Dirty: 100 kB
VmFlags: rd wr mr mw me ac
";
        let m = parse(text, 128);
        assert_eq!(m.rss_kib, 1152);
        assert_eq!(m.pss_kib, 1132);
        assert_eq!(m.guest_rss_kib, 1000);
        assert_eq!(m.private_anon_kib, 112);
        assert_eq!(m.overhead_kib(), 152);
        // Without the dd flag, the size says it is guest RAM.
        let m = parse(&text.replace(" dd ac", " ac"), 128);
        assert_eq!(m.guest_rss_kib, 1000);
    }
}
