// A TypeScript FastMCP server for mcpbalancer's tests (tests/test_ts_fastmcp.py).
//
//   node server.mjs NAME stateless|stateful
//
// Serves FastMCP's HTTP stream on 127.0.0.1, a port the OS picks, at /mcp, with its own /health and
// /ready routes, and one tool, `whoami`, answering NAME. Prints `READY <port>` once it listens.
// The parent's end of stdin closing (the test died) ends the process.
import http from "node:http";
import { FastMCP } from "fastmcp";
import { z } from "zod";

// FastMCP starts its own http.Server and does not say which port port 0 gave it: note the server.
const servers = [];
const listen = http.Server.prototype.listen;
http.Server.prototype.listen = function (...args) {
  servers.push(this);
  return listen.apply(this, args);
};

const [name, mode] = process.argv.slice(2);
if (!name || !["stateless", "stateful"].includes(mode)) {
  console.error("usage: node server.mjs NAME stateless|stateful");
  process.exit(2);
}
const server = new FastMCP({ name: `ts-${name}`, version: "1.0.0" });
server.addTool({
  name: "whoami",
  description: "The instance name.",
  parameters: z.object({}),
  execute: async () => name,
});
await server.start({
  transportType: "httpStream",
  httpStream: { host: "127.0.0.1", port: 0, stateless: mode === "stateless" },
});
console.log(`READY ${servers[0].address().port}`);
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
process.on("SIGTERM", () => process.exit(0));
