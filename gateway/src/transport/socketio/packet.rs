//! Socket.IO v5 packets: `<type>[<attachments>-][<namespace>,][<ack id>][<JSON>]`,
//! and the reassembly of binary attachments (a `BINARY_EVENT` or
//! `BINARY_ACK` header, then that many binary Engine.IO messages).

use bytes::Bytes;
use serde_json::Value;

use super::engine::Payload;

/// Attachments one packet may announce.
pub const MAX_ATTACHMENTS: usize = 16;

/// The packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `0`: join a namespace (client), or accepted (server).
    Connect,
    /// `1`: leave a namespace.
    Disconnect,
    /// `2`: an event.
    Event,
    /// `3`: the answer to an event that asked for one.
    Ack,
    /// `4`: a namespace refused (server only).
    ConnectError,
    /// `5`: an event with binary attachments.
    BinaryEvent,
    /// `6`: an ack with binary attachments.
    BinaryAck,
}

impl Kind {
    fn digit(self) -> char {
        match self {
            Kind::Connect => '0',
            Kind::Disconnect => '1',
            Kind::Event => '2',
            Kind::Ack => '3',
            Kind::ConnectError => '4',
            Kind::BinaryEvent => '5',
            Kind::BinaryAck => '6',
        }
    }

    fn binary(self) -> bool {
        matches!(self, Kind::BinaryEvent | Kind::BinaryAck)
    }
}

/// One Socket.IO packet (attachments excepted).
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    /// Its type.
    pub kind: Kind,
    /// Its namespace (`/` when absent).
    pub nsp: String,
    /// The ack id of an event that wants an answer, or of the answer.
    pub id: Option<u64>,
    /// Its JSON data.
    pub data: Option<Value>,
    /// How many binary attachments follow (binary types only).
    pub attachments: usize,
}

/// Why a packet was refused (the connection is closed for it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty packet")]
    /// Nothing.
    Empty,
    #[error("unknown packet type")]
    /// Not a type digit.
    UnknownType,
    #[error("bad attachment count")]
    /// `5`/`6` without `<n>-`, or more than [`MAX_ATTACHMENTS`].
    BadAttachments,
    #[error("invalid payload")]
    /// JSON that does not parse or does not fit the type.
    InvalidPayload,
    #[error("a binary message nobody announced")]
    /// A binary message outside an attachment sequence.
    UnexpectedBinary,
    #[error("a text packet while attachments were expected")]
    /// A text packet before the announced attachments arrived.
    MissingAttachments,
    #[error("a placeholder names an attachment that does not exist")]
    /// `{"_placeholder":true,"num":n}` with `n` out of range.
    BadPlaceholder,
    #[error("the server never receives this packet type")]
    /// `CONNECT_ERROR` from a client.
    ServerOnly,
}

impl Packet {
    /// A packet without data.
    pub fn new(kind: Kind, nsp: &str) -> Self {
        Self {
            kind,
            nsp: nsp.to_owned(),
            id: None,
            data: None,
            attachments: 0,
        }
    }

