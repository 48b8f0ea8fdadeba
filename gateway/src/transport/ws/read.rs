//! Reading client frames (RFC 6455, section 5), without I/O: bytes read
//! from the socket go in, whole messages come out.
//!
//! tungstenite parses each frame's header; the rules a server must apply
//! on top are here: client frames are masked, no reserved bit is set (no
//! extension is negotiated), control frames are whole and at most 125
//! bytes, fragments continue a message that was started and nothing else,
//! a message stays within the size limit (checked from the header, before
//! its payload is read), text is UTF-8, and a close frame carries an
//! allowed code. Nothing is kept while nothing is pending: an idle
//! connection's reader holds no buffer (reads land in the worker thread's
//! scratch buffer first, see `socket.rs`).

use std::io::Cursor;

use bytes::{Buf, Bytes, BytesMut};

use crate::protocol::Close;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

/// A message from the client.
#[derive(Debug, PartialEq)]
pub(crate) enum Incoming {
    Text(Utf8Bytes),
    Binary(Bytes),
    /// A ping: the socket answers it with a pong before reading on.
    Ping(Bytes),
    Pong,
    /// A close frame (with the code, if the client gave one).
    Close(Option<u16>),
}

/// Why the client's frames cannot be read on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("a message of {size} bytes exceeds the limit of {max}")]
    TooBig { size: u64, max: u32 },
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("a text message or close reason is not valid UTF-8")]
    InvalidUtf8,
    #[error("the connection ended without a closing handshake")]
    Reset,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ReadError {
    /// The close that tells the client what it did (RFC 6455, section
    /// 7.4.1); None when the connection is gone.
    pub(crate) fn close(&self) -> Option<Close> {
        match self {
            ReadError::TooBig { .. } => Some(Close::MessageTooBig),
            ReadError::Protocol(_) => Some(Close::ProtocolError),
            ReadError::InvalidUtf8 => Some(Close::InvalidPayload),
            ReadError::Reset | ReadError::Io(_) => None,
        }
    }
}

/// A fragmented message being put together.
struct Fragments {
    text: bool,
    data: BytesMut,
}

/// Client frames read and not yet taken, and the message being assembled.
pub(crate) struct FrameReader {
    /// Bytes read and not parsed yet; unallocated when there are none.
    buf: BytesMut,
    /// A message whose first fragment came and whose last did not yet.
    fragments: Option<Box<Fragments>>,
    /// The largest message (and frame) the client may send.
    max: u32,
}

impl FrameReader {
    pub(crate) fn new(max: u32) -> Self {
        FrameReader {
            buf: BytesMut::new(),
            fragments: None,
            max,
        }
    }

    /// Bytes read from the socket.
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Is a frame partly read?
    pub(crate) fn mid_frame(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next whole message in what was read; None until more is read.
    pub(crate) fn next(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let mut cursor = Cursor::new(&self.buf[..]);
            let parsed = FrameHeader::parse(&mut cursor)
                .map_err(|_| ReadError::Protocol("reserved opcode"))?;
            let Some((head, len)) = parsed else {
                return Ok(None);
            };
            // At most 14.
            let head_len = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
            let mask = self.check(&head, len)?;
            // `check` bounds the length by the limit (a u32).
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if self.buf.len() - head_len < len {
                return Ok(None);
            }
            self.buf.advance(head_len);
            let mut payload = self.buf.split_to(len);
            if self.buf.is_empty() {
                // What the payload does not hold is given back with it.
                self.buf = BytesMut::new();
            }
            unmask(&mut payload, mask);
            let message = match head.opcode {
                OpCode::Control(Control::Ping) => Incoming::Ping(payload.freeze()),
                OpCode::Control(Control::Pong) => Incoming::Pong,
                OpCode::Control(_) => close_frame(&payload)?,
                OpCode::Data(Data::Continue) => {
                    let Some(mut whole) = self.fragments.take() else {
                        // `check` refused it.
                        return Err(ReadError::Protocol("continuation without a message"));
                    };
                    whole.data.extend_from_slice(&payload);
                    if !head.is_final {
                        self.fragments = Some(whole);
                        continue;
                    }
                    message(whole.text, whole.data)?
                }
                OpCode::Data(kind) => {
                    let text = kind == Data::Text;
                    if !head.is_final {
                        self.fragments = Some(Box::new(Fragments {
                            text,
                            data: payload,
                        }));
                        continue;
                    }
                    message(text, payload)?
                }
            };
            return Ok(Some(message));
        }
    }

