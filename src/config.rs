//! Resolved connection settings: parsing libpq-style URLs and keeping passwords out
//! of every message walshuttle prints.

use std::str::FromStr;

use anyhow::{bail, Context, Result};

use crate::pg::tls::{self, TlsSettings};

/// Which side of the pipeline a connection belongs to; named in every error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The database changes are read from.
    Source,
    /// The database changes are written to.
    Target,
}

impl Side {
    /// The flag that sets this side's URL, for messages that say what to fix.
    pub fn flag(self) -> &'static str {
        match self {
            Side::Source => "--source",
            Side::Target => "--target",
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// A parsed connection string for one side, with its redacted form for messages.
#[derive(Clone)]
pub struct Endpoint {
    /// Which side this is.
    pub side: Side,
    /// Parsed settings, as tokio-postgres understands them (its `ssl_mode` is the
    /// closest it knows to `tls.mode`).
    pub config: tokio_postgres::Config,
    /// `sslmode` and `sslrootcert`, which tokio-postgres does not fully understand.
    pub tls: TlsSettings,
    /// The connection string with any password replaced by `***`: the only form
    /// that may appear in logs, errors and `status`.
    pub redacted: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Endpoint({}: {})", self.side, self.redacted)
    }
}

impl Endpoint {
    /// Parses a libpq-style URL (`postgresql://user:pass@host:5432/db?sslmode=…`) or
    /// key/value string (`host=… dbname=…`).
    pub fn parse(side: Side, text: &str) -> Result<Self> {
        let redacted = redact(text);
        let text = text.trim();
        if text.is_empty() {
            bail!(
                "the {side} connection string is empty: pass {} postgresql://user@host:5432/dbname",
                side.flag()
            );
        }
        let (rest, tls) = tls::extract_settings(text).map_err(|e| {
            anyhow::anyhow!("the {side} connection string `{redacted}` is not usable: {e}")
        })?;
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            anyhow::anyhow!(
                "the {side} connection string `{redacted}` does not parse ({e}): use the form postgresql://user:password@host:5432/dbname"
            )
        })?;
        if config.get_hosts().is_empty() {
            bail!(
                "the {side} connection string `{redacted}` names no host: add one, e.g. postgresql://user@localhost:5432/dbname"
            );
        }
        config.ssl_mode(tls.mode.driver_mode());
        Ok(Endpoint {
            side,
            config,
            tls,
            redacted,
        })
    }

    /// Database name the connection uses (the user name when none is given, as libpq does).
    pub fn dbname(&self) -> String {
        self.config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("postgres")
            .to_string()
    }

    /// User name the connection uses.
    pub fn user(&self) -> String {
        self.config.get_user().unwrap_or("postgres").to_string()
    }
}

/// Replaces the password in a connection string with `***`, in both the URL form
/// (`user:secret@host`, `?password=secret`) and the key/value form (`password=secret`).
pub fn redact(text: &str) -> String {
    let mut out = text.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map(|i| rest_start + i)
            .unwrap_or(out.len());
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                let start = rest_start + colon + 1;
                let end = rest_start + at;
                out.replace_range(start..end, "***");
            }
        }
        // Query parameters: keys may be percent-encoded (`pass%77ord=`), which the
        // driver decodes, so decode them before deciding.
        if let Some(q) = out.find('?') {
            let query: Vec<String> = out[q + 1..]
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _)) if percent_decode(key).eq_ignore_ascii_case("password") => {
                        format!("{key}=***")
                    }
                    _ => param.to_string(),
                })
                .collect();
            out = format!("{}?{}", &out[..q], query.join("&"));
        }
    }
    redact_key_values(&out)
}

/// Decodes `%XX` escapes (lossily), for comparing URL query keys.
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

fn redact_key_values(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while let Some(found) = lower[i..].find("password") {
        let key_start = i + found;
        let mut j = key_start + "password".len();
        let bytes = text.as_bytes();
        while j < bytes.len() && bytes[j] == b' ' {
            j += 1;
        }
        let boundary_ok =
            key_start == 0 || matches!(bytes[key_start - 1], b' ' | b'?' | b'&' | b'\t');
        if j < bytes.len() && bytes[j] == b'=' && boundary_ok {
            j += 1;
            while j < bytes.len() && bytes[j] == b' ' {
                j += 1;
            }
            let value_end = if j < bytes.len() && bytes[j] == b'\'' {
                let mut k = j + 1;
                while k < bytes.len() && bytes[k] != b'\'' {
                    k += if bytes[k] == b'\\' { 2 } else { 1 };
                }
                (k + 1).min(bytes.len())
            } else {
                let mut k = j;
                while k < bytes.len() && !matches!(bytes[k], b' ' | b'&' | b'\t') {
                    k += 1;
                }
                k
            };
            out.push_str(&text[i..j]);
            out.push_str("***");
            i = value_end;
        } else {
            out.push_str(&text[i..j]);
            i = j;
        }
    }
    out.push_str(&text[i..]);
    out
}

