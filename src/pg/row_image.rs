//! A row image as pgoutput sends it: one value per published column, each NULL,
//! an unchanged TOASTed value left out, or the value in text or binary form.
//!
//! Below the stream's stages (decoding makes them, the copy positions and apply
//! read them), so none of those imports another to name a row.

use bytes::Bytes;

/// One column's value in a row image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value that the source did not send.
    UnchangedToast,
    /// `t`: the value in PostgreSQL's text format.
    Text(Bytes),
    /// `b`: the value in the type's binary format.
    Binary(Bytes),
}

/// A row image: one value per published column, in the Relation's order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData {
    /// The column values.
    pub columns: Vec<TupleValue>,
}
