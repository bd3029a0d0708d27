//! Decodes pgoutput TupleData, the row images inside Insert, Update and Delete
//! messages, kept apart from the message decoder because rows are where the
//! bytes (and the zero-copy care) are.

use crate::pg::{TupleData, TupleValue};

use super::{DecodeError, Reader};

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
