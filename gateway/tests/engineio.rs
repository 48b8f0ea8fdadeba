//! Engine.IO v4 behaviour that the vendored Socket.IO suite does not cover
//! and the (unlicensed, so not vendored) official Engine.IO suite does:
//! payloads of several packets, binary over polling and WebSocket, the
//! session ending on a malformed packet or on two polls at once. Run
//! against the engine layer with an echo session, as that suite's fixture.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use switchboard_gateway::transport::socketio::engine::{Accept, Engine, EngineConfig};
use switchboard_gateway::transport::socketio::router;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(10);

async fn echo_server() -> String {
    echo_engine().await.0
}

/// The echo endpoint, its engine, and a channel that names each session
/// whose task has ended (its socket dropped).
async fn echo_engine() -> (String, Arc<Engine>, mpsc::UnboundedReceiver<String>) {
    let (ended_tx, ended) = mpsc::unbounded_channel();
    let accept: Accept = Box::new(move |mut socket, _| {
        let ended_tx = ended_tx.clone();
        tokio::spawn(async move {
            while let Ok(m) = socket.recv().await {
                socket.send([m]);
            }
            let sid = socket.sid().to_owned();
            drop(socket);
            let _ = ended_tx.send(sid);
        });
    });
    let engine: Arc<Engine> = Engine::new(
        EngineConfig {
            ping_interval: Duration::from_millis(300),
            ping_timeout: Duration::from_millis(200),
            max_payload: 1_000_000,
        },
        accept,
    );
    let app: axum::Router = router(engine.clone(), "/engine.io");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("127.0.0.1:{}", addr.port()), engine, ended)
}

fn polling(addr: &str, sid: Option<&str>) -> String {
    match sid {
        Some(s) => format!("http://{addr}/engine.io/?EIO=4&transport=polling&sid={s}"),
        None => format!("http://{addr}/engine.io/?EIO=4&transport=polling"),
    }
}

async fn open(addr: &str) -> String {
    let body = reqwest::get(polling(addr, None))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&body[1..]).unwrap();
    v["sid"].as_str().unwrap().to_owned()
}

async fn get(addr: &str, sid: &str) -> (u16, String) {
    let r = tokio::time::timeout(DEADLINE, reqwest::get(polling(addr, Some(sid))))
        .await
        .expect("answered")
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn post(addr: &str, sid: &str, body: &'static str) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(polling(addr, Some(sid)))
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn polling_payloads_of_text_and_binary_packets_come_back_whole() {
    let addr = echo_server().await;
    let sid = open(&addr).await;
    assert_eq!(post(&addr, &sid, "4hello").await, (200, "ok".into()));
    assert_eq!(get(&addr, &sid).await, (200, "4hello".into()));
    assert_eq!(post(&addr, &sid, "4test1\x1e4test2\x1e4test3").await.0, 200);
    assert_eq!(get(&addr, &sid).await.1, "4test1\x1e4test2\x1e4test3");
    assert_eq!(post(&addr, &sid, "4hello\x1ebAQIDBA==").await.0, 200);
    assert_eq!(get(&addr, &sid).await.1, "4hello\x1ebAQIDBA==");
}

#[tokio::test]
async fn two_polls_at_once_end_the_session() {
    let addr = echo_server().await;
    let sid = open(&addr).await;
    // Both are sent before either can be answered (nothing is queued, and
    // the first ping is 300 ms away): whichever arrives second is refused,
    // and the parked one gets a close packet.
    let (one, two) = tokio::join!(get(&addr, &sid), get(&addr, &sid));
    let mut answers = [one, two];
    answers.sort();
    assert_eq!(
        answers,
        [(200, "1".into()), (400, answers[1].1.clone())],
        "{answers:?}"
    );
    assert_eq!(get(&addr, &sid).await.0, 400, "the session is gone");
}

#[tokio::test]
async fn a_malformed_packet_ends_the_session_on_either_transport() {
    let addr = echo_server().await;
    let sid = open(&addr).await;
    assert_eq!(post(&addr, &sid, "abc").await.0, 400);
    assert_eq!(get(&addr, &sid).await.0, 400);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{addr}/engine.io/?EIO=4&transport=websocket"
    ))
    .await
    .unwrap();
    ws.next().await.unwrap().unwrap(); // open
    ws.send(Message::binary(vec![1u8, 2, 3, 4])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3, 4])
    );
    ws.send(Message::text("abc")).await.unwrap();
    loop {
        match tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), "2", "only pings before the close")
            }
            Some(Ok(other)) => panic!("unexpected {other:?}"),
        }
    }
}

