// Rendering of the dashboard pages from the data scripts (window.META, VOCAB, LATENTS, SHARDS).
"use strict";

function escapeHtml(text) {
  return text.replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;"}[c]));
}

function format(value, digits) {
  return value === null || value === undefined ? "" : Number(value).toFixed(digits);
}

// One token shaded by the latent's activation (relative to `peak`); the value and store row on hover.
function tokenSpan(tokenId, value, row, centre, peak) {
  const alpha = Math.min(1, Math.max(0, value) / peak).toFixed(2);
  const cls = "token" + (centre ? " centre" : "");
  return `<span class="${cls}" data-act="${value}" data-row="${row}" title="activation ${value}"`
    + ` style="background: rgba(220, 60, 30, ${alpha})">${escapeHtml(VOCAB[tokenId])}</span>`;
}

function renderIndex() {
  const body = document.querySelector("#latents tbody");
  const filter = document.getElementById("kind-filter");
  const search = document.getElementById("explanation-filter");
  document.getElementById("summary").textContent =
    `${META.n_live} live latents of the run ${META.run}, by the difference ranking; ${META.n_dead} dead latents left out. ` +
    `Dictionary health on ${META.health.heldout_tokens.toLocaleString("en")} held-out tokens: ${META.health.dead} of ${META.health.dict_size} dead, ` +
    `${META.health.duplicate_groups} duplicate groups (${META.health.latents_in_duplicate_groups} latents), effective dictionary size ${META.health.effective_size}.`;
  for (const kind of [...new Set(LATENTS.map(row => row.kind))]) {
    filter.insertAdjacentHTML("beforeend", `<option value="${kind}">${kind}</option>`);
  }
  let rows = LATENTS.slice();
  const draw = () => {
    const text = search.value.toLowerCase();
    const shown = rows.filter(row => (!filter.value || row.kind === filter.value)
      && row.explanation.toLowerCase().includes(text));
    const peak = row => Math.max(1e-9, ...row.context.map(t => t[1]));
    body.innerHTML = shown.map(row => `<tr data-latent="${row.latent}">
      <td class="number">${row.rank}</td><td><a href="latent.html#${row.latent}">${row.latent}</a></td>
      <td class="kind-${row.kind}">${row.kind}</td><td class="number">${format(row.difference_score, 2)}</td>
      <td class="number">${(100 * row.frequency).toFixed(3)}%</td><td class="number">${format(row.relative_norm, 3)}</td>
      <td class="number">${format(row.decoder_cosine, 3)}</td><td class="number">${format(row.nu_error, 2)}</td>
      <td class="number">${format(row.nu_reconstruction, 2)}</td><td>${escapeHtml(row.explanation)}</td>
      <td class="number">${format(row.explanation_f1, 2)}</td><td>${row.fires_on}</td>
      <td class="context">${row.context.map(t => tokenSpan(t[0], t[1], "", t[2], peak(row))).join("")}</td></tr>`).join("");
  };
  for (const th of document.querySelectorAll("th[data-key]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      const descending = !th.classList.contains("sorted-desc");
      document.querySelectorAll("th").forEach(other => other.classList.remove("sorted-asc", "sorted-desc"));
      th.classList.add(descending ? "sorted-desc" : "sorted-asc");
      const value = row => row[key] === null ? -Infinity : row[key];
      rows.sort((a, b) => (value(a) < value(b) ? -1 : value(a) > value(b) ? 1 : 0) * (descending ? -1 : 1));
      draw();
    });
  }
  filter.addEventListener("change", draw);
  search.addEventListener("input", draw);
  draw();
}

function contextBlock(context, peak) {
  const tokens = context.tokens.map(t => tokenSpan(t[0], t[1], t[2], t[2] === context.centre, peak)).join("");
  return `<div class="context"><span class="value">${context.value.toFixed(2)}</span>${tokens}</div>`;
}

