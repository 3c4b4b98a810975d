//! Lets every stock gRPC client in over the unix socket, whatever `:authority` it sends.
//!
//! grpc-go (grpcurl), grpc-core (Python, C++, Ruby), grpc-java and others send the socket path —
//! raw (`/run/faultd/faultd.sock`) or %-encoded — as `:authority` on a unix socket. The HTTP/2
//! server under tonic validates `:authority` as an RFC 3986 authority before any service sees the
//! request and resets the stream with PROTOCOL_ERROR (hyperium/h2#487). On a unix socket the
//! authority names nothing (the socket is the address), so this layer, between the socket and
//! the HTTP/2 server, rewrites an `:authority` that is not a valid authority to `localhost`, as
//! grpc-go itself sends today. TCP listeners keep the server's checks untouched.
//!
//! Only the client's header blocks are touched; every other byte passes through as it came.
//! A header block is HPACK-coded against the client's dynamic table, so each one is decoded
//! (the `fluke-hpack` decoder follows that table) and encoded again as literals that never
//! enter the server's dynamic table: the server's table stays empty, and so always agrees with
//! what this layer sends. Frames keep their stream, END_STREAM flag and priority; padding is
//! dropped; a block larger than 16 KiB (the frame size every HTTP/2 peer accepts) is continued
//! in CONTINUATION frames.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use fluke_hpack::Decoder;
use fluke_hpack::encoder::encode_integer_into;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// What a client writes first (RFC 9113 §3.4), passed through untouched.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every peer must accept (SETTINGS_MAX_FRAME_SIZE's initial value).
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is refused (the connection closes); the server's own
/// header list limit is far below it.
const MAX_BLOCK: usize = 1 << 20;
/// What replaces an authority the server would refuse.
pub const UNIX_AUTHORITY: &[u8] = b"localhost";

/// A client connection on the unix socket whose header blocks are normalized on the way in.
pub struct NormalizedAuthority<S> {
    inner: S,
    /// Bytes of the preface still to pass through.
    preface_left: usize,
    /// Read from the client, not yet processed.
    input: BytesMut,
    /// Processed, for the server to read.
    output: BytesMut,
    /// Payload bytes of the current non-header frame still to pass through as they arrive.
    passthrough_left: usize,
    /// A header block waiting for its CONTINUATION frames.
    pending: Option<PendingBlock>,
    decoder: Decoder<'static>,
    /// The client's end of the connection was read to the end.
    eof: bool,
}

struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl<S> NormalizedAuthority<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            preface_left: PREFACE_LEN,
            input: BytesMut::with_capacity(MAX_FRAME),
            output: BytesMut::new(),
            passthrough_left: 0,
            pending: None,
            decoder: Decoder::new(),
            eof: false,
        }
    }

    /// Takes bytes the client sent; what can be decided goes to the server's side at once
    /// (`take_output`). An error means the connection must close.
    pub fn push(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.input.extend_from_slice(bytes);
        self.process()
    }

    /// What the server is to read next.
    pub fn take_output(&mut self) -> BytesMut {
        self.output.split()
    }

    /// Moves what can be decided from `input` to `output`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            if self.preface_left > 0 || self.passthrough_left > 0 {
                let left = self.preface_left.max(self.passthrough_left);
                let n = left.min(self.input.len());
                if n == 0 {
                    return Ok(());
                }
                self.output.extend_from_slice(&self.input.split_to(n));
                if self.preface_left > 0 {
                    self.preface_left -= n;
                } else {
                    self.passthrough_left -= n;
                }
                continue;
            }
            if self.input.len() < FRAME_HEADER_LEN {
                return Ok(());
            }
            let header = &self.input[..FRAME_HEADER_LEN];
            let length =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let kind = header[3];
            let flags = header[4];
            let stream_id =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            let is_block = kind == HEADERS || (kind == CONTINUATION && self.pending.is_some());
            if !is_block {
                if self.pending.is_some() {
                    return Err(malformed("a frame interrupted a header block"));
                }
                // Everything else passes as it arrives, without waiting for the whole payload.
                self.output
                    .extend_from_slice(&self.input.split_to(FRAME_HEADER_LEN));
                self.passthrough_left = length;
                continue;
            }
            if length > MAX_BLOCK {
                return Err(malformed("header frame too large"));
            }
            if self.input.len() < FRAME_HEADER_LEN + length {
                self.input
                    .reserve(FRAME_HEADER_LEN + length - self.input.len());
                return Ok(());
            }
            self.input.advance(FRAME_HEADER_LEN);
            let payload = self.input.split_to(length);
            self.header_frame(kind, flags, stream_id, &payload)?;
        }
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream_id: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let fragment = if kind == HEADERS {
            let (fragment, priority) = headers_payload(flags, payload)?;
            self.pending = Some(PendingBlock {
                stream_id,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: Vec::with_capacity(fragment.len()),
            });
            fragment
        } else {
            payload
        };
        let Some(block) = self.pending.as_mut() else {
            return Err(malformed("CONTINUATION without HEADERS"));
        };
        if block.stream_id != stream_id {
            return Err(malformed("CONTINUATION on another stream"));
        }
        if block.fragment.len() + fragment.len() > MAX_BLOCK {
            return Err(malformed("header block too large"));
        }
        block.fragment.extend_from_slice(fragment);
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let Some(block) = self.pending.take() else {
            return Ok(());
        };
        let fields = self
            .decoder
            .decode(&block.fragment)
            .map_err(|e| malformed(&format!("HPACK: {e:?}")))?;
        let encoded = encode_block(fields.iter().map(|(name, value)| {
            let value = if name == b":authority" && !valid_authority(value) {
                UNIX_AUTHORITY
            } else {
                value.as_slice()
            };
            (name.as_slice(), value)
        }));
        write_frames(&mut self.output, &block, &encoded);
        Ok(())
    }
}

