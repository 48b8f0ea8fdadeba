//! The native protocol's WebSocket once upgraded: the handshake, reading
//! client frames and writing server frames.
//!
//! Reading is tungstenite's protocol state ([`WebSocketContext`]): masking,
//! fragments, UTF-8, control frames, size limits, answers to pings and the
//! closing handshake. Writing server frames is ours. A server frame is a
//! 2- to 10-byte header before its payload (never masked), and an event's
//! payload is one `Bytes` shared by every connection it goes to, so a batch
//! of frames leaves in one vectored write of small headers and shared
//! payloads: nothing is copied, and a socket with nothing to write keeps no
//! buffer. (tokio-tungstenite copies every frame into a write buffer that
//! keeps its size after the first writes, registers the task's waker in two
//! shared proxies on every send, and wraps the socket in both.)

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::FromRequestParts;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame, Role, WebSocketConfig, WebSocketContext,
};
use tokio_tungstenite::tungstenite::{Error, Message};

/// Most slices one vectored write is given (Linux takes up to 1,024).
const MAX_SLICES: usize = 128;
/// Frames up to this size in all are copied together and written at once.
const SCRATCH: usize = 16 * 1024;

thread_local! {
    /// Where small frames are gathered for one write (one per worker thread).
    static SCRATCH_BUF: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(SCRATCH));
}

/// A WebSocket upgrade request, checked: answer it with [`Handshake::accept`].
///
/// axum's own extractor checks the request (method, `Connection`, `Upgrade`,
/// `Sec-WebSocket-Version` and `-Key`, or HTTP/2's extended CONNECT) and
/// answers a bad one with its usual 4xx; this one keeps the upgraded
/// connection itself instead of tokio-tungstenite's stream around it.
pub(crate) struct Handshake {
    on_upgrade: OnUpgrade,
    /// `Sec-WebSocket-Accept` (HTTP/1.1); None on HTTP/2, which answers 200.
    accept: Option<HeaderValue>,
}

impl<S: Send + Sync> FromRequestParts<S> for Handshake {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Taken before axum's check, which removes it.
        let on_upgrade = parts.extensions.get::<OnUpgrade>().cloned();
        // Checked, then dropped unused: it holds its own copy of the upgrade.
        drop(
            WebSocketUpgrade::from_request_parts(parts, state)
                .await
                .map_err(IntoResponse::into_response)?,
        );
        let on_upgrade = on_upgrade.ok_or_else(|| {
            (StatusCode::UPGRADE_REQUIRED, "connection not upgradable").into_response()
        })?;
        let accept = if parts.version <= Version::HTTP_11 {
            let key = parts
                .headers
                .get(header::SEC_WEBSOCKET_KEY)
                .map(|k| derive_accept_key(k.as_bytes()));
            match key.map(HeaderValue::try_from) {
                Some(Ok(v)) => Some(v),
                _ => {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        "`Sec-WebSocket-Key` header missing",
                    )
                        .into_response());
                }
            }
        } else {
            None
        };
        Ok(Handshake { on_upgrade, accept })
    }
}

impl Handshake {
    /// Answer the upgrade and run `serve` on the socket once the client has
    /// it (in a task of its own).
    pub(crate) fn accept<F, Fut>(self, config: WebSocketConfig, serve: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => serve(Socket::new(upgraded, config)).await,
                Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
            }
        });
        match self.accept {
            Some(accept) => (
                StatusCode::SWITCHING_PROTOCOLS,
                [
                    (header::CONNECTION, HeaderValue::from_static("upgrade")),
                    (header::UPGRADE, HeaderValue::from_static("websocket")),
                    (header::SEC_WEBSOCKET_ACCEPT, accept),
                ],
            )
                .into_response(),
            None => StatusCode::OK.into_response(),
        }
    }
}

/// One server frame on its way out: its header, then its payload.
struct OutFrame {
    head: [u8; 10],
    /// Bytes of `head` already written.
    head_written: u8,
    head_len: u8,
    /// What is left of the payload to write.
    payload: Bytes,
    /// Some of the frame was written: nothing else may be written before
    /// the rest of it.
    started: bool,
}

/// Frame opcodes the writer sends (RFC 6455, section 5.2).
#[derive(Clone, Copy)]
pub(crate) enum OpCode {
    Text = 0x1,
    Ping = 0x9,
}

impl OutFrame {
    fn new(opcode: OpCode, payload: Bytes) -> Self {
        let mut head = [0u8; 10];
        // FIN: every frame we send is a whole message.
        head[0] = 0x80 | opcode as u8;
        let len = payload.len();
        let head_len = match (u8::try_from(len), u16::try_from(len)) {
            (Ok(short), _) if short < 126 => {
                head[1] = short;
                2
            }
            (_, Ok(medium)) => {
                head[1] = 126;
                head[2..4].copy_from_slice(&medium.to_be_bytes());
                4
            }
            _ => {
                head[1] = 127;
                head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
                10
            }
        };
        OutFrame {
            head,
            head_written: 0,
            head_len,
            payload,
            started: false,
        }
    }

