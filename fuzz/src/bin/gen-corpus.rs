//! Writes each target's generated seeds to `fuzz/corpus/<target>/seed-<n>` (regression
//! inputs for fixed crashes live next to them, named `crash-*`, and are kept).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for t in cinder_fuzz::TARGETS {
        let dir = root.join(t.name);
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let p = entry?.path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"))
            {
                std::fs::remove_file(p)?;
            }
        }
        for (i, seed) in (t.seeds)().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed)?;
        }
        println!("{}: {} seeds", t.name, (t.seeds)().len());
    }
    // Regression inputs that are not generated seeds.
    std::fs::write(
        root.join("virtio_vsock/crash-connect-backlog"),
        cinder_fuzz::vsock::full_backlog(),
    )?;
    Ok(())
}
