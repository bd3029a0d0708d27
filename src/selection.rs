//! Leaving tables out: `--schemas`, `--exclude-schemas` and `--exclude-tables`,
//! with patterns as `pg_dump -n/-N/-T` take them.
//!
//! A pattern is `table`, or `schema.table` (for `--exclude-tables`), or `schema`
//! (for the schema flags). `*` matches any run of characters and `?` any one;
//! letters outside double quotes are folded to lower case, as SQL does with
//! unquoted names; inside double quotes every character (a dot, a capital, a `*`)
//! is literal and `""` is a quote. Unlike `pg_dump`, a table pattern without a
//! schema matches that table in every schema (walshuttle has no search path to
//! resolve it against).
//!
//! The filter applies where the table list is resolved (bootstrap's preflight,
//! and so `run`); the pipeline then carries the resolved tables, so streaming,
//! `verify`, `catch-up` and `tables` work on them without matching again.

use anyhow::{bail, Result};

use crate::pg::QualifiedName;

/// One name pattern, compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Glob(Vec<Token>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Char(char),
    Any,
    One,
}

impl Glob {
    fn matches(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        // Classic two-pointer wildcard match with backtracking to the last `*`.
        let (mut p, mut t) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while t < chars.len() {
            match self.0.get(p) {
                Some(Token::Char(c)) if *c == chars[t] => {
                    p += 1;
                    t += 1;
                }
                Some(Token::One) => {
                    p += 1;
                    t += 1;
                }
                Some(Token::Any) => {
                    star = Some((p, t));
                    p += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        self.0[p..].iter().all(|t| *t == Token::Any)
    }
}

/// Splits a pattern on unquoted dots into compiled parts.
fn parse_parts(pattern: &str) -> Result<Vec<Glob>> {
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut chars = pattern.trim().chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                part.push(Token::Char('"'));
            }
            '"' => quoted = !quoted,
            _ if quoted => part.push(Token::Char(c)),
            '.' => parts.push(std::mem::take(&mut part)),
            '*' => part.push(Token::Any),
            '?' => part.push(Token::One),
            _ => part.extend(c.to_lowercase().map(Token::Char)),
        }
    }
    parts.push(part);
    if quoted {
        bail!("pattern `{pattern}` has an unclosed double quote");
    }
    if parts.iter().any(Vec::is_empty) {
        bail!("pattern `{pattern}` has an empty name part");
    }
    Ok(parts.into_iter().map(Glob).collect())
}

/// A table pattern: `table` (any schema) or `schema.table`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TablePattern {
    schema: Option<Glob>,
    table: Glob,
}

/// Which of the source's tables a pipeline leaves out, or keeps only.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableFilter {
    /// `--schemas`: only tables in schemas matching one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schemas: Vec<String>,
    /// `--exclude-schemas`: no table in schemas matching one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_schemas: Vec<String>,
    /// `--exclude-tables`: no table matching one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_tables: Vec<String>,
    #[serde(skip)]
    compiled: Compiled,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Compiled {
    schemas: Vec<Glob>,
    exclude_schemas: Vec<Glob>,
    exclude_tables: Vec<TablePattern>,
}

fn schema_pattern(flag: &str, p: &str) -> Result<Glob> {
    let mut parts = parse_parts(p).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
    if parts.len() != 1 {
        bail!("{flag}: `{p}` is not a schema name pattern (quote a name with a dot: '\"a.b\"')");
    }
    Ok(parts.remove(0))
}

impl TableFilter {
    /// Compiles the three flags' patterns (blank entries are ignored).
    pub fn new(
        schemas: &[String],
        exclude_schemas: &[String],
        exclude_tables: &[String],
    ) -> Result<TableFilter> {
        let keep = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let (schemas, exclude_schemas, exclude_tables) =
            (keep(schemas), keep(exclude_schemas), keep(exclude_tables));
        let mut compiled = Compiled::default();
        for p in &schemas {
            compiled.schemas.push(schema_pattern("--schemas", p)?);
        }
        for p in &exclude_schemas {
            compiled
                .exclude_schemas
                .push(schema_pattern("--exclude-schemas", p)?);
        }
        for p in &exclude_tables {
            let mut parts = parse_parts(p).map_err(|e| anyhow::anyhow!("--exclude-tables: {e}"))?;
            let pattern = match parts.len() {
                1 => TablePattern {
                    schema: None,
                    table: parts.remove(0),
                },
                2 => {
                    let table = parts.remove(1);
                    TablePattern {
                        schema: Some(parts.remove(0)),
                        table,
                    }
                }
                _ => bail!(
                    "--exclude-tables: `{p}` is not [schema.]table (quote a name with a dot: '\"a.b\"')"
                ),
            };
            compiled.exclude_tables.push(pattern);
        }
        Ok(TableFilter {
            schemas,
            exclude_schemas,
            exclude_tables,
            compiled,
        })
    }

