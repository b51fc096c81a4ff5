// The dashboard's live updates: one EventSource per page (server-sent events,
// pushed by the server; nothing here polls). Each "patch" names a list on the
// page (an element with data-list) and carries items to add or update and
// keys to remove. New items are copies of the page's <template id="tpl-NAME">
// elements; every value is set with textContent, .value, a checked href or a
// checked data:image/png src, never parsed as HTML: it came from models and
// sandboxes.
"use strict";

(function () {
  const body = document.body;
  const view = body.dataset.view;
  if (!view || view === "login" || view === "error") {
    return;
  }
  const connection = document.getElementById("connection");

  function say(state) {
    if (connection) {
      connection.textContent = state;
      connection.dataset.state = state;
    }
  }

  function find(root, key) {
    return root.querySelector('[data-key="' + CSS.escape(key) + '"]');
  }

  // The elements of `el` itself (it included), not of the items nested in it (sub-agents).
  function own(el, selector) {
    const found = Array.from(el.querySelectorAll(selector)).filter(
      (inner) => inner.closest("[data-key]") === el
    );
    return el.matches(selector) ? [el, ...found] : found;
  }

  function safePath(path) {
    return typeof path === "string" && path.startsWith("/") && !path.startsWith("//");
  }

  function fill(el, item) {
    if (typeof item.status === "string") {
      el.dataset.status = item.status;
    }
    for (const [name, value] of Object.entries(item.fields)) {
      for (const slot of own(el, '[data-field="' + CSS.escape(name) + '"]')) {
        slot.textContent = value;
      }
      for (const input of own(el, '[data-value="' + CSS.escape(name) + '"]')) {
        input.value = value;
      }
    }
    for (const [name, urls] of Object.entries(item.images || {})) {
      for (const slot of own(el, '[data-images="' + CSS.escape(name) + '"]')) {
        slot.replaceChildren();
        for (const url of urls) {
          if (typeof url === "string" && url.startsWith("data:image/png;base64,")) {
            const img = document.createElement("img");
            img.alt = "a figure the code showed";
            img.src = url;
            slot.append(img);
          }
        }
      }
    }
    for (const [name, path] of Object.entries(item.links || {})) {
      for (const link of own(el, '[data-link="' + CSS.escape(name) + '"]')) {
        if (safePath(path)) {
          link.setAttribute("href", path);
        }
      }
    }
  }

  function create(root, item) {
    const template = document.getElementById("tpl-" + item.template);
    if (!template) {
      return null;
    }
    const el = template.content.firstElementChild.cloneNode(true);
    el.dataset.key = item.key;
    const parent = item.parent ? find(root, item.parent) : null;
    const nest = parent ? parent.querySelector("[data-children]") : null;
    if (nest) {
      nest.append(el);
    } else if (root.dataset.order === "newest-first") {
      root.prepend(el);
    } else {
      root.append(el);
    }
    return el;
  }

  function apply(patch) {
    for (const root of document.querySelectorAll('[data-list="' + CSS.escape(patch.list) + '"]')) {
      const keys = new Set();
      for (const item of patch.items) {
        keys.add(item.key);
        const el = find(root, item.key) || create(root, item);
        if (el) {
          fill(el, item);
        }
      }
      for (const key of patch.remove) {
        const el = find(root, key);
        if (el) {
          el.remove();
        }
      }
      if (patch.full) {
        for (const el of root.querySelectorAll("[data-key]")) {
          if (!keys.has(el.dataset.key)) {
            el.remove();
          }
        }
      }
    }
  }

  const query = new URLSearchParams({ view: view });
  if (body.dataset.run) {
    query.set("run", body.dataset.run);
  }
  if (body.dataset.chat) {
    query.set("c", body.dataset.chat);
  }
  const source = new EventSource("/events?" + query.toString());
  source.addEventListener("open", () => say("live"));
  source.addEventListener("error", () => {
    // EventSource reconnects by itself; CLOSED means the server refused (the
    // session ended, or the server is going away).
    say(source.readyState === EventSource.CLOSED ? "offline: reload the page" : "reconnecting");
  });
  source.addEventListener("patch", (event) => {
    apply(JSON.parse(event.data));
  });
})();