    /// Decode a client's text packet and check its shape.
    pub fn decode(s: &str) -> Result<Self, ParseError> {
        let mut rest = s;
        let kind = match rest.as_bytes().first().ok_or(ParseError::Empty)? {
            b'0' => Kind::Connect,
            b'1' => Kind::Disconnect,
            b'2' => Kind::Event,
            b'3' => Kind::Ack,
            b'4' => Kind::ConnectError,
            b'5' => Kind::BinaryEvent,
            b'6' => Kind::BinaryAck,
            _ => return Err(ParseError::UnknownType),
        };
        rest = &rest[1..];
        let mut attachments = 0;
        if kind.binary() {
            let (n, after) = rest.split_once('-').ok_or(ParseError::BadAttachments)?;
            if n.is_empty() || n.len() > 3 || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ParseError::BadAttachments);
            }
            attachments = n.parse().map_err(|_| ParseError::BadAttachments)?;
            if attachments > MAX_ATTACHMENTS {
                return Err(ParseError::BadAttachments);
            }
            rest = after;
        }
        let mut nsp = "/".to_owned();
        if rest.starts_with('/') {
            let end = rest.find(',').unwrap_or(rest.len());
            nsp = rest[..end].to_owned();
            rest = rest.get(end + 1..).unwrap_or("");
        }
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let id = if digits > 0 {
            let id = rest[..digits]
                .parse()
                .map_err(|_| ParseError::InvalidPayload)?;
            rest = &rest[digits..];
            Some(id)
        } else {
            None
        };
        let data = if rest.is_empty() {
            None
        } else {
            Some(serde_json::from_str::<Value>(rest).map_err(|_| ParseError::InvalidPayload)?)
        };
        let valid = match kind {
            Kind::Connect => data.as_ref().is_none_or(Value::is_object),
            Kind::Disconnect => data.is_none(),
            Kind::ConnectError => return Err(ParseError::ServerOnly),
            Kind::Event | Kind::BinaryEvent => data
                .as_ref()
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .is_some_and(Value::is_string),
            Kind::Ack | Kind::BinaryAck => {
                id.is_some() && data.as_ref().is_some_and(Value::is_array)
            }
        };
        if !valid {
            return Err(ParseError::InvalidPayload);
        }
        Ok(Self {
            kind,
            nsp,
            id,
            data,
            attachments,
        })
    }

    /// The text form.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16);
        out.push(self.kind.digit());
        if self.kind.binary() {
            out.push_str(&self.attachments.to_string());
            out.push('-');
        }
        if self.nsp != "/" {
            out.push_str(&self.nsp);
            out.push(',');
        }
        if let Some(id) = self.id {
            out.push_str(&id.to_string());
        }
        if let Some(d) = &self.data {
            out.push_str(&d.to_string());
        }
        out
    }
}

/// A packet with its attachments.
#[derive(Debug, Clone, PartialEq)]
pub struct Complete {
    /// The packet.
    pub packet: Packet,
    /// Its binary attachments, in order.
    pub attachments: Vec<Bytes>,
}

/// Turns Engine.IO messages into complete Socket.IO packets.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<Complete>,
}

impl Assembler {
    /// Feed one message; a packet once one is complete.
    pub fn feed(&mut self, message: Payload) -> Result<Option<Complete>, ParseError> {
        match message {
            Payload::Text(t) => {
                if self.pending.is_some() {
                    return Err(ParseError::MissingAttachments);
                }
                let packet = Packet::decode(&t)?;
                let complete = Complete {
                    attachments: Vec::with_capacity(packet.attachments),
                    packet,
                };
                if complete.packet.attachments == 0 {
                    check_placeholders(&complete)?;
                    Ok(Some(complete))
                } else {
                    self.pending = Some(complete);
                    Ok(None)
                }
            }
            Payload::Binary(b) => {
                let pending = self.pending.as_mut().ok_or(ParseError::UnexpectedBinary)?;
                pending.attachments.push(b);
                if pending.attachments.len() < pending.packet.attachments {
                    return Ok(None);
                }
                let complete = self.pending.take().ok_or(ParseError::UnexpectedBinary)?;
                check_placeholders(&complete)?;
                Ok(Some(complete))
            }
        }
    }
}

/// The attachment a JSON value stands for, if it is a placeholder.
pub fn placeholder(v: &Value) -> Option<Option<usize>> {
    let o = v.as_object()?;
    if o.get("_placeholder") != Some(&Value::Bool(true)) {
        return None;
    }
    Some(o.get("num").and_then(Value::as_u64).map(|n| n as usize))
}

