/* batchcam gallery: the cards, filters and sorting (this page or the whole run), and the large view.
 *
 * A file of its own because the page's Content-Security-Policy refuses inline scripts. Every card,
 * of a page or of the whole-run view, is built by buildCard from a row of the gallery's data: the
 * page's own rows come in its JSON data block (#page-rows, never run), the whole run's in
 * gallery/rows.js, loaded with a <script src> on first use (fetch() of a data file fails on
 * file://); both hold records in one form (report/gallery.py: the columns, which of them are the
 * card's data attributes, the rows). Every view is built with createElement and textContent, never
 * innerHTML, so no file name, class name or error text can turn into markup. Reviewers' decisions
 * are kept by review.js (window.BatchcamReview); the blocks marked "review" wire them in.
 */
"use strict";
(function () {
  const body = document.body;
  const base = body.dataset.base || "";
  const byId = (id) => document.getElementById(id);
  const controls = {
    form: byId("filters"), scope: byId("f-scope"), cls: byId("f-class"), outcome: byId("f-outcome"),
    min: byId("f-min"), max: byId("f-max"), errors: byId("f-errors"), skipped: byId("f-skipped"), sort: byId("f-sort"),
    review: byId("f-review"), change: byId("f-change"),
  };
  const review = window.BatchcamReview;
  const shownStatus = byId("shown");
  const pageGrid = byId("cards");
  const runView = byId("run-view");
  const runGrid = byId("run-cards");
  const runSize = Number(body.dataset.pageSize) || 100;

  /** A report-relative path as a link from this page, percent-encoded segment by segment. */
  function reportUrl(path) {
    return base + path.split("/").map(encodeURIComponent).join("/");
  }

  // ---- the gallery's data: this page's rows and the whole run's ----------------------------------

  /** The records of a data object as items: each reads its columns by name through getters on one
   *  shared prototype (so 50,000 items copy nothing), and has its index in the run, the page it sits
   *  on (pageOf(index)), the ground-truth boxes to draw, the decision imported into reviews.csv and,
   *  once built, its card. report/gallery.py keeps these names out of the columns. */
  function itemsOf(data, start, pageOf) {
    const shared = { attributes: data.attributes };
    data.columns.forEach((name, i) => {
      Object.defineProperty(shared, name, { get() { return this.record[i]; }, enumerable: true });
    });
    return data.rows.map((record, i) => {
      const item = Object.create(shared);
      item.record = record;
      item.index = start + i;
      item.page = pageOf(start + i);
      item.card = null;
      item.groundTruth = boxesOf(item.width, item.height, item.boxes);
      // review: the decision in reviews.csv, if any
      item.review = item.decision ? { decision: item.decision, note: item.note || "", reviewed_at: item.reviewed_at || "" }
                                  : null;
      return item;
    });
  }

  /** Ground-truth boxes in the original image's pixels (after `batchcam evaluate --boxes`), or null
   *  when there are none to draw. */
  function boxesOf(width, height, boxes) {
    if (!(width > 0) || !(height > 0) || !Array.isArray(boxes) || !boxes.length) return null;
    return { width: Number(width), height: Number(height), boxes: boxes };
  }

  /** A link to one of the item's images (thumb, overlay, original), encoded only when shown
   *  (encoding 150,000 paths up front would cost the whole-run view seconds). */
  function imageUrl(item, kind) {
    return item[kind] ? reportUrl(item[kind]) : "";
  }

  /** This page's rows, from its JSON data block; none when the block is missing or unreadable. */
  function readPageItems() {
    const block = byId("page-rows");
    let data = null;
    try {
      data = JSON.parse(block ? block.textContent : "null");
    } catch (error) {
      data = null;
    }
    if (!data || !Array.isArray(data.rows)) return [];
    const page = Number(body.dataset.page) || 1;
    return itemsOf(data, data.start, () => page);
  }

  // ---- the card: one builder for the page and the whole-run view --------------------------------

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function percentText(value) {
    return value === null || value === undefined ? "n/a" : `${(100 * value).toFixed(1)}%`;
  }

  /** The card of an item. A page's cards carry the id the whole-run view links to (r<index>); a
   *  whole-run result carries a link to the page it sits on. Every column the data names as an
   *  attribute becomes data-<attribute> (left out when empty). */
  function buildCard(item, inRun) {
    const card = element("article", "card");
    if (!inRun) card.id = `r${item.index}`;
    card.dataset.index = String(item.index);
    for (const [name, attribute] of Object.entries(item.attributes)) {
      const value = item[name];
      if (value !== null && value !== undefined && value !== "") card.setAttribute(`data-${attribute}`, String(value));
    }
    if (item.status === "ok") {
      if (item.correct === false) card.classList.add("wrong");
      card.append(thumbLink(item), element("p", "name", item.path), predictionLine(item));
      if (item.label) card.appendChild(truthLine(item));
      if (item.ood_flag) card.appendChild(mark("ood", "\u26a0 unlike the training images", oodTitle(item)));
      if (item.attention_flag) {
        card.appendChild(mark("attention", `\u26a0 heat outside the lungs ${percentText(item.attention_outside)}`,
                              "share of the heat off the estimated lung fields"));
      }
    } else {
      const skipped = item.status === "skipped";
      card.classList.add(skipped ? "skipped" : "error");
      const placeholder = element("div", "thumb placeholder", skipped ? "not scored" : "no image");
      placeholder.setAttribute("aria-hidden", "true");
      const reason = element("p", "error-text");
      reason.append(element("strong", "", `${skipped ? "skipped" : "error"}:`), " ", element("span", "reason", item.error));
      card.append(placeholder, element("p", "name", item.path), reason);
    }
    if (item.change) {                                                       // review: in this run
      card.appendChild(element("p", `change-mark change-${item.change.replace(/ /g, "-")}`, `${item.change} in this run`));
    }
    review.decorate(card, item);                                             // review: the decision's mark
    if (inRun) {
      const where = element("p", "where");
      const pageLink = element("a", "", `on page ${item.page}`);
      pageLink.href = reportUrl(runData.pages[item.page - 1]) + `#r${item.index}`;
      where.appendChild(pageLink);
      card.appendChild(where);
    }
    item.card = card;
    return card;
  }

  function thumbLink(item) {
    const link = element("a", "thumb");
    link.href = imageUrl(item, "overlay");
    link.dataset.original = imageUrl(item, "original");
    link.title = "Open the large view";
    const img = element("img");
    img.src = imageUrl(item, "thumb");
    img.alt = `Grad-CAM overlay of ${item.path}`;
    link.appendChild(img);
    return link;
  }

  function predictionLine(item) {
    const line = element("p", "prediction");
    line.append(element("span", "class", item.prediction), " ", element("span", "conf", percentText(item.confidence)));
    const meter = element("meter");
    meter.min = 0;
    meter.max = 1;
    meter.value = item.confidence;
    meter.setAttribute("aria-label", "confidence");
    line.append(meter);
    return line;
  }

  function truthLine(item) {
    const line = element("p", "truth", "true ");
    line.append(element("span", "label", item.label), " ");
    line.append(item.correct === false ? element("strong", "mark-wrong", "\u2717 wrong")
                                       : element("span", "mark-right", "\u2713 correct"));
    return line;
  }

  /** A warning line (class `kind`) with its explanation as a tooltip. */
  function mark(kind, text, title) {
    const strong = element("strong", "mark-wrong", text);
    strong.title = title;
    const line = element("p", kind);
    line.appendChild(strong);
    return line;
  }

  function oodTitle(item) {
    const distance = typeof item.ood_score === "number"
      ? `Mahalanobis distance ${item.ood_score.toFixed(1)} of its features from the training images, beyond the ` +
        "model's threshold" : "Its features lie beyond the model's threshold";
    return `${distance}: the prediction and the heatmap are not to be trusted`;
  }

  const pageItems = readPageItems();
  pageGrid.replaceChildren(...pageItems.map((item) => buildCard(item, false)));

  // ---- filtering and sorting -------------------------------------------------------------------

  function percentValue(input, fallback) {
    const value = Number(input.value);
    return input.value === "" || Number.isNaN(value) ? fallback : Math.min(100, Math.max(0, value)) / 100;
  }

  function readFilter() {
    return {
      scope: controls.scope.value, cls: controls.cls.value, outcome: controls.outcome ? controls.outcome.value : "",
      min: percentValue(controls.min, 0), max: percentValue(controls.max, 1), errorsOnly: controls.errors.checked,
      skippedOnly: controls.skipped.checked,
      sort: controls.sort.value, review: controls.review.value, change: controls.change.value,
    };
  }

  function matches(item, filter) {
    if (filter.errorsOnly || filter.skippedOnly) {
      return (filter.errorsOnly && item.status === "error") || (filter.skippedOnly && item.status === "skipped");
    }
    if (filter.cls && item.prediction !== filter.cls) return false;
    if (filter.outcome === "correct" && item.correct !== true) return false;
    if (filter.outcome === "wrong" && item.correct !== false) return false;
    const wholeRange = filter.min <= 0 && filter.max >= 1;
    if (!wholeRange && (item.confidence === null || item.confidence < filter.min - 1e-9 ||
                        item.confidence > filter.max + 1e-9)) return false;
    if (filter.change && item.change !== filter.change) return false;         // review: in this run
    if (!review.matches(item, filter.review)) return false;                   // review: decisions
    return true;
  }

  /** Error rows (no confidence) go last in both confidence orders; ties keep the path order. */
  function byConfidence(direction) {
    return (a, b) => {
      if (a.confidence === null || b.confidence === null) {
        return (a.confidence === null) - (b.confidence === null) || a.index - b.index;
      }
      return direction * (a.confidence - b.confidence) || a.index - b.index;
    };
  }

  const comparators = {
    "path": (a, b) => a.index - b.index,          // rows are in path order
    "path-desc": (a, b) => b.index - a.index,
    "conf-desc": byConfidence(-1),
    "conf-asc": byConfidence(1),
    // review: the files first seen by the latest run first (ISO times sort as text)
    "new-first": (a, b) => (b.first_seen > a.first_seen) - (b.first_seen < a.first_seen) || a.index - b.index,
  };

  function select(items, filter) {
    return items.filter((item) => matches(item, filter)).sort(comparators[filter.sort] || comparators.path);
  }

  let shownItems = pageItems;   // what is on screen, in order: the large view walks this list

  function showPage(filter) {
    for (const item of pageItems) review.decorate(item.card, item);   // review: decisions made elsewhere
    const shown = select(pageItems, filter);
    const visible = new Set(shown);
    for (const item of pageItems) item.card.hidden = !visible.has(item);
    for (const item of shown) pageGrid.appendChild(item.card);
    shownItems = shown;
    runView.hidden = true;
    pageGrid.hidden = false;
    shownStatus.textContent = `Showing ${shown.length} of ${pageItems.length} images on this page.`;
  }

  // ---- the whole run ---------------------------------------------------------------------------

  let runData = null;
  let runLoading = null;
  let runMatches = [];
  let runOffset = 0;

  function loadRunData() {
    if (runData) return Promise.resolve(runData);
    if (!runLoading) {
      runLoading = new Promise((resolve, reject) => {
        const script = document.createElement("script");
        script.src = base + "gallery/rows.js";
        script.onload = () => (window.BATCHCAM_ROWS ? resolve(window.BATCHCAM_ROWS) : reject(new Error("empty")));
        script.onerror = () => reject(new Error("gallery/rows.js could not be loaded"));
        document.head.appendChild(script);
      }).then((data) => {
        const items = itemsOf(data, 0, (index) => Math.floor(index / data.pageSize) + 1);
        runData = { pages: data.pages, items: items };
        return runData;
      });
      runLoading.catch(() => { runLoading = null; });
    }
    return runLoading;
  }

  function showRun() {
    shownStatus.textContent = "Loading the whole run\u2026";
    loadRunData().then((data) => {
      const filter = readFilter();                  // as it is now: the reader may have changed it meanwhile
      if (filter.scope !== "run") return;
      runMatches = select(data.items, filter);
      shownItems = runMatches;
      runOffset = 0;
      pageGrid.hidden = true;
      runView.hidden = false;
      renderRunSlice();
    }, (error) => {
      shownStatus.textContent = `The whole-run view is unavailable: ${error.message}.`;
    });
  }

  function renderRunSlice() {
    const slice = runMatches.slice(runOffset, runOffset + runSize);
    runGrid.replaceChildren(...slice.map((item) => buildCard(item, true)));
    const first = runMatches.length ? runOffset + 1 : 0;
    const last = runOffset + slice.length;
    byId("run-range").textContent = `results ${first}\u2013${last} of ${runMatches.length}`;
    byId("run-prev").disabled = runOffset === 0;
    byId("run-next").disabled = last >= runMatches.length;
    shownStatus.textContent =
      `Showing ${first}\u2013${last} of ${runMatches.length} matching images across the run ` +
      `(${runData.items.length} in all).`;
  }

  function apply() {
    const filter = readFilter();
    if (filter.scope === "run") showRun();
    else showPage(filter);
  }

  // ---- the large view --------------------------------------------------------------------------

  const viewer = {
    dialog: byId("viewer"), image: byId("viewer-image"), path: byId("viewer-path"), info: byId("viewer-info"),
    mode: byId("viewer-mode"), position: byId("viewer-position"), toggle: byId("viewer-toggle"),
    file: byId("viewer-file"), figure: byId("viewer-figure"), boxes: byId("viewer-boxes"),
    boxesLegend: byId("viewer-boxes-legend"),
    items: [], at: 0, showing: "overlay", opener: null,
  };

  function openViewer(item, opener) {
    viewer.items = shownItems.filter((candidate) => candidate.status === "ok");
    viewer.at = Math.max(0, viewer.items.indexOf(item));
    viewer.showing = "overlay";
    viewer.opener = opener;
    renderViewer();
    if (!viewer.dialog.open) viewer.dialog.showModal();
    viewer.figure.focus();
  }

  function renderViewer() {
    const item = viewer.items[viewer.at];
    if (!item) return;
    const overlay = viewer.showing === "overlay";
    const src = imageUrl(item, overlay ? "overlay" : "original");
    viewer.image.src = src;
    viewer.image.alt = `${overlay ? "Grad-CAM overlay" : "Original X-ray"} of ${item.path}`;
    viewer.file.href = src;
    viewer.dialog.dataset.showing = viewer.showing;
    viewer.path.textContent = item.path;
    viewer.info.replaceChildren(`predicted ${item.prediction}, confidence ${percentText(item.confidence)}`);
    if (item.label) {
      viewer.info.append(`; true ${item.label} `);
      if (item.correct === false) viewer.info.append(element("span", "wrong", "\u2717 wrong"));
      else viewer.info.append("\u2713 correct");
    }
    viewer.mode.textContent = overlay ? "Grad-CAM overlay" : "original X-ray";
    viewer.toggle.textContent = overlay ? "show original" : "show overlay";
    viewer.position.textContent = `(${viewer.at + 1} of ${viewer.items.length})`;
    drawBoxes(item);
    showDecision(item);
  }

  /** The item's ground-truth boxes as outlined rectangles over the large view (overlay and original
   *  alike), in % of the image, so they follow its displayed size. Positions go through element.style
   *  (CSSOM), which the CSP allows; style attributes in markup it would refuse. */
  function drawBoxes(item) {
    const boxes = item.groundTruth;
    viewer.boxesLegend.hidden = !boxes;
    viewer.boxes.hidden = !boxes;
    if (!boxes) {
      viewer.boxes.replaceChildren();
      return;
    }
    const percentOf = (value, whole) => `${(100 * Math.min(Math.max(value, 0), whole) / whole).toFixed(3)}%`;
    viewer.boxes.replaceChildren(...boxes.boxes.map((box) => {
      const [x0, y0, x1, y1] = box.map(Number);
      const outline = element("div", "gt-box");
      outline.title = `ground-truth box (${x0}, ${y0})–(${x1}, ${y1})`;
      outline.style.left = percentOf(x0, boxes.width);
      outline.style.top = percentOf(y0, boxes.height);
      outline.style.width = `calc(${percentOf(x1, boxes.width)} - ${percentOf(x0, boxes.width)})`;
      outline.style.height = `calc(${percentOf(y1, boxes.height)} - ${percentOf(y0, boxes.height)})`;
      return outline;
    }));
    placeBoxes();
  }

  /** Lay the boxes' layer exactly over the displayed image (it is centred and scaled to fit). */
  function placeBoxes() {
    if (viewer.boxes.hidden) return;
    const image = viewer.image;
    viewer.boxes.style.left = `${image.offsetLeft}px`;
    viewer.boxes.style.top = `${image.offsetTop}px`;
    viewer.boxes.style.width = `${image.offsetWidth}px`;
    viewer.boxes.style.height = `${image.offsetHeight}px`;
  }
  viewer.image.addEventListener("load", placeBoxes);
  window.addEventListener("resize", placeBoxes);

  function step(delta) {
    if (!viewer.items.length) return;
    viewer.at = (viewer.at + delta + viewer.items.length) % viewer.items.length;
    renderViewer();
  }

  function toggleViewer() {
    viewer.showing = viewer.showing === "overlay" ? "original" : "overlay";
    renderViewer();
  }

  function closeViewer() {
    if (viewer.dialog.open) viewer.dialog.close();
  }

  viewer.dialog.addEventListener("close", () => {
    const current = viewer.items[viewer.at];
    const card = current && current.card;
    const target = (card && card.isConnected && card.querySelector("a.thumb")) || viewer.opener;
    if (target && target.isConnected) target.focus();
  });
  viewer.dialog.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.target === viewer.note) {                 // review: typing a note; Enter goes back to the keys
      if (event.key !== "Enter") return;
      viewer.figure.focus();
    } else if (DECISION_KEYS[event.key] !== undefined) decide(DECISION_KEYS[event.key]);
    else if (event.key === "n" || event.key === "N") viewer.note.focus();
    else if (event.key === "ArrowRight") step(1);
    else if (event.key === "ArrowLeft") step(-1);
    else if (event.key === "o" || event.key === "O" || event.key === " ") toggleViewer();
    else if (event.key === "Escape") closeViewer();
    else return;
    event.preventDefault();
  });
  viewer.dialog.addEventListener("click", (event) => {
    if (event.target === viewer.dialog) closeViewer();   // a click on the backdrop
  });
  byId("viewer-prev").addEventListener("click", () => step(-1));
  byId("viewer-next").addEventListener("click", () => step(1));
  byId("viewer-toggle").addEventListener("click", toggleViewer);
  byId("viewer-close").addEventListener("click", closeViewer);

  // ---- review: decisions in the large view, export, the summary's counts ------------------------

  const DECISION_KEYS = { a: "agree", A: "agree", d: "disagree", D: "disagree", u: "unsure", U: "unsure", x: "", X: "" };
  viewer.note = byId("viewer-note");
  viewer.decision = byId("viewer-decision");
  let decided = false;           // a decision was made since the view opened: the filters apply again on close

  function showDecision(item) {
    const found = review.decisionOf(item);
    viewer.note.value = found ? found.note : "";
    viewer.decision.textContent = review.markText(item);
    viewer.dialog.dataset.decision = found ? found.decision : "";
  }

  /** Record the decision (with the note typed) on the image shown, then show the next one. */
  function decide(decision) {
    const item = viewer.items[viewer.at];
    if (!item) return;
    review.record(item, decision, viewer.note.value);
    decided = true;
    if (item.card) review.decorate(item.card, item);
    const twin = pageItems.find((candidate) => candidate.sha256 === item.sha256 && candidate !== item);
    if (twin) review.decorate(twin.card, twin);
    refreshSummary();
    if (decision && viewer.items.length > 1) step(1);
    else showDecision(item);
  }

  viewer.dialog.querySelectorAll("button[data-decision]").forEach((button) => {
    button.addEventListener("click", () => decide(button.dataset.decision));
  });
  viewer.dialog.addEventListener("close", () => {
    if (decided) apply();
    decided = false;
  });

  function refreshSummary() {
    if (!byId("review-counts")) return;
    loadRunData().then((data) => review.updateSummary(data.items), () => review.updateSummary(pageItems));
  }

  byId("review-export").addEventListener("click", () => {
    loadRunData().then((data) => data.items, () => pageItems)
      .then((items) => review.download(review.exportCsv(items), "review.csv"));
  });
  review.onChange(() => {
    for (const item of pageItems) review.decorate(item.card, item);
    if (runData) runData.items.forEach((item) => { if (item.card) review.decorate(item.card, item); });
    refreshSummary();
  });
  review.describeStorage(`page-${body.dataset.page || 1}`);
  byId("review-tools").hidden = false;
  refreshSummary();

  function onGridClick(event) {
    const link = event.target.closest("a.thumb");
    if (!link || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
    const card = link.closest(".card");
    const item = shownItems.find((candidate) => candidate.card === card);
    if (!item) return;
    event.preventDefault();
    openViewer(item, link);
  }
  pageGrid.addEventListener("click", onGridClick);
  runGrid.addEventListener("click", onGridClick);

  // ---- wiring ----------------------------------------------------------------------------------

  function moveRunSlice(delta) {
    runOffset = Math.max(0, runOffset + delta * runSize);
    renderRunSlice();
    shownStatus.scrollIntoView({ block: "start" });
  }
  byId("run-prev").addEventListener("click", () => moveRunSlice(-1));
  byId("run-next").addEventListener("click", () => moveRunSlice(1));
  controls.form.addEventListener("input", apply);
  controls.form.addEventListener("change", apply);
  controls.form.addEventListener("submit", (event) => event.preventDefault());
  controls.form.addEventListener("reset", () => setTimeout(apply, 0));
  controls.form.hidden = false;   // the controls only work with this script, so they only show with it
  apply();
})();
