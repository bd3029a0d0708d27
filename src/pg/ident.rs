//! Identifier and literal quoting, the one place SQL text is built from names.
//!
//! Every table, column, schema, slot and publication name that walshuttle puts into
//! SQL goes through here, so tables named `Order Items` or `"weird"` work everywhere.

use std::fmt;

/// Quotes an identifier for SQL: `Order Items` becomes `"Order Items"`, embedded
/// double quotes are doubled.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes a string literal for SQL (standard_conforming_strings on): embedded single
/// quotes are doubled.
pub fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// A schema-qualified table name, the key walshuttle uses for tables everywhere.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct QualifiedName {
    /// Schema (namespace) name, unquoted.
    pub schema: String,
    /// Relation name, unquoted.
    pub name: String,
}

impl QualifiedName {
    /// Builds a name from its unquoted parts.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        QualifiedName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// The name quoted for SQL: `"public"."Order Items"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// Parses a user-supplied `[schema.]table`, where either part may be written
    /// double-quoted (`"My Schema"."Order Items"`); unquoted parts keep their case
    /// as written, since walshuttle matches catalog names exactly.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts = split_dotted(text.trim())?;
        match parts.as_slice() {
            [table] => Ok(QualifiedName::new("public", table.clone())),
            [schema, table] => Ok(QualifiedName::new(schema.clone(), table.clone())),
            _ => Err(format!(
                "`{text}` is not a table name: use table or schema.table (quote names containing dots)"
            )),
        }
    }
}

impl fmt::Display for QualifiedName {
    /// Form for messages, as SQL would need it: `public.items`, `public."Order
    /// Items"`, `public."a.b"` (unambiguous, and pastable into a statement).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            display_ident(&self.schema),
            display_ident(&self.name)
        )
    }
}

/// Words PostgreSQL reserves (reserved and type/function-name keywords): an
/// identifier spelled like one needs quotes.
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// An identifier as SQL needs it in a message: bare when it is a plain lower-case
/// name, quoted otherwise.
pub fn display_ident(name: &str) -> String {
    let mut chars = name.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
        && !RESERVED.contains(&name);
    if plain {
        name.to_string()
    } else {
        quote_ident(name)
    }
}

fn split_dotted(text: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted_part = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if current.is_empty() && !quoted_part => {
                quoted_part = true;
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            current.push('"');
                        }
                        Some('"') => break,
                        Some(other) => current.push(other),
                        None => return Err(format!("`{text}` has an unterminated quote")),
                    }
                }
            }
            '.' => {
                if current.is_empty() {
                    return Err(format!("`{text}` has an empty name part"));
                }
                parts.push(std::mem::take(&mut current));
                quoted_part = false;
            }
            _ if quoted_part => {
                return Err(format!("`{text}`: unexpected text after a quoted name"));
            }
            other => current.push(other),
        }
    }
    if current.is_empty() {
        return Err(format!("`{text}` has an empty name part"));
    }
    parts.push(current);
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_tables_unambiguously() {
        assert_eq!(
            QualifiedName::new("public", "items").to_string(),
            "public.items"
        );
        assert_eq!(
            QualifiedName::new("public", "a.b").to_string(),
            "public.\"a.b\""
        );
        assert_eq!(
            QualifiedName::new("Sales", "Order Items").to_string(),
            "\"Sales\".\"Order Items\""
        );
        assert_eq!(
            QualifiedName::new("public", "user").to_string(),
            "public.\"user\""
        );
        assert_eq!(QualifiedName::new("s", "t_1$x").to_string(), "s.t_1$x");
    }

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(quote_ident("users"), "\"users\"");
        assert_eq!(quote_ident("Order Items"), "\"Order Items\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn parses_table_names() {
        assert_eq!(
            QualifiedName::parse("users").unwrap(),
            QualifiedName::new("public", "users")
        );
        assert_eq!(
            QualifiedName::parse("sales.\"Order Items\"").unwrap(),
            QualifiedName::new("sales", "Order Items")
        );
        assert_eq!(
            QualifiedName::parse("\"a.b\".\"we\"\"ird\"").unwrap(),
            QualifiedName::new("a.b", "we\"ird")
        );
        assert!(QualifiedName::parse("a.b.c").is_err());
        assert!(QualifiedName::parse("a.").is_err());
        assert!(QualifiedName::parse("\"open").is_err());
        assert_eq!(
            QualifiedName::new("s", "Order Items").quoted(),
            "\"s\".\"Order Items\""
        );
    }
}
