//! Whether an existing target column can take a source column's values unchanged:
//! the same type with the same or a wider modifier, or a known widening. Types are
//! compared as `format_type` prints them (schema-qualified under the pinned
//! search_path), taken apart into name, modifier, interval fields and array.

/// Type pairs where the target's type can hold every source value (text COPY is used).
const WIDENINGS: &[(&str, &str)] = &[
    ("smallint", "integer"),
    ("smallint", "bigint"),
    ("integer", "bigint"),
    ("real", "double precision"),
    ("character varying", "text"),
    ("text", "character varying"),
    ("timestamp without time zone", "timestamp with time zone"),
    ("json", "jsonb"),
];

/// A type as `format_type` prints it, taken apart: `numeric(12,4)[]` is `numeric`
/// with modifiers `12,4`, an array; `timestamp(3) with time zone` is `timestamp
/// with time zone` with modifier `3`; `interval day to second(2)` is `interval`
/// with fields `day to second` and modifier `2`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeSpec {
    /// The type's name without modifier, fields or array brackets.
    pub name: String,
    /// The modifier between parentheses, as printed (`12,4`), if any.
    pub modifier: Option<String>,
    /// An interval's field restriction (`year to month`), if any.
    pub fields: Option<String>,
    /// Whether this is an array of the type.
    pub array: bool,
}

