//! Unit tests for the pgoutput decoder, on buffers built by hand.

use bytes::{BufMut, Bytes, BytesMut};

use super::*;

/// Builds a pgoutput message field by field.
struct Msg(BytesMut);

impl Msg {
    fn new(tag: u8) -> Self {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        Msg(b)
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.put_u8(v);
        self
    }
    fn i16(mut self, v: i16) -> Self {
        self.0.put_i16(v);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.put_u32(v);
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.put_i32(v);
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.put_u64(v);
        self
    }
    fn i64(mut self, v: i64) -> Self {
        self.0.put_i64(v);
        self
    }
    fn cstr(mut self, s: &str) -> Self {
        self.0.put_slice(s.as_bytes());
        self.0.put_u8(0);
        self
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.put_slice(b);
        self
    }
    /// Appends TupleData for the given values.
    fn tuple(mut self, cols: &[TupleValue]) -> Self {
        self.0.put_i16(i16::try_from(cols.len()).unwrap());
        for col in cols {
            match col {
                TupleValue::Null => self.0.put_u8(b'n'),
                TupleValue::UnchangedToast => self.0.put_u8(b'u'),
                TupleValue::Text(v) | TupleValue::Binary(v) => {
                    let kind = if matches!(col, TupleValue::Text(_)) {
                        b't'
                    } else {
                        b'b'
                    };
                    self.0.put_u8(kind);
                    self.0.put_u32(u32::try_from(v.len()).unwrap());
                    self.0.put_slice(v);
                }
            }
        }
        self
    }
    fn build(self) -> Bytes {
        self.0.freeze()
    }
}

fn text(s: &str) -> TupleValue {
    TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn row(cols: &[TupleValue]) -> TupleData {
    TupleData {
        columns: cols.to_vec(),
    }
}

/// Decodes `buf`, and checks that every strict prefix of it, and it with a
/// byte appended, is an error rather than a panic or a different message.
fn decode_strict(buf: &Bytes, in_stream: bool) -> LogicalMessage {
    for len in 0..buf.len() {
        let prefix = buf.slice(..len);
        if let Ok(msg) = decode_bytes(&prefix, in_stream) {
            panic!("prefix of {len} bytes decoded as {msg:?}");
        }
    }
    let mut longer = BytesMut::from(&buf[..]);
    longer.put_u8(0);
    assert!(
        decode(&longer, in_stream).is_err(),
        "trailing byte accepted"
    );
    let msg = decode_bytes(buf, in_stream).expect("valid message");
    assert_eq!(
        decode(buf, in_stream).as_ref(),
        Ok(&msg),
        "decode and decode_bytes differ"
    );
    msg
}

#[test]
fn begin() {
    let buf = Msg::new(b'B')
        .u64(0x16_B374_D848)
        .i64(1_234_567)
        .u32(771)
        .build();
    let want = Begin {
        final_lsn: Lsn(0x16_B374_D848),
        commit_time: PgTimestamp(1_234_567),
        xid: 771,
    };
    assert_eq!(
        decode_strict(&buf, false),
        LogicalMessage::Begin(want.clone())
    );
    // The stream flag does not change messages that never carry a streamed xid.
    assert_eq!(decode(&buf, true), Ok(LogicalMessage::Begin(want)));
}

#[test]
fn commit() {
    let buf = Msg::new(b'C').u8(0).u64(100).u64(108).i64(-5).build();
    let want = Commit {
        flags: 0,
        commit_lsn: Lsn(100),
        end_lsn: Lsn(108),
        commit_time: PgTimestamp(-5),
    };
    assert_eq!(decode_strict(&buf, false), LogicalMessage::Commit(want));
}

#[test]
fn origin() {
    let buf = Msg::new(b'O').u64(42).cstr("node_a").build();
    let want = Origin {
        commit_lsn: Lsn(42),
        name: "node_a".into(),
    };
    assert_eq!(decode_strict(&buf, false), LogicalMessage::Origin(want));
}

fn relation_body(m: Msg) -> Msg {
    m.u32(16384)
        .cstr("public")
        .cstr("accounts")
        .u8(b'd')
        .i16(2)
        .u8(1)
        .cstr("id")
        .u32(20)
        .i32(-1)
        .u8(0)
        .cstr("name")
        .u32(1043)
        .i32(68)
}

fn accounts(xid: Option<u32>) -> Relation {
    Relation {
        xid,
        oid: 16384,
        namespace: "public".into(),
        name: "accounts".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            RelationColumn {
                is_key: true,
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
            },
            RelationColumn {
                is_key: false,
                name: "name".into(),
                type_oid: 1043,
                type_modifier: 68,
            },
        ],
    }
}

#[test]
fn relation() {
    let buf = relation_body(Msg::new(b'R')).build();
    assert_eq!(
        decode_strict(&buf, false),
        LogicalMessage::Relation(accounts(None))
    );
}

