//! The Linux guest artifacts built by `resources/guest/build.sh`.

use std::path::PathBuf;

/// A built guest profile's directory (`vmlinux`, `bzImage`, `bzImage-uncompressed`,
/// `initramfs.cpio`, ...).
pub struct GuestDir(pub PathBuf);

impl GuestDir {
    /// The clean default guest: `$CINDER_GUEST_DIR`, else built (or found in the cache) now.
    pub fn default_guest() -> GuestDir {
        Self::from_env_or_build("CINDER_GUEST_DIR", "default")
    }

    /// The test profile: `$CINDER_TEST_GUEST_DIR`, else built (or found in the cache) now.
    pub fn test_profile() -> GuestDir {
        Self::from_env_or_build("CINDER_TEST_GUEST_DIR", "test")
    }

    fn from_env_or_build(var: &str, profile: &str) -> GuestDir {
        if let Some(d) = std::env::var_os(var) {
            return GuestDir(PathBuf::from(d));
        }
        let script = crate::cinder::repo_root().join("resources/guest/build.sh");
        // cinder hides the KVM PV hypercall features itself (--cpu-template no-pv-hypercalls),
        // so the test profile is built without its kvm.c patch.
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(profile)
            .env("CINDER_TEST_KVM_PV_PATCH", "0")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} {profile} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        GuestDir(PathBuf::from(dir))
    }

    /// A file in the directory, which must exist.
    pub fn file(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        assert!(p.exists(), "guest artifact {} is missing", p.display());
        p
    }
}
