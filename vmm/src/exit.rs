//! Why a VM ended, and the one place that records it.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset itself (i8042, triple fault, KVM reset event): a normal end.
    Reset,
    /// The user typed the console escape (Ctrl-A x).
    Escape,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// The guest cannot go on: KVM internal error, failed entry, unexpected exit. The text
    /// holds the reason and the registers.
    GuestFatal(String),
    /// The VMM itself failed.
    VmmError(String),
}

impl ExitReason {
    /// The process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Reset | ExitReason::Escape => 0,
            ExitReason::Signal(sig) => 128 + sig,
            ExitReason::GuestFatal(_) => 3,
            ExitReason::VmmError(_) => 1,
        }
    }
}

/// The first reason wins; the event fd wakes the main loop.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    /// Readable once a reason is recorded.
    pub evt: EventFd,
}

impl ExitSignal {
    /// A fresh signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// Records `reason` unless one is recorded already, and wakes the main loop.
    pub fn request(&self, reason: ExitReason) {
        let mut g = match self.reason.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.is_none() {
            *g = Some(reason);
        }
        drop(g);
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        match self.reason.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.request(ExitReason::Reset);
        s.request(ExitReason::GuestFatal("x".into()));
        assert_eq!(s.reason(), Some(ExitReason::Reset));
        assert!(s.evt.read().is_ok());
        assert_eq!(ExitReason::Signal(15).exit_code(), 143);
        assert_eq!(ExitReason::GuestFatal(String::new()).exit_code(), 3);
    }
}