#[test]
fn relation_in_stream_carries_xid() {
    let buf = relation_body(Msg::new(b'R').u32(900)).build();
    assert_eq!(
        decode_strict(&buf, true),
        LogicalMessage::Relation(accounts(Some(900)))
    );
}

#[test]
fn relation_replica_identities_and_empty_namespace() {
    for (byte, want) in [
        (b'd', ReplicaIdentity::Default),
        (b'n', ReplicaIdentity::Nothing),
        (b'f', ReplicaIdentity::Full),
        (b'i', ReplicaIdentity::Index),
    ] {
        let buf = Msg::new(b'R')
            .u32(1)
            .cstr("")
            .cstr("pg_x")
            .u8(byte)
            .i16(0)
            .build();
        let LogicalMessage::Relation(rel) = decode_strict(&buf, false) else {
            panic!()
        };
        assert_eq!(rel.replica_identity, want);
        assert_eq!(rel.namespace, "pg_catalog");
        assert!(rel.columns.is_empty());
    }
    let buf = Msg::new(b'R')
        .u32(1)
        .cstr("s")
        .cstr("t")
        .u8(b'x')
        .i16(0)
        .build();
    assert_eq!(
        decode(&buf, false),
        Err(DecodeError::UnknownReplicaIdentity(b'x'))
    );
}

