//! A WebSocket text frame from a client: parsed as the gateway parses it,
//! then its patterns, topics and cursor as the session would read them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_config::{Pattern, Topic};
use switchboard_gateway::event::Cursor;
use switchboard_gateway::protocol::ClientMessage;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = serde_json::from_str::<ClientMessage>(text);
    // The pieces a frame carries, whatever the frame's shape.
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        for key in ["topics", "topic", "channel", "cursor"] {
            match value.get(key) {
                Some(serde_json::Value::String(s)) => {
                    let _ = Pattern::parse(s);
                    let _ = Topic::parse(s);
                    let _ = Cursor::parse(s);
                    let _ = Cursor::parse_lenient(s);
                }
                Some(serde_json::Value::Array(items)) => {
                    for s in items.iter().filter_map(serde_json::Value::as_str) {
                        if let (Ok(p), Ok(t)) = (Pattern::parse(s), Topic::parse(s)) {
                            let _ = p.matches(&t);
                            let _ = p.overlaps(&p);
                        }
                    }
                }
                _ => {}
            }
        }
    }
});
