//! Column values from pgoutput passed to the target without re-encoding.
//!
//! pgoutput sends each value either as text (the type's output function) or, with
//! `binary 'true'`, in the type's binary send format. Both can go to the target as-is:
//! a binary value is exactly what a binary-format parameter or binary COPY field of the
//! same type expects, and a text value is exactly the binary form of a `text`
//! parameter, which SQL then casts (`$1::text::numeric`). So nothing here parses a
//! value; it only frames bytes.

use std::error::Error;

use bytes::{BufMut, Bytes, BytesMut};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

use super::decoder::TupleValue;

/// Oid of `text`, the parameter type of every value in text mode.
pub const TEXT_OID: u32 = 25;

/// One value as a statement parameter: NULL or bytes in the parameter type's binary
/// format. Accepts any parameter type, because the statement's casts decide it.
#[derive(Debug, Clone)]
pub struct RawValue(pub Option<Bytes>);

impl RawValue {
    /// The parameter for a tuple value; `None` for an unchanged TOAST value, which
    /// must not be written at all.
    pub fn from_tuple(value: &TupleValue) -> Option<RawValue> {
        match value {
            TupleValue::Null => Some(RawValue(None)),
            TupleValue::Text(b) | TupleValue::Binary(b) => Some(RawValue(Some(b.clone()))),
            TupleValue::UnchangedToast => None,
        }
    }
}

impl ToSql for RawValue {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match &self.0 {
            None => Ok(IsNull::Yes),
            Some(bytes) => {
                out.extend_from_slice(bytes);
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A one-dimensional array parameter built from raw element values, in PostgreSQL's
/// binary array format, for set-based statements (`unnest($1::bigint[])`).
#[derive(Debug, Clone)]
pub struct RawArray {
    /// Element type oid, as the server expects it in the array header.
    pub element_oid: u32,
    /// Elements in the element type's binary format; `None` is NULL.
    pub elements: Vec<Option<Bytes>>,
}

impl ToSql for RawArray {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        let has_nulls = self.elements.iter().any(|e| e.is_none());
        out.put_i32(1);
        out.put_i32(i32::from(has_nulls));
        out.put_u32(self.element_oid);
        out.put_i32(i32::try_from(self.elements.len())?);
        out.put_i32(1);
        for e in &self.elements {
            match e {
                None => out.put_i32(-1),
                Some(b) => {
                    out.put_i32(i32::try_from(b.len())?);
                    out.extend_from_slice(b);
                }
            }
        }
        Ok(IsNull::No)
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Builds COPY data for a run of inserted rows.
pub struct CopyEncoder {
    binary: bool,
    buf: BytesMut,
    rows: usize,
}

impl CopyEncoder {
    /// Starts COPY data in binary format (values are binary) or text format.
    pub fn new(binary: bool) -> Self {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        if binary {
            buf.put_slice(b"PGCOPY\n\xff\r\n\0");
            buf.put_i32(0);
            buf.put_i32(0);
        }
        CopyEncoder {
            binary,
            buf,
            rows: 0,
        }
    }

    /// Appends one row. Unchanged TOAST values cannot occur in inserted rows; one is
    /// written as NULL rather than failing, and the caller never passes them.
    pub fn push_row<'a>(&mut self, values: impl ExactSizeIterator<Item = &'a TupleValue>) {
        self.rows += 1;
        if self.binary {
            self.buf.put_i16(values.len() as i16);
            for v in values {
                match v {
                    TupleValue::Text(b) | TupleValue::Binary(b) => {
                        self.buf.put_i32(b.len() as i32);
                        self.buf.put_slice(b);
                    }
                    TupleValue::Null | TupleValue::UnchangedToast => self.buf.put_i32(-1),
                }
            }
        } else {
            for (i, v) in values.enumerate() {
                if i > 0 {
                    self.buf.put_u8(b'\t');
                }
                match v {
                    TupleValue::Text(b) | TupleValue::Binary(b) => {
                        escape_copy_text(b, &mut self.buf)
                    }
                    TupleValue::Null | TupleValue::UnchangedToast => self.buf.put_slice(b"\\N"),
                }
            }
            self.buf.put_u8(b'\n');
        }
    }

    /// Rows appended so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes buffered so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing but the header was written.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Takes the bytes buffered so far (to send while encoding continues).
    pub fn take(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    /// Ends the data (binary trailer) and returns what is left to send.
    pub fn finish(mut self) -> Bytes {
        if self.binary {
            self.buf.put_i16(-1);
        }
        self.buf.freeze()
    }
}

/// COPY text format escaping: backslash, tab, newline and carriage return.
fn escape_copy_text(value: &[u8], out: &mut BytesMut) {
    let mut start = 0;
    for (i, &b) in value.iter().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.put_slice(&value[start..i]);
        out.put_slice(esc);
        start = i + 1;
    }
    out.put_slice(&value[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_copy_escapes_specials_and_nulls() {
        let mut enc = CopyEncoder::new(false);
        let row = [
            TupleValue::Text(Bytes::from_static(b"a\tb\\c\nd\re")),
            TupleValue::Null,
            TupleValue::Text(Bytes::from_static(b"plain")),
        ];
        enc.push_row(row.iter());
        assert_eq!(&enc.finish()[..], b"a\\tb\\\\c\\nd\\re\t\\N\tplain\n");
    }

    #[test]
    fn binary_copy_frames_rows() {
        let mut enc = CopyEncoder::new(true);
        let row = [
            TupleValue::Binary(Bytes::from_static(&[0, 0, 0, 7])),
            TupleValue::Null,
        ];
        enc.push_row(row.iter());
        let data = enc.finish();
        assert!(data.starts_with(b"PGCOPY\n\xff\r\n\0"));
        let body = &data[19..];
        assert_eq!(
            body,
            &[0, 2, 0, 0, 0, 4, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn arrays_encode_header_and_nulls() {
        let arr = RawArray {
            element_oid: TEXT_OID,
            elements: vec![Some(Bytes::from_static(b"x")), None],
        };
        let mut out = BytesMut::new();
        arr.to_sql(&Type::TEXT_ARRAY, &mut out).unwrap();
        assert_eq!(
            &out[..],
            &[
                0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 25, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1, b'x',
                0xff, 0xff, 0xff, 0xff
            ]
        );
    }
}