    /// Whether no flag was given (every table passes).
    pub fn is_empty(&self) -> bool {
        self.schemas.is_empty() && self.exclude_schemas.is_empty() && self.exclude_tables.is_empty()
    }

    /// Whether `name` is kept.
    pub fn keeps(&self, name: &QualifiedName) -> bool {
        let c = &self.compiled;
        if !c.schemas.is_empty() && !c.schemas.iter().any(|g| g.matches(&name.schema)) {
            return false;
        }
        if c.exclude_schemas.iter().any(|g| g.matches(&name.schema)) {
            return false;
        }
        !c.exclude_tables.iter().any(|p| {
            p.table.matches(&name.name) && p.schema.as_ref().is_none_or(|s| s.matches(&name.schema))
        })
    }

    /// The flags as one line for `status` and logs, e.g.
    /// `--exclude-tables public.audit_*`; empty without any.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        for (flag, list) in [
            ("--schemas", &self.schemas),
            ("--exclude-schemas", &self.exclude_schemas),
            ("--exclude-tables", &self.exclude_tables),
        ] {
            if !list.is_empty() {
                out.push(format!("{flag} {}", list.join(",")));
            }
        }
        out.join(" ")
    }

    /// The filter as stored in the state (JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A filter stored by [`TableFilter::to_json`].
    pub fn from_json(text: &str) -> Result<TableFilter> {
        let raw: TableFilter = serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("the stored table filter does not parse: {e}"))?;
        TableFilter::new(&raw.schemas, &raw.exclude_schemas, &raw.exclude_tables)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str, t: &str) -> QualifiedName {
        QualifiedName::new(s, t)
    }

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn patterns_match_as_pg_dump_takes_them() {
        let f = TableFilter::new(
            &[],
            &v(&["tmp_*"]),
            &v(&["public.audit_*", "log?", "\"Order Items\"", "\"a.b\".x"]),
        )
        .unwrap();
        assert!(f.keeps(&name("public", "users")));
        assert!(!f.keeps(&name("public", "audit_2024")));
        assert!(f.keeps(&name("other", "audit_2024")));
        assert!(!f.keeps(&name("other", "log1")));
        assert!(f.keeps(&name("other", "log12")));
        assert!(!f.keeps(&name("sales", "Order Items")));
        assert!(f.keeps(&name("sales", "order items")));
        assert!(!f.keeps(&name("a.b", "x")));
        assert!(!f.keeps(&name("tmp_1", "users")));
        // Unquoted letters fold to lower case.
        let f = TableFilter::new(&v(&["Sales"]), &[], &v(&["*.Big*"])).unwrap();
        assert!(f.keeps(&name("sales", "small")));
        assert!(!f.keeps(&name("sales", "bigone")));
        assert!(!f.keeps(&name("public", "small")));
        assert!(TableFilter::new(&[], &[], &v(&["a.b.c"])).is_err());
        assert!(TableFilter::new(&[], &[], &v(&["\"open"])).is_err());
        assert!(TableFilter::new(&v(&["a.b"]), &[], &[]).is_err());
    }

    #[test]
    fn wildcards_backtrack_and_the_filter_round_trips() {
        let g = &parse_parts("a*b*c").unwrap()[0];
        assert!(g.matches("abc") && g.matches("aXbYbZc") && !g.matches("abcx"));
        assert!(parse_parts("*").unwrap()[0].matches(""));
        let f = TableFilter::new(&v(&["s*"]), &[], &v(&["x"])).unwrap();
        let back = TableFilter::from_json(&f.to_json()).unwrap();
        assert_eq!(back, f);
        assert_eq!(f.describe(), "--schemas s* --exclude-tables x");
        assert!(TableFilter::default().is_empty());
    }
}