    fn head_left(&self) -> &[u8] {
        &self.head[usize::from(self.head_written)..usize::from(self.head_len)]
    }

    /// Count `n` written bytes against the frame; returns what is left of `n`.
    fn advance(&mut self, n: usize) -> usize {
        let from_head = n.min(self.head_left().len());
        // At most 10: fits.
        self.head_written += u8::try_from(from_head).unwrap_or(0);
        let from_payload = (n - from_head).min(self.payload.len());
        self.payload.advance(from_payload);
        self.started |= n > 0;
        n - from_head - from_payload
    }

    fn is_written(&self) -> bool {
        self.head_left().is_empty() && self.payload.is_empty()
    }
}

/// The native protocol's WebSocket.
pub(crate) struct Socket {
    io: TokioIo<Upgraded>,
    /// tungstenite's protocol state: reads, and writes only its answers
    /// (pong, close).
    ctx: WebSocketContext,
    /// Our frames not yet taken by the socket; not allocated while empty.
    out: VecDeque<OutFrame>,
    /// The protocol state may hold an answer it could not write yet.
    ctx_unflushed: bool,
}

/// The stream as tungstenite's blocking-style protocol state sees it: a
/// write or read that would wait says `WouldBlock` (the task is then woken
/// when the socket is ready), and writes wait while one of our frames is
/// half written.
struct Blocking<'a, 'b> {
    io: &'a mut TokioIo<Upgraded>,
    cx: &'a mut Context<'b>,
    write_blocked: bool,
}

fn would_block<T>(poll: Poll<io::Result<T>>) -> io::Result<T> {
    match poll {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl Read for Blocking<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        would_block(Pin::new(&mut *self.io).poll_read(self.cx, &mut buf))?;
        Ok(buf.filled().len())
    }
}

impl Write for Blocking<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.write_blocked {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        would_block(Pin::new(&mut *self.io).poll_write(self.cx, buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        would_block(Pin::new(&mut *self.io).poll_flush(self.cx))
    }
}

impl Socket {
    fn new(upgraded: Upgraded, config: WebSocketConfig) -> Self {
        Socket {
            io: TokioIo::new(upgraded),
            ctx: WebSocketContext::new(Role::Server, Some(config)),
            out: VecDeque::new(),
            ctx_unflushed: false,
        }
    }

    /// Is one of our frames half written?
    fn mid_frame(&self) -> bool {
        self.out.front().is_some_and(|f| f.started)
    }

    /// The next message from the client; None once the connection is
    /// closed (after a closing handshake, or when the client vanished).
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message, Error>>> {
        let write_blocked = self.mid_frame();
        let mut stream = Blocking {
            io: &mut self.io,
            cx,
            write_blocked,
        };
        let read = self.ctx.read(&mut stream);
        // A ping or close read is answered by the protocol state, which
        // writes the answer on its next read or flush.
        self.ctx_unflushed |= matches!(read, Ok(Message::Ping(_) | Message::Close(_)));
        match read {
            Ok(message) => Poll::Ready(Some(Ok(message))),
            Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            Err(Error::ConnectionClosed | Error::AlreadyClosed) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    /// [`Socket::poll_next`] as a future.
    pub(crate) async fn next(&mut self) -> Option<Result<Message, Error>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Queue a text frame for the next flush.
    pub(crate) fn feed_text(&mut self, text: Bytes) {
        self.out.push_back(OutFrame::new(OpCode::Text, text));
    }

    /// Queue a frame for the next flush.
    pub(crate) fn feed(&mut self, opcode: OpCode, payload: Bytes) {
        self.out.push_back(OutFrame::new(opcode, payload));
    }

    /// Write everything queued (and the protocol state's answers).
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            if self.ctx_unflushed && !self.mid_frame() {
                let mut stream = Blocking {
                    io: &mut self.io,
                    cx,
                    write_blocked: false,
                };
                match self.ctx.flush(&mut stream) {
                    Ok(()) => self.ctx_unflushed = false,
                    Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Poll::Pending;
                    }
                    // Closed by the handshake: our frames cannot follow.
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if self.out.is_empty() {
                // Whatever a burst made it grow to is given back.
                self.out = VecDeque::new();
                return Poll::Ready(Ok(()));
            }
            let written = ready!(self.poll_write_front(cx))?;
            if written == 0 {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
            }
            self.consume(written);
        }
    }

    /// One write of the queue's front frames. Frames that fit are copied
    /// together into this thread's scratch buffer and sent with one plain
    /// write: a vectored write of small slices costs more in the kernel
    /// (writev's file layer) than copying a few hundred bytes. A larger
    /// frame goes out vectored, header and shared payload, uncopied.
    fn poll_write_front(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let fits = self
            .out
            .front()
            .is_some_and(|f| f.head_left().len() + f.payload.len() <= SCRATCH);
        if fits {
            return SCRATCH_BUF.with_borrow_mut(|buf| {
                buf.clear();
                for frame in &self.out {
                    if buf.len() + frame.head_left().len() + frame.payload.len() > SCRATCH {
                        break;
                    }
                    buf.extend_from_slice(frame.head_left());
                    buf.extend_from_slice(&frame.payload);
                }
                Pin::new(&mut self.io).poll_write(cx, buf)
            });
        }
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut n = 0;
        for frame in &self.out {
            if n + 2 > MAX_SLICES {
                break;
            }
            for part in [frame.head_left(), &frame.payload[..]] {
                if !part.is_empty() {
                    slices[n] = IoSlice::new(part);
                    n += 1;
                }
            }
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n])
    }

