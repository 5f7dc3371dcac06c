//! Secrets this process makes and keeps: random tokens and passwords, and files only their
//! owner may read (the admin token, a topology's passwords and keys).

use std::path::Path;

/// `N` random bytes (the thread RNG, seeded from the OS) as lowercase hex.
pub fn random_hex<const N: usize>() -> String {
    use rand::Rng;
    let bytes: [u8; N] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `text` to `path`, readable and writable by its owner only (0600). A file that
/// exists is narrowed too: `mode` applies only to a file the call creates.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_fresh_and_private() {
        let (a, b) = (random_hex::<16>(), random_hex::<16>());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s");
        std::fs::write(&path, "old").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private(&path, "new").expect("write_private");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
    }
}
