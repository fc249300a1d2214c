// The WebSocket side: one Realtime connection with reconnects (exponential backoff), JSON events in and out.
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000];

export class RealtimeConnection {
  /**
   * url: ws(s)://.../v1/realtime; apiKey: sent as the `openai-insecure-api-key.<key>` subprotocol (browsers
   * cannot set headers); handlers: {onEvent(ev), onOpen(), onStatus(status, detail)} with status in
   * "connecting" | "open" | "reconnecting" | "closed" | "failed".
   */
  constructor(url, apiKey, handlers) {
    this.url = url;
    this.apiKey = apiKey;
    this.h = handlers;
    this.ws = null;
    this.attempt = 0;
    this.wanted = false;
    this.timer = null;
    this.sent = 0;
  }

  open() {
    this.wanted = true;
    this.connect();
  }

  connect() {
    const protocols = ["realtime"];
    if (this.apiKey) protocols.push(`openai-insecure-api-key.${this.apiKey}`);
    this.h.onStatus(this.attempt ? "reconnecting" : "connecting", this.attempt ? `attempt ${this.attempt + 1}` : "");
    let ws;
    try {
      ws = new WebSocket(this.url, protocols);
    } catch (e) {
      this.h.onStatus("failed", `bad server URL ${this.url}: ${e.message}`);
      this.wanted = false;
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.attempt = 0;
      this.h.onStatus("open", "");
      this.h.onOpen();
    };
    ws.onmessage = (m) => {
      let ev;
      try {
        ev = JSON.parse(m.data);
      } catch {
        return;
      }
      this.h.onEvent(ev);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (!this.wanted) {
        this.h.onStatus("closed", "");
        return;
      }
      if (e.code === 1008) {
        // policy: wrong key or the server is full; retrying at once won't help
        this.h.onStatus("failed", `server refused the session: ${e.reason || "policy violation (1008)"}`);
        this.wanted = false;
        return;
      }
      const delay = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
      this.attempt++;
      const why = opened ? `connection lost (code ${e.code})` : "server unreachable";
      this.h.onStatus("reconnecting", `${why}; retrying in ${(delay / 1000).toFixed(1)} s`);
      this.timer = setTimeout(() => this.wanted && this.connect(), delay);
    };
  }

  get isOpen() {
    return !!this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  send(ev) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(ev));
    this.sent++;
    return true;
  }

  close() {
    this.wanted = false;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, "bye");
  }
}
