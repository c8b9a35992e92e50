//! The allow-lists, one per thread kind: what a reviewer reads. Each line is one system call,
//! the arguments it may take (`Any`, or a rule), and who needs it. Anything not here ends
//! cinder (see the module's comment). A new system call is one line in the right table.
//!
//! Found by running cinder under `strace -f` over the probe, blk, net, vsock, console, API,
//! terminal and manager tests (thread start-up calls happen before a thread's own filter and
//! are not listed, except in `VMM`, whose filter the threads it spawns inherit).

use super::ioctls::*;
use super::{Allow, Args};

use libc::{
    SYS_accept4, SYS_bind, SYS_brk, SYS_chmod, SYS_clock_gettime, SYS_clock_nanosleep, SYS_clone,
    SYS_clone3, SYS_close, SYS_connect, SYS_dup, SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_pwait,
    SYS_epoll_wait, SYS_eventfd2, SYS_exit, SYS_exit_group, SYS_fallocate, SYS_fchmod,
    SYS_fchmodat, SYS_fcntl, SYS_fdatasync, SYS_fstat, SYS_fsync, SYS_ftruncate, SYS_futex,
    SYS_getdents64, SYS_getpid, SYS_getrandom, SYS_getsockopt, SYS_gettid, SYS_io_uring_enter,
    SYS_io_uring_register, SYS_io_uring_setup, SYS_ioctl, SYS_kill, SYS_listen, SYS_lseek,
    SYS_madvise, SYS_mmap, SYS_mprotect, SYS_mremap, SYS_munmap, SYS_nanosleep, SYS_newfstatat,
    SYS_openat, SYS_poll, SYS_ppoll, SYS_prctl, SYS_pread64, SYS_preadv, SYS_pwrite64, SYS_pwritev,
    SYS_read, SYS_readv, SYS_recvfrom, SYS_recvmsg, SYS_restart_syscall, SYS_rseq,
    SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_rt_sigtimedwait,
    SYS_sched_getaffinity, SYS_sched_yield, SYS_seccomp, SYS_sendmsg, SYS_sendto,
    SYS_set_robust_list, SYS_setsockopt, SYS_shutdown, SYS_sigaltstack, SYS_socket, SYS_socketpair,
    SYS_statx, SYS_tgkill, SYS_timerfd_create, SYS_timerfd_settime, SYS_unlink, SYS_unlinkat,
    SYS_userfaultfd, SYS_wait4, SYS_write, SYS_writev, AF_UNIX, PR_SET_NAME, PR_SET_NO_NEW_PRIVS,
};

/// Every thread: memory (never executable), locks, signals, its own end, logging.
#[rustfmt::skip]
pub const COMMON: &[Allow] = &[
    (SYS_read, Args::Any, "every thread: eventfds, sockets, pipes"),
    (SYS_write, Args::Any, "every thread: eventfds, the log (stderr or --log-path), the SIGSYS line"),
    (SYS_close, Args::Any, "every thread: dropping fds"),
    (SYS_futex, Args::Any, "every thread: Mutex, Condvar, channels"),
    (SYS_mmap, Args::NoExec(2), "every thread: the allocator; never PROT_EXEC"),
    (SYS_mprotect, Args::NoExec(2), "every thread: the allocator, stack guards; never PROT_EXEC"),
    (SYS_munmap, Args::Any, "every thread: the allocator"),
    (SYS_mremap, Args::Any, "every thread: the allocator (growing a Vec)"),
    (SYS_madvise, Args::Any, "every thread: the allocator, thread exit; devices: the balloon discards inflated and reported guest pages (MADV_DONTNEED)"),
    (SYS_brk, Args::Any, "every thread: the allocator"),
    (SYS_rt_sigprocmask, Args::Any, "every thread: std, thread exit, abort"),
    (SYS_rt_sigreturn, Args::Any, "every thread: return from the vCPU kick handler"),
    (SYS_sigaltstack, Args::Any, "every thread: std's stack-overflow handler at thread exit"),
    (SYS_exit, Args::Any, "every thread: its own end"),
    (SYS_exit_group, Args::Any, "every thread: the process's end, the SIGSYS handler"),
    (SYS_restart_syscall, Args::Any, "every thread: an interrupted sleep"),
    (SYS_sched_yield, Args::Any, "every thread: spin locks in std"),
    (SYS_nanosleep, Args::Any, "every thread: thread::sleep"),
    (SYS_clock_nanosleep, Args::Any, "every thread: thread::sleep"),
    (SYS_clock_gettime, Args::Any, "every thread: Instant::now when the vDSO is not used"),
    (SYS_gettid, Args::Any, "every thread: std, the log"),
    (SYS_getpid, Args::Any, "every thread: abort (raise)"),
    (SYS_tgkill, Args::Any, "every thread: abort (raise SIGABRT), the vCPU kick"),
    (SYS_getrandom, Args::Any, "every thread: HashMap seeds"),
    (SYS_fcntl, Args::Any, "every thread: O_NONBLOCK, F_DUPFD_CLOEXEC (dup of fds)"),
    (SYS_dup, Args::Any, "every thread: try_clone of fds"),
    (SYS_sched_getaffinity, Args::Any, "every thread: std at thread exit"),
    (SYS_rseq, Args::Any, "every thread: glibc's restartable sequences"),
    (SYS_set_robust_list, Args::Any, "every thread: glibc"),
    (SYS_fstat, Args::Any, "every thread: std file metadata"),
    (SYS_newfstatat, Args::Any, "every thread: std file metadata"),
    (SYS_statx, Args::Any, "every thread: std file metadata"),
    (SYS_ioctl, Args::In(1, &[TCSETS]), "every thread: the SIGSYS handler and a panic restore the terminal"),
];

