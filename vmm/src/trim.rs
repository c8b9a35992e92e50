//! Giving memory back once the VM runs (issue 17 item 5): what building or restoring a VM
//! touched and no longer needs stays resident in every idle microVM unless it is handed back.
//!
//! - the allocator's free heap pages (`malloc_trim`);
//! - the main thread's stack below where its event loop runs: building a VM, and far more so
//!   restoring one (the snapshot's state decoded, every device's and vCPU's state on the
//!   stack on its way in), runs deep on the main thread, and each page it touched stays
//!   dirty for the life of the process. Those pages lie below the stack pointer, so nothing
//!   lives there: `MADV_DONTNEED` drops them and a later deeper call faults in zero pages.
//!
//! [`note_main_stack`] records where the main thread's stack may reach, early in `main`
//! (it reads `/proc/self/maps`, so before the seccomp filters); [`give_back`] is called by the
//! main thread when the VM runs.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The lowest address the main thread's stack may reach (0: not recorded, no stack trim).
static MAIN_STACK_LOW: AtomicUsize = AtomicUsize::new(0);

/// Pages kept below the caller's stack pointer: [`trim_stack_below`]'s own frame and the
/// libc call it makes live there.
const KEEP_BELOW_SP: usize = 2 * 1024;

/// Records the main thread's stack bounds; call it on the main thread, early in `main`
/// (glibc reads `/proc/self/maps` for them). Without it [`give_back`] trims only the heap.
pub fn note_main_stack() {
    // SAFETY: pthread_attr_t is plain data; pthread_getattr_np initialises it.
    let mut attr: libc::pthread_attr_t = unsafe { std::mem::zeroed() };
    // SAFETY: `attr` is ours; pthread_self() is the calling thread.
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), &mut attr) } != 0 {
        return;
    }
    let mut addr: *mut libc::c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: `attr` was initialised above; the outputs are ours.
    let rc = unsafe { libc::pthread_attr_getstack(&attr, &mut addr, &mut size) };
    // SAFETY: `attr` was initialised by pthread_getattr_np and is destroyed once.
    unsafe { libc::pthread_attr_destroy(&mut attr) };
    if rc == 0 && !addr.is_null() && size > 0 {
        // Never more than 8 MiB below here: with an unlimited RLIMIT_STACK glibc reports
        // everything down to the next mapping below, and the kernel's legacy (bottom-up)
        // layout may place later mappings in that space; within 8 MiB of the stack's top it
        // places none in either layout, and no build or restore runs that deep.
        let here = 0u8;
        let sp = std::hint::black_box(&here) as *const u8 as usize;
        let low = (addr as usize).max(sp.saturating_sub(MAX_MAIN_STACK));
        MAIN_STACK_LOW.store(low, Ordering::Relaxed);
    }
}

/// The most of the main thread's stack below `main` that [`give_back`] trims.
const MAX_MAIN_STACK: usize = 8 << 20;

/// Gives the allocator's free pages and the main thread's dead stack pages back to the host.
/// Call it on the main thread once the VM runs (after a boot or a restore).
pub fn give_back() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own heap.
    unsafe { libc::malloc_trim(0) };
    let low = MAIN_STACK_LOW.load(Ordering::Relaxed);
    if low != 0 {
        trim_stack_below(low);
    }
}

/// Drops the pages of the calling thread's stack between `low` and a margin below the
/// current stack pointer. Not inlined: its frame must sit just below the caller's.
#[inline(never)]
fn trim_stack_below(low: usize) {
    let here = 0u8;
    let sp = std::hint::black_box(&here) as *const u8 as usize;
    let page = 4096;
    let end = (sp.saturating_sub(KEEP_BELOW_SP)) & !(page - 1);
    let start = (low + page - 1) & !(page - 1);
    if end <= start {
        return;
    }
    // SAFETY: [start, end) is part of this thread's own stack strictly below its live
    // frames (at least KEEP_BELOW_SP under the stack pointer, which this frame and the
    // madvise call itself stay within), so no live data is there; MADV_DONTNEED makes a
    // later access fault in a zero page. A part of the range the stack never reached is not
    // mapped: madvise skips it (and says ENOMEM, ignored).
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Touches `depth` bytes of stack below the caller; returns a checksum so it is kept.
    #[inline(never)]
    fn go_deep(depth: usize) -> u64 {
        let mut buf = [0u8; 4096];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = u8::try_from(i % 251).unwrap_or(0);
        }
        let s: u64 = std::hint::black_box(&buf)
            .iter()
            .map(|&b| u64::from(b))
            .sum();
        if depth > 4096 {
            s + go_deep(depth - 4096)
        } else {
            s
        }
    }

    /// A thread's stack trimmed below its stack pointer keeps working: the frames above
    /// still hold their values, and going deep again afterwards gets fresh pages.
    #[test]
    fn trimmed_stack_keeps_live_frames_and_works_again() {
        let h = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(|| {
                note_main_stack_of_this_thread();
                let live = [7u64; 64];
                let first = go_deep(256 * 1024);
                give_back();
                let second = go_deep(256 * 1024);
                assert_eq!(first, second);
                assert!(std::hint::black_box(&live).iter().all(|&v| v == 7));
            })
            .expect("spawn");
        h.join().expect("the trimmed thread ran on");
    }

    fn note_main_stack_of_this_thread() {
        note_main_stack();
        assert_ne!(MAIN_STACK_LOW.load(Ordering::Relaxed), 0);
    }
}
