//! The session settings every connection walshuttle opens runs under, on both
//! sides and of every kind, whatever the server, database or role say.
//!
//! Values cross between the servers as text wherever binary is not portable, and
//! their text depends on session settings: `DateStyle` decides whether `03/04/2024`
//! is March or April, `IntervalStyle` whether a leading minus covers every field,
//! `TimeZone` which instant a `timestamptz` or a widened `timestamp` names (and
//! which abbreviation is printed: `IST` is read back as Israel time),
//! `extra_float_digits` whether a float keeps every bit. A database or a role may
//! set any of them (`ALTER DATABASE … SET …`), so they are sent in the startup
//! packet's `options`, which outrank database and role settings, as PostgreSQL's
//! own apply worker and pg_dump pin them. A fixed `search_path` of `pg_catalog`
//! makes `format_type`, `pg_get_expr`, `pg_get_indexdef`, `pg_get_constraintdef`
//! and the reg* types print schema-qualified names, as pg_dump does; walshuttle
//! always qualifies user objects itself. Timeouts are set on purpose (0: off)
//! rather than inherited: a role's `statement_timeout` must not kill an index
//! build. A caller that wants a timeout sets its own with `SET`, which outranks
//! these; settings in the connection string's own `options` do not.

/// Declares the list once and derives the `SET` script from it at compile time.
macro_rules! pinned_settings {
    ($(($name:literal, $value:literal)),* $(,)?) => {
        /// Every pinned setting, as (name, value).
        pub const PINNED: &[(&str, &str)] = &[$(($name, $value)),*];

        /// The same settings as `SET` statements, for a session that changed them.
        pub const SET_ALL: &str = concat!($("SET ", $name, " = '", $value, "'; "),*);
    };
}

pinned_settings! {
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("TimeZone", "UTC"),
    ("standard_conforming_strings", "on"),
    ("bytea_output", "hex"),
    ("xmloption", "content"),
    ("lc_monetary", "C"),
    ("search_path", "pg_catalog"),
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    ("idle_session_timeout", "0"),
}

/// The startup `options` value: the connection string's own `options` (if any),
/// then every pinned setting as `-c name=value`, which win over them.
pub fn startup_options(from_connection_string: Option<&str>) -> String {
    let mut out = from_connection_string.unwrap_or("").trim().to_string();
    for (name, value) in PINNED {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("-c ");
        out.push_str(&escape(&format!("{name}={value}")));
    }
    out
}

/// Escapes one argument of the `options` value: the server splits it at spaces and
/// takes a backslash as escaping the next character.
fn escape(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    for c in arg.chars() {
        if c == '\\' || c.is_whitespace() {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_escape_spaces_and_come_after_the_users_own() {
        let options = startup_options(Some(" -c work_mem=64MB "));
        assert!(options.starts_with("-c work_mem=64MB -c DateStyle=ISO,\\ YMD -c "));
        assert!(options.contains("-c search_path=pg_catalog"));
        assert_eq!(options.matches("-c ").count(), PINNED.len() + 1);
        assert!(!startup_options(None).starts_with(' '));
    }

    #[test]
    fn set_script_matches_the_list() {
        assert_eq!(SET_ALL.matches("SET ").count(), PINNED.len());
        assert!(SET_ALL.starts_with("SET DateStyle = 'ISO, YMD'; "));
    }
}