    /// Count `n` written bytes against the queue's front frames.
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.out.front_mut() else {
                return;
            };
            n = front.advance(n);
            if front.is_written() {
                self.out.pop_front();
            }
        }
    }

    /// [`Socket::poll_flush`] as a future.
    pub(crate) async fn flush(&mut self) -> Result<(), Error> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Write one text frame now.
    pub(crate) async fn send_text(&mut self, text: Bytes) -> Result<(), Error> {
        self.feed_text(text);
        self.flush().await
    }

    /// Start the closing handshake: what is queued, then our close frame.
    /// Reading on until [`Socket::next`] returns None completes it.
    pub(crate) async fn close(&mut self, code: u16, reason: String) -> Result<(), Error> {
        self.flush().await?;
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let mut frame = Some(frame);
        std::future::poll_fn(|cx| {
            let mut stream = Blocking {
                io: &mut self.io,
                cx,
                write_blocked: false,
            };
            // The frame is queued by the first call; later calls flush it.
            let done = match frame.take() {
                Some(f) => self.ctx.close(&mut stream, Some(f)),
                None => self.ctx.flush(&mut stream),
            };
            match done {
                Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
                done => Poll::Ready(done),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_of(len: usize) -> Vec<u8> {
        OutFrame::new(OpCode::Text, Bytes::from(vec![b'x'; len]))
            .head_left()
            .to_vec()
    }

    #[test]
    fn headers_use_the_shortest_length_encoding() {
        assert_eq!(header_of(0), [0x81, 0]);
        assert_eq!(header_of(125), [0x81, 125]);
        assert_eq!(header_of(126), [0x81, 126, 0, 126]);
        assert_eq!(header_of(65_535), [0x81, 126, 0xff, 0xff]);
        assert_eq!(header_of(65_536), [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        let ping = OutFrame::new(OpCode::Ping, Bytes::new());
        assert_eq!(ping.head_left(), [0x89, 0]);
    }

    /// Our header, parsed by tungstenite's client-side reader, says what we
    /// meant: a final text frame of the payload's length.
    #[test]
    fn headers_parse_as_tungstenite_reads_them() {
        use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode as Op};
        for len in [0, 1, 125, 126, 127, 1000, 65_535, 65_536, 200_000] {
            let head = header_of(len);
            let mut cursor = io::Cursor::new(head.clone());
            let parsed = FrameHeader::parse(&mut cursor).ok().flatten();
            let Some((h, parsed_len)) = parsed else {
                panic!("header of {len} did not parse: {head:?}");
            };
            assert!(h.is_final && !h.rsv1 && !h.rsv2 && !h.rsv3 && h.mask.is_none());
            assert_eq!(h.opcode, Op::Data(Data::Text));
            assert_eq!(parsed_len, len as u64);
            assert_eq!(cursor.position() as usize, head.len());
        }
    }

    /// A frame written a few bytes at a time ends exactly once all of its
    /// header and payload were counted, and is marked started from the
    /// first byte.
    #[test]
    fn partial_writes_are_counted_across_header_and_payload() {
        let mut f = OutFrame::new(OpCode::Text, Bytes::from(vec![7u8; 300]));
        assert!(!f.started);
        assert_eq!(f.advance(1), 0);
        assert!(f.started && !f.is_written());
        assert_eq!(f.head_left().len(), 3);
        assert_eq!(f.advance(5), 0);
        assert_eq!(f.payload.len(), 298);
        // More than the frame holds: the rest belongs to the next frame.
        assert_eq!(f.advance(300), 2);
        assert!(f.is_written());
    }
}
