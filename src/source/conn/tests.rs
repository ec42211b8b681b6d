//! Tests of the replication connection's pure parts: error responses and data rows.
use super::*;

#[test]
fn error_response_keeps_code_and_message_only() {
    let mut b = BytesMut::new();
    for (f, v) in [
        (b'S', "ERROR"),
        (b'C', "42704"),
        (b'M', "slot missing"),
        (b'D', "Alice"),
    ] {
        b.extend_from_slice(&[f]);
        b.extend_from_slice(v.as_bytes());
        b.extend_from_slice(&[0]);
    }
    b.extend_from_slice(&[0]);
    let e = server_error(&b.freeze());
    assert_eq!(e.code(), Some("42704"));
    assert!(e.to_string().contains("slot missing"));
    assert!(!e.to_string().contains("Alice"));
}

#[test]
fn error_messages_that_may_quote_data_are_withheld() {
    let mut b = BytesMut::new();
    for (f, v) in [
        (b'C', "22P05"),
        (
            b'M',
            "character with byte sequence 0x41 0x6c in encoding \"UTF8\" has no equivalent",
        ),
    ] {
        b.extend_from_slice(&[f]);
        b.extend_from_slice(v.as_bytes());
        b.extend_from_slice(&[0]);
    }
    b.extend_from_slice(&[0]);
    let e = server_error(&b.freeze()).to_string();
    assert!(e.contains("22P05") && e.contains("withheld"), "{e}");
    assert!(!e.contains("0x41"), "{e}");
}

#[test]
fn data_row_parsing() {
    let mut b = BytesMut::new();
    b.extend_from_slice(&2i16.to_be_bytes());
    b.extend_from_slice(&2i32.to_be_bytes());
    b.extend_from_slice(b"hi");
    b.extend_from_slice(&(-1i32).to_be_bytes());
    assert_eq!(
        parse_data_row(b.freeze()).unwrap(),
        vec![Some("hi".into()), None]
    );
    assert!(parse_data_row(Bytes::from_static(&[0, 1, 0, 0, 0, 9])).is_err());
}
