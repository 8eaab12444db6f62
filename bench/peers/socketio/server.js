// Socket.IO 4 with its default in-memory adapter, speaking just enough for resync's load
// generator (bench/src/bin/loadgen): a client emits "subscribe" with a channel name and
// joins that room; `POST /api/publish` ({"channel", "data"}) emits an "event" to the room
// with a per-channel seq; `GET /api/channels/<name>` answers the room's size. It prints
// "listening on http://127.0.0.1:<port>" once it accepts connections.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

const seqs = new Map();

const server = http.createServer((request, response) => {
  if (request.method === "POST" && request.url === "/api/publish") {
    const chunks = [];
    request.on("data", (chunk) => chunks.push(chunk));
    request.on("end", () => {
      let body;
      try {
        body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
      } catch {
        response.writeHead(400).end();
        return;
      }
      const seq = (seqs.get(body.channel) || 0) + 1;
      seqs.set(body.channel, seq);
      io.to(body.channel).emit("event", { type: "event", seq, data: body.data });
      response.writeHead(200, { "content-type": "application/json" });
      response.end(JSON.stringify({ position: { epoch: "socketio", seq } }));
    });
    return;
  }
  const channel = request.url.startsWith("/api/channels/")
    ? decodeURIComponent(request.url.slice("/api/channels/".length))
    : null;
  if (request.method === "GET" && channel !== null) {
    const room = io.of("/").adapter.rooms.get(channel);
    response.writeHead(200, { "content-type": "application/json" });
    response.end(JSON.stringify({ subscribers: room ? room.size : 0 }));
    return;
  }
  response.writeHead(404).end();
});

const io = new Server(server, { transports: ["websocket"], serveClient: false });
io.on("connection", (socket) => {
  socket.on("subscribe", (channel) => socket.join(String(channel)));
});

server.listen(0, "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
