// One y-websocket client (the standard WebsocketProvider, on Node) of tests/system/test_yjs.py.
//
//   node editor.mjs URL ROOM [--insert TEXT] [--edits N] [--expect TEXT]...
//
// Syncs the room's document, appends TEXT to its Y.Text "content" (or N small edits, one
// update each), and waits until the text contains every --expect (its own edits and, for a
// writer, the other's: seen through the server, so stored). Prints {"content": ...}; exits 2
// after 20 s.
import * as Y from "yjs";
import { WebsocketProvider } from "y-websocket";
import WebSocket from "ws";

const [url, room, ...rest] = process.argv.slice(2);
const options = { insert: "", edits: 0, expect: [] };
for (let i = 0; i < rest.length; i += 2) {
  const [flag, value] = [rest[i], rest[i + 1]];
  if (flag === "--insert") options.insert = value;
  else if (flag === "--edits") options.edits = Number(value);
  else if (flag === "--expect") options.expect.push(value);
}
const doc = new Y.Doc();
const text = doc.getText("content");
const provider = new WebsocketProvider(url, room, doc, { WebSocketPolyfill: WebSocket, disableBc: true });
provider.awareness.setLocalStateField("user", { name: options.insert || "editor" });

let edited = false;
const done = () => {
  console.log(JSON.stringify({ content: text.toString() }));
  provider.destroy();
  process.exit(0);
};
const check = () => {
  if (!provider.synced) return;
  if (!edited) {
    edited = true;
    if (options.insert) text.insert(text.length, options.insert);
    for (let i = 0; i < options.edits; i++) text.insert(text.length, `${i % 10}`);
  }
  const content = text.toString();
  if (options.expect.every((part) => content.includes(part))) setTimeout(done, 200);
};
doc.on("update", check);
provider.on("sync", check);
setTimeout(() => {
  console.error(`timeout; content ${JSON.stringify(text.toString())}`);
  process.exit(2);
}, 20000);
