/* batchcam gallery: reviewers' decisions (agree / disagree / unsure, and a note) on the images.
 *
 * A file of its own because the page's Content-Security-Policy refuses inline scripts; gallery.js
 * uses it through window.BatchcamReview. Decisions are kept in the browser's localStorage under the
 * report's identity, by each image's sha256: a reload, another page of the report or the next
 * night's run (same file, same bytes) finds them. Decisions imported into REPORT/reviews.csv come
 * with the gallery's data (each page's rows and rows.js: item.review); of the two, the later one
 * shows. Nothing here builds markup from text: decisions and notes are set with textContent.
 */
"use strict";
window.BatchcamReview = (function () {
  const DECISIONS = ["agree", "disagree", "unsure"];
  const MARKS = { agree: "\u2713 agree", disagree: "\u2717 disagree", unsure: "? unsure" };
  // report_id last: `batchcam review --import` refuses a review.csv exported from another report.
  const EXPORT_COLUMNS = ["path", "sha256", "prediction", "confidence", "decision", "note", "reviewed_at", "report_id"];
  // OWASP CSV injection: a cell starting so may run as a formula in a spreadsheet; it gets a leading quote
  // (and so does one starting with a quote, so the import can undo it without doubt).
  const FORMULA_START = /^[=+\-@\t\r']/;
  const MAX_NOTE = 500;
  const tools = document.getElementById("review-tools");
  const reportId = tools ? tools.dataset.reportId || "" : "";
  const storeKey = `batchcam-review:${reportId}`;
  const pagesKey = `${storeKey}:pages`;
  const listeners = [];

  /** localStorage, or null where the browser keeps none for this page (some refuse it on file://). */
  const storage = (function () {
    try {
      window.localStorage.getItem(storeKey);
      return window.localStorage;
    } catch (error) {
      return null;
    }
  })();

  function readJson(key) {
    if (!storage) return {};
    try {
      const value = JSON.parse(storage.getItem(key) || "{}");
      return value && typeof value === "object" && !Array.isArray(value) ? value : {};
    } catch (error) {
      return {};
    }
  }

  let local = readJson(storeKey);        // sha256 -> {decision, note, reviewed_at, path}; decision "" = cleared

  function time(text) {
    const value = Date.parse(text || "");
    return Number.isNaN(value) ? 0 : value;
  }

  /** The decision shown for an item ({decision, note, reviewed_at}), or null: the browser's or the
   *  report's (reviews.csv, item.review), whichever is later. */
  function decisionOf(item) {
    const mine = item.sha256 ? local[item.sha256] : undefined;
    const imported = item.review || null;
    if (mine && (!imported || time(mine.reviewed_at) >= time(imported.reviewed_at))) {
      return DECISIONS.includes(mine.decision) ? mine : null;
    }
    return imported;
  }

  /** Keep a decision ("" clears it) for the item's bytes; returns what now shows. */
  function record(item, decision, note) {
    if (!item.sha256) return decisionOf(item);
    if (storage) local = readJson(storeKey);   // another page of the report may have written meanwhile
    local[item.sha256] = {
      decision: DECISIONS.includes(decision) ? decision : "",
      note: String(note || "").replace(/\s+/g, " ").trim().slice(0, MAX_NOTE),
      reviewed_at: new Date().toISOString(), path: item.path,
    };
    if (storage) {
      try {
        storage.setItem(storeKey, JSON.stringify(local));
      } catch (error) {
        setNotice("The browser refused to keep this decision (storage full?): export the decisions now.");
      }
    }
    return decisionOf(item);
  }

  function matches(item, wanted) {
    if (!wanted) return true;
    const found = decisionOf(item);
    return wanted === "none" ? !found : Boolean(found) && found.decision === wanted;
  }

  /** The card's mark and border for its decision. */
  function decorate(card, item) {
    for (const decision of DECISIONS) card.classList.remove(`review-${decision}`);
    let mark = card.querySelector(".review-mark");
    if (!mark) {
      mark = document.createElement("p");
      mark.className = "review-mark";
      card.appendChild(mark);
    }
    const found = decisionOf(item);
    mark.hidden = !found;
    mark.replaceChildren();
    if (!found) return;
    card.classList.add(`review-${found.decision}`);
    mark.append(MARKS[found.decision]);
    if (found.note) {
      const note = document.createElement("span");
      note.className = "review-note";
      note.textContent = found.note;
      mark.append(": ", note);
    }
  }

  function markText(item) {
    const found = decisionOf(item);
    return found ? `your decision: ${MARKS[found.decision]}${found.note ? ` (${found.note})` : ""}` : "not reviewed yet";
  }

  // ---- export ----------------------------------------------------------------------------------

  function csvField(value) {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function formulaEscaped(text) {
    return FORMULA_START.test(text) ? `'${text}` : text;
  }

  /** review.csv: one line per item with a decision, in the gallery's order; the note escaped as a text cell. */
  function exportCsv(items) {
    const lines = [EXPORT_COLUMNS.join(",")];
    for (const item of items) {
      const found = decisionOf(item);
      if (!found) continue;
      lines.push([item.path, item.sha256, item.prediction, item.confidence, found.decision,
                  formulaEscaped(found.note || ""), found.reviewed_at, reportId].map(csvField).join(","));
    }
    return lines.join("\n") + "\n";
  }

  function download(text, name) {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([text], { type: "text/csv;charset=utf-8" }));
    link.download = name;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  }

  // ---- the summary's counts --------------------------------------------------------------------

  function percentText(value) {
    return value === null ? "n/a" : `${(100 * value).toFixed(1)}%`;
  }

  /** Recount the summary's table (index.html) with the decisions shown now. */
  function updateSummary(items) {
    const table = document.getElementById("review-counts");
    if (!table) return;
    const lines = new Map();
    const tally = (name) => {
      if (!lines.has(name)) lines.set(name, { agree: 0, disagree: 0, unsure: 0, none: 0 });
      return lines.get(name);
    };
    for (const row of table.tBodies[0].rows) tally(row.dataset.class);
    for (const item of items) {
      const found = decisionOf(item);
      const names = item.status === "ok" ? [item.prediction, "all images"] : ["all images"];
      for (const name of names) tally(name)[found ? found.decision : "none"] += 1;
    }
    for (const row of table.tBodies[0].rows) {
      const counts = tally(row.dataset.class);
      const judged = counts.agree + counts.disagree;
      const cells = [counts.agree, counts.disagree, counts.unsure, counts.none,
                     percentText(judged ? counts.disagree / judged : null)];
      cells.forEach((value, i) => { row.cells[i + 1].textContent = String(value); });
    }
  }

  // ---- where decisions are kept ----------------------------------------------------------------

  function setNotice(text) {
    const notice = document.getElementById("review-storage");
    if (notice) notice.textContent = text;
  }

  /** Say where decisions live; Firefox gives each file:// page an origin of its own ("null"), and
   *  whether its pages still share storage shows once two pages of the report have been opened. */
  function describeStorage(pageName) {
    const share = "export them and run `batchcam review REPORT --import review.csv` to share them";
    if (!storage) {
      setNotice(`This browser keeps nothing for pages opened from files: decisions last while this page is open; ${share}.`);
      return;
    }
    const visits = readJson(pagesKey);
    visits[pageName] = new Date().toISOString();
    try {
      storage.setItem(pagesKey, JSON.stringify(visits));
    } catch (error) { /* the notice below still holds */ }
    const shared = Object.keys(visits).length > 1;
    if (window.origin === "null" && !shared) {
      setNotice("Decisions are kept in this browser, which may keep each page opened from a file apart: if the " +
                `report's other pages do not show those made here, ${share}.`);
    } else {
      setNotice(`Decisions are kept in this browser${shared ? ", shared by the report's pages" : ""}; ${share}.`);
    }
  }

  window.addEventListener("storage", (event) => {
    if (event.key !== storeKey) return;
    local = readJson(storeKey);
    listeners.forEach((listener) => listener());
  });

  return {
    decisions: DECISIONS, decisionOf, record, matches, decorate, markText, exportCsv, download, updateSummary,
    describeStorage, onChange: (listener) => listeners.push(listener), shared: Boolean(storage),
  };
})();
