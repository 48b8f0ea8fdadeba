//! Socket.IO traffic: an Engine.IO polling body or WebSocket frame, and the
//! Socket.IO packets in it with their binary attachments.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_gateway::transport::socketio::engine::Payload;
use switchboard_gateway::transport::socketio::engine::packet::{
    Packet as EnginePacket, decode_payload,
};
use switchboard_gateway::transport::socketio::packet::{Assembler, Packet};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = EnginePacket::decode_text(text);
    let _ = decode_payload(text);
    let _ = Packet::decode(text);
    // Text parts, then the raw bytes as a binary attachment, into one
    // assembler (a packet announcing attachments waits for them).
    let mut assembler = Assembler::default();
    for part in text.split('\u{1e}') {
        let _ = assembler.feed(Payload::Text(part.to_owned()));
        let _ = assembler.feed(Payload::Binary(data.to_vec().into()));
    }
});
