// A small canvas bar chart of recent turns' latency (ms); bars coloured against a target line.
export function drawLatencyChart(canvas, values, targetMs = 1000) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300;
  const h = canvas.clientHeight || 100;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.fillStyle = "#10151d";
  g.fillRect(0, 0, w, h);
  const pad = 22;
  const peak = Math.max(0, ...values.map((v) => v.ms));
  const max = peak > targetMs * 1.25 ? Math.ceil(peak / 500) * 500 : targetMs * 1.25;
  const y = (ms) => h - pad - (ms / max) * (h - pad - 8);
  g.strokeStyle = "#2b3646";
  g.fillStyle = "#8a97a8";
  g.font = "10px system-ui, sans-serif";
  const ticks = max > targetMs * 2.5 ? [0, targetMs, max] : [0, targetMs / 2, targetMs];
  for (const tick of ticks) {
    g.beginPath();
    g.moveTo(pad + 12, y(tick));
    g.lineTo(w - 4, y(tick));
    g.stroke();
    g.fillText(`${tick}`, 2, y(tick) + 3);
  }
  if (!values.length) {
    g.fillText("no turns yet", w / 2 - 28, h / 2);
    return;
  }
  const n = Math.max(values.length, 10);
  const bw = (w - pad - 16) / n;
  values.forEach((v, i) => {
    g.fillStyle = v.ms <= targetMs ? "#3ccf91" : v.ms <= targetMs * 1.5 ? "#f2c14e" : "#ef6461";
    const x = pad + 14 + i * bw;
    g.fillRect(x, y(v.ms), Math.max(2, bw - 3), h - pad - y(v.ms));
  });
  g.fillStyle = "#8a97a8";
  g.fillText("ms, end of speech → first reply audio played (recent turns)", pad + 14, h - 6);
}
