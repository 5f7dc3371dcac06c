//! RSocket over QUIC, as Beacon speaks it: framing and a guarded frame decoder.
//!
//! There is no standard RSocket-over-QUIC mapping; ours interoperates with rsocket-py:
//! one RSocket connection per QUIC connection, the client writes only on its first
//! bidirectional stream, the server writes only on its own first bidirectional stream, and
//! every frame is preceded by a 3-byte big-endian length.
//!
//! This module is pure (no I/O) so it can be unit-tested and fuzzed directly. The frame codec
//! is `rsocket_rust`'s, but its decoder trusts its input (it panics on unknown frame types
//! and on metadata lengths past the end of the frame), so [`FrameReader`] validates every
//! frame's structure before handing it over.

use bytes::{Buf, BufMut, Bytes, BytesMut};
pub use rsocket_rust::error::{
    ERR_APPLICATION, ERR_CONN_CLOSED, ERR_CONN_FAILED, ERR_INVALID, ERR_INVALID_SETUP,
    ERR_REJECTED, ERR_REJECT_SETUP, ERR_UNSUPPORTED_SETUP,
};
pub use rsocket_rust::frame::{self, Body, Frame};
use rsocket_rust::utils::Writeable;

/// Frames longer than this are refused by default (the u24 prefix allows 16 MiB).
pub const DEFAULT_MAX_FRAME_LEN: usize = 1 << 20;
const HEADER_LEN: usize = 6;
const LEN_PREFIX: usize = 3;
/// Metadata MIME type for the write key in SETUP.
pub const AUTH_MIME: &str = "text/plain";
pub const DATA_MIME: &str = "application/json";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame of {0} bytes is shorter than the 6-byte RSocket header")]
    TooShort(usize),
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u16),
    #[error("malformed {kind} frame: {what}")]
    Malformed {
        kind: &'static str,
        what: &'static str,
    },
}

/// Accumulates bytes from a stream and yields whole, validated frames.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    max_frame_len: usize,
}

impl FrameReader {
    pub fn new(max_frame_len: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(64 * 1024),
            max_frame_len,
        }
    }

    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `None` if more bytes are needed, or an error after which the
    /// connection must be closed (the stream can no longer be re-synchronised).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = (usize::from(self.buf[0]) << 16)
            | (usize::from(self.buf[1]) << 8)
            | usize::from(self.buf[2]);
        // Refuse before buffering the body: a peer announcing 16 MiB gets no 16 MiB buffer.
        if len > self.max_frame_len {
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        if self.buf.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        self.buf.advance(LEN_PREFIX);
        let mut body = self.buf.split_to(len);
        decode_frame(&mut body).map(Some)
    }
}

/// Validates and decodes one frame (without its length prefix).
pub fn decode_frame(body: &mut BytesMut) -> Result<Frame, WireError> {
    validate(body)?;
    // `validate` checked every length `Frame::decode` reads, so it cannot fail or panic
    // here; an error would mean the two disagree, reported rather than unwrapped.
    Frame::decode(body).map_err(|_| WireError::Malformed {
        kind: "rsocket",
        what: "rejected by the frame codec",
    })
}

