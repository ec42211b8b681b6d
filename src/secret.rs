//! Secrets (passwords) in a wrapper whose `Debug` and `Display` print nothing of them, and their
//! resolution from environment variables, files and systemd credentials.

use std::fmt;
use std::path::{Path, PathBuf};

/// A password. Printing it shows `***`; only [`Secret::expose`] gives the text.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret string.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret text, for handing to an authentication exchange and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Why a password could not be read. Names the place, never the content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The password file could not be read.
    #[error("cannot read password file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The password file is readable by group or others.
    #[error("password file {0} is readable by group or others; chmod 600 it")]
    Permissions(PathBuf),
}

/// Reads a password file: the first line, without its line ending. Refuses group/world-readable
/// files, as libpq does for `.pgpass`.
pub fn read_password_file(path: &Path) -> Result<Secret, SecretError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| SecretError::File {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(SecretError::Permissions(path.to_path_buf()));
    }
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::File {
        path: path.to_path_buf(),
        source,
    })?;
    let line = text.lines().next().unwrap_or("");
    Ok(Secret::new(line.trim_end_matches('\r')))
}

/// The environment variable holding a target's password: `PGCARVE_TARGET_<NAME>_PASSWORD`, the
/// name upper-cased with every non-alphanumeric character turned into `_`.
pub fn target_password_env(target: &str) -> String {
    let name: String = target
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("PGCARVE_TARGET_{name}_PASSWORD")
}

/// Resolves a password in order: the environment variable `env`, then `password_file`, then the
/// systemd credential `credential` (in `$CREDENTIALS_DIRECTORY`), then whatever the URL carried.
pub fn resolve(
    env: &str,
    password_file: Option<&Path>,
    credential: &str,
    from_url: Option<Secret>,
) -> Result<Option<Secret>, SecretError> {
    if let Ok(v) = std::env::var(env) {
        return Ok(Some(Secret::new(v)));
    }
    if let Some(p) = password_file {
        return read_password_file(p).map(Some);
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let p = Path::new(&dir).join(credential);
        if p.exists() {
            // systemd makes credentials readable by the service only; no mode check needed.
            let text = std::fs::read_to_string(&p).map_err(|source| SecretError::File {
                path: p.clone(),
                source,
            })?;
            return Ok(Some(Secret::new(text.lines().next().unwrap_or(""))));
        }
    }
    Ok(from_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn env_names() {
        assert_eq!(
            target_password_env("patient"),
            "PGCARVE_TARGET_PATIENT_PASSWORD"
        );
        assert_eq!(
            target_password_env("lab-2"),
            "PGCARVE_TARGET_LAB_2_PASSWORD"
        );
    }

    #[test]
    fn password_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\nignored\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_password_file(&p),
            Err(SecretError::Permissions(_))
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password_file(&p).unwrap().expose(), "s3cret");
    }
}
