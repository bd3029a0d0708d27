//! Feeds arbitrary UTF-8 to every parser of user-given settings: connection strings
//! (`Endpoint::parse`, `redact`), durations and sizes (`parse_duration`,
//! `parse_bytes`) and the TOML settings file (`FileConfig::load`, which parses with
//! the `toml` crate and then checks every value). None may panic, and a password
//! placed in a connection string (URL user info, URL query, key/value, quoted
//! key/value, or the `source` key of the file) never appears in `redact`'s output,
//! in `Endpoint::redacted`, or in any error message.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use walshuttle::cli::{parse_bytes, parse_duration};
use walshuttle::config::{redact, Endpoint, Side};
use walshuttle::settings::FileConfig;

fn toml_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("walshuttle-fuzz-{}.toml", std::process::id()))
    })
}

/// A password made of the input's letters and digits, bracketed so that it cannot
/// be confused with anything else in the text.
fn secret_from(s: &str) -> String {
    let core: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!("Sx{core}Zq9")
}

fn check_no_secret(text: &str, secret: &str) {
    assert!(
        !redact(text).contains(secret),
        "redact({text:?}) shows the password"
    );
    for side in [Side::Source, Side::Target] {
        match Endpoint::parse(side, text) {
            Ok(e) => {
                assert!(
                    !e.redacted.contains(secret),
                    "Endpoint::parse({text:?}).redacted shows the password: {}",
                    e.redacted
                );
                assert!(
                    !format!("{e:?}").contains(secret),
                    "Debug of the endpoint for {text:?} shows the password"
                );
            }
            Err(err) => {
                let msg = format!("{err:#}");
                assert!(
                    !msg.contains(secret),
                    "the error for {text:?} shows the password: {msg}"
                );
            }
        }
    }
}

fn load_toml(text: &str) -> Result<(), String> {
    let path = toml_path();
    std::fs::write(path, text).expect("write the fuzz TOML file");
    FileConfig::load(path)
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };

    // The parsers on the raw text.
    let _ = Endpoint::parse(Side::Source, s);
    let _ = Endpoint::parse(Side::Target, s);
    let _ = redact(s);
    if let Ok(d) = parse_duration(s) {
        assert!(d.as_secs_f64() <= 31_536_000.0 + 1e-6, "{s:?} -> {d:?}");
    }
    let _ = parse_bytes(s);
    let _ = load_toml(s);

    // A password in every place a connection string can hold one.
    let secret = secret_from(s);
    if s.contains(&secret) || s.contains("Zq9") {
        return;
    }
    for text in [
        format!("postgresql://user:{secret}@{s}"),
        format!("postgres://user:{secret}@localhost:5432/{s}"),
        format!("postgresql://user@localhost/db?password={secret}&{s}"),
        format!("postgresql://user@localhost/db?{s}&password={secret}"),
        format!("host=localhost password={secret} {s}"),
        format!("host=localhost password = '{secret}' {s}"),
        format!("{s} password={secret}"),
    ] {
        check_no_secret(&text, &secret);
    }

    // The same in the settings file: a broken rest of the file must not echo it.
    let toml = format!("source = \"postgresql://user:{secret}@localhost/db\"\n{s}");
    if let Err(msg) = load_toml(&toml) {
        assert!(
            !msg.contains(&secret),
            "the config file error shows the password: {msg}"
        );
    }
});