/// Checks a frame's structure against what `rsocket_rust`'s decoder will read.
pub fn validate(b: &[u8]) -> Result<(), WireError> {
    if b.len() < HEADER_LEN {
        return Err(WireError::TooShort(b.len()));
    }
    let n = u16::from_be_bytes([b[4], b[5]]);
    let (flag, kind) = (n & 0x03FF, n >> 10);
    let rest = &b[HEADER_LEN..];
    let malformed = |kind: &'static str, what: &'static str| WireError::Malformed { kind, what };
    let payload = |kind: &'static str, rest: &[u8]| -> Result<(), WireError> {
        if flag & Frame::FLAG_METADATA != 0 {
            if rest.len() < 3 {
                return Err(malformed(kind, "metadata length missing"));
            }
            let m =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            if rest.len() - 3 < m {
                return Err(malformed(kind, "metadata length past the end of the frame"));
            }
        }
        Ok(())
    };
    match kind {
        Frame::TYPE_SETUP => {
            if rest.len() < 12 {
                return Err(malformed(
                    "SETUP",
                    "shorter than version, keepalive and lifetime",
                ));
            }
            let mut r = &rest[12..];
            if flag & Frame::FLAG_RESUME != 0 {
                if r.len() < 2 {
                    return Err(malformed("SETUP", "resume token length missing"));
                }
                let t = usize::from(u16::from_be_bytes([r[0], r[1]]));
                if r.len() - 2 < t {
                    return Err(malformed("SETUP", "resume token past the end"));
                }
                r = &r[2 + t..];
            }
            for what in ["metadata MIME type", "data MIME type"] {
                let Some((&m, tail)) = r.split_first() else {
                    return Err(malformed("SETUP", what));
                };
                if tail.len() < usize::from(m) {
                    return Err(malformed("SETUP", what));
                }
                r = &tail[usize::from(m)..];
            }
            payload("SETUP", r)
        }
        Frame::TYPE_REQUEST_RESPONSE => payload("REQUEST_RESPONSE", rest),
        Frame::TYPE_REQUEST_FNF => payload("REQUEST_FNF", rest),
        Frame::TYPE_PAYLOAD => payload("PAYLOAD", rest),
        Frame::TYPE_REQUEST_STREAM | Frame::TYPE_REQUEST_CHANNEL => {
            if rest.len() < 4 {
                return Err(malformed("REQUEST_STREAM", "initial request-n missing"));
            }
            payload("REQUEST_STREAM", &rest[4..])
        }
        Frame::TYPE_KEEPALIVE if rest.len() < 8 => Err(malformed("KEEPALIVE", "position missing")),
        Frame::TYPE_LEASE => {
            if rest.len() < 8 {
                return Err(malformed("LEASE", "ttl and count missing"));
            }
            payload("LEASE", &rest[8..])
        }
        Frame::TYPE_ERROR | Frame::TYPE_REQUEST_N if rest.len() < 4 => {
            Err(malformed("ERROR/REQUEST_N", "shorter than 4 bytes"))
        }
        Frame::TYPE_KEEPALIVE
        | Frame::TYPE_ERROR
        | Frame::TYPE_REQUEST_N
        | Frame::TYPE_CANCEL
        | Frame::TYPE_METADATA_PUSH => Ok(()),
        // RESUME and RESUME_OK are not supported; their layouts are not validated, so they
        // never reach the codec.
        other => Err(WireError::UnknownType(other)),
    }
}

/// Appends `frame` with its u24 length prefix to `out`.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let len = frame.len();
    out.reserve(LEN_PREFIX + len);
    out.put_uint(len as u64, LEN_PREFIX);
    frame.write_to(out);
}

/// The client's batch id, carried as request metadata: retries of a batch reuse it, and the
/// edge publishes with it so JetStream drops the repeats. Ids that are not 1-64 characters
/// of `[A-Za-z0-9._-]` are ignored (the edge then numbers the batch itself).
pub fn client_batch_id(metadata: Option<&Bytes>) -> Option<&str> {
    let m = std::str::from_utf8(metadata?).ok()?;
    let ok = (1..=64).contains(&m.len())
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then_some(m)
}

/// Request-response metadata asking for the nearest edges instead of sending a batch:
/// `locate:` or `locate:<region>`. Batch ids cannot hold `:`, so the two never collide.
pub const LOCATE_PREFIX: &str = "locate:";

pub fn is_locate(metadata: Option<&Bytes>) -> bool {
    metadata.is_some_and(|m| m.starts_with(LOCATE_PREFIX.as_bytes()))
}

/// The region a locate request names, if any.
pub fn locate_region(metadata: Option<&Bytes>) -> Option<&str> {
    let m = std::str::from_utf8(metadata?).ok()?;
    m.strip_prefix(LOCATE_PREFIX).filter(|r| !r.is_empty())
}