#[test]
fn relation_rejects_negative_and_huge_column_counts() {
    let buf = Msg::new(b'R')
        .u32(1)
        .cstr("s")
        .cstr("t")
        .u8(b'd')
        .i16(-1)
        .build();
    assert!(matches!(
        decode(&buf, false),
        Err(DecodeError::NegativeCount { count: -1, .. })
    ));
    let buf = Msg::new(b'R')
        .u32(1)
        .cstr("s")
        .cstr("t")
        .u8(b'd')
        .i16(i16::MAX)
        .build();
    assert!(matches!(
        decode(&buf, false),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn type_message() {
    let want = |xid| TypeMessage {
        xid,
        oid: 70000,
        namespace: "public".into(),
        name: "mood".into(),
    };
    let buf = Msg::new(b'Y')
        .u32(70000)
        .cstr("public")
        .cstr("mood")
        .build();
    assert_eq!(decode_strict(&buf, false), LogicalMessage::Type(want(None)));
    let buf = Msg::new(b'Y')
        .u32(5)
        .u32(70000)
        .cstr("public")
        .cstr("mood")
        .build();
    assert_eq!(
        decode_strict(&buf, true),
        LogicalMessage::Type(want(Some(5)))
    );
    let buf = Msg::new(b'Y').u32(70000).cstr("").cstr("int4").build();
    let LogicalMessage::Type(ty) = decode_strict(&buf, false) else {
        panic!()
    };
    assert_eq!(ty.namespace, "pg_catalog");
}

#[test]
fn insert_with_every_tuple_kind() {
    let cols = [
        TupleValue::Null,
        TupleValue::UnchangedToast,
        text("hello"),
        TupleValue::Binary(Bytes::from_static(&[0, 1, 255])),
        text(""),
    ];
    let buf = Msg::new(b'I').u32(16384).u8(b'N').tuple(&cols).build();
    let want = Insert {
        xid: None,
        relation_oid: 16384,
        new: row(&cols),
    };
    assert_eq!(decode_strict(&buf, false), LogicalMessage::Insert(want));
}

#[test]
fn insert_in_stream_carries_xid() {
    let buf = Msg::new(b'I')
        .u32(77)
        .u32(16384)
        .u8(b'N')
        .tuple(&[text("1")])
        .build();
    let want = Insert {
        xid: Some(77),
        relation_oid: 16384,
        new: row(&[text("1")]),
    };
    assert_eq!(decode_strict(&buf, true), LogicalMessage::Insert(want));
}

#[test]
fn insert_with_no_columns() {
    let buf = Msg::new(b'I').u32(1).u8(b'N').tuple(&[]).build();
    let want = Insert {
        xid: None,
        relation_oid: 1,
        new: TupleData::default(),
    };
    assert_eq!(decode_strict(&buf, false), LogicalMessage::Insert(want));
}

#[test]
fn column_values_are_zero_copy_slices() {
    let buf = Msg::new(b'I')
        .u32(1)
        .u8(b'N')
        .tuple(&[text("abcdef")])
        .build();
    let LogicalMessage::Insert(insert) = decode_bytes(&buf, false).unwrap() else {
        panic!()
    };
    let TupleValue::Text(value) = &insert.new.columns[0] else {
        panic!()
    };
    assert_eq!(&value[..], b"abcdef");
    let start = buf.as_ptr() as usize;
    let at = value.as_ptr() as usize;
    assert!(
        at >= start && at < start + buf.len(),
        "value was copied out of the message"
    );
}

#[test]
fn tuple_errors() {
    let buf = Msg::new(b'I').u32(1).u8(b'N').i16(1).u8(b'z').build();
    assert_eq!(
        decode(&buf, false),
        Err(DecodeError::UnknownTupleKind(b'z'))
    );
    let buf = Msg::new(b'I').u32(1).u8(b'X').tuple(&[]).build();
    assert!(matches!(
        decode(&buf, false),
        Err(DecodeError::UnexpectedMarker { found: b'X', .. })
    ));
    let buf = Msg::new(b'I').u32(1).u8(b'N').i16(-3).build();
    assert!(matches!(
        decode(&buf, false),
        Err(DecodeError::NegativeCount { count: -3, .. })
    ));
    // A length far beyond the message, in both value kinds.
    for kind in [b't', b'b'] {
        let buf = Msg::new(b'I')
            .u32(1)
            .u8(b'N')
            .i16(1)
            .u8(kind)
            .u32(u32::MAX)
            .raw(b"ab")
            .build();
        assert!(matches!(
            decode(&buf, false),
            Err(DecodeError::Truncated { .. })
        ));
    }
    // Many columns announced, few present.
    let buf = Msg::new(b'I')
        .u32(1)
        .u8(b'N')
        .i16(i16::MAX)
        .u8(b'n')
        .build();
    assert!(matches!(
        decode(&buf, false),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn update_without_old_tuple() {
    let buf = Msg::new(b'U').u32(9).u8(b'N').tuple(&[text("2")]).build();
    let want = Update {
        xid: None,
        relation_oid: 9,
        old: None,
        new: row(&[text("2")]),
    };
    assert_eq!(decode_strict(&buf, false), LogicalMessage::Update(want));
}

#[test]
fn update_with_key_and_full_old_tuple() {
    let old = [text("1"), TupleValue::Null];
    let new = [text("2"), TupleValue::UnchangedToast];
    for (marker, wrap) in [
        (b'K', OldTuple::Key as fn(TupleData) -> OldTuple),
        (b'O', OldTuple::Full as fn(TupleData) -> OldTuple),
    ] {
        let buf = Msg::new(b'U')
            .u32(9)
            .u8(marker)
            .tuple(&old)
            .u8(b'N')
            .tuple(&new)
            .build();
        let want = Update {
            xid: None,
            relation_oid: 9,
            old: Some(wrap(row(&old))),
            new: row(&new),
        };
        let got = decode_strict(&buf, false);
        assert_eq!(got, LogicalMessage::Update(want));
        let LogicalMessage::Update(update) = got else {
            panic!()
        };
        assert_eq!(update.old.unwrap().tuple(), &row(&old));
    }
}

#[test]
fn update_in_stream_and_bad_markers() {
    let buf = Msg::new(b'U')
        .u32(31)
        .u32(9)
        .u8(b'K')
        .tuple(&[text("1")])
        .u8(b'N')
        .tuple(&[])
        .build();
    let want = Update {
        xid: Some(31),
        relation_oid: 9,
        old: Some(OldTuple::Key(row(&[text("1")]))),
        new: TupleData::default(),
    };
    assert_eq!(decode_strict(&buf, true), LogicalMessage::Update(want));

    let buf = Msg::new(b'U').u32(9).u8(b'Q').tuple(&[]).build();
    assert!(matches!(
        decode(&buf, false),
        Err(DecodeError::UnexpectedMarker { found: b'Q', .. })
    ));
    let buf = Msg::new(b'U')
        .u32(9)
        .u8(b'K')
        .tuple(&[])
        .u8(b'K')
        .tuple(&[])
        .build();
    assert!(matches!(
        decode(&buf, false),
        Err(DecodeError::UnexpectedMarker { found: b'K', .. })
    ));
}

#[test]
fn delete_with_key_and_full() {
    let buf = Msg::new(b'D').u32(9).u8(b'K').tuple(&[text("1")]).build();
    let want = Delete {
        xid: None,
        relation_oid: 9,
        old: OldTuple::Key(row(&[text("1")])),
    };
    assert_eq!(decode_strict(&buf, false), LogicalMessage::Delete(want));

    let buf = Msg::new(b'D')
        .u32(4)
        .u32(9)
        .u8(b'O')
        .tuple(&[text("1"), text("x")])
        .build();
    let want = Delete {
        xid: Some(4),
        relation_oid: 9,
        old: OldTuple::Full(row(&[text("1"), text("x")])),
    };
    assert_eq!(decode_strict(&buf, true), LogicalMessage::Delete(want));

    let buf = Msg::new(b'D').u32(9).u8(b'N').tuple(&[]).build();
    assert!(matches!(
        decode(&buf, false),
        Err(DecodeError::UnexpectedMarker { found: b'N', .. })
    ));
}

mod more_messages;
