//! Interoperability shim: HTTP/2 `:authority` values that gRPC C-core
//! clients (py-spiffe, grpc-java, C++) send over Unix sockets.
//!
//! Since gRPC 1.57, C-core clients send the percent-encoded socket path as
//! the `:authority` of every request made over a Unix socket (for
//! `/run/tether/agent.sock`: `run%2Ftether%2Fagent.sock`). The `http` crate
//! refuses a `%` in a host, so `h2` resets every such stream with
//! PROTOCOL_ERROR and no Python SPIFFE client can talk to a tonic server
//! (hyperium/h2#487, grpc/grpc#38142). The authority carries no information
//! on a Unix socket (the socket path already names the peer), so the fix is
//! to replace it with `localhost`, which is what grpc-go sends.
//!
//! [`AuthorityFix`] sits between the socket and `h2` on the *read* side of
//! each connection. It looks at the client's first request header block
//! (HPACK-decoded with `loona-hpack`, never by hand):
//! - a valid authority (Rust and Go clients): the connection is passed
//!   through untouched from then on, at no further cost;
//! - an authority `h2` would refuse: for the rest of the connection every
//!   header block is decoded and re-encoded (with our own HPACK encoder, whose
//!   dynamic table `h2` then mirrors) with `:authority: localhost`. Other
//!   frames are copied unchanged; padding and priority fields of HEADERS
//!   frames are dropped (both are optional, and `h2` ignores priority).
//!
//! Everything here is untrusted input: frame and header-block sizes are
//! bounded, and any malformed input ends the connection with an error, as
//! `h2` itself would.

use std::io;

use loona_hpack::{Decoder, Encoder};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame header length.
const FRAME_HEADER_LEN: usize = 9;
/// `h2`'s default (and only) SETTINGS_MAX_FRAME_SIZE: a client may not send
/// larger frames, and the frames we write must not be larger either.
const MAX_FRAME_LEN: usize = 16_384;
/// `h2`'s default SETTINGS_HEADER_TABLE_SIZE, which bounds both the client's
/// encoder (our decoder) and our encoder (its decoder).
const HEADER_TABLE_SIZE: usize = 4096;
/// Largest header block (all fragments) accepted, compressed.
const MAX_HEADER_BLOCK_LEN: usize = 64 * 1024;
/// Largest decoded header list accepted (names + values + 32 per field, as
/// RFC 7540 counts it).
const MAX_HEADER_LIST_LEN: usize = 256 * 1024;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Rewrites the client-to-server byte stream of one connection.
pub struct AuthorityFix {
    mode: Mode,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Header block fragments of a HEADERS frame awaiting CONTINUATION.
    pending: Option<PendingBlock>,
    /// The raw frames of the first header block, kept until the mode is decided.
    first_raw: Vec<u8>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Waiting for the connection preface.
    Preface,
    /// Reading frames until the first header block decides.
    Undecided,
    /// Re-encoding every header block.
    Rewrite,
    /// Copying bytes, no more parsing.
    Passthrough,
}

struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    block: Vec<u8>,
}

impl std::fmt::Debug for AuthorityFix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Default for AuthorityFix {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        let mut encoder = Encoder::new();
        encoder.set_max_table_size(HEADER_TABLE_SIZE);
        Self {
            mode: Mode::Preface,
            input: Vec::new(),
            output: Vec::new(),
            pending: None,
            first_raw: Vec::new(),
            decoder,
            encoder,
        }
    }
}

impl AuthorityFix {
    /// True once the connection needs no more work: bytes can go straight
    /// from the socket to `h2`.
    pub fn is_passthrough(&self) -> bool {
        self.mode == Mode::Passthrough && self.input.is_empty()
    }

