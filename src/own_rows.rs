//! How a statement names a table's own rows: `ONLY t`, so that the rows of an
//! inheritance child (one carried as a table of its own, or one only the target
//! has) are never read, counted, deleted or truncated as the table's; but plain `t`
//! where `t` is partitioned on that server. A partitioned table's partitions hold
//! all its rows and `ONLY t` holds none: PostgreSQL reads, updates and deletes
//! nothing through it, without an error, and refuses `TRUNCATE ONLY`. A table plain
//! on the source may be partitioned on the target (a serving database's choice); a
//! partitioned table of the source is never carried itself (its leaf partitions
//! are, see [`crate::partitions`]), so this matters on the target.

use anyhow::Result;
use tokio_postgres::GenericClient;

use crate::pg::{PgResultExt, QualifiedName};

/// `ONLY "s"."t"`, or `"s"."t"` when the table is partitioned.
pub fn own_rows(name: &QualifiedName, partitioned: bool) -> String {
    if partitioned {
        name.quoted()
    } else {
        format!("ONLY {}", name.quoted())
    }
}

/// Whether `name` is a partitioned table (relkind `p`) on the server `client`
/// reaches (a table that does not exist is not).
pub async fn is_partitioned(client: &impl GenericClient, name: &QualifiedName) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = to_regclass($1) AND relkind = 'p')",
            &[&name.quoted()],
        )
        .await
        .pg_context(|| format!("reading whether {name} is partitioned"))?
        .get(0))
}

/// [`own_rows`] of `name` as the server `client` reaches has it.
pub async fn own_rows_on(client: &impl GenericClient, name: &QualifiedName) -> Result<String> {
    Ok(own_rows(name, is_partitioned(client, name).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unless_partitioned() {
        let name = QualifiedName::new("public", "Order Items");
        assert_eq!(own_rows(&name, false), r#"ONLY "public"."Order Items""#);
        assert_eq!(own_rows(&name, true), r#""public"."Order Items""#);
    }
}
