// Polled parts of a page (hx-trigger "every") are not swapped while a pointer is held down anywhere on it: the
// browser drops a click whose element is replaced between its press and its release. The held-back answer is
// dropped whole (out-of-band parts too), so the part keeps its poll URL (the digest or run shown) and a poll after
// the release brings the change again. Requests of the user's own (forms, buttons) swap as usual.
(() => {
  const pressed = new Set(); // ids of the pointers down
  document.addEventListener("pointerdown", (event) => pressed.add(event.pointerId), true);
  for (const type of ["pointerup", "pointercancel"]) {
    document.addEventListener(type, (event) => pressed.delete(event.pointerId), true);
  }
  // A release the page never hears of (a drag, the window left) must not hold the polls back for good.
  document.addEventListener("dragend", () => pressed.clear(), true);
  window.addEventListener("blur", () => pressed.clear());
  document.addEventListener("htmx:beforeSwap", (event) => {
    const trigger = event.detail.elt.getAttribute("hx-trigger") ?? "";
    if (pressed.size > 0 && /^\s*every\s/.test(trigger)) event.detail.shouldSwap = false;
  });
})();
