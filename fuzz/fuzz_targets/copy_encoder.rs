//! Arbitrary rows through `CopyEncoder` in binary and text mode, decoded back:
//! binary output is the PGCOPY header, one field count and length-prefixed fields
//! per row, and the 0xFFFF trailer; text output has exactly one unescaped newline per
//! row, one unescaped tab between fields, `\N` for NULL, and every value unescapes to
//! its bytes. Taking the buffer in pieces (`take`) changes nothing.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walshuttle::stream::decoder::TupleValue;
use walshuttle::stream::values::CopyEncoder;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Reads rows from the input: per row a header byte (low 4 bits + 1 = columns;
/// bit 4: take the buffer before this row), then per column a tag byte (kind in the
/// low 2 bits, length in the rest) and that many bytes.
fn rows_from(mut data: &[u8]) -> Vec<(bool, Vec<TupleValue>)> {
    let mut rows = Vec::new();
    while let Some((&header, rest)) = data.split_first() {
        data = rest;
        let columns = usize::from(header & 0x0f) + 1;
        let take_before = header & 0x10 != 0;
        let mut values = Vec::with_capacity(columns);
        for _ in 0..columns {
            let Some((&tag, rest)) = data.split_first() else {
                break;
            };
            data = rest;
            let len = usize::from(tag >> 2).min(data.len());
            let (bytes, rest) = data.split_at(len);
            let bytes = Bytes::copy_from_slice(bytes);
            data = rest;
            values.push(match tag & 3 {
                0 => TupleValue::Null,
                1 => TupleValue::UnchangedToast,
                2 => TupleValue::Text(bytes),
                _ => TupleValue::Binary(bytes),
            });
        }
        if values.is_empty() {
            break;
        }
        rows.push((take_before, values));
    }
    rows
}

fn encode(binary: bool, rows: &[(bool, Vec<TupleValue>)], use_take: bool) -> Vec<u8> {
    let mut enc = CopyEncoder::new(binary);
    assert!(enc.is_empty());
    let mut out = Vec::new();
    for (n, (take_before, values)) in rows.iter().enumerate() {
        if use_take && *take_before {
            out.extend_from_slice(&enc.take());
            assert_eq!(enc.len(), 0, "take leaves nothing buffered");
        }
        enc.push_row(values.iter());
        assert_eq!(enc.rows(), n + 1);
        assert!(!enc.is_empty());
    }
    out.extend_from_slice(&enc.finish());
    out
}

fn be_i16(b: &[u8], at: &mut usize) -> i16 {
    let v = i16::from_be_bytes(b[*at..*at + 2].try_into().expect("2 bytes"));
    *at += 2;
    v
}

fn be_i32(b: &[u8], at: &mut usize) -> i32 {
    let v = i32::from_be_bytes(b[*at..*at + 4].try_into().expect("4 bytes"));
    *at += 4;
    v
}

fn check_binary(out: &[u8], rows: &[(bool, Vec<TupleValue>)]) {
    assert!(out.starts_with(SIGNATURE), "no PGCOPY signature");
    assert!(out.ends_with(&[0xff, 0xff]), "no 0xFFFF trailer");
    let mut at = SIGNATURE.len();
    assert_eq!(be_i32(out, &mut at), 0, "flags");
    assert_eq!(be_i32(out, &mut at), 0, "header extension length");
    for (_, values) in rows {
        assert_eq!(be_i16(out, &mut at) as usize, values.len(), "field count");
        for v in values {
            let len = be_i32(out, &mut at);
            match v {
                TupleValue::Null | TupleValue::UnchangedToast => assert_eq!(len, -1),
                TupleValue::Text(b) | TupleValue::Binary(b) => {
                    assert_eq!(len as usize, b.len(), "field length");
                    assert_eq!(&out[at..at + b.len()], &b[..], "field bytes");
                    at += b.len();
                }
            }
        }
    }
    assert_eq!(be_i16(out, &mut at), -1, "trailer");
    assert_eq!(at, out.len(), "bytes after the trailer");
}

fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' {
            let next = *field.get(i + 1).expect("a lone backslash ends a field");
            out.push(match next {
                b'\\' => b'\\',
                b't' => b'\t',
                b'n' => b'\n',
                b'r' => b'\r',
                other => panic!("unexpected escape \\{}", other as char),
            });
            i += 2;
        } else {
            assert!(
                !matches!(field[i], b'\t' | b'\n' | b'\r'),
                "raw special byte in a field"
            );
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

fn check_text(out: &[u8], rows: &[(bool, Vec<TupleValue>)]) {
    assert_eq!(
        out.iter().filter(|&&b| b == b'\n').count(),
        rows.len(),
        "one newline per row"
    );
    assert!(!out.contains(&b'\r'), "raw carriage return");
    if rows.is_empty() {
        assert!(out.is_empty());
        return;
    }
    assert_eq!(out.last(), Some(&b'\n'), "the data ends with a newline");
    let lines: Vec<&[u8]> = out[..out.len() - 1].split(|&b| b == b'\n').collect();
    assert_eq!(lines.len(), rows.len());
    for (line, (_, values)) in lines.iter().zip(rows) {
        assert_ne!(*line, b"\\.", "a row reads as the end-of-data marker");
        let fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
        assert_eq!(fields.len(), values.len(), "one tab between fields");
        for (field, v) in fields.iter().zip(values) {
            match v {
                TupleValue::Null | TupleValue::UnchangedToast => {
                    assert_eq!(*field, b"\\N", "NULL is \\N")
                }
                TupleValue::Text(b) | TupleValue::Binary(b) => {
                    assert_eq!(unescape(field), &b[..], "value round trip")
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let rows = rows_from(rest);
    let binary = mode & 1 == 1;
    let whole = encode(binary, &rows, false);
    let pieces = encode(binary, &rows, true);
    assert_eq!(whole, pieces, "take() changed the output");
    if binary {
        check_binary(&whole, &rows);
    } else {
        check_text(&whole, &rows);
    }
});