/// The header block fragment of a HEADERS payload, without padding, and its priority fields.
fn headers_payload(flags: u8, payload: &[u8]) -> io::Result<(&[u8], Option<[u8; 5]>)> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&len, tail) = rest
            .split_first()
            .ok_or_else(|| malformed("padded HEADERS without a length"))?;
        pad = usize::from(len);
        rest = tail;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (fields, tail) = rest
            .split_first_chunk::<5>()
            .ok_or_else(|| malformed("HEADERS too short for its priority"))?;
        priority = Some(*fields);
        rest = tail;
    }
    let end = rest
        .len()
        .checked_sub(pad)
        .ok_or_else(|| malformed("HEADERS padding longer than the frame"))?;
    Ok((&rest[..end], priority))
}

/// Whether the HTTP/2 server accepts `value` as `:authority`.
pub fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// Header fields as HPACK literals without indexing (RFC 7541 §6.2.2), new names: nothing
/// enters the server's dynamic table.
fn encode_block<'a>(fields: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        for string in [name, value] {
            // Prefix of 7 bits, H (Huffman) bit clear.
            let _written = encode_integer_into(string.len(), 7, 0, &mut out);
            out.extend_from_slice(string);
        }
    }
    out
}

/// `block` as a HEADERS frame, continued in CONTINUATION frames past `MAX_FRAME`.
fn write_frames(out: &mut BytesMut, block: &PendingBlock, encoded: &[u8]) {
    let room = MAX_FRAME - if block.priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = encoded.split_at(encoded.len().min(room));
    let mut flags = if block.end_stream { END_STREAM } else { 0 };
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
    frame_header(
        out,
        priority.len() + first.len(),
        HEADERS,
        flags,
        block.stream_id,
    );
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        frame_header(out, chunk.len(), CONTINUATION, flags, block.stream_id);
        out.extend_from_slice(chunk);
    }
}

