// clipserve playground: plain ES2020, no dependencies. It calls the service's public API from this origin and
// builds every piece of text it shows with textContent (never innerHTML), so nothing a server or a file name
// says can become markup. The Content-Security-Policy forbids inline script and style; bar widths are set
// through the CSSOM (element.style), which that policy allows.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const state = {
    apiKey: null, // the API key, only ever in this variable: never in storage, cookies or the URL
    keyPromptShown: false,
    model: null, // the card from /v1/models
    images: [], // [{file, url}] chosen for /classify
    shownUrls: new Set(), // object URLs the results still show
    embed: { a: null, b: null }, // {file, url} per embed slot
    classifiers: new Map(), // name -> status, from /v1/classifiers
    classifierNodes: new Map(), // name -> its list item's parts
    pollTimer: null,
    examples: null, // the classifier whose labels take examples (GET /v1/classifiers/{name})
    busy: new Set(), // buttons whose request is under way
  };

  // ---------------------------------------------------------------------------------------------- helpers

  /** An element with attributes and children (strings become text nodes). */
  function h(tag, attributes = {}, ...children) {
    const element = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") element.className = value;
      else element.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      element.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return element;
  }

  const plural = (n, one, many) => `${n.toLocaleString("en")} ${n === 1 ? one : many}`;
  const ms = (value) => `${value < 10 ? value.toFixed(1) : Math.round(value).toLocaleString("en")}\u00a0ms`;

  function percent(probability) {
    const value = probability * 100;
    if (value >= 99.95 && value < 100) return ">99.9 %";
    if (value > 0 && value < 0.05) return "<0.1 %";
    return `${value.toFixed(1)} %`;
  }

  /** Labels from text: split at commas and line breaks, trimmed, blanks dropped. */
  const splitList = (text) =>
    text
      .split(/[,\n]/)
      .map((item) => item.trim())
      .filter(Boolean);

  /** A template choice: null (the server's default), a preset name, or a custom list. */
  function templatesChoice(selectId, customId) {
    const value = $(selectId).value;
    if (!value) return null;
    if (value !== "custom") return value;
    return $(customId)
      .value.split("\n")
      .map((line) => line.trim())
      .filter(Boolean);
  }

  const isImageFile = (file) => !file.type || file.type.startsWith("image/");

  function readBase64(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).slice(String(reader.result).indexOf(",") + 1));
      reader.onerror = () => reject(new Error(`could not read ${file.name || "the image"}`));
      reader.readAsDataURL(file);
    });
  }

  function setBusy(button, busyText) {
    state.busy.add(button);
    button.dataset.idleText = button.textContent;
    button.textContent = busyText;
    button.setAttribute("aria-disabled", "true");
  }

  function setIdle(button) {
    state.busy.delete(button);
    if (button.dataset.idleText) button.textContent = button.dataset.idleText;
    button.removeAttribute("aria-disabled");
  }

  // ------------------------------------------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, body, fallback) {
      const error = (body && typeof body === "object" && body.error) || {};
      super(error.message || fallback || `the server answered ${status}`);
      this.status = status;
      this.code = error.code || (status ? `http_${status}` : "network_error");
      this.param = error.param || null;
      this.requestId = error.request_id || null;
    }
  }

  /** One API call: JSON or a form in, the parsed JSON and timings out; ApiError for any non-2xx answer. */
  async function api(path, { method = "GET", json, form } = {}) {
    const headers = { Accept: "application/json" };
    if (state.apiKey) headers.Authorization = `Bearer ${state.apiKey}`;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form; // the browser writes the multipart boundary
    }
    const started = performance.now();
    let response;
    try {
      response = await fetch(path, { method, headers, body, cache: "no-store", credentials: "same-origin" });
    } catch (error) {
      throw new ApiError(0, null, "the server did not answer: is it still running?");
    }
    const text = await response.text();
    const roundTripMs = performance.now() - started;
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (error) {
      data = null;
    }
    if (!response.ok) {
      const failure = new ApiError(response.status, data, `${response.status} ${response.statusText}`.trim());
      if (response.status === 401) askForKey(failure);
      throw failure;
    }
    return { data, roundTripMs, serverTiming: response.headers.get("Server-Timing") };
  }

  /** An error in words in an alert region: the message, its code and parameter, and the request id. */
  function showError(region, error) {
    region.replaceChildren();
    if (!error) return;
    const details = error instanceof ApiError ? [error.code, error.param].filter(Boolean).join(", ") : "";
    region.append(
      h("strong", {}, error instanceof ApiError ? "The server said: " : "Error: "),
      h("span", { class: "error-message", "data-testid": "error-message" }, error.message),
      details ? " " : null,
      details ? h("span", { class: "error-code" }, `(${details})`) : null,
      error.requestId ? h("span", { class: "error-id" }, `request id ${error.requestId}`) : null,
    );
  }

  // ------------------------------------------------------------------------------------------- API key

  function askForKey(error) {
    const section = $("auth");
    section.hidden = false;
    if (state.apiKey) showError($("auth-error"), error);
    if (!state.keyPromptShown) {
      state.keyPromptShown = true;
      $("api-key").focus();
    }
  }

  async function useKey(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) {
      showError($("auth-error"), new Error("type the API key first"));
      return;
    }
    state.apiKey = key;
    showError($("auth-error"), null);
    try {
      await api("/v1/models");
    } catch (error) {
      if (error.status !== 401) showError($("auth-error"), error);
      return;
    }
    $("api-key").value = ""; // from here on only the variable holds it
    $("auth").hidden = true;
    loadModel();
    refreshClassifiers();
  }

  // --------------------------------------------------------------------------------------------- model

  async function loadModel() {
    const info = $("model-info");
    try {
      const { data } = await api("/v1/models");
      const card = data.data[0];
      state.model = card;
      info.replaceChildren(
        "Model ",
        h("strong", { "data-testid": "model-name" }, card.id),
        ` · ${card.embed_dim}-d embeddings · ${card.image_size} px · `,
        h("span", { class: "engine" }, card.engine),
      );
      info.title = `content hash ${card.content_hash}`;
      $("embed-dim").textContent = String(card.embed_dim);
      $("embed-model").textContent = card.id;
    } catch (error) {
      if (error.status === 503) {
        info.textContent = `The server is not ready yet (${error.message}); retrying…`;
        window.setTimeout(loadModel, 1000);
      } else if (error.status === 401) {
        info.textContent = "This server needs an API key.";
      } else {
        info.textContent = `Could not read the model: ${error.message}`;
      }
    }
  }

  // ---------------------------------------------------------------------------------------------- tabs

  const tabs = () => [...document.querySelectorAll('[role="tab"]')].filter((tab) => !tab.hidden);

  function selectTab(tab, focus = false) {
    for (const other of document.querySelectorAll('[role="tab"]')) {
      const selected = other === tab;
      other.setAttribute("aria-selected", String(selected));
      other.tabIndex = selected ? 0 : -1;
      $(other.getAttribute("aria-controls")).hidden = !selected;
    }
    if (focus) tab.focus();
    if (tab.id === "tab-classifiers") refreshClassifiers();
  }

  function activePanel() {
    const tab = document.querySelector('[role="tab"][aria-selected="true"]');
    return tab ? tab.id.replace("tab-", "") : "classify";
  }

  function onTabKey(event) {
    const list = tabs();
    const index = list.indexOf(event.currentTarget);
    const next = {
      ArrowRight: list[(index + 1) % list.length],
      ArrowLeft: list[(index - 1 + list.length) % list.length],
      Home: list[0],
      End: list[list.length - 1],
    }[event.key];
    if (next) {
      event.preventDefault();
      selectTab(next, true);
    }
  }

  // ----------------------------------------------------------------------------------- drop zones, paste

  /** Highlights `zone` while files are dragged over it and hands dropped files to `take`. */
  function dropTarget(zone, take) {
    zone.addEventListener("dragenter", (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", (event) => {
      if (!zone.contains(event.relatedTarget)) zone.classList.remove("dragging");
    });
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      event.stopPropagation();
      zone.classList.remove("dragging");
      const files = [...((event.dataTransfer && event.dataTransfer.files) || [])];
      if (files.length) take(files);
    });
  }

  function onPaste(event) {
    const files = [...((event.clipboardData && event.clipboardData.files) || [])].filter(isImageFile);
    if (!files.length) return; // text: the browser pastes it as usual
    event.preventDefault();
    const panel = activePanel();
    if (panel === "classify") {
      addImages(files);
    } else if (panel === "embed") {
      // The slot that has focus; else the first one waiting for an image; else A.
      const focused = document.activeElement && document.activeElement.closest(".slot");
      const waiting = ["a", "b"].find((slot) => slotKind(slot) === "image" && !state.embed[slot]);
      setSlotImage(focused ? focused.dataset.slot : waiting || "a", files[0]);
    } else if (panel === "classifiers" && state.examples) {
      const target = document.activeElement && document.activeElement.closest(".label-target");
      if (target) addExamples(target.dataset.label, files);
      else showError($("examples-error"), new Error("focus a label (Tab to its button) before pasting an image"));
    }
  }

  // ------------------------------------------------------------------------------------------- classify

  function addImages(files) {
    const images = files.filter(isImageFile);
    for (const file of images) state.images.push({ file, url: URL.createObjectURL(file) });
    showError(
      $("classify-error"),
      images.length < files.length ? new Error(`${plural(files.length - images.length, "file is", "files are")} not an image`) : null,
    );
    renderPreviews();
  }

  function removeImage(index) {
    const [removed] = state.images.splice(index, 1);
    if (removed && !state.shownUrls.has(removed.url)) URL.revokeObjectURL(removed.url);
    renderPreviews();
    const buttons = $("previews").querySelectorAll("button");
    (buttons[Math.min(index, buttons.length - 1)] || $("images")).focus();
  }

  function renderPreviews() {
    const list = $("previews");
    list.replaceChildren(
      ...state.images.map(({ file, url }, index) => {
        const name = file.name || `image ${index + 1}`;
        const remove = h("button", { type: "button", "aria-label": `Remove ${name}`, title: `Remove ${name}` }, "×");
        remove.addEventListener("click", () => removeImage(index));
        return h("li", {}, h("img", { src: url, alt: `Preview of ${name}` }), remove);
      }),
    );
    const count = state.images.length;
    $("images-drop").querySelector(".dropzone-text").lastElementChild.textContent = count
      ? "add more"
      : "choose files";
  }

  function onSourceChange() {
    const byClassifier = $("source-classifier").checked;
    $("labels-field").hidden = byClassifier;
    $("templates-field").hidden = byClassifier; // a saved classifier has its own templates
    $("classifier-field").hidden = !byClassifier;
    if (byClassifier) refreshClassifiers();
  }

  async function classify(event) {
    event.preventDefault();
    const button = $("classify-submit");
    if (state.busy.has(button)) return;
    showError($("classify-error"), null);
    const images = state.images.slice();
    const form = new FormData();
    for (const { file } of images) form.append("image", file, file.name || "pasted-image");
    if ($("source-classifier").checked) {
      if ($("classifier").value) form.append("classifier", $("classifier").value);
      const weight = $("examples-weight").value.trim();
      if (weight) form.append("examples_weight", weight);
    } else {
      // One field with a JSON list: each label arrives exactly as typed, commas or brackets in it or not.
      const labels = splitList($("labels").value);
      if (labels.length) form.append("labels", JSON.stringify(labels));
      const templates = templatesChoice("templates", "custom-templates");
      if (templates !== null) form.append("templates", Array.isArray(templates) ? JSON.stringify(templates) : templates);
    }
    const topK = $("top-k").value.trim();
    if (topK) form.append("top_k", topK);

    setBusy(button, "Classifying…");
    $("results").setAttribute("aria-busy", "true");
    $("classify-status").textContent = "Classifying…";
    try {
      const answer = await api("/classify", { method: "POST", form });
      renderResults(answer, images);
    } catch (error) {
      showError($("classify-error"), error);
      $("classify-status").textContent = `Classification failed: ${error.message}`;
    } finally {
      setIdle(button);
      $("results").removeAttribute("aria-busy");
    }
  }

  function parseServerTiming(header) {
    if (!header) return [];
    return header
      .split(",")
      .map((entry) => {
        const [name, ...params] = entry.trim().split(";");
        const duration = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
        return { name, duration: duration ? Number(duration.slice(4)) : NaN };
      })
      .filter((entry) => entry.name && Number.isFinite(entry.duration));
  }

  function renderResults({ data, roundTripMs, serverTiming }, images) {
    const timing = data.timing || {};
    const meta = $("classify-meta");
    meta.replaceChildren(
      "Model ",
      h("strong", { "data-testid": "result-model" }, data.model),
      ...(data.classifier ? [" · classifier ", h("strong", {}, data.classifier)] : []),
      " · server ",
      h("strong", { "data-testid": "server-time" }, ms(timing.total_ms || 0)),
      ` (images ${ms(timing.images_ms || 0)}, labels ${ms(timing.labels_ms || 0)}, similarity ${ms(
        timing.similarity_ms || 0,
      )}) · round trip ${ms(roundTripMs)}`,
    );
    const phases = parseServerTiming(serverTiming);
    if (phases.length) {
      meta.title = `Server-Timing: ${phases.map((p) => `${p.name} ${ms(p.duration)}`).join(", ")}`;
    }

    for (const url of state.shownUrls) {
      if (!state.images.some((image) => image.url === url)) URL.revokeObjectURL(url);
    }
    state.shownUrls = new Set(images.map((image) => image.url));

    const blocks = data.results.map((result, index) => {
      const image = images[index];
      const name = image ? image.file.name || "pasted image" : "";
      const labels = result.labels.slice().sort((a, b) => b.probability - a.probability);
      const titleId = `result-${index + 1}-title`;
      const bars = labels.map((item) => {
        const fill = h("span", { class: "bar-fill" });
        fill.style.width = `${Math.max(0, Math.min(1, item.probability)) * 100}%`; // CSSOM: allowed by the CSP
        return h(
          "li",
          { class: "bar", "data-testid": "bar", title: `cosine ${item.score.toFixed(4)}` },
          h("span", { class: "bar-label", "data-testid": "bar-label" }, item.label),
          h("span", { class: "bar-track", "aria-hidden": "true" }, fill),
          h(
            "span",
            { class: "bar-value" },
            h("span", { "data-testid": "bar-probability" }, percent(item.probability)),
            h("span", { class: "visually-hidden" }, `, cosine ${item.score.toFixed(3)}`),
          ),
        );
      });
      return h(
        "article",
        { class: "result", "data-testid": "result", "aria-labelledby": titleId },
        image ? h("img", { class: "result-image", src: image.url, alt: `Image ${index + 1}: ${name}` }) : null,
        h(
          "div",
          { class: "result-body" },
          h("h3", { class: "result-title", id: titleId }, `Image ${index + 1} `, h("span", { class: "hint" }, name)),
          h("ol", { class: "bars", "aria-label": `Labels for image ${index + 1}, most probable first` }, bars),
        ),
      );
    });
    $("results").replaceChildren(...blocks);

    const summary = data.results
      .map((result, index) => {
        const top = result.labels[0];
        return top ? `image ${index + 1}: ${top.label}, ${percent(top.probability)}` : `image ${index + 1}: no labels`;
      })
      .join("; ");
    $("classify-status").textContent = `Classified ${plural(data.results.length, "image", "images")}. Top label for ${summary}.`;
  }

  // --------------------------------------------------------------------------------------------- embed

  const slotKind = (slot) => ($(`embed-${slot}-kind-image`).checked ? "image" : "text");

  function onSlotKind(slot) {
    const fieldset = $(`slot-${slot}`);
    const image = slotKind(slot) === "image";
    fieldset.querySelector(".slot-text").hidden = image;
    fieldset.querySelector(".slot-image").hidden = !image;
  }

  function setSlotImage(slot, file) {
    if (!isImageFile(file)) {
      showError($("embed-error"), new Error(`${file.name || "that file"} is not an image`));
      return;
    }
    const previous = state.embed[slot];
    if (previous) URL.revokeObjectURL(previous.url);
    const url = URL.createObjectURL(file);
    state.embed[slot] = { file, url };
    const preview = $(`slot-${slot}`).querySelector(".slot-preview");
    preview.src = url;
    preview.alt = `Input ${slot.toUpperCase()}: ${file.name || "pasted image"}`;
    preview.hidden = false;
    $(`embed-${slot}-kind-image`).checked = true;
    onSlotKind(slot);
    showError($("embed-error"), null);
  }

  function normalised(vector) {
    const norm = Math.sqrt(vector.reduce((sum, x) => sum + x * x, 0)) || 1;
    return vector.map((x) => x / norm);
  }

  /** The cosine of two embeddings: the dot product of the L2-normalised vectors. */
  function cosine(a, b) {
    const [u, v] = [normalised(a), normalised(b)];
    return u.reduce((sum, x, i) => sum + x * v[i], 0);
  }

  async function compare(event) {
    event.preventDefault();
    const button = $("embed-submit");
    if (state.busy.has(button)) return;
    showError($("embed-error"), null);
    const inputs = ["a", "b"].map((slot) =>
      slotKind(slot) === "text"
        ? { slot, kind: "text", text: $(`embed-${slot}-text`).value }
        : { slot, kind: "image", file: state.embed[slot] && state.embed[slot].file },
    );
    const missing = inputs.find((input) => input.kind === "image" && !input.file);
    if (missing) {
      showError($("embed-error"), new Error(`input ${missing.slot.toUpperCase()}: choose, drop or paste an image`));
      return;
    }
    setBusy(button, "Comparing…");
    try {
      const texts = inputs.filter((input) => input.kind === "text").map((input) => input.text);
      const images = await Promise.all(inputs.filter((input) => input.kind === "image").map((input) => readBase64(input.file)));
      const body = {};
      if (texts.length) body.texts = texts;
      if (images.length) body.images = images;
      const templates = $("embed-templates").value;
      if (templates && texts.length) body.templates = templates;
      const { data, roundTripMs, serverTiming } = await api("/embed", { method: "POST", json: body });
      const counters = { text: 0, image: 0 };
      const vectors = inputs.map((input) =>
        input.kind === "text" ? data.texts[counters.text++] : data.images[counters.image++],
      );
      const value = cosine(vectors[0], vectors[1]);
      const output = $("embed-cosine");
      output.textContent = value.toFixed(4);
      output.dataset.cosine = String(value);
      $("embed-dim").textContent = String(data.dim);
      $("embed-model").textContent = data.model;
      const app = parseServerTiming(serverTiming).find((phase) => phase.name === "app");
      $("embed-timing").textContent = `${app ? ms(app.duration) : "–"} (round trip ${ms(roundTripMs)})`;
      const marker = $("cosine-marker");
      marker.style.left = `${((Math.max(-1, Math.min(1, value)) + 1) / 2) * 100}%`; // CSSOM: allowed by the CSP
      marker.hidden = false;
    } catch (error) {
      showError($("embed-error"), error);
    } finally {
      setIdle(button);
    }
  }

  // ---------------------------------------------------------------------------------- saved classifiers

  const path = (name) => `/v1/classifiers/${encodeURIComponent(name)}`;

  async function refreshClassifiers() {
    window.clearTimeout(state.pollTimer);
    state.pollTimer = null;
    let data;
    try {
      ({ data } = await api("/v1/classifiers"));
    } catch (error) {
      if (error.status === 404 && error.code === "not_found") {
        hideClassifiers(); // a server without saved classifiers
      } else if (error.status !== 401) {
        showError($("classifiers-error"), error);
      }
      return;
    }
    showError($("classifiers-error"), null);
    state.classifiers = new Map(data.data.map((status) => [status.name, status]));
    renderClassifierList();
    renderClassifierSelect();
    if (data.data.some((status) => status.status === "preparing")) {
      state.pollTimer = window.setTimeout(refreshClassifiers, 600);
    }
  }

  function hideClassifiers() {
    $("tab-classifiers").hidden = true;
    $("source-classifier").closest(".choice").hidden = true;
  }

  function classifierDetail(status) {
    const parts = [plural(status.label_count, "label", "labels"), plural(status.templates.length, "template", "templates")];
    if (status.status === "preparing") {
      parts.push(`${status.prompts_prepared.toLocaleString("en")} / ${status.prompts_total.toLocaleString("en")} prompts`);
      if (status.eta_s !== null && status.eta_s !== undefined) parts.push(`about ${Math.ceil(status.eta_s)} s left`);
    }
    const examples = Object.values(status.examples_per_label || {}).reduce((sum, n) => sum + n, 0);
    if (examples) parts.push(plural(examples, "example image", "example images"));
    if (status.error) parts.push(`failed: ${status.error}`);
    return parts.join(" · ");
  }

  function classifierNode(name) {
    const badge = h("span", { class: "badge" });
    const progress = h("progress", { max: 1, value: 0, "aria-label": `Preparation of ${name}` });
    const detail = h("p", { class: "classifier-detail" });
    const use = h("button", { type: "button", class: "small" }, "Classify with it");
    const examples = h("button", { type: "button", class: "small" }, "Add examples");
    use.addEventListener("click", () => useClassifier(name));
    examples.addEventListener("click", () => openExamples(name));
    const item = h(
      "li",
      { class: "classifier", "data-name": name, "data-testid": "classifier" },
      h("div", { class: "classifier-head" }, h("span", { class: "classifier-name" }, name), badge),
      progress,
      detail,
      h("div", { class: "classifier-actions" }, use, examples),
    );
    return { item, badge, progress, detail };
  }

  /** Updates the list in place (focus stays on a button while progress updates arrive). */
  function renderClassifierList() {
    const list = $("classifier-list");
    for (const [name, node] of state.classifierNodes) {
      if (!state.classifiers.has(name)) {
        node.item.remove();
        state.classifierNodes.delete(name);
      }
    }
    for (const [name, status] of state.classifiers) {
      let node = state.classifierNodes.get(name);
      if (!node) {
        node = classifierNode(name);
        state.classifierNodes.set(name, node);
      }
      list.append(node.item); // moves it into the server's order
      node.badge.textContent = status.status;
      node.badge.className = `badge badge-${status.status}`;
      node.progress.hidden = status.status !== "preparing";
      node.progress.max = Math.max(1, status.prompts_total);
      node.progress.value = status.prompts_prepared;
      node.detail.textContent = classifierDetail(status);
      node.item.classList.toggle("selected", Boolean(state.examples && state.examples.name === name));
    }
    $("classifiers-empty").hidden = state.classifiers.size > 0;
    if (state.examples && !state.classifiers.has(state.examples.name)) {
      state.examples = null;
      $("examples").hidden = true;
    }
  }

  function renderClassifierSelect() {
    const select = $("classifier");
    const current = select.value;
    const options = [...state.classifiers.values()].map((status) => {
      const progress =
        status.status === "preparing" && status.prompts_total
          ? ` ${Math.floor((100 * status.prompts_prepared) / status.prompts_total)} %`
          : "";
      return h("option", { value: status.name }, `${status.name} (${status.status}${progress})`);
    });
    select.replaceChildren(...(options.length ? options : [h("option", { value: "" }, "none saved yet")]));
    if (state.classifiers.has(current)) select.value = current;
    onClassifierPicked();
  }

  function onClassifierPicked() {
    const status = state.classifiers.get($("classifier").value);
    $("classifier-hint").textContent = !status
      ? "Create one in the Classifiers tab."
      : status.status === "preparing"
        ? "Still preparing its label vectors: the server answers 409 until it is ready."
        : classifierDetail(status);
  }

  function useClassifier(name) {
    $("source-classifier").checked = true;
    onSourceChange();
    renderClassifierSelect();
    $("classifier").value = name;
    onClassifierPicked();
    selectTab($("tab-classify"));
    $("classifier").focus();
  }

  async function createClassifier(event) {
    event.preventDefault();
    const button = $("create-submit");
    if (state.busy.has(button)) return;
    const error = $("create-error");
    showError(error, null);
    const name = $("new-name").value.trim();
    if (!name) {
      showError(error, new Error("give the classifier a name"));
      $("new-name").focus();
      return;
    }
    const body = {};
    const labels = splitList($("new-labels").value);
    if (labels.length) body.labels = labels;
    const templates = templatesChoice("new-templates", "new-custom-templates");
    if (templates !== null) body.templates = templates;
    setBusy(button, "Creating…");
    try {
      const { data } = await api(path(name), { method: "PUT", json: body });
      state.classifiers.set(data.name, data);
      await refreshClassifiers();
      await openExamples(data.name);
    } catch (failure) {
      showError(error, failure);
    } finally {
      setIdle(button);
    }
  }

  // ------------------------------------------------------------------------------------------- examples

  const MAX_LABEL_TARGETS = 120;

  async function openExamples(name) {
    showError($("examples-error"), null);
    let data;
    try {
      ({ data } = await api(path(name)));
    } catch (error) {
      $("examples").hidden = false;
      showError($("examples-error"), error);
      return;
    }
    state.examples = data;
    $("examples-title").textContent = `Examples for ${name}`;
    $("examples-filter").value = "";
    $("examples-status").textContent = "";
    $("examples").hidden = false;
    renderLabelTargets();
    renderClassifierList();
    $("examples").scrollIntoView({ block: "nearest" });
  }

  function renderLabelTargets() {
    const classifier = state.examples;
    const filter = $("examples-filter").value.trim().toLowerCase();
    const matching = classifier.labels.filter((label) => label.toLowerCase().includes(filter));
    const shown = matching.slice(0, MAX_LABEL_TARGETS);
    $("examples-count").textContent =
      shown.length < matching.length
        ? `Showing ${shown.length} of ${plural(matching.length, "label", "labels")}: type to narrow them down.`
        : plural(matching.length, "label", "labels");
    $("examples-labels").replaceChildren(
      ...shown.map((label) => {
        const index = classifier.labels.indexOf(label);
        const inputId = `example-input-${index}`;
        const input = h("input", { id: inputId, type: "file", accept: "image/*", multiple: true, class: "visually-hidden" });
        input.addEventListener("change", () => {
          const files = [...input.files];
          input.value = "";
          if (files.length) addExamples(label, files);
        });
        const item = h(
          "li",
          { class: "label-target", "data-label": label, "data-testid": "label-target" },
          h("span", { class: "label-target-name" }, label),
          h("span", { class: "label-target-count" }, exampleCount(label)),
          h("label", { class: "pick", for: inputId }, "Add images", h("span", { class: "visually-hidden" }, ` to ${label}`)),
          input,
        );
        dropTarget(item, (files) => addExamples(label, files));
        return item;
      }),
    );
  }

  function exampleCount(label) {
    const count = (state.examples.examples_per_label || {})[label] || 0;
    return count ? plural(count, "example", "examples") : "no examples yet";
  }

  async function addExamples(label, files) {
    const classifier = state.examples;
    if (!classifier) return;
    const images = files.filter(isImageFile);
    showError($("examples-error"), null);
    if (!images.length) {
      showError($("examples-error"), new Error("none of those files is an image"));
      return;
    }
    const form = new FormData();
    form.append("label", label);
    for (const file of images) form.append("image", file, file.name || "pasted-image");
    $("examples-status").textContent = `Adding ${plural(images.length, "image", "images")} to “${label}”…`;
    try {
      const { data } = await api(`${path(classifier.name)}/examples`, { method: "POST", form });
      classifier.examples_per_label = data.examples_per_label;
      state.classifiers.set(data.name, data);
      renderClassifierList();
      const item = [...$("examples-labels").children].find((li) => li.dataset.label === label);
      if (item) item.querySelector(".label-target-count").textContent = exampleCount(label);
      $("examples-status").textContent = `Added ${plural(images.length, "example", "examples")} to “${label}”: ${exampleCount(label)} now.`;
    } catch (error) {
      $("examples-status").textContent = "";
      showError($("examples-error"), error);
    }
  }

  // ------------------------------------------------------------------------------------------- wiring

  function templatesToggle(selectId, fieldId) {
    const update = () => {
      $(fieldId).hidden = $(selectId).value !== "custom";
    };
    $(selectId).addEventListener("change", update);
    update();
  }

  function start() {
    for (const tab of document.querySelectorAll('[role="tab"]')) {
      tab.addEventListener("click", () => selectTab(tab));
      tab.addEventListener("keydown", onTabKey);
    }
    $("auth-form").addEventListener("submit", useKey);

    $("images").addEventListener("change", (event) => {
      const files = [...event.target.files];
      event.target.value = ""; // picking the same file again still fires "change"
      if (files.length) addImages(files);
    });
    dropTarget($("images-drop"), addImages);
    for (const radio of document.querySelectorAll('input[name="source"]')) radio.addEventListener("change", onSourceChange);
    $("classifier").addEventListener("change", onClassifierPicked);
    templatesToggle("templates", "custom-templates-field");
    $("classify-form").addEventListener("submit", classify);

    for (const slot of ["a", "b"]) {
      for (const radio of document.querySelectorAll(`input[name="kind-${slot}"]`)) {
        radio.addEventListener("change", () => onSlotKind(slot));
      }
      const input = $(`embed-${slot}-image`);
      input.addEventListener("change", () => {
        const [file] = input.files;
        input.value = "";
        if (file) setSlotImage(slot, file);
      });
      dropTarget($(`slot-${slot}`), (files) => setSlotImage(slot, files[0]));
      onSlotKind(slot);
    }
    $("embed-form").addEventListener("submit", compare);

    templatesToggle("new-templates", "new-custom-templates-field");
    $("create-form").addEventListener("submit", createClassifier);
    $("classifiers-refresh").addEventListener("click", refreshClassifiers);
    $("examples-filter").addEventListener("input", renderLabelTargets);

    document.addEventListener("paste", onPaste);
    // Files dropped outside a drop zone: on the classify view they are images to classify; elsewhere the browser
    // must not navigate away to show them.
    document.addEventListener("dragover", (event) => event.preventDefault());
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      const files = [...((event.dataTransfer && event.dataTransfer.files) || [])];
      if (files.length && activePanel() === "classify") addImages(files);
    });

    onSourceChange();
    loadModel();
    refreshClassifiers();
    document.documentElement.dataset.ready = "true"; // for tests: the handlers are in place
  }

  start();
})();
