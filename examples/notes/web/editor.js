// The notes page's editor: CodeMirror 6 bound to the Y.Text "content" of one document room,
// synced by the standard y-websocket provider, with the others' names and cursors
// (awareness). Built into ../static/editor.js by `make notes-bundle` (esbuild); the page calls
// NotesEditor.open(...).
import * as Y from "yjs";
import { WebsocketProvider } from "y-websocket";
import { yCollab } from "y-codemirror.next";
import { EditorView, basicSetup } from "codemirror";
import { EditorState } from "@codemirror/state";

const SAVED = 4; // the room's "your edits so far are stored" frame (asked for with ?acks=1)

export function open({ serverUrl, room, parent, name, color, onStatus }) {
  const doc = new Y.Doc();
  const text = doc.getText("content");
  const provider = new WebsocketProvider(serverUrl, room, doc, { params: { acks: "1" } });
  provider.awareness.setLocalStateField("user", { name, color, colorLight: color + "33" });
  let pending = 0; // local edits not yet reported stored
  doc.on("update", (_update, origin) => {
    if (origin !== provider) {
      pending += 1;
      onStatus("saving");
    }
  });
  provider.messageHandlers[SAVED] = () => {
    pending = 0;
    onStatus("saved");
  };
  provider.on("status", ({ status }) => onStatus(status === "connected" ? (pending ? "saving" : "saved") : status));
  const view = new EditorView({
    state: EditorState.create({
      doc: text.toString(),
      extensions: [basicSetup, EditorView.lineWrapping, yCollab(text, provider.awareness)],
    }),
    parent,
  });
  return { doc, text, provider, view };
}