/// vcpuN (vmm/src/vcpu.rs): KVM_RUN and the device register handlers behind PIO/MMIO exits.
#[rustfmt::skip]
pub const VCPU: &[Allow] = &[
    (SYS_ioctl, Args::In(1, &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS]), "vcpu: KVM_RUN; registers for a fatal exit's report"),
    (
        SYS_ioctl,
        Args::In(
            1,
            &[
                KVM_GET_VCPU_EVENTS,
                KVM_GET_MP_STATE,
                KVM_GET_XSAVE,
                KVM_GET_XCRS,
                KVM_GET_DEBUGREGS,
                KVM_GET_LAPIC,
                KVM_GET_CPUID2,
                KVM_GET_TSC_KHZ,
                KVM_GET_MSRS,
            ],
        ),
        "vcpu: a snapshot reads the parked vCPU's state (vcpu.rs save_state)",
    ),
    (SYS_ioctl, Args::In(1, &[TUNSETOFFLOAD, TUNSETVNETHDRSZ, FIONBIO]), "vcpu: virtio-net activation (DRIVER_OK is an MMIO write)"),
    (SYS_writev, Args::Any, "vcpu: virtio device activation, log lines"),
    (SYS_shutdown, Args::Any, "vcpu: a virtio-vsock reset (a status write) closes its connections"),
    (SYS_unlink, Args::Any, "vcpu: a virtio-vsock reset"),
];

/// devices (vmm/src/device_loop.rs): queues, TAPs, vsock sockets, console input, images.
#[rustfmt::skip]
pub const DEVICES: &[Allow] = &[
    (SYS_epoll_wait, Args::Any, "devices: event-manager"),
    (SYS_epoll_pwait, Args::Any, "devices: event-manager"),
    (SYS_epoll_ctl, Args::Any, "devices: event-manager, vsock connections coming and going"),
    (SYS_readv, Args::Any, "devices: virtio-net rx from the TAP"),
    (SYS_writev, Args::Any, "devices: virtio-net tx to the TAP"),
    (SYS_pread64, Args::Any, "devices: virtio-blk"),
    (SYS_pwrite64, Args::Any, "devices: virtio-blk"),
    (SYS_preadv, Args::Any, "devices: virtio-blk"),
    (SYS_pwritev, Args::Any, "devices: virtio-blk"),
    (SYS_lseek, Args::Any, "devices: virtio-blk"),
    (SYS_fsync, Args::Any, "devices: virtio-blk FLUSH"),
    (SYS_fdatasync, Args::Any, "devices: virtio-blk FLUSH"),
    (SYS_fallocate, Args::Any, "devices: virtio-blk DISCARD / WRITE_ZEROES"),
    (SYS_accept4, Args::Any, "devices: vsock host connections"),
    (SYS_socket, Args::In(0, &[AF_UNIX as u64]), "devices: vsock guest-to-host connections, AF_UNIX only"),
    (SYS_connect, Args::Any, "devices: vsock guest-to-host connections (to PATH_port)"),
    (SYS_unlink, Args::Any, "devices: vsock socket files"),
    (SYS_recvfrom, Args::Any, "devices: vsock, console socket"),
    (SYS_sendto, Args::Any, "devices: vsock, console socket"),
    (SYS_recvmsg, Args::Any, "devices: vsock"),
    (SYS_sendmsg, Args::Any, "devices: vsock"),
    (SYS_shutdown, Args::Any, "devices: vsock connection shutdown"),
    (SYS_getsockopt, Args::Any, "devices: SO_ERROR of a vsock connection"),
    (SYS_ioctl, Args::In(1, &[FIONBIO, FIONREAD]), "devices: non-blocking vsock sockets"),
    (SYS_timerfd_settime, Args::Any, "devices: vsock timers (CONNECT line, unanswered REQUEST, shutdown, accept back-off); the balloon's statistics timer, armed on activation"),
];