impl TypeSpec {
    /// Takes apart `format_type` output. Parentheses inside a quoted name are part
    /// of the name.
    pub fn parse(sql: &str) -> TypeSpec {
        let mut rest = sql.trim();
        let mut array = false;
        while let Some(inner) = rest.strip_suffix("[]") {
            array = true;
            rest = inner.trim_end();
        }
        let mut open = None;
        let mut quoted = false;
        for (i, c) in rest.char_indices() {
            match c {
                '"' => quoted = !quoted,
                '(' if !quoted => {
                    open = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let (mut name, modifier) = match open.and_then(|i| rest[i..].find(')').map(|j| (i, i + j)))
        {
            Some((i, j)) => {
                let before = rest[..i].trim_end();
                let after = rest[j + 1..].trim_start();
                let name = if after.is_empty() {
                    before.to_string()
                } else {
                    format!("{before} {after}")
                };
                (name, Some(rest[i + 1..j].trim().to_string()))
            }
            None => (rest.to_string(), None),
        };
        let mut fields = None;
        if let Some(f) = name.strip_prefix("interval ") {
            fields = Some(f.trim().to_string());
            name = "interval".to_string();
        }
        TypeSpec {
            name,
            modifier,
            fields,
            array,
        }
    }

    /// The modifier's numbers (`12,4` → [12, 4]), `None` without one or when it is
    /// not numeric.
    fn numbers(&self) -> Option<Vec<i64>> {
        self.modifier
            .as_ref()?
            .split(',')
            .map(|n| n.trim().parse().ok())
            .collect()
    }
}

/// Whether a target column of type `target` can hold every value of a source column
/// of type `source`, unchanged: the same type with the same or a wider modifier
/// (`numeric(12,4)` into `numeric(14,6)` or `numeric`, `varchar(10)` into
/// `varchar(50)`, `timestamp(0)` into `timestamp(6)`), or a known widening.
/// A narrower modifier would round or refuse values, so it is not compatible.
pub fn types_compatible(source: &str, target: &str) -> bool {
    if source == target {
        return true;
    }
    let (s, t) = (TypeSpec::parse(source), TypeSpec::parse(target));
    if s.array != t.array {
        return false;
    }
    if s.name == t.name {
        return modifier_holds(&s, &t);
    }
    if !WIDENINGS.iter().any(|(a, b)| *a == s.name && *b == t.name) {
        return false;
    }
    // A widening: the target's modifier, if any, must still hold every value.
    match (&s.name[..], &t.name[..]) {
        ("timestamp without time zone", "timestamp with time zone") => precision_holds(&s, &t),
        _ => t.modifier.is_none() && t.fields.is_none(),
    }
}

/// Whether `target`'s modifier holds every value of `source`'s (same type name).
fn modifier_holds(source: &TypeSpec, target: &TypeSpec) -> bool {
    match source.name.as_str() {
        "numeric" => match (source.numbers(), target.numbers()) {
            (_, None) if target.modifier.is_none() => true,
            (Some(s), Some(t)) => {
                let (sp, ss) = (s[0], s.get(1).copied().unwrap_or(0));
                let (tp, ts) = (t[0], t.get(1).copied().unwrap_or(0));
                // As many digits after the point, and as many before it.
                ts >= ss && tp - ts >= sp - ss
            }
            _ => false,
        },
        // Lengths: longer holds shorter (a longer `character` only pads with
        // blanks, which are insignificant in that type).
        "character varying" | "bit varying" | "character" => {
            match (source.numbers(), target.numbers()) {
                (_, None) if target.modifier.is_none() => true,
                (Some(s), Some(t)) => t[0] >= s[0],
                _ => false,
            }
        }
        "timestamp without time zone"
        | "timestamp with time zone"
        | "time without time zone"
        | "time with time zone" => precision_holds(source, target),
        "interval" => {
            (target.fields.is_none() || target.fields == source.fields)
                && precision_holds(source, target)
        }
        // `bit(n)` takes exactly n bits; other types' modifiers are not known here:
        // only the same modifier, or none on the target, is sure to hold.
        _ => target.modifier.is_none() && target.fields.is_none(),
    }
}

/// Fractional-second precision: the target's (6 when absent) at least the source's.
fn precision_holds(source: &TypeSpec, target: &TypeSpec) -> bool {
    let precision = |t: &TypeSpec| match t.modifier {
        None => Some(6),
        Some(_) => t.numbers().and_then(|n| n.first().copied()),
    };
    matches!((precision(source), precision(target)), (Some(s), Some(t)) if t >= s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_takes_format_type_apart() {
        let t = TypeSpec::parse("timestamp(3) with time zone[]");
        assert_eq!(t.name, "timestamp with time zone");
        assert_eq!(t.modifier.as_deref(), Some("3"));
        assert!(t.array);
        let t = TypeSpec::parse("interval day to second(2)");
        assert_eq!(
            (t.name.as_str(), t.fields.as_deref()),
            ("interval", Some("day to second"))
        );
        assert_eq!(TypeSpec::parse("app.\"odd(1)\"").modifier, None);
        assert_eq!(
            TypeSpec::parse("numeric(12,4)").numbers(),
            Some(vec![12, 4])
        );
    }

    #[test]
    fn same_or_wider_types_are_compatible() {
        for (source, target) in [
            ("integer", "integer"),
            ("integer", "bigint"),
            ("character varying(10)", "character varying(20)"),
            ("character varying(10)", "character varying"),
            ("character varying(10)", "text"),
            ("text", "character varying"),
            ("character(3)", "character(6)"),
            ("numeric(12,2)", "numeric"),
            ("numeric(12,4)", "numeric(14,6)"),
            ("numeric(5)", "numeric(7,2)"),
            ("numeric(12,4)[]", "numeric(16,4)[]"),
            (
                "timestamp(0) without time zone",
                "timestamp without time zone",
            ),
            (
                "timestamp without time zone",
                "timestamp(6) without time zone",
            ),
            ("timestamp(3) without time zone", "timestamp with time zone"),
            ("timestamp without time zone", "timestamp with time zone"),
            ("time(2) with time zone", "time(4) with time zone"),
            ("interval day to second(3)", "interval"),
            ("interval year to month", "interval year to month"),
            ("bit varying(4)", "bit varying(8)"),
            ("json", "jsonb"),
            ("app.\"Mood\"[]", "app.\"Mood\"[]"),
            ("public.geometry(Point,4326)", "public.geometry"),
        ] {
            assert!(types_compatible(source, target), "{source} -> {target}");
        }
    }

    #[test]
    fn narrower_and_other_types_are_not() {
        for (source, target) in [
            ("bigint", "integer"),
            ("text", "integer"),
            ("jsonb", "text"),
            ("numeric(12,4)", "numeric(10,2)"),
            ("numeric(12,4)", "numeric(12,2)"),
            ("numeric(12,4)", "numeric(10,4)"),
            ("numeric", "numeric(20,4)"),
            ("character varying(50)", "character varying(10)"),
            ("character varying", "character varying(10)"),
            ("text", "character varying(10)"),
            ("character(6)", "character(3)"),
            (
                "timestamp(6) without time zone",
                "timestamp(0) without time zone",
            ),
            ("timestamp without time zone", "timestamp(3) with time zone"),
            ("interval", "interval year to month"),
            ("interval(6)", "interval(2)"),
            ("bit(4)", "bit(8)"),
            ("integer[]", "integer"),
            ("integer", "bigint[]"),
            ("public.vector(3)", "public.vector(4)"),
        ] {
            assert!(!types_compatible(source, target), "{source} -> {target}");
        }
    }
}
