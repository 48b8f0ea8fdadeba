//! The native protocol's WebSocket once upgraded: the handshake, reading
//! client frames and writing server frames.
//!
//! Client frames are read into the worker thread's scratch buffer and
//! parsed by [`FrameReader`] (`read.rs`), which keeps bytes only while a
//! frame is partly read; the socket answers pings and runs the closing
//! handshake. Writing server frames is ours too. A server frame is a
//! 2- to 10-byte header before its payload (never masked), and an event's
//! payload is one `Bytes` shared by every connection it goes to, so a batch
//! of frames leaves in one vectored write of small headers and shared
//! payloads: nothing is copied, and a socket with nothing to write keeps no
//! buffer. (tokio-tungstenite copies every frame into a write buffer that
//! keeps its size after the first writes, registers the task's waker in two
//! shared proxies on every send, and wraps the socket in both.)

use std::collections::VecDeque;
use std::io::{self, IoSlice};
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

use super::read::{FrameReader, Incoming, ReadError};

/// Most slices one vectored write is given (Linux takes up to 1,024).
const MAX_SLICES: usize = 128;
/// Frames up to this size in all are copied together and written at once.
const SCRATCH: usize = 16 * 1024;

thread_local! {
    /// Where small frames are gathered for one write (one per worker thread).
    static SCRATCH_BUF: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(SCRATCH));
    /// Where reads land (one per worker thread). Zeroed once, when the
    /// thread first reads, and never cleared: a read is polled at every
    /// wake-up of a connection, and zeroing 16 KiB each time was a few
    /// per cent of the gateway's CPU at moderate fan-out.
    static READ_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SCRATCH].into_boxed_slice());
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
    pub(crate) fn accept<F, Fut>(self, max_message: u32, serve: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => serve(Socket::new(TokioIo::new(upgraded), max_message)).await,
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
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
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

/// Where a connection is in the closing handshake (RFC 6455, section 7).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Closing {
    Open,
    /// The client's close frame came; our answer is queued.
    Received,
    /// Ours was sent: what the client sends until its close is dropped.
    Sent,
    /// Both sides closed, or the client broke the protocol: nothing more
    /// is read.
    Done,
}