fn check_placeholders(c: &Complete) -> Result<(), ParseError> {
    fn walk(v: &Value, n: usize, depth: usize) -> bool {
        if depth > 64 {
            return true;
        }
        if let Some(p) = placeholder(v) {
            return p.is_some_and(|i| i < n);
        }
        match v {
            Value::Array(a) => a.iter().all(|x| walk(x, n, depth + 1)),
            Value::Object(o) => o.values().all(|x| walk(x, n, depth + 1)),
            _ => true,
        }
    }
    match &c.packet.data {
        Some(d) if !walk(d, c.attachments.len(), 0) => Err(ParseError::BadPlaceholder),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn decodes_the_protocols_examples() {
        let p = Packet::decode("0").unwrap();
        assert_eq!((p.kind, p.nsp.as_str(), p.data), (Kind::Connect, "/", None));
        let p = Packet::decode(r#"0/admin,{"token":"123"}"#).unwrap();
        assert_eq!(p.nsp, "/admin");
        assert_eq!(p.data, Some(json!({"token": "123"})));
        let p = Packet::decode(r#"2/admin,12["project:delete",123]"#).unwrap();
        assert_eq!((p.kind, p.id), (Kind::Event, Some(12)));
        let p = Packet::decode(r#"3/admin,13[]"#).unwrap();
        assert_eq!((p.kind, p.id), (Kind::Ack, Some(13)));
        let p = Packet::decode(r#"51-["hello",{"_placeholder":true,"num":0}]"#).unwrap();
        assert_eq!((p.kind, p.attachments), (Kind::BinaryEvent, 1));
        let p = Packet::decode("1/custom").unwrap();
        assert_eq!((p.kind, p.nsp.as_str()), (Kind::Disconnect, "/custom"));
    }

    #[test]
    fn encodes_like_the_reference() {
        let mut p = Packet::new(Kind::Event, "/");
        p.data = Some(json!(["message-back", 1]));
        p.id = Some(7);
        assert_eq!(p.encode(), r#"27["message-back",1]"#);
        let mut p = Packet::new(Kind::BinaryAck, "/custom");
        p.attachments = 2;
        p.id = Some(789);
        p.data = Some(json!([]));
        assert_eq!(p.encode(), "62-/custom,789[]");
    }

    #[test]
    fn refuses_malformed_packets() {
        for bad in [
            "",
            "9",
            "4abc",
            "abc",
            "2{}",
            "2[]",
            "2[1]",
            "42",
            "2abc[\"x\"]",
            "3[1]",
            "1{}",
            "5[\"x\"]",
            "5x-[\"x\"]",
            "5999-[\"x\"]",
            "0[1]",
            "2[\"x\"",
            "4/a,{}",
        ] {
            assert!(Packet::decode(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn attachments_that_lie_are_refused() {
        let mut a = Assembler::default();
        // A placeholder for attachment 1 when one was announced.
        assert!(
            a.feed(Payload::Text(
                r#"51-["x",{"_placeholder":true,"num":1}]"#.into()
            ))
            .unwrap()
            .is_none()
        );
        assert_eq!(
            a.feed(Payload::Binary(Bytes::from_static(b"1"))),
            Err(ParseError::BadPlaceholder)
        );
        // Binary nobody announced.
        let mut a = Assembler::default();
        assert_eq!(
            a.feed(Payload::Binary(Bytes::new())),
            Err(ParseError::UnexpectedBinary)
        );
        // Text before the announced attachments.
        let mut a = Assembler::default();
        a.feed(Payload::Text(r#"52-["x"]"#.into())).unwrap();
        a.feed(Payload::Binary(Bytes::new())).unwrap();
        assert_eq!(
            a.feed(Payload::Text("2[\"y\"]".into())),
            Err(ParseError::MissingAttachments)
        );
        // Two announced, two sent: complete.
        let mut a = Assembler::default();
        a.feed(Payload::Text(
            r#"52-["x",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]"#.into(),
        ))
        .unwrap();
        a.feed(Payload::Binary(Bytes::from_static(b"a"))).unwrap();
        let c = a
            .feed(Payload::Binary(Bytes::from_static(b"b")))
            .unwrap()
            .unwrap();
        assert_eq!(c.attachments.len(), 2);
    }

    proptest! {
        #[test]
        fn any_text_decodes_or_errs(s in "\\PC*") {
            let _ = Packet::decode(&s);
        }

        #[test]
        fn events_round_trip(nsp in "(/[a-z]{1,8})?", id in proptest::option::of(0u64..1_000_000), name in "[a-z_]{1,10}", n in 0i64..1000) {
            let p = Packet {
                kind: Kind::Event,
                nsp: if nsp.is_empty() { "/".into() } else { nsp },
                id,
                data: Some(json!([name, n])),
                attachments: 0,
            };
            prop_assert_eq!(Packet::decode(&p.encode()).unwrap(), p);
        }
    }
}