/// The official suite's "should forcefully close the session" sends the
/// poll and the `1` at once. Whichever the server serves first, the poll
/// is answered 200 with a noop (as engine.io does: a close that finds no
/// poll waiting leaves one noop for the next), and the poll after it 400.
#[tokio::test]
async fn a_close_that_beats_the_poll_still_answers_that_poll_with_a_noop() {
    let (addr, engine, mut ended) = echo_engine().await;
    let sid = open(&addr).await;
    assert_eq!(post(&addr, &sid, "1").await, (200, "ok".into()));
    // The session's task has ended and dropped its socket before the
    // late poll arrives: the noop must not depend on that race either.
    let gone = tokio::time::timeout(DEADLINE, ended.recv())
        .await
        .expect("the session task ended");
    assert_eq!(gone.as_deref(), Some(sid.as_str()));
    assert_eq!(get(&addr, &sid).await, (200, "6".into()));
    assert_eq!(get(&addr, &sid).await.0, 400, "only one late poll");

    // Nobody comes for the noop: the session leaves the table all the same.
    let sid = open(&addr).await;
    assert_eq!(post(&addr, &sid, "1").await, (200, "ok".into()));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while engine.holds(&sid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a closed session was never removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&addr, &sid).await.0, 400);
}

/// The other order: the poll is parked when the `1` arrives, gets the
/// noop, and no second noop is left over.
#[tokio::test]
async fn a_close_that_finds_the_poll_waiting_answers_it_once() {
    let (addr, engine, _ended) = echo_engine().await;
    let sid = open(&addr).await;
    let parked = {
        let (addr, sid) = (addr.clone(), sid.clone());
        tokio::spawn(async move { get(&addr, &sid).await })
    };
    // The poll is parked once the session is marked as polled.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !engine.polled(&sid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the poll never parked"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(post(&addr, &sid, "1").await, (200, "ok".into()));
    assert_eq!(parked.await.unwrap(), (200, "6".into()));
    assert_eq!(get(&addr, &sid).await.0, 400);
}

/// Park a poll of `sid` and return it once the engine holds it.
async fn parked_poll(
    addr: &str,
    engine: &Engine,
    sid: &str,
) -> tokio::task::JoinHandle<(u16, String)> {
    let parked = {
        let (addr, sid) = (addr.to_owned(), sid.to_owned());
        tokio::spawn(async move { get(&addr, &sid).await })
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !engine.polled(sid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the poll never parked"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    parked
}

async fn upgrading_socket(
    addr: &str,
    sid: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{addr}/engine.io/?EIO=4&transport=websocket&sid={sid}"
    ))
    .await
    .unwrap();
    ws
}

/// The official suite's "should ignore HTTP requests with same sid after
/// upgrade" opens the WebSocket, sends `2probe` and `5`, and polls at
/// once. That poll can reach the server before the WebSocket's frames are
/// read (it did on a loaded CI machine, and was answered 200 with a
/// noop): a poll sent after the WebSocket waits for the upgrade to
/// settle and, upgraded, is refused as any poll after an upgrade.
#[tokio::test]
async fn a_poll_sent_after_the_websocket_is_refused_once_the_upgrade_lands() {
    let (addr, engine, _ended) = echo_engine().await;
    let sid = open(&addr).await;
    let mut ws = upgrading_socket(&addr, &sid).await;
    let parked = parked_poll(&addr, &engine, &sid).await;
    ws.send(Message::text("2probe")).await.unwrap();
    ws.send(Message::text("5")).await.unwrap();
    assert_eq!(parked.await.unwrap().0, 400);
    // The session lives on over the WebSocket.
    assert_eq!(
        tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("answered")
            .unwrap()
            .unwrap(),
        Message::text("3probe")
    );
    ws.send(Message::text("4hello")).await.unwrap();
    loop {
        let m = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("echoed")
            .unwrap()
            .unwrap();
        match m {
            Message::Text(t) if t.as_str() == "2" => ws.send(Message::text("3")).await.unwrap(),
            other => {
                assert_eq!(other, Message::text("4hello"));
                break;
            }
        }
    }
}

/// The probe and `5` can be read in one go, so that the parked poll's
/// first look after parking already sees the upgrade done: it is refused
/// too (it was answered 200 with a noop, as the official suite saw on a
/// loaded CI machine).
#[tokio::test]
async fn a_poll_that_first_looks_after_the_whole_upgrade_is_refused() {
    let (addr, engine, _ended) = echo_engine().await;
    let sid = open(&addr).await;
    let mut ws = upgrading_socket(&addr, &sid).await;
    let parked = parked_poll(&addr, &engine, &sid).await;
    ws.feed(Message::text("2probe")).await.unwrap();
    ws.feed(Message::text("5")).await.unwrap();
    ws.flush().await.unwrap();
    assert_eq!(parked.await.unwrap().0, 400);
}

/// The poll a client sent before opening its WebSocket is the one it
/// waits on before it sends `5` (engine.io-client pauses polling): it
/// ends with a noop as soon as the probe is answered, without waiting
/// for a `5` that cannot come yet.
#[tokio::test]
async fn the_poll_sent_before_the_websocket_ends_when_the_probe_is_answered() {
    let (addr, engine, _ended) = echo_engine().await;
    let sid = open(&addr).await;
    let parked = parked_poll(&addr, &engine, &sid).await;
    let mut ws = upgrading_socket(&addr, &sid).await;
    ws.send(Message::text("2probe")).await.unwrap();
    assert_eq!(parked.await.unwrap(), (200, "6".into()));
    ws.send(Message::text("5")).await.unwrap();
    assert_eq!(get(&addr, &sid).await.0, 400);
}
