//! Decodes pgoutput TupleData, the row images inside Insert, Update and Delete
//! messages, kept apart from the message decoder because rows are where the
//! bytes (and the zero-copy care) are.

use bytes::Bytes;

use super::{DecodeError, Reader};

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

impl TupleData {
    /// Reads an `i16` column count and that many columns.
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<TupleData, DecodeError> {
        let count = r.count("tuple column")?;
        // Every column takes at least its kind byte.
        let mut columns = Vec::with_capacity(count.min(r.remaining()));
        for _ in 0..count {
            let value = match r.u8("tuple column kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => {
                    let len = r.u32("text column length")?;
                    TupleValue::Text(r.bytes(len, "text column value")?)
                }
                b'b' => {
                    let len = r.u32("binary column length")?;
                    TupleValue::Binary(r.bytes(len, "binary column value")?)
                }
                other => return Err(DecodeError::UnknownTupleKind(other)),
            };
            columns.push(value);
        }
        Ok(TupleData { columns })
    }
}
