// The feedback page: look up a user's playlists (recording an impression) and like one.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("lookup");
  const input = $("user-id");
  const showButton = $("show");
  const message = $("message");
  const results = $("results");
  const list = $("playlists");
  const MAX_USER_ID = 9223372036854775807n;

  let shown = null; // the current impression
  const likeIds = new Map(); // playlist id -> like id: a retried like reuses its id

  function uuid4() {
    if (window.crypto.randomUUID) return window.crypto.randomUUID();
    const b = window.crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  // Ids go up to 2**63 - 1, beyond what a JavaScript number holds exactly: integers are
  // kept as their source text, and request bodies are written with that text.
  function parseJSON(text) {
    return JSON.parse(text, (key, value, context) =>
      typeof value === "number" && Number.isInteger(value) && context && context.source
        ? context.source
        : value,
    );
  }

  function say(kind, text) {
    message.className = `message ${kind}`;
    message.textContent = text;
    message.hidden = false;
  }

  function reasonOf(body) {
    if (!body) return "";
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
    return "";
  }

  // The page's own credentials: no API key lives in the browser. The page token lets it
  // record impressions; each impression answers with a token for liking that one only.
  const pageToken = document.querySelector('meta[name="recfleet-page-token"]').content;

  async function post(path, json, token) {
    const response = await fetch(new URL(path, document.baseURI), {
      method: "POST",
      headers: {
        "content-type": "application/json",
        accept: "application/json",
        "x-page-token": token,
      },
      body: json,
    });
    let body = null;
    try {
      body = parseJSON(await response.text());
    } catch {
      body = null;
    }
    return { status: response.status, body, likeToken: response.headers.get("x-like-token") };
  }

  function timeLabel(seconds) {
    const iso = new Date(Number(seconds) * 1000).toISOString();
    return `${iso.slice(0, 10)} ${iso.slice(11, 16)} UTC`;
  }

  function playlistItem(playlistId, rank) {
    const li = document.createElement("li");
    li.className = "playlist";
    const badge = document.createElement("span");
    badge.className = "rank";
    badge.setAttribute("aria-hidden", "true");
    badge.textContent = rank;
    const info = document.createElement("div");
    info.className = "info";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = `Playlist ${playlistId}`;
    const spoken = document.createElement("span");
    spoken.className = "visually-hidden";
    spoken.textContent = `Rank ${rank}: `;
    info.append(spoken, name);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "like";
    button.dataset.playlist = playlistId;
    button.setAttribute("aria-pressed", "false");
    button.setAttribute("aria-label", `Like playlist ${playlistId}, rank ${rank}`);
    button.innerHTML = '<span class="heart" aria-hidden="true">&#9825;</span> <span>Like</span>';
    button.addEventListener("click", () => like(playlistId, rank, button));
    li.append(badge, info, button);
    return li;
  }

  function render(impression) {
    shown = impression;
    likeIds.clear();
    $("results-user").textContent = impression.user_id;
    $("meta-model").textContent = impression.model_version;
    $("meta-generation").textContent = impression.generation;
    $("meta-generation").title = impression.generation;
    $("meta-generated").textContent = timeLabel(impression.generated_at);
    const note = $("cold-note");
    note.hidden = !impression.cold;
    note.textContent = impression.cold
      ? `User ${impression.user_id} is new to the model, so these are today's most popular playlists.`
      : "";
    list.replaceChildren(...impression.playlists.map((id, i) => playlistItem(id, i + 1)));
    results.hidden = false;
    if (impression.playlists.length === 0) {
      say("warn", `There are no playlists to show for user ${impression.user_id}.`);
    } else {
      message.hidden = true;
    }
    $("results-title").focus();
  }

  async function lookup(event) {
    event.preventDefault();
    const raw = input.value.trim();
    if (!/^\d{1,19}$/.test(raw) || BigInt(raw) > MAX_USER_ID) {
      input.setAttribute("aria-invalid", "true");
      say("error", "Enter a user id: a whole number such as 42.");
      input.focus();
      return;
    }
    input.removeAttribute("aria-invalid");
    const userId = BigInt(raw).toString();
    results.hidden = true;
    showButton.disabled = true;
    say("info", `Looking up user ${userId}…`);
    let reply;
    try {
      reply = await post("api/impressions", `{"user_id":${userId}}`, pageToken);
    } catch {
      say("error", "The gateway could not be reached. Check your connection and try again.");
      return;
    } finally {
      showButton.disabled = false;
    }
    const reason = reasonOf(reply.body);
    if (reply.status === 201) {
      render({ ...reply.body, likeToken: reply.likeToken || "" });
    } else if (reply.status === 404) {
      say(
        "warn",
        `No recommendations for user ${userId} yet. They are not in a finished batch: ` +
          "submit them, or come back when today's batch is done.",
      );
    } else if (reply.status === 503) {
      say(
        "error",
        `Playlists can't be shown right now because feedback can't be saved: ${reason}. ` +
          "Please try again in a minute.",
      );
    } else {
      say("error", `Something went wrong (HTTP ${reply.status}${reason ? `: ${reason}` : ""}).`);
    }
  }

  async function like(playlistId, rank, button) {
    if (button.getAttribute("aria-pressed") === "true" || button.getAttribute("aria-busy")) return;
    const likeId = likeIds.get(playlistId) || uuid4();
    likeIds.set(playlistId, likeId);
    button.setAttribute("aria-busy", "true");
    const json =
      `{"like_id":"${likeId}","impression_id":"${shown.impression_id}",` +
      `"user_id":${shown.user_id},"playlist_id":${playlistId}}`;
    let reply;
    try {
      reply = await post("api/feedback", json, shown.likeToken);
    } catch {
      say("error", "Your like was not sent: the gateway could not be reached. Press Like to retry.");
      return;
    } finally {
      button.removeAttribute("aria-busy");
    }
    const reason = reasonOf(reply.body);
    if (reply.status === 201 || reply.status === 200) {
      button.setAttribute("aria-pressed", "true");
      button.classList.add("liked");
      button.innerHTML = '<span class="heart" aria-hidden="true">&#9829;</span> <span>Liked</span>';
      say("success", `You liked playlist ${playlistId} (rank ${rank}). Thank you!`);
    } else if (reply.status === 503) {
      say("error", `Your like was not saved: ${reason}. Press Like to retry.`);
    } else {
      say("error", `Your like was refused (HTTP ${reply.status}${reason ? `: ${reason}` : ""}).`);
    }
  }

  form.addEventListener("submit", lookup);
})();
