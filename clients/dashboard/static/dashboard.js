// The chinwag dashboard's script: the page's event stream (the daemon's state for the
// banner, run events, counters), its actions sent in place, and each page's live part.
"use strict";
(() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const root = meta("root");
  const csrf = meta("csrf-token");
  const body = document.body;
  const banner = document.getElementById("banner");
  const onRun = []; // each live part's handler of run events
  const onInFlight = []; // what to do when told which run of the conversation is in flight
  const onUp = []; // what to do when the daemon is back ({ resubscribed }: or was kept)
  const onMissed = []; // what to do when a run's end went unseen, the daemon still there

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function folded(summary, content) {
    const details = element("details", "tool-call");
    details.append(element("summary", "", summary), element("pre", "", content));
    return details;
  }

  async function post(path, fields) {
    const response = await fetch(root + path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(fields),
    });
    const answer = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw new Error(answer.error || response.statusText);
    return answer;
  }

  // --- actions: a form with data-post goes as JSON, and the page stays ----------------
  for (const form of document.querySelectorAll("form[data-post]")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const fields = Object.fromEntries(new FormData(form));
      const status = form.querySelector("[data-status]");
      status.textContent = "…";
      status.classList.remove("error");
      form.dispatchEvent(new CustomEvent("posting", { detail: fields }));
      // Emptied as it goes, not when answered: what is typed meanwhile (the answer may
      // come after the run it began has streamed) stays.
      const box = form.dataset.reset !== undefined ? form.querySelector("textarea") : null;
      const sent = box?.value;
      if (box) box.value = "";
      try {
        const answer = await post(form.dataset.post, fields);
        status.textContent = "";
        form.dispatchEvent(new CustomEvent("posted", { detail: answer }));
      } catch (error) {
        status.textContent = error.message;
        status.classList.add("error");
        if (box && !box.value) box.value = sent; // refused: there to send again
        form.dispatchEvent(new CustomEvent("refused", { detail: fields }));
      }
    });
  }

  // --- the event stream ---------------------------------------------------------------
  // Each connection of the stream begins with the daemon's state. When it is up, what the
  // page shows is read again: the daemon is back, or this is the stream's first (or a
  // new) connection, and what changed between the page's rendering (or the stream's
  // last connection) and now came on no stream.
  let wasUp = !body.hasAttribute("data-away");
  let connecting = true;
  const source = new EventSource(`${root}/events?${body.dataset.events || ""}`);
  source.addEventListener("daemon", (event) => {
    const state = JSON.parse(event.data);
    banner.hidden = state.up;
    banner.textContent = state.reason;
    if (state.up && body.hasAttribute("data-away")) location.reload();
    if (state.up && (connecting || !wasUp)) onUp.forEach((handler) => handler());
    wasUp = state.up;
    connecting = false;
  });
  source.addEventListener("error", () => {
    connecting = true;
    banner.hidden = false;
    banner.textContent = "The dashboard's event stream broke; connecting again.";
  });
  // The daemon dropped the dashboard's subscription as the machine was busy, and it has
  // subscribed again: no alarm, but what came meanwhile is read again, as when back.
  // The runs that were in flight are replayed from their start if they still are, and
  // the others come as "missed": their ends went unseen, the daemon never away.
  source.addEventListener("resubscribed", () =>
    onUp.forEach((handler) => handler({ resubscribed: true })));
  source.addEventListener("missed", (event) => {
    const missed = JSON.parse(event.data);
    onMissed.forEach((handler) => handler(missed));
  });
  source.addEventListener("run", (event) => {
    const run = JSON.parse(event.data);
    onRun.forEach((handler) => handler(run));
  });
  source.addEventListener("inflight", (event) => {
    const { run_id: running } = JSON.parse(event.data);
    onInFlight.forEach((handler) => handler(running));
  });
  source.addEventListener("stats", (event) => {
    const stats = JSON.parse(event.data);
    for (const cell of document.querySelectorAll("[data-stat]")) {
      const value = stats[cell.dataset.stat];
      if (value === undefined) continue;
      cell.textContent =
        cell.dataset.stat === "uptime_s" ? duration(value) : Number(value).toLocaleString("en");
    }
  });

  // The largest whole unit, as the CLI says it (clients/_render.py): 3d, 5h, 12m, 40s.
  function duration(seconds) {
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
      if (seconds >= size) return `${Math.floor(seconds / size)}${unit}`;
    }
    return `${Math.max(Math.floor(seconds), 1)}s`;
  }

  // --- mail views: each live part fetched again when what it shows changes ------------
  // A part names what it shows in data-live (mail, participants, spaces, locks), and
  // narrows mail to a thread, a space or a message; its address is data-fragment.
  const liveParts = [...document.querySelectorAll("[data-fragment]")].map((part) => {
    let fetching = null;
    let again = false;
    const refresh = () => {
      if (fetching) { again = true; return; }
      fetching = fetch(part.dataset.fragment, { credentials: "same-origin" })
        .then(async (response) => { if (response.ok) part.innerHTML = await response.text(); })
        .catch(() => {})
        .finally(() => {
          fetching = null;
          if (again) { again = false; refresh(); }
        });
    };
    const shows = new Set(part.dataset.live.split(" "));
    return { part, shows, refresh };
  });
  const mailShown = (part, message) =>
    (!part.dataset.thread || message.thread_id === part.dataset.thread) &&
    (!part.dataset.space || message.space === part.dataset.space) &&
    (!part.dataset.msg || message.msg_id === part.dataset.msg);
  source.addEventListener("watching", (event) => {
    body.dataset.watching = event.data;
    // The watch is on: what came before it is read afresh, what comes after is pushed.
    liveParts.filter(({ shows }) => shows.has("mail")).forEach(({ refresh }) => refresh());
  });
  source.addEventListener("mail", (event) => {
    const { message } = JSON.parse(event.data);
    liveParts
      .filter(({ part, shows }) => shows.has("mail") && mailShown(part, message))
      .forEach(({ refresh }) => refresh());
  });
  // The reader's mail read, here or through any other client: the parts listing one of
  // those messages, or counting the unread, are read again (an opened message is read).
  source.addEventListener("read", (event) => {
    const read = new Set(JSON.parse(event.data).msg_ids);
    const touched = (part) =>
      part.querySelector(".unread") ||
      [...part.querySelectorAll("[data-msg]")].some((row) => read.has(row.dataset.msg));
    liveParts
      .filter(({ part, shows }) => shows.has("mail") && touched(part))
      .forEach(({ refresh }) => refresh());
  });
  source.addEventListener("roster", (event) => {
    const { changed } = JSON.parse(event.data);
    liveParts
      .filter(({ shows }) => changed.some((name) => shows.has(name)))
      .forEach(({ refresh }) => refresh());
  });
  onUp.push(() => liveParts.forEach(({ refresh }) => refresh()));

  // --- the conversations list: each row's state and title, live; read again as a run ends
  const list = document.getElementById("conversations");
  if (list) {
    const rows = liveParts.find(({ part }) => list.contains(part));
    onRun.push((run) => {
      const row = [...list.querySelectorAll("tr[data-agent]")].find(
        (tr) => tr.dataset.agent === run.agent && tr.dataset.sender === run.sender);
      const event = run.event;
      if (!row) {
        // A conversation not listed (yet): the list read again as it begins, is named, ends.
        if (["start", "title", "end"].includes(event.type)) rows.refresh();
        return;
      }
      if (event.type === "start" || event.type === "end") {
        const running = event.type === "start";
        row.classList.toggle("running", running);
        row.querySelector(".state").textContent = running ? "running" : "idle";
        // Its last activity, messages and tokens changed, and so its place: read again.
        if (!running) rows.refresh();
      } else if (event.type === "title") {
        row.querySelector(".title a").textContent = event.title;
      }
    });
  }

  // --- the live feed: one row a run ---------------------------------------------------
  const feed = document.getElementById("feed");
  if (feed) {
    const rows = feed.tBodies[0];
    onRun.push((run) => {
      const event = run.event;
      let row = [...rows.rows].find((tr) => tr.dataset.run === run.run_id);
      if (!row) {
        rows.querySelector(".empty")?.remove();
        row = rows.insertRow(0);
        row.dataset.run = run.run_id;
        row.insertCell().textContent = new Date().toLocaleTimeString();
        const link = element("a", "", `${run.agent} · ${run.sender}`);
        link.href = `${root}/conversation?${new URLSearchParams({ agent: run.agent, sender: run.sender })}`;
        row.insertCell().append(link);
        row.insertCell().textContent = run.agent;
        row.insertCell().className = "state";
        row.insertCell().className = "text";
        while (rows.rows.length > 100) rows.deleteRow(-1);
      }
      const state = row.cells[3];
      const text = row.cells[4];
      if (row.classList.contains("unseen")) {
        // Still going after all (the daemon dropped the subscription, not the run).
        row.classList.remove("unseen");
        state.textContent = "running";
      }
      switch (event.type) {
        case "queued": state.textContent = "queued"; break;
        case "start":
          // A new connection of the stream replays the run from its start.
          row.cells[2].textContent = event.agent;
          state.textContent = "running";
          text.textContent = "";
          break;
        case "text_delta": text.textContent = (text.textContent + event.delta).slice(-300); break;
        case "tool_call": state.textContent = `tool ${event.name}`; break;
        case "tool_result": state.textContent = "running"; break;
        case "ask_user": state.textContent = "asking"; break;
        case "end":
          state.textContent = event.error ? `${event.status}: ${event.error.message}` : event.status;
          row.classList.add(event.status);
          row.dataset.ended = "";
          break;
      }
    });
    const unseen = (row, why) => {
      row.classList.add("unseen");
      row.cells[3].textContent = `ended unseen: ${why}`;
    };
    // Connected (again): the runs still in flight are replayed from their start; one
    // not ended and not replayed was lost with the daemon (a crash sends no end). Not
    // so when subscribed again: each run is replayed or missed (below).
    onUp.push((how) => {
      if (how?.resubscribed) return;
      for (const row of rows.querySelectorAll("tr[data-run]:not([data-ended])")) {
        unseen(row, "the daemon went away");
      }
    });
    onMissed.push(({ run_id: runId }) => {
      const row = [...rows.rows].find((tr) => tr.dataset.run === runId);
      if (row && row.dataset.ended === undefined) {
        unseen(row, "its end came as the dashboard subscribed to the daemon again");
      }
    });
  }

  // --- one conversation: its run in flight, its ask, the history after each run --------
  const history = document.getElementById("history");
  if (history) {
    const { agent, sender } = history.dataset;
    const live = document.getElementById("live");
    const ask = document.getElementById("ask");
    const title = document.getElementById("title");
    const runs = new Map(); // run_id -> its bubble's parts, and its start's seq
    let asking = null; // the call_id of the ask_user shown, whose result ends it
    let refreshing = Promise.resolve();

    const shownEntries = () => [...history.querySelectorAll("[data-seq]")];
    const lastSeq = () => Math.max(0, ...shownEntries().map((node) => Number(node.dataset.seq)));

    // What a run in flight stored after its prompt, its bubble shows (replayed from its
    // start): out of the history until the run ends and the history is read again.
    function leaveToBubbles() {
      const first = Math.min(...[...runs.values()].map((parts) => parts.seq ?? Infinity));
      shownEntries()
        .filter((node) => Number(node.dataset.seq) > first)
        .forEach((node) => node.remove());
    }

    // The entries stored since the last shown take the live bubbles' place.
    function refresh() {
      refreshing = refreshing.then(async () => {
        const query = new URLSearchParams({ agent, sender, after_seq: lastSeq() });
        const response = await fetch(`${root}/conversation/entries?${query}`);
        if (!response.ok) return;
        history.insertAdjacentHTML("beforeend", await response.text());
        leaveToBubbles();
        // Now stored and shown: the runs that ended done, and what was sent, once all ended.
        live.querySelectorAll('[data-end="done"]').forEach((node) => node.remove());
        if (runs.size === 0) live.querySelectorAll(".pending").forEach((node) => node.remove());
      });
    }
    onUp.push(refresh);

    // A run shown whose end went unseen stays in view, saying why; the history is read.
    function unseen(runId, why) {
      const parts = runs.get(runId);
      parts.node.dataset.end = "lost";
      parts.node.append(element("div", "end-status", `ended unseen: ${why}`));
      runs.delete(runId);
      ask.hidden = true;
    }

    // On each connection to the daemon the page is told which run is in flight now (and
    // is shown it from its start): a run shown but not that one ended unseen, the daemon
    // gone while it ran (a crash sends no end).
    onInFlight.push((running) => {
      for (const runId of [...runs.keys()]) {
        if (runId !== running) unseen(runId, "the daemon went away while it ran");
      }
      ask.hidden = true;
      refresh();
    });
    onMissed.push(({ run_id: runId }) => {
      if (!runs.has(runId)) return;
      unseen(runId, "its end came as the dashboard subscribed to the daemon again");
      refresh();
    });

    // The whole history read again: compaction archived what it showed.
    function reread() {
      refreshing = refreshing.then(async () => {
        const query = new URLSearchParams({ agent, sender, after_seq: 0 });
        if (history.dataset.archived !== undefined) query.set("archived", "1");
        const response = await fetch(`${root}/conversation/entries?${query}`);
        if (!response.ok) return;
        const text = await response.text();
        history.replaceChildren();
        history.insertAdjacentHTML("beforeend", text);
        leaveToBubbles();
      });
    }

    const killForm = document.getElementById("kill");
    killForm.addEventListener("posted", (event) => {
      if (event.detail.run_id === null) {
        killForm.querySelector("[data-status]").textContent = "Nothing is running.";
      }
    });

    const compactForm = document.getElementById("compact");
    compactForm.addEventListener("posted", (event) => {
      const { archive, archived_entries: count } = event.detail;
      compactForm.querySelector("[data-status]").textContent =
        `${count} ${count === 1 ? "entry" : "entries"} compacted into ${archive}`;
      compactForm.querySelector("input[name=instructions]").value = "";
      reread();
    });

    function bubble(run) {
      let parts = runs.get(run.run_id);
      if (!parts) {
        const node = element("div", "entry assistant live");
        node.dataset.run = run.run_id;
        parts = { node, speaker: element("div", "speaker", agent), text: element("div", "text") };
        node.append(parts.speaker, parts.text);
        live.append(node);
        runs.set(run.run_id, parts);
      }
      return parts;
    }

    function answer(content) {
      post("/conversation/reply", { agent, sender, content, ask_id: ask.dataset.ask })
        .then(() => { ask.hidden = true; })
        .catch((error) => { ask.querySelector(".status").textContent = error.message; });
    }

    // An ask as the TUI shows it (clients/tui/_dialogs.py): one question with options,
    // taking one, is answered by a button; otherwise each question gets its answer (an
    // option, several toggled for multi_select, or text), and Send sends them joined as
    // the CLI and the TUI join them (an answer alone for one question, else a line each).
    function showAsk(run, event) {
      ask.replaceChildren();
      ask.dataset.ask = event.ask_id;
      const questions = event.questions;
      const oneChoice =
        questions.length === 1 && questions[0].options.length > 0 && !questions[0].multi_select;
      const chosen = questions.map(() => []); // the labels picked, in the options' order
      const typed = questions.map(() => "");
      const answerOf = (index) => typed[index].trim() || chosen[index].join(", ");
      const sendButton = element("button", "send", oneChoice ? "Answer" : "Send");
      const complete = () => questions.every((_, index) => answerOf(index));
      const update = () => { if (!oneChoice) sendButton.disabled = !complete(); };
      const form = element("form", "free");
      questions.forEach((question, index) => {
        const heading = question.header
          ? `${question.header}: ${question.question}` : question.question;
        form.append(element("p", "question", heading));
        const options = element("div", "options");
        for (const option of question.options) {
          const button = element("button", "option", option.label);
          button.type = "button";
          button.setAttribute("aria-pressed", "false");
          if (option.description) button.title = option.description;
          button.addEventListener("click", () => {
            if (oneChoice) { answer(option.label); return; }
            const picked = new Set(question.multi_select ? chosen[index] : []);
            if (picked.has(option.label)) picked.delete(option.label);
            else picked.add(option.label);
            chosen[index] = question.options.map((o) => o.label).filter((l) => picked.has(l));
            for (const other of options.children) {
              const on = picked.has(other.textContent);
              other.classList.toggle("chosen", on);
              other.setAttribute("aria-pressed", String(on));
            }
            update();
          });
          options.append(button);
        }
        if (question.options.length) form.append(options);
        const input = element("input");
        input.name = `answer-${index}`;
        input.placeholder = question.options.length ? "or write an answer" : "write the answer";
        input.addEventListener("input", () => { typed[index] = input.value; update(); });
        form.append(input);
      });
      form.append(sendButton, element("span", "status"));
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        if (!complete()) return;
        answer(questions.length === 1
          ? answerOf(0)
          : questions.map((q, index) => `${q.question}: ${answerOf(index)}`).join("\n"));
      });
      ask.append(form);
      update();
      ask.hidden = false;
    }

    // What was sent shows at once; refused, it goes (its form says why), not left to
    // look sent until the history is next read.
    const pending = new WeakMap(); // the fields posted -> their bubble
    const sendForm = document.getElementById("send");
    sendForm.addEventListener("posting", (event) => {
      const mine = element("div", "entry user pending");
      mine.append(element("div", "speaker", sender), element("div", "text", event.detail.content));
      live.append(mine);
      pending.set(event.detail, mine);
    });
    sendForm.addEventListener("refused", (event) => pending.get(event.detail)?.remove());

    onRun.push((run) => {
      const event = run.event;
      switch (event.type) {
        case "start": {
          const parts = bubble(run);
          parts.text.textContent = ""; // a replay from the start
          parts.node.querySelectorAll("details").forEach((node) => node.remove());
          parts.speaker.textContent = event.agent === agent ? agent : `${event.agent} (guest)`;
          parts.seq = event.seq;
          leaveToBubbles();
          break;
        }
        case "text_delta": bubble(run).text.textContent += event.delta; break;
        case "tool_call": {
          const call = folded(`called ${event.name}`, event.arguments);
          call.dataset.call = event.call_id;
          bubble(run).node.append(call);
          if (event.name === "ask_user") asking = event.call_id;
          break;
        }
        case "tool_result": {
          const call = bubble(run).node.querySelector(`[data-call="${CSS.escape(event.call_id)}"]`);
          call?.append(element("pre", event.is_error ? "error" : "", event.output));
          if (event.call_id === asking) ask.hidden = true; // answered, here or elsewhere
          break;
        }
        case "ask_user": showAsk(run, event); break;
        case "title": title.textContent = event.title; break;
        case "end": {
          // A run that did not end done stays in view, saying how it ended.
          const parts = bubble(run);
          parts.node.dataset.end = event.status;
          if (event.status !== "done") {
            const how = event.error ? `${event.status}: ${event.error.message}` : event.status;
            parts.node.append(element("div", "end-status", how));
          }
          runs.delete(run.run_id);
          ask.hidden = true;
          refresh();
          break;
        }
      }
    });
  }
})();