/// blk-<id>, a drive's I/O thread (the blk branch: devices/src/virtio/block/worker.rs),
/// spawned by main at InstanceStart: owns the drive's queue (polls its ioeventfd, the activate
/// fd, the rate limiter's timer), executes requests on the image, raises the irqfd.
#[rustfmt::skip]
pub const BLOCK_IO: &[Allow] = &[
    (SYS_epoll_wait, Args::Any, "blk: its loop over the queue's ioeventfd, timer, stop fd"),
    (SYS_epoll_pwait, Args::Any, "blk: its loop"),
    (SYS_timerfd_settime, Args::Any, "blk: the rate limiter's timer (armed when out of tokens)"),
    (SYS_io_uring_setup, Args::Any, "blk: io_engine Async/auto, its ring (devices/src/virtio/block/uring.rs)"),
    (SYS_io_uring_register, Args::Any, "blk: the ring's eventfd, restrictions, enabling it"),
    (SYS_io_uring_enter, Args::Any, "blk: submitting to the ring, waiting for completions"),
    (SYS_readv, Args::Any, "blk: reads into guest memory"),
    (SYS_writev, Args::Any, "blk: writes from guest memory"),
    (SYS_pread64, Args::Any, "blk: reads"),
    (SYS_pwrite64, Args::Any, "blk: writes"),
    (SYS_preadv, Args::Any, "blk: reads"),
    (SYS_pwritev, Args::Any, "blk: writes"),
    (SYS_lseek, Args::Any, "blk: the request's offset"),
    (SYS_fdatasync, Args::Any, "blk: FLUSH, write-through"),
    (SYS_fsync, Args::Any, "blk: FLUSH"),
    (SYS_fallocate, Args::Any, "blk: DISCARD / WRITE_ZEROES"),
];

/// log-writer (the procrobust branch: vmm/src/logger.rs): writes log lines to stderr or the
/// log file (write, fstat/statx for the file's size are in COMMON).
#[rustfmt::skip]
pub const LOG_WRITER: &[Allow] = &[(SYS_writev, Args::Any, "log-writer: stderr, the log file")];

/// api (api/src/server.rs, spawned in main.rs): the API socket and its clients.
#[rustfmt::skip]
pub const API: &[Allow] = &[
    (SYS_epoll_create1, Args::Any, "api: its epoll"),
    (SYS_epoll_wait, Args::Any, "api: its loop"),
    (SYS_epoll_pwait, Args::Any, "api: its loop"),
    (SYS_epoll_ctl, Args::Any, "api: clients coming and going"),
    (SYS_eventfd2, Args::Any, "api: its shutdown eventfd"),
    (SYS_accept4, Args::Any, "api: clients"),
    (SYS_recvfrom, Args::Any, "api: requests"),
    (SYS_sendto, Args::Any, "api: answers"),
    (SYS_writev, Args::Any, "api: answers"),
    (SYS_shutdown, Args::Any, "api: closing a client"),
    (SYS_ioctl, Args::In(1, &[FIONBIO]), "api: non-blocking clients"),
    (SYS_unlink, Args::Any, "api: removes its socket file at the end"),
    (SYS_unlinkat, Args::Any, "api: removes its socket file at the end"),
];

/// console-out (vmm/src/console.rs): writes the guest's console output.
#[rustfmt::skip]
pub const CONSOLE_OUT: &[Allow] = &[(SYS_writev, Args::Any, "console-out: the console")];

