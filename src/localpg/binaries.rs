//! Where the PostgreSQL server binaries of a major version are on this machine.
//!
//! The machine's own server (`pg_config --bindir`, Debian's
//! `/usr/lib/postgresql/<major>/bin`) serves by default; other majors come from the
//! cache `scripts/fetch-postgres.sh` fills (`$WALSHUTTLE_PG_CACHE/<major>/bin`). A
//! directory is only used once its `postgres --version` ran, as the user the server
//! will run as, and named the expected major: a missing or unusable version is an
//! error saying how to get it, never a silent substitute.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Result};

/// The fetch script, as the error for a missing version names it.
pub const FETCH_SCRIPT: &str = "scripts/fetch-postgres.sh";

/// The server binaries (`initdb`, `pg_ctl`, `postgres`) of one major version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerBinaries {
    /// The directory holding them.
    pub bindir: PathBuf,
    /// Their major version (14, 15, …).
    pub major: u32,
}

/// Whether this process runs as root, so servers must run as the `postgres` user
/// (initdb and postgres refuse to run as root).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    match std::fs::metadata("/proc/self") {
        Ok(meta) => meta.uid() == 0,
        Err(_) => Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false),
    }
}

/// The cache of fetched server binaries: `$WALSHUTTLE_PG_CACHE`, else
/// `/var/cache/walshuttle/postgres` as root (the `postgres` user the servers run as
/// cannot enter root's home), else `~/.cache/walshuttle/postgres`. Must match
/// `scripts/fetch-postgres.sh`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WALSHUTTLE_PG_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if is_root() {
        return PathBuf::from("/var/cache/walshuttle/postgres");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Path::new(&home).join(".cache/walshuttle/postgres"),
        None => PathBuf::from("/var/cache/walshuttle/postgres"),
    }
}

fn has_server(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() && dir.join("postgres").is_file()
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    has_server(&dir).then_some(dir)
}

/// Debian's and Ubuntu's per-version server directories, oldest first.
fn debian_bindirs() -> Vec<(u32, PathBuf)> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let major = e.file_name().to_str()?.parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    has_server(&bin).then_some((major, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// The machine's default server binaries: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`; or an error saying which package to install.
pub fn default_binaries() -> Result<ServerBinaries> {
    let dir = pg_config_bindir().or_else(|| debian_bindirs().pop().map(|(_, dir)| dir));
    let Some(bindir) = dir else {
        bail!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install them (Debian/Ubuntu: apt-get install -y postgresql; macOS: brew install postgresql) and make sure `pg_config --bindir` points at them"
        );
    };
    let major = checked_major(&bindir)?;
    Ok(ServerBinaries { bindir, major })
}

/// The server binaries of major version `major`: Debian's
/// `/usr/lib/postgresql/<major>/bin`, `pg_config --bindir` when it is that version,
/// or the fetch cache; an error naming the fetch command when none has them.
pub fn binaries_for(major: u32) -> Result<ServerBinaries> {
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    let cached = cache_dir().join(major.to_string()).join("bin");
    let mut candidates = vec![debian.clone()];
    if let Some(dir) = pg_config_bindir() {
        candidates.push(dir);
    }
    candidates.push(cached.clone());
    for bindir in candidates.into_iter().filter(|d| has_server(d)) {
        if let Ok(found) = version_of(&bindir) {
            if found == major {
                return Ok(ServerBinaries { bindir, major });
            }
        }
    }
    if has_server(&cached) {
        // There, but not usable: say why.
        let found = checked_major(&cached)?;
        bail!(
            "{} holds PostgreSQL {found}, not {major}: delete {} and run {FETCH_SCRIPT} {major}",
            cached.display(),
            cached.parent().unwrap_or(&cached).display()
        );
    }
    bail!(
        "PostgreSQL {major} server binaries not found (looked in {}, `pg_config --bindir` and {}): run {FETCH_SCRIPT} {major} to fetch them into the cache (set WALSHUTTLE_PG_CACHE to use another directory), or install PostgreSQL {major}'s server package",
        debian.display(),
        cached.display()
    )
}

/// The major version of the server in `bindir`, checked to run as the user servers
/// run as, with an error saying what to do otherwise.
fn checked_major(bindir: &Path) -> Result<u32> {
    version_of(bindir).map_err(|why| anyhow::anyhow!(why))
}

/// `postgres --version` of a directory, run once per process as the server user
/// (`postgres` when root): the major version, or why it cannot be used.
fn version_of(bindir: &Path) -> std::result::Result<u32, String> {
    static SEEN: OnceLock<Mutex<HashMap<PathBuf, std::result::Result<u32, String>>>> =
        OnceLock::new();
    let seen = SEEN.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(known) = seen.lock().ok().and_then(|m| m.get(bindir).cloned()) {
        return known;
    }
    let result = probe_version(bindir);
    if let Ok(mut m) = seen.lock() {
        m.insert(bindir.to_path_buf(), result.clone());
    }
    result
}

fn probe_version(bindir: &Path) -> std::result::Result<u32, String> {
    let postgres = bindir.join("postgres");
    let as_postgres = is_root();
    let mut cmd = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&postgres);
        c
    } else {
        Command::new(&postgres)
    };
    let who = if as_postgres {
        "the postgres user"
    } else {
        "this user"
    };
    let out = cmd
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", postgres.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if as_postgres {
            format!(
                "make every directory on the path to {} searchable and readable for the postgres user (as root, {FETCH_SCRIPT} fetches into /var/cache/walshuttle/postgres by default, which is)",
                bindir.display()
            )
        } else {
            format!(
                "check its shared libraries (ldd {}) or fetch it again",
                postgres.display()
            )
        };
        return Err(format!(
            "{who} cannot run {}: {}: {hint}",
            postgres.display(),
            err.trim()
        ));
    }
    parse_major(&text).ok_or_else(|| {
        format!(
            "{} --version printed {:?}, not a PostgreSQL version",
            postgres.display(),
            text.trim()
        )
    })
}

/// The major version in `postgres --version` output: `postgres (PostgreSQL) 15.18
/// (Debian 15.18-0+deb12u1)` → 15.
pub fn parse_major(version_output: &str) -> Option<u32> {
    let rest = version_output
        .trim()
        .strip_prefix("postgres (PostgreSQL) ")?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The `psql` client for clusters of `bindir`: its own when it has one, else the
/// machine's default server's (Debian's psql talks to every major), else `psql` on
/// `PATH`.
pub fn psql_for(bindir: &Path) -> PathBuf {
    let own = bindir.join("psql");
    if own.is_file() {
        return own;
    }
    let from_pg_config = pg_config_bindir().map(|d| d.join("psql"));
    match from_pg_config {
        Some(p) if p.is_file() => p,
        _ => PathBuf::from("psql"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_major;

    #[test]
    fn majors_are_read_from_version_output() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 18.4"), Some(18));
        assert_eq!(parse_major("postgres (PostgreSQL) 19beta1"), Some(19));
        assert_eq!(parse_major("something else"), None);
    }
}
