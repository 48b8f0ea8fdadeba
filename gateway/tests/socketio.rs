//! The Socket.IO endpoint at the wire level: what socket.io-client does not
//! send but a broken or hostile client does, and the races of the upgrade.
//! (The official protocol suite and socket.io-client itself run in
//! tests/run.sh against the same code.)

mod common;

use common::{DEADLINE, Gateway, config, publish_ok, user_token};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn url(gw: &Gateway, query: &str) -> String {
    format!("http://{}/socket.io/?EIO=4&{query}", gw.addr)
}

/// Open a polling session; its sid.
async fn handshake(gw: &Gateway) -> String {
    let body = reqwest::get(url(gw, "transport=polling"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let open: Value = serde_json::from_str(body.strip_prefix('0').expect("open packet")).unwrap();
    assert_eq!(open["upgrades"], json!(["websocket"]));
    open["sid"].as_str().unwrap().to_owned()
}

async fn post(gw: &Gateway, sid: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(url(gw, &format!("transport=polling&sid={sid}")))
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn poll(gw: &Gateway, sid: &str) -> (u16, String) {
    let r = tokio::time::timeout(
        DEADLINE,
        reqwest::get(url(gw, &format!("transport=polling&sid={sid}"))),
    )
    .await
    .expect("poll answered")
    .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn ws(gw: &Gateway, query: &str) -> Ws {
    let u = format!(
        "ws://{}/socket.io/?EIO=4&transport=websocket{query}",
        gw.addr
    );
    tokio_tungstenite::connect_async(u).await.unwrap().0
}

/// The next text frame that is not a ping; None once closed.
async fn next_text(ws: &mut Ws) -> Option<String> {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(t))) if t.as_str() == "2" => {}
            Some(Ok(Message::Text(t))) => return Some(t.to_string()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// A WebSocket session whose main namespace is joined as `user`.
async fn joined(gw: &Gateway, user: &str) -> Ws {
    let mut s = ws(gw, "").await;
    assert!(next_text(&mut s).await.unwrap().starts_with('0'));
    let token = user_token("acme", user);
    s.send(Message::text(format!(r#"40{{"token":"{token}"}}"#)))
        .await
        .unwrap();
    let connect = next_text(&mut s).await.unwrap();
    assert!(connect.starts_with("40{"), "{connect}");
    let v: Value = serde_json::from_str(&connect[2..]).unwrap();
    assert!(v["sid"].is_string() && v["pid"].is_string(), "{v}");
    let hello = next_text(&mut s).await.unwrap();
    assert!(hello.starts_with(r#"42["connected","#), "{hello}");
    s
}

#[tokio::test]
async fn a_write_that_races_the_upgrade_is_kept() {
    // socket.io-client may still finish a POST it began over polling after
    // its probe was answered; refusing it (400) ended the session.
    let gw = Gateway::default().await;
    let sid = handshake(&gw).await;
    let mut s = ws(&gw, &format!("&sid={sid}")).await;
    s.send(Message::text("2probe")).await.unwrap();
    assert_eq!(next_text(&mut s).await.as_deref(), Some("3probe"));
    let token = user_token("acme", "alice");
    let (status, body) = post(&gw, &sid, format!(r#"40{{"token":"{token}"}}"#)).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    // A poll during the upgrade ends at once with a noop.
    assert_eq!(poll(&gw, &sid).await, (200, "6".into()));
    s.send(Message::text("5")).await.unwrap();
    // The namespace joined by that POST answers over the WebSocket.
    let connect = next_text(&mut s).await.unwrap();
    assert!(connect.starts_with("40{"), "{connect}");
    // Polling is over for this session.
    assert_eq!(poll(&gw, &sid).await.0, 400);
}

#[tokio::test]
async fn malformed_engine_io_input_is_refused_and_ends_only_its_session() {
    let gw = Gateway::default().await;
    // Unknown packet type: 400, and the session is gone.
    let sid = handshake(&gw).await;
    assert_eq!(post(&gw, &sid, "abc").await.0, 400);
    assert_eq!(poll(&gw, &sid).await.0, 400);
    // Bytes that are not UTF-8, base64 that is not base64.
    let sid = handshake(&gw).await;
    assert_eq!(post(&gw, &sid, vec![0xff, 0xfe, 0x34]).await.0, 400);
    let sid = handshake(&gw).await;
    assert_eq!(post(&gw, &sid, "4hi\x1eb!!!").await.0, 400);
    // An upgrade packet over polling.
    let sid = handshake(&gw).await;
    assert_eq!(post(&gw, &sid, "5").await.0, 400);
    // A body over maxPayload (1,000,000 by default): 413 and the end.
    let sid = handshake(&gw).await;
    let big = format!("4{}", "x".repeat(1_000_001));
    assert_eq!(post(&gw, &sid, big).await.0, 413);
    assert_eq!(poll(&gw, &sid).await.0, 400);
    // Unknown session ids, versions, transports and methods.
    assert_eq!(poll(&gw, "nobody-here").await.0, 400);
    assert_eq!(poll(&gw, "../../etc").await.0, 400);
    for q in [
        "EIO=3&transport=polling",
        "EIO=4&transport=carrier-pigeon",
        "transport=polling",
    ] {
        let r = reqwest::get(format!("http://{}/socket.io/?{q}", gw.addr))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{q}");
        let v: Value = r.json().await.unwrap();
        assert!(v["message"].is_string(), "{v}");
    }
    let r = reqwest::Client::new()
        .put(url(&gw, "transport=polling"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // The gateway goes on serving.
    let mut s = joined(&gw, "alice").await;
    s.send(Message::text(r#"42["ping"]"#)).await.unwrap();
    assert!(next_text(&mut s).await.unwrap().starts_with(r#"42["pong""#));
}

#[tokio::test]
async fn malformed_socket_io_packets_close_the_connection() {
    let gw = Gateway::default().await;
    let token = user_token("acme", "alice");
    for bad in [
        // Unknown type, an event that is not an array, an ack id that is not a number.
        "4abc".to_owned(),
        r#"42{}"#.to_owned(),
        r#"42abc["message"]"#.to_owned(),
        // An attachment count beyond what a packet may announce.
        r#"45999-["message",{"_placeholder":true,"num":0}]"#.to_owned(),
        // A CONNECT whose payload is not an object.
        r#"40[1,2]"#.to_owned(),
        // A CONNECT_ERROR from a client.
        r#"44{"message":"x"}"#.to_owned(),
    ] {
        let mut s = ws(&gw, "").await;
        next_text(&mut s).await.unwrap();
        s.send(Message::text(format!(r#"40{{"token":"{token}"}}"#)))
            .await
            .unwrap();
        next_text(&mut s).await.unwrap();
        next_text(&mut s).await.unwrap();
        s.send(Message::text(bad.clone())).await.unwrap();
        assert_eq!(
            next_text(&mut s).await,
            None,
            "{bad} must close the connection"
        );
    }
}

#[tokio::test]
async fn attachment_counts_that_lie_close_the_connection() {
    let gw = Gateway::default().await;
    // A placeholder for an attachment that was never announced.
    let mut s = joined(&gw, "alice").await;
    s.send(Message::text(
        r#"451-["message",{"_placeholder":true,"num":3}]"#,
    ))
    .await
    .unwrap();
    s.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(next_text(&mut s).await, None);
    // Binary nobody announced.
    let mut s = joined(&gw, "alice").await;
    s.send(Message::binary(vec![1u8])).await.unwrap();
    assert_eq!(next_text(&mut s).await, None);
    // Two announced, a text packet after one.
    let mut s = joined(&gw, "alice").await;
    s.send(Message::text(
        r#"452-["message",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]"#,
    ))
    .await
    .unwrap();
    s.send(Message::binary(vec![1u8])).await.unwrap();
    s.send(Message::text(r#"42["ping"]"#)).await.unwrap();
    assert_eq!(next_text(&mut s).await, None);
    // Honest attachments are accepted (base64 in the published payload).
    let mut s = joined(&gw, "alice").await;
    s.send(Message::text(r#"42["join_room",{"roomId":"files.1"}]"#))
        .await
        .unwrap();
    assert_eq!(
        next_text(&mut s).await.unwrap(),
        r#"42["room_joined",{"roomId":"files.1"}]"#
    );
    s.send(Message::text(
        r#"451-["message",{"roomId":"files.1","payload":{"blob":{"_placeholder":true,"num":0}}}]"#,
    ))
    .await
    .unwrap();
    s.send(Message::binary(vec![1u8, 2, 3, 4])).await.unwrap();
    let ack = next_text(&mut s).await.unwrap();
    assert!(ack.starts_with(r#"42["message_ack""#), "{ack}");
    let event = next_text(&mut s).await.unwrap();
    assert!(
        event.contains(r#""payload":{"blob":"AQIDBA=="}"#),
        "{event}"
    );
}

#[tokio::test]
async fn namespaces_tokens_and_oversized_messages() {
    let mut c = config();
    c.socketio.max_payload = 4096;
    let gw = Gateway::start(c).await;
    let mut s = ws(&gw, "").await;
    let open: Value = serde_json::from_str(&next_text(&mut s).await.unwrap()[1..]).unwrap();
    assert_eq!(open["maxPayload"], 4096);
    assert_eq!(open["upgrades"], json!([]));
    // A namespace the gateway does not serve.
    s.send(Message::text("40/admin,")).await.unwrap();
    assert_eq!(
        next_text(&mut s).await.unwrap(),
        r#"44/admin,{"message":"Invalid namespace"}"#
    );
    // No token, then a bad one: refused with the reason, the connection stays.
    s.send(Message::text("40")).await.unwrap();
    let refused = next_text(&mut s).await.unwrap();
    let v: Value = serde_json::from_str(refused.strip_prefix("44").unwrap()).unwrap();
    assert_eq!(v["message"], "unauthorized");
    assert_eq!(v["data"]["code"], "unauthorized");
    s.send(Message::text(r#"40{"token":"eyJhbGciOiJub25lIn0.e30."}"#))
        .await
        .unwrap();
    assert!(next_text(&mut s).await.unwrap().starts_with("44{"));
    // Then a good one.
    let token = user_token("acme", "alice");
    s.send(Message::text(format!(r#"40{{"token":"{token}"}}"#)))
        .await
        .unwrap();
    assert!(next_text(&mut s).await.unwrap().starts_with("40{"));
    assert!(
        next_text(&mut s)
            .await
            .unwrap()
            .starts_with(r#"42["connected""#)
    );
    // A message over maxPayload ends the session.
    s.send(Message::text(format!(
        r#"42["message",{{"roomId":"a","payload":"{}"}}]"#,
        "x".repeat(5000)
    )))
    .await
    .unwrap();
    assert_eq!(next_text(&mut s).await, None);
}

#[tokio::test]
async fn tenants_are_walls_and_the_rate_limit_holds() {
    let mut c = config();
    c.limits.messages_per_minute = 60;
    let gw = Gateway::start(c).await;
    let mut alice = joined(&gw, "alice").await;
    alice
        .send(Message::text(r#"42["join_room",{"roomId":"deal.1"}]"#))
        .await
        .unwrap();
    next_text(&mut alice).await.unwrap();
    // Another tenant's event on the same topic never arrives; our own does.
    publish_ok(&gw, "globex", "deal.1", json!({"secret": true})).await;
    let id = publish_ok(&gw, "acme", "deal.1", json!({"n": 1})).await;
    let event = next_text(&mut alice).await.unwrap();
    assert!(
        event.contains(&format!(r#""id":"{id}""#)) && !event.contains("secret"),
        "{event}"
    );
    // 60 a minute allows a burst of 10 (join_room took one); then the
    // client is told and closed.
    let mut answers = Vec::new();
    for _ in 0..12 {
        alice.send(Message::text(r#"42["ping"]"#)).await.unwrap();
    }
    while let Some(t) = next_text(&mut alice).await {
        answers.push(t);
    }
    assert_eq!(answers.iter().filter(|a| a.contains("pong")).count(), 9);
    assert!(
        answers.last().unwrap().contains("rate_limited"),
        "{answers:?}"
    );
}

#[tokio::test]
async fn a_socket_io_message_reaches_native_websocket_clients_and_back() {
    let gw = Gateway::default().await;
    let mut native = common::Client::open(&gw, "acme").await;
    native.subscribe(&["deal.5"]).await;
    let mut sio = joined(&gw, "alice").await;
    sio.send(Message::text(r#"42["join_room",{"roomId":"deal.5"}]"#))
        .await
        .unwrap();
    next_text(&mut sio).await.unwrap();
    sio.send(Message::text(
        r#"427["message",{"type":"chat.message","roomId":"deal.5","payload":{"text":"hi"}}]"#,
    ))
    .await
    .unwrap();
    // The ack callback (id 7) and the named reply.
    let ack = next_text(&mut sio).await.unwrap();
    assert!(ack.starts_with(r#"437[{"#), "{ack}");
    let native_event = &native.events(1).await[0];
    assert_eq!(native_event["event_type"], "deal.5");
    assert_eq!(native_event["data"], json!({"text": "hi"}));
    assert_eq!(native_event["metadata"]["publisher"], "alice");
    // And a native client's publish reaches the Socket.IO room.
    native
        .send(json!({"type": "publish", "topic": "deal.5", "data": {"from": "native"}}))
        .await;
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|t: &String| t.contains(r#""from":"native""#))
    {
        seen.push(next_text(&mut sio).await.expect("the native publish"));
    }
}

#[tokio::test]
async fn connection_limits_hold_for_socket_io() {
    let mut c = config();
    c.limits.max_connections = 1;
    let gw = Gateway::start(c).await;
    let _first = joined(&gw, "alice").await;
    let mut second = ws(&gw, "").await;
    next_text(&mut second).await.unwrap();
    let token = user_token("acme", "bob");
    second
        .send(Message::text(format!(r#"40{{"token":"{token}"}}"#)))
        .await
        .unwrap();
    let refused = next_text(&mut second).await.unwrap();
    let v: Value =
        serde_json::from_str(refused.strip_prefix("44").expect("CONNECT_ERROR")).unwrap();
    assert_eq!(v["message"], "too_many_connections", "{v}");
}
