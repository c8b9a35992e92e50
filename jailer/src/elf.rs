//! What a dynamically linked binary needs to start inside a jail: its ELF interpreter and the
//! shared libraries it (and they) name in DT_NEEDED, found as the dynamic loader finds them
//! (DT_RPATH/DT_RUNPATH, then the system's library directories). A static binary needs nothing.

use std::path::{Path, PathBuf};

/// Where the loader looks when a binary names no run path (Debian's multiarch directories
/// first, as its `ld.so` does).
const SYSTEM_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// At most this many libraries (a loop guard; cinder needs three).
const MAX_LIBS: usize = 256;

/// Why a binary's dependencies could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file could not be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The file is not an ELF file goblin can parse.
    #[error("{0} is not an ELF executable: {1}")]
    Parse(PathBuf, goblin::error::Error),
    /// A DT_NEEDED library is nowhere the loader would look.
    #[error(
        "{0} needs {1}, which is not in its run path nor in {dirs}: install it or build a \
         static binary",
        dirs = SYSTEM_DIRS.join(", ")
    )]
    Missing(PathBuf, String),
    /// More libraries than any sane binary has.
    #[error("{0} needs more than {MAX_LIBS} shared libraries")]
    TooMany(PathBuf),
}

/// The files (absolute host paths, the path the loader uses) that `exe` needs besides itself:
/// its interpreter and every shared library, transitively. Empty for a static binary.
pub fn runtime_files(exe: &Path) -> Result<Vec<PathBuf>, ElfError> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut todo: Vec<PathBuf> = vec![exe.to_path_buf()];
    let mut seen_names: Vec<String> = Vec::new();
    while let Some(file) = todo.pop() {
        let bytes = std::fs::read(&file).map_err(|e| ElfError::Read(file.clone(), e))?;
        let elf = goblin::elf::Elf::parse(&bytes).map_err(|e| ElfError::Parse(file.clone(), e))?;
        if let Some(interp) = elf.interpreter {
            let p = PathBuf::from(interp);
            if !out.contains(&p) {
                out.push(p);
            }
        }
        let origin = file.parent().unwrap_or(Path::new("/"));
        let mut dirs: Vec<PathBuf> = elf
            .rpaths
            .iter()
            .chain(elf.runpaths.iter())
            .flat_map(|r| r.split(':'))
            .filter(|d| !d.is_empty())
            .map(|d| PathBuf::from(d.replace("$ORIGIN", &origin.to_string_lossy())))
            .collect();
        dirs.extend(SYSTEM_DIRS.iter().map(PathBuf::from));
        for name in &elf.libraries {
            if seen_names.iter().any(|n| n == name) {
                continue;
            }
            seen_names.push((*name).to_string());
            let found = if name.contains('/') {
                Some(PathBuf::from(name)).filter(|p| p.is_file())
            } else {
                dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
            };
            let lib = found.ok_or_else(|| ElfError::Missing(file.clone(), (*name).into()))?;
            if !out.contains(&lib) {
                out.push(lib.clone());
                todo.push(lib);
            }
            if out.len() > MAX_LIBS {
                return Err(ElfError::TooMany(exe.to_path_buf()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_needs_libc_and_its_loader() {
        let exe = std::env::current_exe().expect("current_exe");
        let files = runtime_files(&exe).expect("listed");
        assert!(
            files
                .iter()
                .any(|f| f.to_string_lossy().contains("ld-linux")),
            "{files:?}"
        );
        assert!(files.iter().any(|f| f.ends_with("libc.so.6")), "{files:?}");
        assert!(files.iter().all(|f| f.is_absolute()), "{files:?}");
    }

    #[test]
    fn a_text_file_is_refused() {
        let p = std::env::temp_dir().join(format!("cinder-jailer-elf-{}", std::process::id()));
        std::fs::write(&p, b"#!/bin/sh\n").expect("write");
        let r = runtime_files(&p);
        let _ = std::fs::remove_file(&p);
        assert!(matches!(r, Err(ElfError::Parse(..))), "{r:?}");
    }
}