    /// Bytes ready for `h2`; the caller drains them.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.output
    }

    /// Feeds bytes read from the client.
    pub fn push(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.mode == Mode::Passthrough {
            self.output.extend_from_slice(bytes);
            return Ok(());
        }
        self.input.extend_from_slice(bytes);
        self.process()
    }

    /// The client closed its side: whatever is buffered goes to `h2` as it
    /// is, and `h2` reports the truncation.
    pub fn finish(&mut self) {
        self.output.append(&mut self.first_raw);
        self.output.append(&mut self.input);
        self.mode = Mode::Passthrough;
    }

    fn process(&mut self) -> io::Result<()> {
        if self.mode == Mode::Preface {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                // Not HTTP/2 prior knowledge: not ours to fix.
                self.finish();
                return Ok(());
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            self.output.extend(self.input.drain(..PREFACE.len()));
            self.mode = Mode::Undecided;
        }
        let mut consumed = 0;
        while self.mode != Mode::Passthrough {
            let rest = &self.input[consumed..];
            if rest.len() < FRAME_HEADER_LEN {
                break;
            }
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            if len > MAX_FRAME_LEN {
                return self.oversized(consumed);
            }
            if rest.len() < FRAME_HEADER_LEN + len {
                break;
            }
            let frame = rest[..FRAME_HEADER_LEN + len].to_vec();
            consumed += frame.len();
            self.frame(&frame)?;
        }
        self.input.drain(..consumed);
        if self.mode == Mode::Passthrough {
            self.output.append(&mut self.input);
        }
        Ok(())
    }

    /// A frame larger than `h2` allows: in passthrough `h2` answers with
    /// FRAME_SIZE_ERROR itself; once rewriting, the streams have diverged
    /// and the connection cannot continue.
    fn oversized(&mut self, consumed: usize) -> io::Result<()> {
        if self.mode == Mode::Rewrite {
            return Err(invalid("frame larger than SETTINGS_MAX_FRAME_SIZE"));
        }
        self.input.drain(..consumed);
        self.finish();
        Ok(())
    }

    fn frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let kind = frame[3];
        let flags = frame[4];
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER_LEN..];

        match (kind, &mut self.pending) {
            (TYPE_CONTINUATION, Some(pending)) if pending.stream_id == stream_id => {
                pending.block.extend_from_slice(payload);
                if pending.block.len() > MAX_HEADER_BLOCK_LEN {
                    return Err(invalid("header block too large"));
                }
                self.keep_raw(frame);
                if flags & FLAG_END_HEADERS != 0 {
                    return self.complete_block();
                }
                Ok(())
            }
            // Anything else in the middle of a header block is a protocol
            // error h2 will report; hand it over untouched.
            (_, Some(_)) => self.give_up_or_fail(frame),
            (TYPE_HEADERS, None) => {
                let fragment = headers_fragment(flags, payload)?;
                self.keep_raw(frame);
                self.pending = Some(PendingBlock {
                    stream_id,
                    end_stream: flags & FLAG_END_STREAM != 0,
                    block: fragment.to_vec(),
                });
                if flags & FLAG_END_HEADERS != 0 {
                    return self.complete_block();
                }
                Ok(())
            }
            _ => {
                self.output.extend_from_slice(frame);
                Ok(())
            }
        }
    }

    fn give_up_or_fail(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.mode == Mode::Rewrite {
            return Err(invalid("frame interleaved with a header block"));
        }
        self.pending = None;
        self.output.append(&mut self.first_raw);
        self.output.extend_from_slice(frame);
        self.mode = Mode::Passthrough;
        Ok(())
    }

    fn keep_raw(&mut self, frame: &[u8]) {
        if self.mode == Mode::Undecided {
            self.first_raw.extend_from_slice(frame);
        }
    }

    fn complete_block(&mut self) -> io::Result<()> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let headers = self.decode(&pending.block)?;
        if self.mode == Mode::Undecided {
            let needs_fix = headers.iter().any(|(name, value)| {
                name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err()
            });
            if !needs_fix {
                // Forward the client's own bytes and stop looking.
                self.output.append(&mut self.first_raw);
                self.mode = Mode::Passthrough;
                return Ok(());
            }
            tracing::debug!(
                "client sends an :authority h2 refuses (a gRPC C-core Unix socket client); rewriting it to localhost"
            );
            self.first_raw.clear();
            self.mode = Mode::Rewrite;
        }
        let fields = headers.iter().map(|(name, value)| {
            let value: &[u8] = if name == b":authority" {
                b"localhost"
            } else {
                value
            };
            (name.as_slice(), value)
        });
        let mut block = Vec::with_capacity(pending.block.len() + 16);
        self.encoder
            .encode_into(fields, &mut block)
            .map_err(|e| invalid(&format!("re-encoding headers: {e}")))?;
        write_header_frames(
            &mut self.output,
            pending.stream_id,
            pending.end_stream,
            &block,
        );
        Ok(())
    }

    fn decode(&mut self, block: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut headers = Vec::new();
        let mut size = 0usize;
        let mut too_large = false;
        self.decoder
            .decode_with_cb(block, |name, value| {
                size += name.len() + value.len() + 32;
                if size > MAX_HEADER_LIST_LEN {
                    too_large = true;
                } else {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| invalid(&format!("HPACK: {e:?}")))?;
        if too_large {
            return Err(invalid("header list too large"));
        }
        Ok(headers)
    }
}

/// The header block fragment of a HEADERS frame payload, without padding
/// and priority fields.
fn headers_fragment(flags: u8, payload: &[u8]) -> io::Result<&[u8]> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let pad = usize::from(
            *payload
                .first()
                .ok_or_else(|| invalid("padded frame without pad length"))?,
        );
        start += 1;
        end = end
            .checked_sub(pad)
            .ok_or_else(|| invalid("padding longer than the frame"))?;
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
    }
    if start > end {
        return Err(invalid("HEADERS frame too short"));
    }
    Ok(&payload[start..end])
}