/// main, the control loop (vmm/src/runtime.rs), after its set-up: signals, the API's
/// requests, metrics, and InstanceStart, which builds the VM here (open images and TAPs,
/// create the KVM VM and vCPUs, map guest memory) and spawns vcpuN, devices and console-out.
/// Those threads inherit this filter, so it also holds their tables (added by
/// [`super::rules`]); their own filter is what confines them.
#[rustfmt::skip]
pub const VMM: &[Allow] = &[
    (SYS_epoll_create1, Args::Any, "vmm: event loops (its own, the device loop's)"),
    (SYS_epoll_wait, Args::Any, "vmm: the control loop"),
    (SYS_epoll_pwait, Args::Any, "vmm: the control loop"),
    (SYS_epoll_ctl, Args::Any, "vmm: the control loop"),
    (SYS_eventfd2, Args::Any, "vmm: irqfds, ioeventfds, exit and reset events"),
    (SYS_timerfd_create, Args::Any, "vmm: the metrics timer; the balloon's statistics timer (InstanceStart)"),
    (SYS_timerfd_settime, Args::Any, "vmm: the metrics timer; PATCH /balloon/statistics re-arms the balloon's timer"),
    (SYS_openat, Args::Any, "vmm: InstanceStart opens /dev/kvm, the kernel, images, TAPs; metrics and log files"),
    (SYS_pread64, Args::Any, "vmm: loading the kernel and initrd"),
    (SYS_userfaultfd, Args::Any, "vmm: snapshot/load with mem_backend Uffd creates the userfaultfd (snapshot::uffd)"),
    (SYS_sendmsg, Args::Any, "vmm: snapshot/load with mem_backend Uffd sends the uffd to the handler (SCM_RIGHTS)"),
    (SYS_pwrite64, Args::Any, "vmm: snapshot/create writes guest memory's non-zero runs at their offsets (snapshot::write_memory)"),
    (SYS_lseek, Args::Any, "vmm: image sizes, kernel loading"),
    (SYS_writev, Args::Any, "vmm: metrics, log"),
    (SYS_fsync, Args::Any, "vmm: metrics file"),
    (SYS_ftruncate, Args::Any, "vmm: --console-out file"),
    (SYS_unlink, Args::Any, "vmm: the vsock socket file at the end, PUT /vsock replacing one"),
    (SYS_unlinkat, Args::Any, "vmm: the vsock socket file at the end"),
    (SYS_socket, Args::In(0, &[AF_UNIX as u64]), "vmm: PUT /vsock binds, --console-sock connects, TAP ifindex; AF_UNIX only"),
    (SYS_socketpair, Args::In(0, &[AF_UNIX as u64]), "vmm: AF_UNIX only"),
    (SYS_bind, Args::Any, "vmm: the vsock socket"),
    (SYS_chmod, Args::Any, "vmm: PUT /vsock makes its socket file 0600 (the vsock branch)"),
    (SYS_fchmodat, Args::Any, "vmm: PUT /vsock makes its socket file 0600 (the vsock branch)"),
    (SYS_fchmod, Args::Any, "vmm: PUT /vsock makes its socket file 0600 (the vsock branch)"),
    (SYS_listen, Args::Any, "vmm: the vsock socket"),
    (SYS_connect, Args::Any, "vmm: --console-sock"),
    (SYS_setsockopt, Args::Any, "vmm: socket options"),
    (SYS_poll, Args::Any, "vmm: --console-sock connect"),
    (SYS_ppoll, Args::Any, "vmm: --console-sock connect"),
    (SYS_rt_sigaction, Args::Any, "vmm: the vCPU kick handler, installed at start"),
    (SYS_clone3, Args::Enosys, "vmm: its flags are in memory, out of a filter's reach: ENOSYS, and glibc falls back to clone"),
    (SYS_clone, Args::AllSet(0, libc::CLONE_THREAD as u64), "vmm: spawning vcpuN, devices, console-out; threads only, never a fork"),
    (SYS_prctl, Args::In(0, &[PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64]), "vmm: a new thread names itself and installs its filter"),
    (SYS_seccomp, Args::In(0, &[libc::SECCOMP_SET_MODE_FILTER as u64]), "vmm: a new thread installs its own filter"),
    (
        SYS_ioctl,
        Args::In(
            1,
            &[
                KVM_GET_API_VERSION,
                KVM_CREATE_VM,
                KVM_CHECK_EXTENSION,
                KVM_GET_VCPU_MMAP_SIZE,
                KVM_GET_SUPPORTED_CPUID,
                KVM_GET_MSR_INDEX_LIST,
                KVM_CREATE_VCPU,
                KVM_SET_USER_MEMORY_REGION,
                KVM_SET_TSS_ADDR,
                KVM_SET_IDENTITY_MAP_ADDR,
                KVM_CREATE_IRQCHIP,
                KVM_IRQ_LINE,
                KVM_IRQFD,
                KVM_CREATE_PIT2,
                KVM_IOEVENTFD,
            ],
        ),
        "vmm: InstanceStart creates the KVM VM",
    ),
    (
        SYS_ioctl,
        Args::In(
            1,
            &[
                KVM_SET_REGS,
                KVM_GET_SREGS,
                KVM_SET_SREGS,
                KVM_GET_MSRS,
                KVM_SET_MSRS,
                KVM_SET_FPU,
                KVM_GET_LAPIC,
                KVM_SET_LAPIC,
                KVM_SET_CPUID2,
                KVM_GET_TSC_KHZ,
            ],
        ),
        "vmm: InstanceStart sets up the vCPUs",
    ),
    (
        SYS_ioctl,
        Args::In(
            1,
            &[
                KVM_GET_IRQCHIP,
                KVM_SET_IRQCHIP,
                KVM_GET_CLOCK,
                KVM_SET_CLOCK,
                KVM_GET_PIT2,
                KVM_SET_PIT2,
                KVM_SET_TSC_KHZ,
                KVM_SET_MP_STATE,
                KVM_SET_VCPU_EVENTS,
                KVM_SET_DEBUGREGS,
                KVM_SET_XSAVE,
                KVM_SET_XCRS,
                KVM_KVMCLOCK_CTRL,
                KVM_GET_DIRTY_LOG,
            ],
        ),
        "vmm: snapshot/create reads the VM's state; a restore sets the VM's and vCPUs' (snapshot, vcpu.rs restore)",
    ),
    (
        SYS_ioctl,
        Args::In(
            1,
            &[
                UFFDIO_API,
                UFFDIO_REGISTER,
                USERFAULTFD_IOC_NEW,
                TUNSETIFF,
                TUNGETIFF,
                TUNSETVNETHDRSZ,
                TUNSETOFFLOAD,
                SIOCGIFINDEX,
            ],
        ),
        "vmm: opening TAPs; snapshot/load with mem_backend Uffd sets up its userfaultfd (snapshot::uffd)",
    ),
    (SYS_ioctl, Args::In(1, &[TCGETS, TCSETS, TIOCGWINSZ, FIONBIO, FIONREAD]), "vmm: the terminal (raw mode and back), non-blocking fds"),
];

