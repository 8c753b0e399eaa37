// Streams a job's log by server-sent events. The server numbers events by byte offset, so when the
// connection drops EventSource reconnects with Last-Event-ID and the log continues where it stopped.
(() => {
  const log = document.getElementById("log");
  const state = document.getElementById("log-state");
  if (!log) return;
  const source = new EventSource(log.dataset.src);
  source.onmessage = (event) => {
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent += event.data + "\n";
    if (atBottom) log.scrollTop = log.scrollHeight;
    state.textContent = "";
  };
  source.addEventListener("end", (event) => {
    source.close();
    state.textContent = `log complete (job ${event.data})`;
  });
  source.onerror = () => {
    state.textContent = "connection lost, reconnecting…";
  };
})();
