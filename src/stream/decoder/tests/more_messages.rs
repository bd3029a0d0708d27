//! Unit tests of the decoder, continued: truncate, logical messages, streaming
//! and two-phase messages, garbage, and mutated messages.

use super::*;

#[test]
fn truncate() {
    let buf = Msg::new(b'T').u32(2).u8(3).u32(16384).u32(16390).build();
    let want = Truncate {
        xid: None,
        cascade: true,
        restart_identity: true,
        relation_oids: vec![16384, 16390],
    };
    assert_eq!(decode_strict(&buf, false), LogicalMessage::Truncate(want));

    let buf = Msg::new(b'T').u32(8).u32(1).u8(0).u32(16384).build();
    let want = Truncate {
        xid: Some(8),
        cascade: false,
        restart_identity: false,
        relation_oids: vec![16384],
    };
    assert_eq!(decode_strict(&buf, true), LogicalMessage::Truncate(want));

    let buf = Msg::new(b'T').u32(1).u8(2).u32(5).build();
    let LogicalMessage::Truncate(t) = decode_strict(&buf, false) else {
        panic!()
    };
    assert!(!t.cascade && t.restart_identity);

    // A count of four billion relations must fail, not allocate.
    let buf = Msg::new(b'T').u32(u32::MAX).u8(0).u32(1).build();
    assert!(matches!(
        decode(&buf, false),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn logical_decoding_message() {
    let buf = Msg::new(b'M')
        .u8(1)
        .u64(500)
        .cstr("walshuttle")
        .u32(3)
        .raw(b"hey")
        .build();
    let want = LogicalDecodingMessage {
        xid: None,
        transactional: true,
        lsn: Lsn(500),
        prefix: "walshuttle".into(),
        content: Bytes::from_static(b"hey"),
    };
    assert_eq!(decode_strict(&buf, false), LogicalMessage::Message(want));

    let buf = Msg::new(b'M')
        .u32(12)
        .u8(0)
        .u64(500)
        .cstr("p")
        .u32(0)
        .build();
    let want = LogicalDecodingMessage {
        xid: Some(12),
        transactional: false,
        lsn: Lsn(500),
        prefix: "p".into(),
        content: Bytes::new(),
    };
    assert_eq!(decode_strict(&buf, true), LogicalMessage::Message(want));
}

#[test]
fn stream_start_and_stop() {
    for (flag, first_segment) in [(1, true), (0, false)] {
        let buf = Msg::new(b'S').u32(600).u8(flag).build();
        let want = StreamStart {
            xid: 600,
            first_segment,
        };
        assert_eq!(
            decode_strict(&buf, false),
            LogicalMessage::StreamStart(want)
        );
    }
    let buf = Msg::new(b'E').build();
    assert_eq!(decode_strict(&buf, true), LogicalMessage::StreamStop);
}

#[test]
fn stream_commit() {
    let buf = Msg::new(b'c')
        .u32(600)
        .u8(0)
        .u64(1000)
        .u64(1040)
        .i64(99)
        .build();
    let want = StreamCommit {
        xid: 600,
        flags: 0,
        commit_lsn: Lsn(1000),
        end_lsn: Lsn(1040),
        commit_time: PgTimestamp(99),
    };
    assert_eq!(
        decode_strict(&buf, false),
        LogicalMessage::StreamCommit(want)
    );
}

#[test]
fn stream_abort_without_and_with_protocol_4_fields() {
    let short = Msg::new(b'A').u32(600).u32(601).build();
    let want = StreamAbort {
        xid: 600,
        subxid: 601,
        abort_lsn: None,
        abort_time: None,
    };
    assert_eq!(
        decode_strict(&short, false),
        LogicalMessage::StreamAbort(want.clone())
    );

    let long = Msg::new(b'A').u32(600).u32(601).u64(2000).i64(7).build();
    // The protocol-1..3 form is a valid prefix of the protocol-4 form, so
    // check the other prefixes by hand.
    for len in (0..long.len()).filter(|&len| len != short.len()) {
        assert!(decode(&long[..len], false).is_err(), "prefix {len}");
    }
    let want4 = StreamAbort {
        abort_lsn: Some(Lsn(2000)),
        abort_time: Some(PgTimestamp(7)),
        ..want
    };
    assert_eq!(decode(&long, false), Ok(LogicalMessage::StreamAbort(want4)));
    let mut longer = BytesMut::from(&long[..]);
    longer.put_u8(0);
    assert!(matches!(
        decode(&longer, false),
        Err(DecodeError::TrailingBytes { count: 1, .. })
    ));
}

#[test]
fn two_phase_messages_are_unsupported() {
    for tag in [b'b', b'P', b'K', b'r', b'p'] {
        let buf = Msg::new(tag)
            .u64(1)
            .u64(2)
            .i64(3)
            .u32(4)
            .cstr("gid")
            .build();
        assert_eq!(
            decode(&buf, false),
            Err(DecodeError::UnsupportedMessage(tag))
        );
    }
}

#[test]
fn garbage_is_rejected() {
    assert_eq!(
        decode(&[], false),
        Err(DecodeError::Truncated {
            what: "message tag"
        })
    );
    assert_eq!(decode(b"Z", false), Err(DecodeError::UnknownMessage(b'Z')));
    assert_eq!(decode(&[0], true), Err(DecodeError::UnknownMessage(0)));
    // Unterminated and non-UTF-8 strings.
    let buf = Msg::new(b'O').u64(1).raw(b"no-nul").build();
    assert!(matches!(
        decode(&buf, false),
        Err(DecodeError::Truncated { .. })
    ));
    let buf = Msg::new(b'O').u64(1).raw(&[0xff, 0xfe, 0]).build();
    assert_eq!(
        decode(&buf, false),
        Err(DecodeError::InvalidUtf8 {
            what: "Origin name"
        })
    );
    // A streamed insert decoded as if outside a stream misreads the xid as the
    // relation OID and then fails on the marker.
    let buf = Msg::new(b'I')
        .u32(77)
        .u32(16384)
        .u8(b'N')
        .tuple(&[])
        .build();
    assert!(decode(&buf, false).is_err());
}

#[test]
fn errors_say_what_was_malformed() {
    let buf = Msg::new(b'B').u64(1).build();
    let err = decode(&buf, false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pgoutput message truncated: ended before Begin commit timestamp"
    );
    assert_eq!(
        DecodeError::UnknownMessage(b'Z').to_string(),
        "unknown pgoutput message tag 'Z' (0x5a)"
    );
    assert_eq!(
        DecodeError::UnknownTupleKind(7).to_string(),
        "unknown tuple column kind 0x07"
    );
    let err = decode(&Msg::new(b'E').u8(1).build(), false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "1 unexpected trailing byte(s) after Stream Stop message"
    );
}

#[test]
fn timestamps_convert_and_saturate() {
    let epoch = PgTimestamp(0).to_system_time();
    assert_eq!(
        epoch.duration_since(UNIX_EPOCH).unwrap(),
        Duration::from_secs(946_684_800)
    );
    let later = PgTimestamp(1_500_000).to_system_time();
    assert_eq!(
        later.duration_since(epoch).unwrap(),
        Duration::from_micros(1_500_000)
    );
    let before_unix = PgTimestamp(-946_684_800_000_000 - 1).to_system_time();
    assert_eq!(
        UNIX_EPOCH.duration_since(before_unix).unwrap(),
        Duration::from_micros(1)
    );
    assert_eq!(PgTimestamp(i64::MAX).unix_micros(), i64::MAX);
    // PostgreSQL's +/-infinity must not panic.
    assert!(PgTimestamp(i64::MAX).to_system_time() > later);
    assert!(PgTimestamp(i64::MIN).to_system_time() < epoch);
}

/// Mutates valid messages at random and checks decoding never panics.
#[test]
fn mutated_messages_never_panic() {
    let seeds = [
        Msg::new(b'B').u64(1).i64(2).u32(3).build(),
        relation_body(Msg::new(b'R').u32(1)).build(),
        Msg::new(b'U')
            .u32(9)
            .u8(b'O')
            .tuple(&[text("1"), TupleValue::Null])
            .u8(b'N')
            .tuple(&[text("22")])
            .build(),
        Msg::new(b'T').u32(2).u8(3).u32(1).u32(2).build(),
        Msg::new(b'M')
            .u8(1)
            .u64(500)
            .cstr("p")
            .u32(3)
            .raw(b"hey")
            .build(),
        Msg::new(b'A').u32(1).u32(2).u64(3).i64(4).build(),
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for seed in &seeds {
        for _ in 0..2000 {
            let mut buf = seed.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % buf.len() as u64) as usize;
                match next() % 3 {
                    0 => buf[at] = next() as u8,
                    1 => buf.truncate(at),
                    _ => buf.insert(at, next() as u8),
                }
                if buf.is_empty() {
                    break;
                }
            }
            let _ = decode(&buf, next() % 2 == 0);
        }
    }
}