/// The native protocol's WebSocket.
pub(crate) struct Socket<IO = TokioIo<Upgraded>> {
    io: IO,
    /// Our frames not yet taken by the socket; not allocated while empty.
    out: VecDeque<OutFrame>,
    /// Client frames read and not yet taken.
    reader: FrameReader,
    closing: Closing,
    /// An answer (pong, close) is queued: it is written before reading on.
    answer_queued: bool,
    /// Our close frame (or the echo of the client's) is queued or sent:
    /// nothing may follow it (RFC 6455, section 5.5.1).
    close_queued: bool,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Socket<IO> {
    /// A socket whose client may send messages of up to `max` bytes.
    pub(crate) fn new(io: IO, max: u32) -> Self {
        Socket {
            io,
            out: VecDeque::new(),
            reader: FrameReader::new(max),
            closing: Closing::Open,
            answer_queued: false,
            close_queued: false,
        }
    }

    /// Is one of our frames half written?
    fn mid_frame(&self) -> bool {
        self.out.front().is_some_and(|f| f.started)
    }

    /// Queue an answer to the client (pong, close) ahead of our frames: a
    /// control frame may go between messages, not inside one.
    fn answer(&mut self, opcode: OpCode, payload: Bytes) {
        let at = usize::from(self.mid_frame());
        self.out.insert(at, OutFrame::new(opcode, payload));
        self.answer_queued = true;
    }

    /// The next message from the client; None once the connection is
    /// closed (after a closing handshake, or when the client vanished).
    /// A ping is answered, and a close frame too (then None follows).
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Incoming, ReadError>>> {
        loop {
            if self.answer_queued {
                if let Err(e) = ready!(self.poll_flush(cx)) {
                    self.closing = Closing::Done;
                    return Poll::Ready(Some(Err(e.into())));
                }
                self.answer_queued = false;
            }
            if matches!(self.closing, Closing::Received | Closing::Done) {
                self.closing = Closing::Done;
                return Poll::Ready(None);
            }
            match self.reader.next() {
                Ok(Some(Incoming::Close(code))) => {
                    if self.closing == Closing::Sent {
                        self.closing = Closing::Done;
                        return Poll::Ready(None);
                    }
                    // Echo its code (RFC 6455, section 5.5.1), then end.
                    let echo = code.map(|c| Bytes::copy_from_slice(&c.to_be_bytes()));
                    self.answer(OpCode::Close, echo.unwrap_or_default());
                    self.close_queued = true;
                    self.closing = Closing::Received;
                    continue;
                }
                // After our close, the client's messages are dropped.
                Ok(Some(_)) if self.closing == Closing::Sent => continue,
                Ok(Some(Incoming::Ping(payload))) => {
                    self.answer(OpCode::Pong, payload.clone());
                    return Poll::Ready(Some(Ok(Incoming::Ping(payload))));
                }
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(e) => {
                    self.closing = Closing::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let read = READ_BUF.with_borrow_mut(|buf| {
                let mut read_buf = ReadBuf::new(&mut buf[..]);
                let polled = Pin::new(&mut self.io).poll_read(cx, &mut read_buf);
                let n = read_buf.filled().len();
                if matches!(polled, Poll::Ready(Ok(()))) {
                    self.reader.extend(&buf[..n]);
                }
                polled.map_ok(|()| n)
            });
            match ready!(read) {
                Ok(0) => {
                    let clean = self.closing == Closing::Sent && !self.reader.mid_frame();
                    self.closing = Closing::Done;
                    // A close frame came, or ours did and the client hung up.
                    return Poll::Ready((!clean).then_some(Err(ReadError::Reset)));
                }
                Ok(_) => {}
                Err(e) => {
                    self.closing = Closing::Done;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    /// [`Socket::poll_next`] as a future.
    pub(crate) async fn next(&mut self) -> Option<Result<Incoming, ReadError>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`Socket::poll_next`] as a future that, while no client frame is
    /// there and `flush_when_idle` holds, writes what is queued: frames
    /// queued before a client's message leave with the answer to it when
    /// the message is already there (a resuming client's
    /// `connection.established`, its subscription's confirmation and its
    /// replay go out in one write), and at once when it is not.
    pub(crate) async fn next_or_flush(
        &mut self,
        flush_when_idle: bool,
    ) -> Option<Result<Incoming, ReadError>> {
        std::future::poll_fn(|cx| {
            let next = self.poll_next(cx);
            if next.is_pending()
                && flush_when_idle
                && !self.out.is_empty()
                && let Poll::Ready(Err(e)) = self.poll_flush(cx)
            {
                self.closing = Closing::Done;
                return Poll::Ready(Some(Err(e.into())));
            }
            next
        })
        .await
    }

    /// Queue a text frame for the next flush.
    pub(crate) fn feed_text(&mut self, text: Bytes) {
        self.out.push_back(OutFrame::new(OpCode::Text, text));
    }

    /// Queue a frame for the next flush.
    pub(crate) fn feed(&mut self, opcode: OpCode, payload: Bytes) {
        self.out.push_back(OutFrame::new(opcode, payload));
    }

    /// Write everything queued.
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.out.is_empty() {
                // Whatever a burst made it grow to is given back.
                self.out = VecDeque::new();
                return Pin::new(&mut self.io).poll_flush(cx);
            }
            let written = ready!(self.poll_write_front(cx))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
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
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Write one text frame now.
    pub(crate) async fn send_text(&mut self, text: Bytes) -> io::Result<()> {
        self.feed_text(text);
        self.flush().await
    }

    /// Start the closing handshake: what is queued, then our close frame.
    /// Reading on until [`Socket::next`] returns None completes it. Once the
    /// client's close came, ours was its answer, and once ours is queued
    /// it is the last frame: nothing more is sent.
    pub(crate) async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        // One close frame per connection: a second call only writes what
        // is still queued.
        if self.close_queued {
            return self.flush().await;
        }
        self.close_queued = true;
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        // A control frame carries at most 125 bytes; cut at a char boundary.
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        self.feed(OpCode::Close, payload.into());
        if self.closing == Closing::Open {
            self.closing = Closing::Sent;
        }
        self.flush().await
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

    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

    /// Our socket and a tungstenite client, joined in memory.
    async fn pair() -> (Socket<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (server, client) = tokio::io::duplex(64 * 1024);
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        (Socket::new(server, 1024), client)
    }

    async fn client_reads(client: &mut WebSocketStream<DuplexStream>) -> Message {
        match client.next().await {
            Some(Ok(m)) => m,
            other => panic!("the client read {other:?}"),
        }
    }

    /// An in-memory stream that counts the writes made on it.
    struct CountingWrites {
        io: DuplexStream,
        writes: usize,
    }

    impl AsyncRead for CountingWrites {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountingWrites {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let written = Pin::new(&mut self.io).poll_write(cx, buf);
            if written.is_ready() {
                self.writes += 1;
            }
            written
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_queued_frame_leaves_with_the_answer_to_a_message_already_there_else_when_idle() {
        use futures_util::FutureExt;
        let (server, client) = tokio::io::duplex(64 * 1024);
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let mut server = Socket::new(
            CountingWrites {
                io: server,
                writes: 0,
            },
            1024,
        );
        server.feed_text(Bytes::from_static(b"established"));
        client.send(Message::text("subscribe")).await.unwrap();
        // The client's message is there: it is read, nothing is written.
        let got = server.next_or_flush(true).await;
        assert!(
            matches!(&got, Some(Ok(Incoming::Text(t))) if t.as_str() == "subscribe"),
            "{got:?}"
        );
        assert_eq!(server.io.writes, 0);
        // The answer joins the queue; both leave in one write.
        server.feed_text(Bytes::from_static(b"confirmed"));
        server.flush().await.unwrap();
        assert_eq!(server.io.writes, 1);
        assert_eq!(
            client_reads(&mut client).await,
            Message::text("established")
        );
        assert_eq!(client_reads(&mut client).await, Message::text("confirmed"));

        // Nothing from the client: a queued frame is written while the
        // socket waits, unless flushing when idle is off (a write delay).
        server.feed_text(Bytes::from_static(b"event"));
        assert!(server.next_or_flush(false).now_or_never().is_none());
        assert_eq!(server.io.writes, 1, "held while flushing when idle is off");
        assert!(server.next_or_flush(true).now_or_never().is_none());
        assert_eq!(server.io.writes, 2);
        assert_eq!(client_reads(&mut client).await, Message::text("event"));
        // Nothing queued: waiting writes nothing.
        assert!(server.next_or_flush(true).now_or_never().is_none());
        assert_eq!(server.io.writes, 2);
    }

    #[tokio::test]
    async fn a_ping_is_answered_and_a_close_is_echoed_before_the_end() {
        let (mut server, mut client) = pair().await;
        client.send(Message::Ping("hi".into())).await.unwrap();
        client.send(Message::text("{}")).await.unwrap();
        let bye = CloseFrame {
            code: CloseCode::Library(4000),
            reason: "bye".into(),
        };
        client.send(Message::Close(Some(bye))).await.unwrap();
        let ping = server.next().await;
        assert!(
            matches!(&ping, Some(Ok(Incoming::Ping(p))) if p[..] == b"hi"[..]),
            "{ping:?}"
        );
        let text = server.next().await;
        assert!(
            matches!(&text, Some(Ok(Incoming::Text(t))) if t.as_str() == "{}"),
            "{text:?}"
        );
        assert!(server.next().await.is_none(), "the client closed");
        assert_eq!(client_reads(&mut client).await, Message::Pong("hi".into()));
        match client_reads(&mut client).await {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Library(4000)),
            other => panic!("not the close echoed: {other:?}"),
        }
    }

    #[tokio::test]
    async fn our_close_ends_reading_at_the_clients_answer() {
        let (mut server, mut client) = pair().await;
        server.feed_text(Bytes::from_static(b"last"));
        server.close(4001, "unauthorized").await.unwrap();
        // Sent before the client saw our close: dropped.
        client.send(Message::text("late")).await.unwrap();
        assert_eq!(client_reads(&mut client).await, Message::text("last"));
        match client_reads(&mut client).await {
            Message::Close(Some(f)) => {
                assert_eq!(f.code, CloseCode::Library(4001));
                assert_eq!(f.reason, "unauthorized");
            }
            other => panic!("not our close: {other:?}"),
        }
        // tungstenite answers the close on its next poll, then waits for
        // the server to end the connection.
        let server_side = async move {
            let read = server.next().await;
            drop(server);
            read
        };
        let (ended, read) = tokio::join!(client.next(), server_side);
        assert!(read.is_none(), "the handshake completed: {read:?}");
        assert!(
            ended.is_none() || matches!(ended, Some(Err(_))),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_sends_one_close_frame_however_often_it_is_closed() {
        // Ours twice: one close frame, the first.
        let (server_io, mut raw) = tokio::io::duplex(1024);
        let mut server = Socket::new(server_io, 1024);
        server.close(4001, "first").await.unwrap();
        server.close(4002, "second").await.unwrap();
        drop(server);
        let mut written = Vec::new();
        raw.read_to_end(&mut written).await.unwrap();
        let mut want = vec![0x88, 7];
        want.extend_from_slice(&4001u16.to_be_bytes());
        want.extend_from_slice(b"first");
        assert_eq!(written, want);

        // The client's close, echoed, then ours: only the echo.
        let (server_io, mut raw) = tokio::io::duplex(1024);
        let mut server = Socket::new(server_io, 1024);
        // A masked close frame without a code.
        raw.write_all(&[0x88, 0x80, 1, 2, 3, 4]).await.unwrap();
        assert!(server.next().await.is_none(), "the client closed");
        server.close(4001, "late").await.unwrap();
        drop(server);
        let mut written = Vec::new();
        raw.read_to_end(&mut written).await.unwrap();
        assert_eq!(written, [0x88, 0x00], "the echo and nothing after it");
    }

    #[tokio::test]
    async fn a_vanished_client_is_a_reset_and_a_breach_ends_reading() {
        let (mut server, client) = pair().await;
        drop(client);
        let read = server.next().await;
        assert!(matches!(read, Some(Err(ReadError::Reset))), "{read:?}");

        let (server_io, mut raw) = tokio::io::duplex(1024);
        let mut server = Socket::new(server_io, 1024);
        // An unmasked text frame.
        raw.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
        let read = server.next().await;
        assert!(
            matches!(read, Some(Err(ReadError::Protocol(_)))),
            "{read:?}"
        );
        assert!(
            server.next().await.is_none(),
            "nothing is read after a breach"
        );
    }
}