function renderLatent(page) {
  document.title = `Latent ${page.latent}`;
  document.getElementById("title").innerHTML =
    `Latent ${page.latent} <span class="kind-${page.kind}">${page.kind}</span>`;
  for (const name of ["previous", "next"]) {
    const link = document.getElementById(name);
    if (page[name] === null) { link.removeAttribute("href"); } else { link.href = `latent.html#${page[name]}`; }
  }
  const stats = [["rank in the difference ranking", `${page.rank} of ${META.n_live}`],
    ["difference score: KL where it fires (nats)", format(page.difference_score, 3)], ["frequency", `${(100 * page.frequency).toFixed(3)}%`],
    ["relative decoder norm", format(page.relative_norm, 3)], ["decoder cosine", format(page.decoder_cosine, 3)],
    ["Latent Scaling ν error / ν reconstruction", page.nu_error === null ? "(not exclusive)"
      : `${format(page.nu_error, 3)} / ${format(page.nu_reconstruction, 3)}`],
    ["explanation (detection F1)", `${escapeHtml(page.explanation)} (${format(page.explanation_f1, 2)})`],
    ["fires on (planted)", page.fires_on || "-"]];
  document.getElementById("stats").innerHTML = stats.map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join("");
  const peak = Math.max(1e-9, ...page.top.map(c => c.value));
  document.getElementById("top").innerHTML = page.top.map(c => contextBlock(c, peak)).join("");
  document.getElementById("sampled").innerHTML = page.sampled.slice().reverse().map(c => contextBlock(c, peak)).join("");
  const most = Math.max(1, ...page.histogram);
  document.getElementById("histogram").innerHTML = page.histogram.map((count, i) =>
    `<div style="height: ${(100 * count / most).toFixed(1)}%" title="${count} of the sample in bin ${i + 1} of 20"></div>`).join("");
  const sampled = page.histogram.reduce((a, b) => a + b, 0);
  document.getElementById("histogram-axis").textContent =
    `activation from 0 (left) to ${page.histogram_max.toFixed(2)} (right), 20 bins, ${sampled} firings sampled`;
  document.getElementById("logits").innerHTML = Object.entries(page.logits).map(([role, effect]) =>
    ["promoted", "suppressed"].map(way => `<table><tr><th colspan="2">${role}: ${way}</th></tr>`
      + effect[way].map(([token, value]) => `<tr><td>${escapeHtml(VOCAB[token])}</td><td>${value.toFixed(2)}</td></tr>`).join("")
      + "</table>").join("")).join("") || "<p>the store was not collected from models: no unembedding</p>";
  document.getElementById("causal").innerHTML = causalHtml(page);
}

// What patching and steering showed of a latent of the top (04's causal tests), where it was tested.
function causalHtml(page) {
  let out = "";
  for (const [model, row] of Object.entries(page.patching || {})) {
    out += `<h2>Patching <span class="hint">(the ${model}'s layers run on the other model's activation plus this `
      + "latent's share of the difference: the KL it closes, against random controls)</span></h2><table class=\"stats\">"
      + Object.entries(row).map(([k, v]) => `<tr><td>${escapeHtml(k)}</td><td>${escapeHtml(String(v))}</td></tr>`).join("")
      + "</table>";
  }
  if (page.steering) {
    out += "<h2>Steering <span class=\"hint\">(greedy continuations with α · its largest activation · its decoder "
      + "difference added at its token, where it fired; the model then runs on its own)</span></h2>";
    for (const s of page.steering) {
      const rows = s.alphas.map((alpha, i) => [`${s.model}, α = ${alpha}`, s.continuations[i]])
        .concat([[`${s.other}, its own`, s.other_continuation]]);
      out += `<table class="steering"><tr><th colspan="2">${escapeHtml(s.prompt)}</th></tr>`
        + rows.map(([k, v]) => `<tr><td>${escapeHtml(k)}</td><td>${escapeHtml(v)}</td></tr>`).join("") + "</table>";
    }
  }
  return out;
}

function loadLatent() {
  const show = () => {
    const latent = parseInt(location.hash.slice(1), 10);
    const shard = Math.floor(latent / META.latents_per_shard);
    const render = () => {
      const page = window.SHARDS && window.SHARDS[shard] && window.SHARDS[shard][latent];
      if (page) { renderLatent(page); return; }
      document.getElementById("title").textContent = `Latent ${location.hash.slice(1)}: not a live latent of this run`;
    };
    if ((window.SHARDS && window.SHARDS[shard]) || !META.shards.includes(shard)) { render(); return; }
    const script = document.createElement("script");
    script.src = `data/shard_${String(shard).padStart(4, "0")}.js`;
    script.onload = render;
    document.head.appendChild(script);
  };
  window.addEventListener("hashchange", show);
  show();
}
