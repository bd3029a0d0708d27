//! Changes of a table being copied while the pipeline streams, held on the target
//! until its copy is in.
//!
//! `walshuttle tables add|resync` copies a table under its own snapshot while every
//! other table keeps streaming. Meanwhile the stream cannot apply the table's changes
//! (the copy is not there yet, or is about to replace the rows) and cannot drop them
//! (those the snapshot will not see must be applied after it), so it writes them to
//! `walshuttle.held_changes` in the same target transaction as the rest of the source
//! transaction, which keeps them exactly-once across crashes. Once the copy has
//! committed with its copy position, the held changes are applied in commit order,
//! through the position (skipping what the copy's snapshot saw), and the table joins
//! the stream.
//!
//! A change is held as pgoutput encodes it (an Insert, Update or Delete message
//! outside a streamed block), so applying it again goes through the same decoder.

use bytes::{BufMut, Bytes, BytesMut};

use super::apply::Op;
use super::decoder::{OldTuple, TupleData, TupleValue};

fn put_tuple(out: &mut BytesMut, tuple: &TupleData) {
    out.put_i16(tuple.columns.len() as i16);
    for v in &tuple.columns {
        match v {
            TupleValue::Null => out.put_u8(b'n'),
            TupleValue::UnchangedToast => out.put_u8(b'u'),
            TupleValue::Text(b) => {
                out.put_u8(b't');
                out.put_u32(b.len() as u32);
                out.put_slice(b);
            }
            TupleValue::Binary(b) => {
                out.put_u8(b'b');
                out.put_u32(b.len() as u32);
                out.put_slice(b);
            }
        }
    }
}

fn put_old(out: &mut BytesMut, old: &OldTuple) {
    match old {
        OldTuple::Key(t) => {
            out.put_u8(b'K');
            put_tuple(out, t);
        }
        OldTuple::Full(t) => {
            out.put_u8(b'O');
            put_tuple(out, t);
        }
    }
}

/// Encodes a change as the pgoutput message it came as (outside a streamed block).
pub fn encode(op: &Op) -> Bytes {
    let mut out = BytesMut::with_capacity(op.approx_bytes());
    match op {
        Op::Insert { rel, new } => {
            out.put_u8(b'I');
            out.put_u32(*rel);
            out.put_u8(b'N');
            put_tuple(&mut out, new);
        }
        Op::Update { rel, old, new } => {
            out.put_u8(b'U');
            out.put_u32(*rel);
            if let Some(old) = old {
                put_old(&mut out, old);
            }
            out.put_u8(b'N');
            put_tuple(&mut out, new);
        }
        Op::Delete { rel, old } => {
            out.put_u8(b'D');
            out.put_u32(*rel);
            put_old(&mut out, old);
        }
    }
    out.freeze()
}

/// Encodes the TRUNCATE of one table as the pgoutput message it came as (outside a
/// streamed block).
pub fn encode_truncate(rel: u32, restart_identity: bool) -> Bytes {
    let mut out = BytesMut::with_capacity(10);
    out.put_u8(b'T');
    out.put_u32(1);
    out.put_u8(if restart_identity { 2 } else { 0 });
    out.put_u32(rel);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::decoder::{decode_bytes, LogicalMessage};

    fn tuple(values: &[TupleValue]) -> TupleData {
        TupleData {
            columns: values.to_vec(),
        }
    }

    #[test]
    fn held_changes_decode_back_to_what_was_held() {
        let t = tuple(&[
            TupleValue::Binary(Bytes::from_static(&[0, 0, 0, 7])),
            TupleValue::Null,
            TupleValue::UnchangedToast,
            TupleValue::Text(Bytes::from_static(b"x\ty")),
        ]);
        let ops = [
            Op::Insert {
                rel: 42,
                new: t.clone(),
            },
            Op::Update {
                rel: 42,
                old: Some(OldTuple::Key(t.clone())),
                new: t.clone(),
            },
            Op::Update {
                rel: 42,
                old: None,
                new: t.clone(),
            },
            Op::Delete {
                rel: 42,
                old: OldTuple::Full(t.clone()),
            },
        ];
        for op in ops {
            let back = decode_bytes(&encode(&op), false).expect("decodes");
            match (&op, back) {
                (Op::Insert { rel, new }, LogicalMessage::Insert(m)) => {
                    assert_eq!((*rel, new), (m.relation_oid, &m.new));
                }
                (Op::Update { rel, old, new }, LogicalMessage::Update(m)) => {
                    assert_eq!((*rel, old, new), (m.relation_oid, &m.old, &m.new));
                }
                (Op::Delete { rel, old }, LogicalMessage::Delete(m)) => {
                    assert_eq!((*rel, old), (m.relation_oid, &m.old));
                }
                (op, other) => panic!("{op:?} came back as {other:?}"),
            }
        }
        match decode_bytes(&encode_truncate(42, true), false).expect("decodes") {
            LogicalMessage::Truncate(t) => {
                assert_eq!(t.relation_oids, vec![42]);
                assert!(t.restart_identity && !t.cascade);
            }
            other => panic!("a truncate came back as {other:?}"),
        }
    }
}
