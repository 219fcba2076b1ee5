// diffusiongemma browser view: chat with reasoning shown apart, and the canvas as it denoises.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];
let frames = [], playing = null, busy = false;

// With `serve --api-key` every /v1 call needs the key: typed once, kept in this browser (localStorage).
const keyBox = $("api-key");
keyBox.value = localStorage.getItem("diffusiongemma-key") || "";
const auth = () => keyBox.value ? { authorization: "Bearer " + keyBox.value } : {};
function loadModel() {
  fetch("/v1/models", { headers: auth() }).then(r => r.json()).then(j => {
    $("model").textContent = j.data ? j.data[0].id : (j.error ? j.error.message : "");
  }).catch(() => {});
}
keyBox.addEventListener("change", () => { localStorage.setItem("diffusiongemma-key", keyBox.value); loadModel(); });
loadModel();

function addMessage(role) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  if (role === "assistant") {
    el.innerHTML = '<div class="reasoning"></div><div class="content"></div><div class="tools"></div><div class="meta"></div>';
  }
  $("messages").appendChild(el);
  $("messages").scrollTop = $("messages").scrollHeight;
  return el;
}

function showFrame(f, stats) {
  const box = $("canvas");
  box.replaceChildren();
  const maxH = Math.max(1e-6, ...f.entropy);
  f.tokens.forEach((t, i) => {
    const s = document.createElement("span");
    s.className = "tok" + (f.accepted[i] ? " acc" : "");
    s.style.setProperty("--h", Math.min(1, f.entropy[i] / maxH).toFixed(3));
    s.textContent = t === "" ? "·" : t.replace(/\n/g, "⏎");
    s.title = `entropy ${f.entropy[i]}${f.accepted[i] ? " · accepted" : ""}`;
    box.appendChild(s);
  });
  $("s-canvas").textContent = f.canvas;
  $("s-step").textContent = f.step + 1;
  $("s-temp").textContent = f.temperature.toFixed(3);
  $("s-acc").textContent = `${f.accepted.filter(Boolean).length}/${f.accepted.length}`;
  if (stats) {
    $("s-tpf").textContent = stats.tpf.toFixed(2);
    $("s-tps").textContent = stats.tps.toFixed(1);
  }
}

async function send(text) {
  busy = true; $("send").disabled = true; $("play").disabled = true; $("scrub").disabled = true;
  frames = [];
  history.push({ role: "user", content: text });
  addMessage("user").textContent = text;
  const el = addMessage("assistant");
  const parts = { reasoning: el.querySelector(".reasoning"), content: el.querySelector(".content"),
                  tools: el.querySelector(".tools"), meta: el.querySelector(".meta") };
  const t0 = performance.now();
  let forwards = 0, answer = "", calls = [];
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "content-type": "application/json", ...auth() },
      body: JSON.stringify({ messages: history, stream: true, max_tokens: Number($("max-tokens").value) || 256,
                             enable_thinking: $("thinking").checked,
                             stream_options: { include_usage: true, include_draft: true } }) });
    if (!res.ok) { const j = await res.json(); throw new Error(j.error ? j.error.message : res.statusText); }
    const reader = res.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        if (j.draft) {
          forwards += 1; frames.push(j.draft);
          const secs = (performance.now() - t0) / 1000, done = j.draft.committed_tokens;
          showFrame(j.draft, { tpf: done / forwards, tps: done / secs });
        }
        if (j.usage) {
          const d = j.usage.diffusion || {};
          parts.meta.textContent = `${j.usage.completion_tokens} tokens · ${d.tokens_per_forward} tokens/forward · ` +
            `${d.steps_per_canvas} steps/canvas · ${((performance.now() - t0) / 1000).toFixed(1)} s`;
          $("s-tpf").textContent = d.tokens_per_forward;
          $("s-tps").textContent = (j.usage.completion_tokens / ((performance.now() - t0) / 1000)).toFixed(1);
        }
        for (const c of j.choices || []) {
          const d = c.delta || {};
          if (d.reasoning_content) parts.reasoning.textContent += d.reasoning_content;
          if (d.content) { parts.content.textContent += d.content; answer += d.content; }
          if (d.tool_calls) for (const tc of d.tool_calls) {
            calls.push(tc);
            parts.tools.textContent += `→ ${tc.function.name}(${tc.function.arguments})\n`;
          }
        }
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    const msg = { role: "assistant", content: answer };
    if (calls.length) msg.tool_calls = calls.map(({ index, ...rest }) => rest);
    history.push(msg);
  } catch (e) {
    el.className = "msg error"; parts.content.textContent = "error: " + e.message;
    history.pop();
  } finally {
    busy = false; $("send").disabled = false;
    if (frames.length) {
      $("scrub").max = frames.length - 1; $("scrub").value = frames.length - 1;
      $("scrub").disabled = false; $("play").disabled = false;
      $("frame-label").textContent = `${frames.length} steps recorded`;
    }
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || busy) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("clear").addEventListener("click", () => { history.length = 0; $("messages").replaceChildren(); });
$("scrub").addEventListener("input", () => {
  const f = frames[Number($("scrub").value)];
  if (f) { showFrame(f); $("frame-label").textContent = `frame ${Number($("scrub").value) + 1}/${frames.length}`; }
});
$("play").addEventListener("click", () => {
  if (playing) { clearInterval(playing); playing = null; $("play").textContent = "▶ replay"; return; }
  let k = 0; $("play").textContent = "■ stop";
  playing = setInterval(() => {
    if (k >= frames.length) { clearInterval(playing); playing = null; $("play").textContent = "▶ replay"; return; }
    $("scrub").value = k; showFrame(frames[k]);
    $("frame-label").textContent = `frame ${k + 1}/${frames.length}`; k += 1;
  }, 120);
});