/// `cinder run`'s front-end, from the moment its VMM child runs: main (the session with the
/// guest agent, copy-out, the end) and the threads it spawns then (signal forwarding, stdin,
/// the terminal's size), which inherit this filter. No KVM, no guest memory, no exec.
#[rustfmt::skip]
pub const RUN: &[Allow] = &[
    (SYS_clone3, Args::Enosys, "run: its flags are out of a filter's reach: ENOSYS, glibc falls back to clone"),
    (SYS_clone, Args::AllSet(0, libc::CLONE_THREAD as u64), "run: the signal, stdin and terminal-size threads; threads only, never a fork"),
    (SYS_rt_sigtimedwait, Args::Any, "run: sigwait for the signals forwarded to the command"),
    (SYS_seccomp, Args::In(0, &[libc::SECCOMP_SET_MODE_FILTER as u64]), "run: installing its second filter (clone3 -> ENOSYS)"),
    (SYS_prctl, Args::In(0, &[PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64, PR_SET_VMA]), "run: installing its second filter (clone3), std names a thread, glibc names thread stacks"),
    (SYS_rt_sigaction, Args::Any, "run: std"),
    (SYS_socket, Args::In(0, &[AF_UNIX as u64]), "run: the vsock socket of its VMM (CONNECT to the agent); AF_UNIX only"),
    (SYS_connect, Args::Any, "run: the vsock socket of its VMM"),
    (SYS_setsockopt, Args::Any, "run: a read timeout on the vsock socket while the agent answers CONNECT"),
    (SYS_shutdown, Args::Any, "run: closing the session"),
    (SYS_recvfrom, Args::Any, "run: frames from the agent"),
    (SYS_sendto, Args::Any, "run: frames to the agent"),
    (SYS_poll, Args::Any, "run: std"),
    (SYS_ppoll, Args::Any, "run: std"),
    (SYS_lseek, Args::Any, "run: reading the VMM's log for a failure line"),
    (SYS_openat, Args::Any, "run: the VMM's log and console files, --copy-out destinations, the scratch directory's removal"),
    (SYS_getdents64, Args::Any, "run: removing its scratch directory"),
    (SYS_unlink, Args::Any, "run: a failed --copy-out's partial file"),
    (SYS_unlinkat, Args::Any, "run: removing its scratch directory"),
    (SYS_wait4, Args::Any, "run: reaping its VMM child"),
    (SYS_kill, Args::Any, "run: ending its VMM child"),
    (SYS_ioctl, Args::In(1, &[TCGETS, TCSETS, TIOCGWINSZ]), "run: -t's raw terminal and its size"),
];

/// prctl's PR_SET_VMA (glibc names the mappings of thread stacks with it).
const PR_SET_VMA: u64 = 0x5356_4d41;
