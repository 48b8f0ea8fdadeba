"""A non-Rust client (Python `websockets`, `urllib`) against the real binary,
speaking the seed protocol exactly as documented."""

import asyncio
import json
import re
import queue
import subprocess
import threading

import pytest
import websockets

from conftest import BIN

TIMEOUT = 10


async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def recv_type(ws, kind):
    while True:
        msg = await recv_json(ws)
        if msg["type"] == kind:
            return msg


def test_websocket_seed_flow(gateway):
    async def run():
        url = f"{gateway.ws}/ws?token={gateway.token('123')}&company_id=123"
        async with websockets.connect(url) as ws:
            hello = await recv_json(ws)
            assert hello["type"] == "connection.established"
            assert hello["data"]["server_time"].endswith("Z")
            await ws.send(json.dumps({"type": "subscribe", "topics": ["deal.stage.*", "timeline.object.created"]}))
            confirmed = await recv_json(ws)
            # Seed 001's fields, plus the cursor extension (a position from
            # which nothing is missed; the SDK keeps it until its first event).
            assert confirmed == {"type": "subscription.confirmed",
                                 "data": {"topics": ["deal.stage.*", "timeline.object.created"],
                                          "cursor": confirmed["data"]["cursor"],
                                          "timestamp": confirmed["data"]["timestamp"]}}
            assert re.fullmatch(r"[0-9a-f]+-\d+", confirmed["data"]["cursor"])
            sent = gateway.publish("123", "deal.stage.updated", {"deal_id": 456})
            event = await recv_json(ws)
            assert event["type"] == "event"
            env = event["data"]
            assert env["event_id"] == sent["event_id"]
            assert env["event_type"] == "deal.stage.updated"
            assert env["data"] == {"deal_id": 456}
            assert set(env["metadata"]) >= {"region", "idempotency_key", "gdpr_context"}
            await ws.send(json.dumps({"type": "ping"}))
            assert (await recv_json(ws))["type"] == "pong"
            await ws.send("{broken")
            err = await recv_json(ws)
            assert err["type"] == "error" and err["data"]["code"] == "malformed_message"
    asyncio.run(run())


def test_cursor_resume_from_python(gateway):
    async def run():
        first = gateway.publish("resume", "deal.stage.updated", {"n": 1})["event_id"]
        missed = [gateway.publish("resume", "deal.stage.updated", {"n": n})["event_id"] for n in (2, 3)]
        url = f"{gateway.ws}/ws?token={gateway.token('resume')}"
        async with websockets.connect(url) as ws:
            await recv_type(ws, "connection.established")
            await ws.send(json.dumps({"type": "subscribe", "topics": ["deal.*"]}))
            await recv_type(ws, "subscription.confirmed")
            await ws.send(json.dumps({"type": "cursor.update", "cursor": first}))
            got = [(await recv_type(ws, "event"))["data"]["event_id"] for _ in missed]
            assert got == missed
            done = await recv_type(ws, "replay.complete")
            assert done["data"]["replayed"] == 2
    asyncio.run(run())


@pytest.mark.parametrize("query", ["", "token=garbage", "token={other}&company_id=123"])
def test_bad_tokens_close_4001(gateway, query):
    async def run():
        q = query.format(other=gateway.token("456"))
        async with websockets.connect(f"{gateway.ws}/ws?{q}") as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert closed.value.rcvd.code == 4001
    asyncio.run(run())


def test_long_poll_with_bearer_and_cursor(gateway):
    token = gateway.token("poller")
    first = gateway.publish("poller", "timeline.object.created", {"i": 1})["event_id"]
    second = gateway.publish("poller", "timeline.object.created", {"i": 2})["event_id"]
    body = gateway.poll(token, f"topics=timeline.object.*&cursor={first}&timeout=5&company_id=poller")
    assert [e["event_id"] for e in body["events"]] == [second]
    assert body["cursor"] == second
    assert body["has_more"] is False
    empty = gateway.poll(token, f"topics=timeline.object.*&cursor={second}&timeout=0")
    assert empty["events"] == [] and empty["cursor"]


def test_cli_publish_and_tail(gateway):
    token = gateway.token("cli", "subscribe,publish")
    tail = subprocess.Popen([BIN, "tail", "--url", gateway.http, "--token", token, "--topics", "cli.*"],
                            stdout=subprocess.PIPE, text=True)
    lines_q = queue.Queue()
    threading.Thread(target=lambda: [lines_q.put(line) for line in tail.stdout], daemon=True).start()

    def next_line():
        return json.loads(lines_q.get(timeout=TIMEOUT))
    try:
        assert next_line()["type"] == "connection.established"
        assert next_line()["type"] == "subscription.confirmed"
        out = subprocess.run([BIN, "publish", "--url", gateway.http, "--token", token,
                              "--event-type", "cli.hello", "--data", '{"hi": 1}'],
                             check=True, capture_output=True, text=True, timeout=TIMEOUT)
        event_id = json.loads(out.stdout)["event_id"]
        event = next_line()
        assert event["type"] == "event" and event["data"]["event_id"] == event_id
    finally:
        tail.kill()