fn frame_header(out: &mut BytesMut, length: usize, kind: u8, flags: u8, stream_id: u32) {
    let length = (length as u32).to_be_bytes();
    out.extend_from_slice(&length[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id);
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from a unix socket client: {what}"),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for NormalizedAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A truncated frame goes to the server as it is: it reports the error.
                let rest = this.input.split();
                if rest.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.output = rest;
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.push(read.filled())?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NormalizedAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for NormalizedAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluke_hpack::Encoder;
    use tokio::io::AsyncReadExt;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        frame_header(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    /// Feeds `input` through the layer in chunks of `chunk` bytes, returns what the server reads.
    async fn through(input: &[u8], chunk: usize) -> io::Result<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in input.chunks(chunk) {
                client.write_all(piece).await?;
            }
            client.shutdown().await
        });
        let mut layer = NormalizedAuthority::new(server);
        let mut out = Vec::new();
        let read = layer.read_to_end(&mut out).await;
        writer.await.map_err(io::Error::other)??;
        read.map(|_| out)
    }

    /// A frame as the server reads it: kind, flags, stream, decoded fields, payload.
    type Frame = (u8, u8, u32, Vec<(Vec<u8>, Vec<u8>)>, Vec<u8>);

    /// Splits the server's input into frames and decodes every header block.
    fn server_view(bytes: &[u8]) -> Vec<Frame> {
        assert_eq!(&bytes[..PREFACE_LEN], PREFACE);
        let mut rest = &bytes[PREFACE_LEN..];
        let mut decoder = Decoder::new();
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = rest[9..9 + len].to_vec();
            rest = &rest[9 + len..];
            let fields = if kind == HEADERS && flags & END_HEADERS != 0 {
                let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                decoder.decode(&payload[skip..]).expect("server decodes")
            } else {
                Vec::new()
            };
            frames.push((kind, flags, stream, fields, payload));
        }
        frames
    }

    fn request(encoder: &mut Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/faultd.v1.FaultService/List"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ])
    }

    fn authority(fields: &[(Vec<u8>, Vec<u8>)]) -> Option<&[u8]> {
        fields
            .iter()
            .find(|(n, _)| n == b":authority")
            .map(|(_, v)| v.as_slice())
    }

    #[tokio::test]
    async fn a_socket_path_becomes_localhost_and_the_rest_passes() {
        let mut encoder = Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &request(&mut encoder, b"/run/faultd/faultd.sock"),
        ));
        input.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 2, 8, 1]));
        // The same headers again: now indexed from the client's dynamic table.
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            3,
            &request(&mut encoder, b"/run/faultd/faultd.sock"),
        ));
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            5,
            &request(&mut encoder, b"%2Frun%2Ffaultd%2Ffaultd.sock"),
        ));
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            7,
            &request(&mut encoder, b"faultd.example:7443"),
        ));
        for chunk in [1, 7, 4096] {
            let frames = server_view(&through(&input, chunk).await.expect("passes"));
            assert_eq!(frames.len(), 6, "chunk {chunk}");
            assert_eq!(frames[0].4, [0, 3, 0, 0, 0, 100], "SETTINGS untouched");
            assert_eq!(authority(&frames[1].3), Some(UNIX_AUTHORITY));
            assert_eq!(
                frames[1].3[2],
                (b":path".to_vec(), b"/faultd.v1.FaultService/List".to_vec())
            );
            assert_eq!((frames[2].0, frames[2].1), (0x0, END_STREAM));
            assert_eq!(frames[2].4, [0, 0, 0, 0, 2, 8, 1], "DATA untouched");
            assert_eq!(authority(&frames[3].3), Some(UNIX_AUTHORITY));
            assert_eq!(frames[3].2, 3);
            assert_eq!(authority(&frames[4].3), Some(UNIX_AUTHORITY));
            assert_eq!(
                authority(&frames[5].3),
                Some(&b"faultd.example:7443"[..]),
                "a valid authority is kept"
            );
        }
    }

    #[tokio::test]
    async fn padding_priority_continuation_and_end_stream_survive() {
        let mut encoder = Encoder::new();
        let block = request(&mut encoder, b"/tmp/s.sock");
        let (first, second) = block.split_at(10);
        let mut headers = vec![3u8]; // pad length
        headers.extend([0x80, 0, 0, 1, 16]); // exclusive dependency on 1, weight 16
        headers.extend(first);
        headers.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 9, &headers));
        input.extend(frame(CONTINUATION, END_HEADERS, 9, second));
        let frames = server_view(&through(&input, 5).await.expect("passes"));
        assert_eq!(frames.len(), 1);
        let (kind, flags, stream, fields, payload) = &frames[0];
        assert_eq!((*kind, *stream), (HEADERS, 9));
        assert_eq!(*flags, PRIORITY | END_STREAM | END_HEADERS);
        assert_eq!(&payload[..5], &[0x80, 0, 0, 1, 16]);
        assert_eq!(authority(fields), Some(UNIX_AUTHORITY));
        assert_eq!(fields.len(), 6);
    }

    #[tokio::test]
    async fn no_authority_stays_absent_and_large_blocks_are_continued() {
        let mut encoder = Encoder::new();
        let big = vec![b'x'; 40_000];
        let block = encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":path", b"/x"),
            (b"x-big", &big[..]),
        ]);
        let mut input = PREFACE.to_vec();
        // The client's own frames may be up to what the server allows; one big frame here.
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let out = through(&input, 3000).await.expect("passes");
        let frames = server_view(&out);
        assert_eq!(frames[0].0, HEADERS);
        assert_eq!(frames[0].1 & END_HEADERS, 0);
        assert!(frames[1..].iter().all(|f| f.0 == CONTINUATION));
        assert!(frames.iter().all(|f| f.4.len() <= MAX_FRAME));
        assert_eq!(frames.last().map(|f| f.1), Some(END_HEADERS));
        let whole: Vec<u8> = frames.iter().flat_map(|f| f.4.clone()).collect();
        let fields = Decoder::new().decode(&whole).expect("decodes");
        assert_eq!(authority(&fields), None);
        assert_eq!(fields[2].1, big);
    }

    #[tokio::test]
    async fn an_interrupted_or_undecodable_block_closes_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"data"));
        assert!(through(&input, 64).await.is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0x7f],
        ));
        assert!(through(&input, 64).await.is_err());
    }

    #[test]
    fn what_the_server_accepts_as_authority() {
        assert!(valid_authority(b"localhost"));
        assert!(valid_authority(b"node1:7443"));
        assert!(!valid_authority(b"/run/faultd/faultd.sock"));
        assert!(!valid_authority(b"%2Frun%2Ffaultd%2Ffaultd.sock"));
        assert!(!valid_authority(b""));
    }
}