/// Reads the URL for one side from its flag value (clap already folds in the
/// `WALSHUTTLE_SOURCE`/`WALSHUTTLE_TARGET` environment variables).
pub fn endpoint(side: Side, value: Option<&str>) -> Result<Endpoint> {
    let env = match side {
        Side::Source => "WALSHUTTLE_SOURCE",
        Side::Target => "WALSHUTTLE_TARGET",
    };
    let text = value.with_context(|| {
        format!(
            "no {side} database given: pass {} postgresql://user@host:5432/dbname or set {env}",
            side.flag()
        )
    })?;
    Endpoint::parse(side, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_url_passwords() {
        assert_eq!(
            redact("postgresql://alice:s3cr%40t@db:5432/app"),
            "postgresql://alice:***@db:5432/app"
        );
        assert_eq!(
            redact("postgres://alice@db/app?password=hunter2&sslmode=require"),
            "postgres://alice@db/app?password=***&sslmode=require"
        );
        assert_eq!(redact("postgres://db/app"), "postgres://db/app");
    }

    #[test]
    fn redacts_percent_encoded_password_keys() {
        assert_eq!(
            redact("postgres://u@h/db?pass%77ord=hunter2&x=1"),
            "postgres://u@h/db?pass%77ord=***&x=1"
        );
        assert_eq!(
            redact("postgres://u@h/db?%50ASSWORD=s"),
            "postgres://u@h/db?%50ASSWORD=***"
        );
        assert_eq!(redact("postgres://u@h/db?x=%"), "postgres://u@h/db?x=%");
    }

    #[test]
    fn redacts_key_value_passwords() {
        assert_eq!(
            redact("host=db password=hunter2 user=a"),
            "host=db password=*** user=a"
        );
        assert_eq!(
            redact("host=db password = 'a b' user=a"),
            "host=db password = *** user=a"
        );
        assert_eq!(redact("host=db passwordless=1"), "host=db passwordless=1");
    }

    #[test]
    fn tls_settings_come_from_the_connection_string() {
        use crate::pg::tls::SslMode;
        let e = Endpoint::parse(
            Side::Source,
            "postgresql://u:pw@localhost:5433/app?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        )
        .unwrap();
        assert_eq!(e.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            e.tls.root_cert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(
            e.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(e.dbname(), "app");
        assert_eq!(e.config.get_ports(), &[5433]);
        assert_eq!(
            e.redacted,
            "postgresql://u:***@localhost:5433/app?sslmode=verify-full&sslrootcert=/etc/ca.pem"
        );

        let e = Endpoint::parse(Side::Target, "host=db dbname=app sslmode=verify-ca").unwrap();
        assert_eq!(e.tls.mode, SslMode::VerifyCa);
        assert_eq!(e.tls.root_cert, None);

        let e = Endpoint::parse(Side::Target, "postgresql://db/app").unwrap();
        assert_eq!(e.tls.mode, SslMode::Prefer);
        assert_eq!(
            e.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        let e = Endpoint::parse(Side::Target, "postgresql://db/app?sslmode=disable").unwrap();
        assert_eq!(
            e.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
    }

    #[test]
    fn bad_sslmode_is_one_clear_line_without_the_password() {
        let err = Endpoint::parse(
            Side::Source,
            "postgresql://u:topsecret@db/app?sslmode=verfy-full",
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("topsecret"), "{err}");
        assert!(
            err.contains("sslmode `verfy-full` is not supported"),
            "{err}"
        );
        assert!(err.contains("verify-full"), "{err}");
    }

    #[test]
    fn parse_errors_never_show_the_password() {
        let err = Endpoint::parse(Side::Source, "postgresql://u:topsecret@host:notaport/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("topsecret"), "{err}");
        assert!(err.contains("source"), "{err}");
    }
}
