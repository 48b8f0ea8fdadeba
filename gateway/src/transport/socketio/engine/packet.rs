//! Engine.IO v4 packets: the text encoding (a type digit, then data), the
//! raw binary frames of the WebSocket transport, and the polling payload
//! (packets joined by the record separator `\x1e`, binary ones as `b` and
//! base64).

use axum::extract::ws::Utf8Bytes;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;

/// What separates packets in a polling payload.
pub const SEPARATOR: char = '\x1e';

/// The content of a `message` packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Bytes),
}

impl Payload {
    /// Its size in bytes, as `maxPayload` counts it.
    pub fn len(&self) -> usize {
        match self {
            Payload::Text(t) => t.len(),
            Payload::Binary(b) => b.len(),
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One Engine.IO packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// `0`: the handshake (server to client).
    Open(String),
    /// `1`: the session ends.
    Close,
    /// `2`: a heartbeat request (`2probe` during an upgrade).
    Ping(String),
    /// `3`: a heartbeat answer (`3probe` during an upgrade).
    Pong(String),
    /// `4`: a message for the layer above.
    Message(Payload),
    /// `5`: the client switches to the WebSocket it probed.
    Upgrade,
    /// `6`: nothing (ends a pending poll during an upgrade).
    Noop,
    /// An outbound packet already in its text form, type digit included
    /// (an event's Socket.IO packet, built once and shared by every
    /// connection it goes to).
    Encoded(Utf8Bytes),
}

/// A packet that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty packet")]
    /// Nothing at all.
    Empty,
    #[error("unknown packet type {0:?}")]
    /// The first character is not a packet type.
    UnknownType(char),
    #[error("binary packet is not valid base64")]
    /// A polling `b` packet whose base64 does not decode.
    BadBase64,
    #[error("packet type {0} carries no data")]
    /// Data on a packet that has none (`1x`, `5x`, `6x`).
    UnexpectedData(u8),
}

impl Packet {
    /// Decode a text packet (a WebSocket text frame, or one packet of a
    /// polling payload without the base64 `b` form).
    pub fn decode_text(s: &str) -> Result<Self, DecodeError> {
        let mut chars = s.chars();
        let kind = chars.next().ok_or(DecodeError::Empty)?;
        let rest = chars.as_str();
        let no_data = |n: u8, p: Packet| {
            if rest.is_empty() {
                Ok(p)
            } else {
                Err(DecodeError::UnexpectedData(n))
            }
        };
        match kind {
            '0' => Ok(Packet::Open(rest.to_owned())),
            '1' => no_data(1, Packet::Close),
            '2' => Ok(Packet::Ping(rest.to_owned())),
            '3' => Ok(Packet::Pong(rest.to_owned())),
            '4' => Ok(Packet::Message(Payload::Text(rest.to_owned()))),
            '5' => no_data(5, Packet::Upgrade),
            '6' => no_data(6, Packet::Noop),
            c => Err(DecodeError::UnknownType(c)),
        }
    }

    /// The text form (binary messages as `b<base64>`, their polling form;
    /// a WebSocket sends them as binary frames instead).
    pub fn encode_text(&self, out: &mut String) {
        match self {
            Packet::Open(d) => {
                out.push('0');
                out.push_str(d);
            }
            Packet::Close => out.push('1'),
            Packet::Ping(d) => {
                out.push('2');
                out.push_str(d);
            }
            Packet::Pong(d) => {
                out.push('3');
                out.push_str(d);
            }
            Packet::Message(Payload::Text(t)) => {
                out.push('4');
                out.push_str(t);
            }
            Packet::Message(Payload::Binary(b)) => {
                out.push('b');
                out.push_str(&BASE64.encode(b));
            }
            Packet::Upgrade => out.push('5'),
            Packet::Noop => out.push('6'),
            Packet::Encoded(t) => out.push_str(t.as_str()),
        }
    }

    /// How many bytes its polling form takes (close enough to bound a
    /// response by `maxPayload`).
    pub fn polling_len(&self) -> usize {
        match self {
            Packet::Open(d) | Packet::Ping(d) | Packet::Pong(d) => d.len() + 1,
            Packet::Message(Payload::Text(t)) => t.len() + 1,
            Packet::Message(Payload::Binary(b)) => b.len().div_ceil(3) * 4 + 1,
            Packet::Close | Packet::Upgrade | Packet::Noop => 1,
            Packet::Encoded(t) => t.len(),
        }
    }
}

/// Decode a polling payload (a POST body) into its packets.
pub fn decode_payload(body: &str) -> Result<Vec<Packet>, DecodeError> {
    body.split(SEPARATOR)
        .map(|p| match p.strip_prefix('b') {
            Some(b64) => BASE64
                .decode(b64)
                .map(|b| Packet::Message(Payload::Binary(Bytes::from(b))))
                .map_err(|_| DecodeError::BadBase64),
            None => Packet::decode_text(p),
        })
        .collect()
}

/// Encode packets as one polling payload.
pub fn encode_payload<'a>(packets: impl IntoIterator<Item = &'a Packet>) -> String {
    let mut out = String::new();
    for (i, p) in packets.into_iter().enumerate() {
        if i > 0 {
            out.push(SEPARATOR);
        }
        p.encode_text(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_packets_round_trip() {
        for p in [
            Packet::Open(r#"{"sid":"x"}"#.into()),
            Packet::Close,
            Packet::Ping(String::new()),
            Packet::Ping("probe".into()),
            Packet::Pong("probe".into()),
            Packet::Message(Payload::Text("hello".into())),
            Packet::Upgrade,
            Packet::Noop,
        ] {
            let mut s = String::new();
            p.encode_text(&mut s);
            assert_eq!(Packet::decode_text(&s), Ok(p));
        }
    }

    #[test]
    fn payload_with_text_and_binary() {
        // The protocol's own example.
        let packets = decode_payload("4hello\x1ebAQIDBA==").unwrap();
        assert_eq!(
            packets,
            vec![
                Packet::Message(Payload::Text("hello".into())),
                Packet::Message(Payload::Binary(Bytes::from_static(&[1, 2, 3, 4]))),
            ]
        );
        assert_eq!(encode_payload(&packets), "4hello\x1ebAQIDBA==");
    }

    #[test]
    fn bad_packets_are_errors() {
        assert_eq!(decode_payload(""), Err(DecodeError::Empty));
        assert_eq!(
            decode_payload("4a\x1e9x"),
            Err(DecodeError::UnknownType('9'))
        );
        assert_eq!(decode_payload("b!!"), Err(DecodeError::BadBase64));
        assert_eq!(
            Packet::decode_text("1x"),
            Err(DecodeError::UnexpectedData(1))
        );
    }

    proptest! {
        #[test]
        fn any_body_decodes_or_errs(s in "\\PC*") {
            let _ = decode_payload(&s);
        }

        #[test]
        fn messages_round_trip(texts in proptest::collection::vec("[^\x1e]*", 1..5)) {
            let packets: Vec<Packet> = texts.into_iter().map(|t| Packet::Message(Payload::Text(t))).collect();
            prop_assert_eq!(decode_payload(&encode_payload(&packets)).unwrap(), packets);
        }
    }
}