    /// The frame's header against the rules; its mask if it passes.
    fn check(&self, head: &FrameHeader, len: u64) -> Result<[u8; 4], ReadError> {
        if head.rsv1 || head.rsv2 || head.rsv3 {
            return Err(ReadError::Protocol(
                "a reserved bit is set (no extension was negotiated)",
            ));
        }
        let Some(mask) = head.mask else {
            return Err(ReadError::Protocol("client frames must be masked"));
        };
        match head.opcode {
            OpCode::Control(_) if !head.is_final => {
                Err(ReadError::Protocol("a control frame may not be fragmented"))
            }
            OpCode::Control(_) if len > 125 => Err(ReadError::Protocol(
                "a control frame carries at most 125 bytes",
            )),
            OpCode::Control(_) => Ok(mask),
            OpCode::Data(Data::Continue) if self.fragments.is_none() => Err(ReadError::Protocol(
                "a continuation frame without a message to continue",
            )),
            OpCode::Data(Data::Text | Data::Binary) if self.fragments.is_some() => Err(
                ReadError::Protocol("a new message before the last one's final fragment"),
            ),
            OpCode::Data(_) => {
                let so_far = self.fragments.as_ref().map_or(0, |f| f.data.len() as u64);
                let size = so_far.saturating_add(len);
                if size > u64::from(self.max) {
                    return Err(ReadError::TooBig {
                        size,
                        max: self.max,
                    });
                }
                Ok(mask)
            }
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

fn message(text: bool, data: BytesMut) -> Result<Incoming, ReadError> {
    let data = data.freeze();
    if text {
        Utf8Bytes::try_from(data)
            .map(Incoming::Text)
            .map_err(|_| ReadError::InvalidUtf8)
    } else {
        Ok(Incoming::Binary(data))
    }
}

/// A close frame's payload: nothing, or a code and a UTF-8 reason.
fn close_frame(payload: &[u8]) -> Result<Incoming, ReadError> {
    match payload {
        [] => Ok(Incoming::Close(None)),
        [_] => Err(ReadError::Protocol("a close frame's code takes two bytes")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !CloseCode::from(code).is_allowed() {
                return Err(ReadError::Protocol("a close code that may not be sent"));
            }
            std::str::from_utf8(reason).map_err(|_| ReadError::InvalidUtf8)?;
            Ok(Incoming::Close(Some(code)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;

    /// A frame as a client writes it (masked), by tungstenite's writer.
    fn client_frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let head = FrameHeader {
            is_final: fin,
            opcode,
            mask: Some([0x37, 0xfa, 0x21, 0x3d]),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        Frame::from_payload(head, Bytes::copy_from_slice(payload))
            .format(&mut out)
            .expect("a frame formats into a Vec");
        out
    }

    const TEXT: OpCode = OpCode::Data(Data::Text);
    const BINARY: OpCode = OpCode::Data(Data::Binary);
    const CONTINUE: OpCode = OpCode::Data(Data::Continue);
    const PING: OpCode = OpCode::Control(Control::Ping);
    const CLOSE: OpCode = OpCode::Control(Control::Close);

    fn read_all(reader: &mut FrameReader, bytes: &[u8]) -> Result<Vec<Incoming>, ReadError> {
        reader.extend(bytes);
        let mut out = Vec::new();
        while let Some(m) = reader.next()? {
            out.push(m);
        }
        Ok(out)
    }

    fn text(s: &str) -> Incoming {
        Incoming::Text(Utf8Bytes::from(s))
    }

    #[test]
    fn whole_and_fragmented_messages_with_control_frames_between() {
        let mut bytes = client_frame(TEXT, true, b"{\"type\":\"ping\"}");
        bytes.extend(client_frame(TEXT, false, b"hel"));
        bytes.extend(client_frame(PING, true, b"p"));
        bytes.extend(client_frame(CONTINUE, false, b"lo "));
        bytes.extend(client_frame(CONTINUE, true, "wörld".as_bytes()));
        bytes.extend(client_frame(BINARY, true, &[0, 1, 2]));
        bytes.extend(client_frame(CLOSE, true, &[0x03, 0xe8, b'o', b'k']));
        let mut reader = FrameReader::new(1024);
        let got = read_all(&mut reader, &bytes).expect("valid frames");
        assert_eq!(
            got,
            [
                text("{\"type\":\"ping\"}"),
                Incoming::Ping(Bytes::from_static(b"p")),
                text("hello wörld"),
                Incoming::Binary(Bytes::from_static(&[0, 1, 2])),
                Incoming::Close(Some(1000)),
            ]
        );
        assert!(!reader.mid_frame());
    }

    #[test]
    fn a_frame_split_anywhere_waits_for_its_rest() {
        let frame = client_frame(TEXT, true, &[b'a'; 300]);
        for cut in 1..frame.len() {
            let mut reader = FrameReader::new(1024);
            let first = read_all(&mut reader, &frame[..cut]).expect("a prefix is not an error");
            assert!(first.is_empty(), "cut at {cut}");
            assert!(reader.mid_frame());
            let rest = read_all(&mut reader, &frame[cut..]).expect("the rest completes it");
            assert_eq!(rest, [text(&"a".repeat(300))], "cut at {cut}");
        }
    }

    fn error_of(bytes: &[u8], max: u32) -> ReadError {
        match read_all(&mut FrameReader::new(max), bytes) {
            Err(e) => e,
            Ok(got) => panic!("{bytes:?} was read as {got:?}"),
        }
    }

    #[test]
    fn frames_against_the_rules_are_refused_with_the_code_that_says_why() {
        let unmasked = [0x81, 0x02, b'h', b'i'];
        let mut rsv1 = client_frame(TEXT, true, b"hi");
        rsv1[0] |= 0x40;
        let mut reserved_opcode = client_frame(TEXT, true, b"hi");
        reserved_opcode[0] = 0x80 | 0x3;
        let mut fragmented_ping = client_frame(PING, true, b"");
        fragmented_ping[0] &= 0x7f;
        let mut interrupted = client_frame(TEXT, false, b"a");
        interrupted.extend(client_frame(TEXT, true, b"b"));
        let cases: [(&[u8], u16); 11] = [
            (&unmasked, 1002),
            (&rsv1, 1002),
            (&reserved_opcode, 1002),
            (&fragmented_ping, 1002),
            (&client_frame(PING, true, &[0; 126]), 1002),
            (&client_frame(CONTINUE, true, b"x"), 1002),
            (&interrupted, 1002),
            (&client_frame(CLOSE, true, &[0x03]), 1002),
            (&client_frame(CLOSE, true, &[0x03, 0xee]), 1002),
            (&client_frame(TEXT, true, &[0xc3, 0x28]), 1007),
            (&client_frame(CLOSE, true, &[0x03, 0xe8, 0xff]), 1007),
        ];
        for (bytes, code) in cases {
            let e = error_of(bytes, 1024);
            assert_eq!(e.close().map(Close::code), Some(code), "{bytes:x?}: {e}");
        }
    }

    /// The limit is checked from the headers, before a payload is read:
    /// a frame that claims too much is refused on its first bytes.
    #[test]
    fn a_message_over_the_limit_is_refused_before_its_payload_comes() {
        let big = client_frame(BINARY, true, &[0; 2000]);
        let e = error_of(&big[..8], 1000);
        assert!(
            matches!(
                e,
                ReadError::TooBig {
                    size: 2000,
                    max: 1000
                }
            ),
            "{e}"
        );
        // Fragments count together.
        let mut parts = client_frame(TEXT, false, &[b'a'; 600]);
        parts.extend(client_frame(CONTINUE, true, &[b'a'; 600]));
        let e = error_of(&parts, 1000);
        assert!(
            matches!(
                e,
                ReadError::TooBig {
                    size: 1200,
                    max: 1000
                }
            ),
            "{e}"
        );
        let exact = client_frame(TEXT, true, &[b'a'; 1000]);
        let got = read_all(&mut FrameReader::new(1000), &exact).expect("at the limit");
        assert_eq!(got.len(), 1);
    }

    /// A fragmented UTF-8 character is whole once the message is.
    #[test]
    fn text_is_checked_as_a_whole_message() {
        let mut bytes = client_frame(TEXT, false, &[0xc3]);
        bytes.extend(client_frame(CONTINUE, true, &[0xa9]));
        let got = read_all(&mut FrameReader::new(64), &bytes).expect("é in two fragments");
        assert_eq!(got, [text("é")]);
    }

    proptest! {
        /// Any sequence of client messages, fragmented any way and read
        /// in chunks of any sizes, comes out as the same messages.
        #[test]
        fn messages_survive_any_fragmenting_and_chunking(
            messages in prop::collection::vec(
                (any::<bool>(), "[a-zé€ ]{0,40}", 1usize..4), 1..8),
            chunk in 1usize..64,
        ) {
            let mut bytes = Vec::new();
            let mut expected = Vec::new();
            for (is_text, body, pieces) in &messages {
                let data = body.as_bytes();
                let step = data.len().div_ceil(*pieces).max(1);
                let parts: Vec<&[u8]> = if data.is_empty() {
                    vec![data]
                } else {
                    data.chunks(step).collect()
                };
                for (i, part) in parts.iter().enumerate() {
                    let opcode = match (i, is_text) {
                        (0, true) => TEXT,
                        (0, false) => BINARY,
                        _ => CONTINUE,
                    };
                    bytes.extend(client_frame(opcode, i + 1 == parts.len(), part));
                }
                expected.push(if *is_text {
                    text(body)
                } else {
                    Incoming::Binary(Bytes::copy_from_slice(data))
                });
            }
            let mut reader = FrameReader::new(4096);
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                got.extend(read_all(&mut reader, piece).expect("valid frames"));
            }
            prop_assert_eq!(got, expected);
            prop_assert!(!reader.mid_frame());
        }

        /// Whatever bytes a client sends, reading them ends in messages
        /// within the limit or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let mut reader = FrameReader::new(128);
            if let Ok(messages) = read_all(&mut reader, &bytes) {
                for m in messages {
                    let len = match &m {
                        Incoming::Text(t) => t.len(),
                        Incoming::Binary(b) | Incoming::Ping(b) => b.len(),
                        Incoming::Pong | Incoming::Close(_) => 0,
                    };
                    prop_assert!(len <= 128, "{m:?}");
                }
            }
        }
    }
}
