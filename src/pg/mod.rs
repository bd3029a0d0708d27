//! Everything that talks to a PostgreSQL server at the wire level: ordinary
//! connections, the replication client, WAL positions and identifier quoting.

pub mod connect;
pub mod ident;
pub mod lsn;
pub mod replication;
pub mod row_image;
pub mod session_settings;
pub mod snapshot_view;
pub mod tls;

pub use connect::{connect, PgResultExt};
pub use ident::{quote_ident, quote_literal, QualifiedName};
pub use lsn::Lsn;
pub use row_image::{TupleData, TupleValue};
pub use snapshot_view::SnapshotView;