/// Writes `block` as a HEADERS frame followed by as many CONTINUATION
/// frames as the maximum frame size requires.
fn write_header_frames(out: &mut Vec<u8>, stream_id: u32, end_stream: bool, block: &[u8]) {
    let mut chunks = block.chunks(MAX_FRAME_LEN).peekable();
    let mut first = true;
    // An empty block still needs its HEADERS frame.
    let empty: &[u8] = &[];
    let mut next = chunks.next().or(Some(empty));
    while let Some(chunk) = next {
        next = chunks.next();
        let kind = if first {
            TYPE_HEADERS
        } else {
            TYPE_CONTINUATION
        };
        let mut flags = 0;
        if first && end_stream {
            flags |= FLAG_END_STREAM;
        }
        if next.is_none() {
            flags |= FLAG_END_HEADERS;
        }
        let len = chunk.len();
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&stream_id.to_be_bytes());
        out.extend_from_slice(chunk);
        first = false;
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from client: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let len = payload.len();
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn request(authority: &str, path: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    fn encode(encoder: &mut Encoder<'_>, headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

    /// Splits the output into frames and decodes every header block with a
    /// fresh decoder, as h2 would.
    fn read_back(bytes: &[u8]) -> (Vec<HeaderList>, Vec<Vec<u8>>) {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut decoder = Decoder::new();
        let mut blocks = Vec::new();
        let mut others = Vec::new();
        let mut pending = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (f, r) = rest.split_at(FRAME_HEADER_LEN + len);
            rest = r;
            match f[3] {
                TYPE_HEADERS | TYPE_CONTINUATION => {
                    pending
                        .extend_from_slice(headers_fragment(f[4], &f[FRAME_HEADER_LEN..]).unwrap());
                    if f[4] & FLAG_END_HEADERS != 0 {
                        blocks.push(decoder.decode(&pending).unwrap());
                        pending.clear();
                    }
                }
                _ => others.push(f.to_vec()),
            }
        }
        (blocks, others)
    }

    fn authority(block: &[(Vec<u8>, Vec<u8>)]) -> String {
        let (_, v) = block.iter().find(|(n, _)| n == b":authority").unwrap();
        String::from_utf8(v.clone()).unwrap()
    }

    #[test]
    fn percent_encoded_authority_becomes_localhost_for_the_whole_connection() {
        let mut client = Encoder::new();
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let bad = "run%2Ftether%2Fagent.sock";
        for (i, path) in [
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            "/SpiffeWorkloadAPI/ValidateJWTSVID",
            "/SpiffeWorkloadAPI/FetchJWTSVID",
        ]
        .iter()
        .enumerate()
        {
            let stream = 1 + 2 * i as u32;
            // Later requests reference the client's dynamic table.
            let block = encode(&mut client, &request(bad, path));
            wire.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, &block));
            wire.extend(frame(0x0, FLAG_END_STREAM, stream, b"\0\0\0\0\x02ab"));
        }
        // Fed in awkward pieces, as a socket would deliver it.
        let mut fix = AuthorityFix::default();
        let mut out = Vec::new();
        for chunk in wire.chunks(7) {
            fix.push(chunk).unwrap();
            out.append(fix.output());
        }
        let (blocks, others) = read_back(&out);
        assert_eq!(blocks.len(), 3);
        for (block, path) in blocks.iter().zip([
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            "/SpiffeWorkloadAPI/ValidateJWTSVID",
            "/SpiffeWorkloadAPI/FetchJWTSVID",
        ]) {
            assert_eq!(authority(block), "localhost");
            let mut expected = request("localhost", path);
            expected.sort();
            let mut got = block.clone();
            got.sort();
            assert_eq!(got, expected, "every other header intact");
        }
        assert_eq!(others.len(), 4, "SETTINGS and DATA frames untouched");
        assert!(others[1].ends_with(b"\0\0\0\0\x02ab"));
        assert!(!fix.is_passthrough());
    }

    #[test]
    fn valid_authority_passes_through_byte_for_byte() {
        let mut client = Encoder::new();
        let mut wire = PREFACE.to_vec();
        let block = encode(
            &mut client,
            &request("localhost", "/SpiffeWorkloadAPI/FetchX509SVID"),
        );
        wire.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &block,
        ));
        wire.extend(frame(0x0, 0, 1, b"later"));
        let mut fix = AuthorityFix::default();
        fix.push(&wire).unwrap();
        assert_eq!(fix.output(), &wire);
        assert!(fix.is_passthrough());
    }

    #[test]
    fn continuation_padding_and_priority_are_handled() {
        let mut client = Encoder::new();
        let mut headers = request("tmp%2Fa.sock", "/SpiffeWorkloadAPI/FetchX509SVID");
        headers.push((b"x-big".to_vec(), vec![b'v'; 3000]));
        let block = encode(&mut client, &headers);
        let (a, b) = block.split_at(10);
        let mut first = vec![3u8]; // pad length
        first.extend_from_slice(&[0, 0, 0, 0, 16]); // priority
        first.extend_from_slice(a);
        first.extend_from_slice(&[0, 0, 0]);
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            5,
            &first,
        ));
        wire.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 5, b));
        let mut fix = AuthorityFix::default();
        fix.push(&wire).unwrap();
        let out = std::mem::take(fix.output());
        let (blocks, _) = read_back(&out);
        assert_eq!(authority(&blocks[0]), "localhost");
        assert!(
            blocks[0]
                .iter()
                .any(|(n, v)| n == b"x-big" && v.len() == 3000)
        );
        // END_STREAM kept on the HEADERS frame.
        assert_eq!(out[PREFACE.len() + 4] & FLAG_END_STREAM, FLAG_END_STREAM);
    }

    #[test]
    fn large_blocks_are_split_to_the_frame_limit() {
        let mut out = Vec::new();
        let block = vec![0u8; MAX_FRAME_LEN * 2 + 5];
        write_header_frames(&mut out, 1, false, &block);
        let lens: Vec<usize> = {
            let mut rest = out.as_slice();
            let mut lens = Vec::new();
            while !rest.is_empty() {
                let len =
                    usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
                lens.push(len);
                rest = &rest[FRAME_HEADER_LEN + len..];
            }
            lens
        };
        assert_eq!(lens, [MAX_FRAME_LEN, MAX_FRAME_LEN, 5]);
    }

    #[test]
    fn hostile_input_never_panics_and_fails_closed_once_rewriting() {
        // Not HTTP/2 at all: handed to h2 untouched.
        let mut fix = AuthorityFix::default();
        fix.push(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(fix.is_passthrough());

        // Garbage HPACK in the first block: an error, like h2's.
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ));
        assert!(AuthorityFix::default().push(&wire).is_err());

        // Padding longer than the frame.
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_PADDED,
            1,
            &[9, 1],
        ));
        assert!(AuthorityFix::default().push(&wire).is_err());

        // An oversized frame before any decision goes to h2 untouched.
        let mut wire = PREFACE.to_vec();
        wire.extend_from_slice(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]);
        let mut fix = AuthorityFix::default();
        fix.push(&wire).unwrap();
        assert!(fix.is_passthrough());

        // Random bytes after the preface, in every chunking: no panic.
        let mut seed = 0x2545_f491_u32;
        for _ in 0..200 {
            let mut wire = PREFACE.to_vec();
            for _ in 0..64 {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                wire.push(seed as u8);
            }
            let mut fix = AuthorityFix::default();
            let _ = fix.push(&wire);
        }
    }
}