/// How a batch request's data is encoded. Edges read both, telling them apart by the first
/// bytes (the packed layout's magic `BPB1`; JSON starts with `{`), so no negotiation is
/// needed; edges that predate the packed encoding refuse it as invalid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BatchEncoding {
    /// The packed batch layout of `beacon-plugin-abi`: no parsing, no field names, no
    /// escaping (what the Rust SDK sends).
    #[default]
    Packed,
    /// `{"events": [...]}` (what rsocket-py and hand-written clients send).
    Json,
}

/// The data of a batch request.
pub fn encode_batch(events: &[crate::Event], encoding: BatchEncoding) -> Bytes {
    match encoding {
        BatchEncoding::Packed => Bytes::from(crate::packed::encode(events.iter())),
        BatchEncoding::Json => {
            #[derive(serde::Serialize)]
            struct Borrowed<'a> {
                events: &'a [crate::Event],
            }
            Bytes::from(serde_json::to_vec(&Borrowed { events }).unwrap_or_default())
        }
    }
}

/// The events of a batch request's data, in either encoding; anything else is an error
/// that says what was wrong.
pub fn decode_batch(data: &[u8]) -> Result<Vec<crate::Event>, String> {
    if data.starts_with(&beacon_plugin_abi::BATCH_MAGIC) {
        crate::packed::decode(data).map_err(|e| format!("packed batch: {e}"))
    } else {
        serde_json::from_slice::<crate::BatchRequest>(data)
            .map(|r| r.events)
            .map_err(|e| format!("not valid JSON of the form {{\"events\": [...]}}: {e}"))
    }
}

pub fn setup_frame(write_key: &str) -> Frame {
    frame::Setup::builder(0, 0)
        .set_mime_metadata(AUTH_MIME)
        .set_mime_data(DATA_MIME)
        .set_keepalive(std::time::Duration::from_secs(20))
        .set_lifetime(std::time::Duration::from_secs(90))
        .set_metadata(Bytes::copy_from_slice(write_key.as_bytes()))
        .build()
}

pub fn error_frame(stream_id: u32, code: u32, message: &str) -> Frame {
    frame::Error::builder(stream_id, 0)
        .set_code(code)
        .set_data(Bytes::copy_from_slice(message.as_bytes()))
        .build()
}

