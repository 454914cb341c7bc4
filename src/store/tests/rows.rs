//! The column codec: every bound holds on the way in and on the way out,
//! and the canonical selector key.

use std::time::{Duration, UNIX_EPOCH};

use rusqlite::types::ValueRef;

use crate::store::rows::*;

fn list(n: usize, len: usize) -> Vec<String> {
    (0..n).map(|i| format!("{i:0len$}")).collect()
}

#[test]
fn selector_key_ignores_order_and_repeats_but_not_content() {
    let key = |s: &[&str]| selector_key(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(key(&["b", "a", "a"]), key(&["a", "b"]));
    assert_eq!(key(&["a", "b"]), r#"["a","b"]"#);
    // A separator inside a selector does not merge two sets into one.
    assert_ne!(key(&["a,b"]), key(&["a", "b"]));
    assert_ne!(key(&["a\nb"]), key(&["a", "b"]));
    assert_eq!(key(&[]), "[]");
}

#[test]
fn times_round_trip_in_whole_milliseconds() {
    let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    let ms = encode_time("t", t).unwrap();
    assert_eq!(ms, 1_700_000_000_123);
    assert_eq!(decode_time("t", ValueRef::Integer(ms)).unwrap(), t);
    // Sub-millisecond precision is dropped, not rounded up.
    let fine = t + Duration::from_micros(999);
    assert_eq!(encode_time("t", fine).unwrap(), ms);
}

#[test]
fn out_of_range_values_are_refused_both_ways() {
    let before_epoch = UNIX_EPOCH - Duration::from_secs(1);
    assert!(encode_time("t", before_epoch).is_err());
    assert!(encode_duration("d", Duration::MAX).is_err());
    assert!(encode_duration("d", Duration::from_millis(MAX_MILLIS as u64 + 1)).is_err());
    assert!(encode_duration("d", Duration::from_millis(MAX_MILLIS as u64)).is_ok());

    for bad in [
        ValueRef::Integer(-1),
        ValueRef::Integer(MAX_MILLIS + 1),
        ValueRef::Integer(i64::MAX),
        ValueRef::Integer(i64::MIN),
        ValueRef::Real(1.0),
        ValueRef::Text(b"1"),
        ValueRef::Null,
    ] {
        assert!(decode_time("t", bad).is_err(), "{bad:?}");
    }
    assert!(decode_opt_duration("d", ValueRef::Null).unwrap().is_none());
    assert!(decode_opt_duration("d", ValueRef::Integer(-5)).is_err());
    assert!(decode_revision(ValueRef::Integer(-1)).is_err());
    assert_eq!(decode_revision(ValueRef::Integer(7)).unwrap(), 7);
}

#[test]
fn integers_are_bounded_by_their_type_and_minimum() {
    let pid = |n| decode_integer::<i32>("owner_pid", ValueRef::Integer(n), 1);
    assert_eq!(pid(1).unwrap(), 1);
    assert_eq!(pid(i64::from(i32::MAX)).unwrap(), i32::MAX);
    for bad in [0, -1, i64::from(i32::MAX) + 1, i64::MIN] {
        let err = pid(bad).unwrap_err();
        assert!(err.what.starts_with("owner_pid: "), "{}", err.what);
    }
    let uid = |n| decode_integer::<u32>("owner_uid", ValueRef::Integer(n), 0);
    assert_eq!(uid(i64::from(u32::MAX)).unwrap(), u32::MAX);
    assert!(uid(i64::from(u32::MAX) + 1).is_err());
    assert!(uid(-1).is_err());
    let count = |v| decode_integer::<u64>("tokens_issued", v, 0);
    assert_eq!(count(ValueRef::Integer(i64::MAX)).unwrap(), i64::MAX as u64);
    assert!(count(ValueRef::Text(b"1")).is_err());
    assert!(count(ValueRef::Null).is_err());
    assert!(encode_count("c", i64::MAX as u64).is_ok());
    assert!(encode_count("c", i64::MAX as u64 + 1).is_err());
}

#[test]
fn flags_are_0_or_1_strictly() {
    assert_eq!(encode_flag(false), 0);
    assert_eq!(encode_flag(true), 1);
    assert!(!decode_flag("f", ValueRef::Integer(0)).unwrap());
    assert!(decode_flag("f", ValueRef::Integer(1)).unwrap());
    for bad in [
        ValueRef::Integer(2),
        ValueRef::Integer(-1),
        ValueRef::Integer(256),
        ValueRef::Integer(i64::MIN),
        ValueRef::Real(1.0),
        ValueRef::Text(b"1"),
        ValueRef::Null,
    ] {
        let err = decode_flag("process_bound", bad).unwrap_err();
        assert!(err.what.starts_with("process_bound: "), "{}", err.what);
    }
}

#[test]
fn an_end_is_both_columns_or_neither() {
    assert_eq!(decode_end(ValueRef::Null, ValueRef::Null).unwrap(), None);
    let ended = decode_end(ValueRef::Integer(5), ValueRef::Text(b"completed")).unwrap();
    assert_eq!(
        ended,
        Some(TaskEnd {
            at: UNIX_EPOCH + Duration::from_millis(5),
            reason: "completed".into()
        })
    );
    let err = decode_end(ValueRef::Integer(5), ValueRef::Null).unwrap_err();
    assert!(err.what.starts_with("end_reason: "), "{}", err.what);
    let err = decode_end(ValueRef::Null, ValueRef::Text(b"completed")).unwrap_err();
    assert!(err.what.starts_with("ended_at_ms: "), "{}", err.what);
}

#[test]
fn lists_are_bounded_both_ways() {
    assert!(encode_list("l", &list(MAX_LIST_ITEMS, 8)).is_ok());
    assert!(encode_list("l", &list(MAX_LIST_ITEMS + 1, 8)).is_err());
    assert!(encode_list("l", &list(1, MAX_LIST_ITEM_LEN + 1)).is_err());
    // Within the item limits, but too long as a whole.
    assert!(encode_list("l", &list(MAX_LIST_ITEMS, MAX_LIST_ITEM_LEN)).is_err());

    let too_many = serde_json::Value::from(list(MAX_LIST_ITEMS + 1, 1)).to_string();
    let err = decode_list("l", ValueRef::Text(too_many.as_bytes())).unwrap_err();
    assert!(err.what.contains("items"), "{}", err.what);

    let huge = format!("[\"{}\"]", "x".repeat(MAX_LIST_JSON_LEN));
    assert!(decode_list("l", ValueRef::Text(huge.as_bytes())).is_err());

    for bad in [
        &b"{}"[..],
        &b"[1]"[..],
        &b"[\"a\""[..],
        &b"\xff"[..],
        &b"[[\"a\"]]"[..],
    ] {
        let err = decode_list("l", ValueRef::Text(bad)).unwrap_err();
        assert!(err.what.starts_with("l: "), "{}", err.what);
    }
    let ok = decode_list("l", ValueRef::Text(br#"["a","b"]"#)).unwrap();
    assert_eq!(ok, ["a", "b"]);
}

#[test]
fn text_is_bounded_and_utf8() {
    assert_eq!(decode_text("c", ValueRef::Text(b"abc"), 3).unwrap(), "abc");
    assert!(decode_text("c", ValueRef::Text(b"abcd"), 3).is_err());
    assert!(decode_text("c", ValueRef::Text(b"\xc3"), 3).is_err());
    assert!(decode_text("c", ValueRef::Blob(b"abc"), 3).is_err());
    assert!(decode_opt_text("c", ValueRef::Null, 3).unwrap().is_none());
    assert!(bounded("c", &"x".repeat(MAX_ID_LEN + 1), MAX_ID_LEN).is_err());
}
