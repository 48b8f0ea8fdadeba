// Socket.IO v4 peer for Switchboard's benchmark (bench/run.sh).
// Clients join a room per topic ("subscribe", acknowledged) and a publisher
// emits "publish" with (topic, data), relayed to the room as "event".
// WebSocket transport only, as Switchboard's benchmark clients use.
const { Server } = require("socket.io");

const port = Number(process.env.PORT || 3000);
const io = new Server(port, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
  pingInterval: 25000,
  pingTimeout: 60000,
});

io.on("connection", (socket) => {
  socket.on("subscribe", (topic, ack) => {
    socket.join(String(topic));
    if (typeof ack === "function") ack();
  });
  socket.on("publish", (topic, data) => {
    io.to(String(topic)).emit("event", data);
  });
});

console.log(`socket.io ${require("socket.io/package.json").version} listening on ${port}`);