pub fn response_frame(stream_id: u32, data: Bytes) -> Frame {
    frame::Payload::builder(stream_id, Frame::FLAG_NEXT | Frame::FLAG_COMPLETE)
        .set_data(data)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_decode_in_either_encoding() {
        let events = vec![crate::Event {
            event_id: "e1".into(),
            name: "pageview".into(),
            ts: 7,
            url: Some("https://a.example/".into()),
            ..Default::default()
        }];
        for enc in [BatchEncoding::Packed, BatchEncoding::Json] {
            assert_eq!(decode_batch(&encode_batch(&events, enc)).unwrap(), events);
        }
        assert!(encode_batch(&events, BatchEncoding::Packed).starts_with(b"BPB1"));
        let bad = decode_batch(b"BPB1\x01\x00").unwrap_err();
        assert!(bad.starts_with("packed batch: "), "{bad}");
        assert!(decode_batch(b"{\"events\": 1}").is_err());
        // A client's batch may not share strings between events: a small frame would
        // otherwise decode into gigabytes.
        let mut shared = Vec::new();
        let mut long = events.clone();
        long[0].url = Some(format!("https://a.example/{}", "p".repeat(4000)));
        let copies = vec![long[0].clone(); 8];
        crate::packed::encode_derived_into(&long, &[&copies], &mut shared);
        assert!(shared.len() < 2 * 4000);
        let refused = decode_batch(&shared).unwrap_err();
        assert!(refused.contains("references name over"), "{refused}");
    }

    fn framed(f: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        encode(f, &mut b);
        b
    }

    #[test]
    fn roundtrip_in_pieces() {
        let f1 = setup_frame("key-123");
        let f2 = frame::RequestResponse::builder(1, 0)
            .set_data(Bytes::from_static(b"{\"events\":[]}"))
            .build();
        let mut all = framed(&f1);
        all.extend_from_slice(&framed(&f2));
        let mut r = FrameReader::new(DEFAULT_MAX_FRAME_LEN);
        let mut got = Vec::new();
        // Feed one byte at a time: frames must come out whole regardless of chunking.
        for byte in all.iter() {
            r.extend(&[*byte]);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        match got[0].get_body_ref() {
            Body::Setup(s) => assert_eq!(s.get_metadata().unwrap().as_ref(), b"key-123"),
            other => panic!("expected SETUP, got {other:?}"),
        }
        assert_eq!(got[1].get_stream_id(), 1);
    }

    #[test]
    fn client_batch_ids_are_checked() {
        let ok = Bytes::from_static(b"b-0193.x_Y");
        assert_eq!(client_batch_id(Some(&ok)), Some("b-0193.x_Y"));
        for bad in [&b""[..], b"has space", b"a:b", &[0xff, 0xfe], &[b'a'; 65]] {
            assert_eq!(client_batch_id(Some(&Bytes::copy_from_slice(bad))), None);
        }
        assert_eq!(client_batch_id(None), None);
    }

    #[test]
    fn oversized_is_refused_before_buffering() {
        let mut r = FrameReader::new(100);
        r.extend(&[0x00, 0x10, 0x00]);
        assert_eq!(
            r.next_frame(),
            Err(WireError::TooLarge {
                len: 4096,
                max: 100
            })
        );
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        // Unknown type 0x3F (EXT) and a metadata length past the end: both panicked the
        // upstream decoder.
        let ext = [0u8, 0, 0, 1, 0xFC, 0x00];
        assert_eq!(validate(&ext), Err(WireError::UnknownType(0x3F)));
        let mut rr = vec![0u8, 0, 0, 1];
        rr.extend_from_slice(
            &((Frame::TYPE_REQUEST_RESPONSE << 10) | Frame::FLAG_METADATA).to_be_bytes(),
        );
        rr.extend_from_slice(&[0x00, 0xFF, 0xFF, 1, 2]);
        assert!(matches!(validate(&rr), Err(WireError::Malformed { .. })));
        assert!(matches!(validate(&[1, 2]), Err(WireError::TooShort(2))));
    }

    /// A cheap stand-in for the fuzzer: random bytes and bit-flipped valid frames, by the
    /// hundred thousand, must decode or fail, never panic.
    #[test]
    fn random_and_mutated_frames_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: Vec<Vec<u8>> = [
            setup_frame("key"),
            error_frame(3, ERR_APPLICATION, "bad"),
            response_frame(5, Bytes::from_static(b"{}")),
            frame::RequestResponse::builder(7, 0)
                .set_metadata(Bytes::from_static(b"m"))
                .set_data(Bytes::from_static(b"d"))
                .build(),
        ]
        .iter()
        .map(|f| framed(f)[LEN_PREFIX..].to_vec())
        .collect();
        for i in 0..200_000 {
            let mut b = if i % 2 == 0 {
                let len = (next() % 48) as usize;
                (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                seeds[(next() % seeds.len() as u64) as usize].clone()
            };
            if !b.is_empty() {
                for _ in 0..=(next() % 3) {
                    let at = (next() % b.len() as u64) as usize;
                    b[at] ^= 1 << (next() % 8);
                }
            }
            let _ = decode_frame(&mut BytesMut::from(&b[..]));
        }
    }

    #[test]
    fn every_truncation_of_valid_frames_is_handled() {
        let frames = [
            setup_frame("k"),
            error_frame(3, ERR_APPLICATION, "bad"),
            response_frame(5, Bytes::from_static(b"ok")),
            frame::Keepalive::builder(0, Frame::FLAG_RESPOND).build(),
        ];
        for f in &frames {
            let full = framed(f);
            for cut in 0..full.len() - LEN_PREFIX {
                let mut body = BytesMut::from(&full[LEN_PREFIX..LEN_PREFIX + cut]);
                let _ = decode_frame(&mut body); // must not panic
            }
        }
    }
}
