// Sortable tables, as progressive enhancement: without JavaScript every row and number is already on the
// page in the order the site ranks them; with it, each column header of a table.sortable gets a button
// (so mouse and keyboard both work; a header's own link stays a link) that sorts the rows by that column,
// again to reverse.
// Cells carry their exact value in data-value; an empty value (a reference's rank, a missing result) sorts last.
// Above each such table a filter box (also added by the script, so a page without JavaScript has none and
// shows every row) keeps the rows whose text holds every word typed, e.g. "round", "w2 adaptive", "frontier".
"use strict";
(function () {
  function value(row, index) {
    var cell = row.children[index];
    if (!cell) return null;
    var text = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent.trim();
    if (text === "" || text === "nan") return null;
    var number = Number(text);
    return isNaN(number) ? text.toLowerCase() : number;
  }

  function compare(a, b) {
    if (a === b) return 0;
    if (a === null) return 1;
    if (b === null) return -1;
    if (typeof a === typeof b) return a < b ? -1 : 1;
    return typeof a === "number" ? -1 : 1;
  }

  function sortBy(table, header, index) {
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    // Missing values stay last in both directions; ties keep the site's order (Array.sort is stable).
    rows.sort(function (r, s) {
      var a = value(r, index), b = value(s, index);
      if (a === null || b === null) return compare(a, b);
      return ascending ? compare(a, b) : compare(b, a);
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) { th.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }

  function filterBy(table, query, status) {
    var words = query.toLowerCase().split(/\s+/).filter(Boolean);
    var shown = 0, rows = table.tBodies[0].rows;
    Array.prototype.forEach.call(rows, function (row) {
      var text = row.textContent.toLowerCase();
      var keep = words.every(function (word) { return text.indexOf(word) !== -1; });
      row.hidden = !keep;
      if (keep) shown += 1;
    });
    status.textContent = words.length ? shown + " of " + rows.length + " rows" : "";
  }

  function addFilter(table) {
    var label = document.createElement("label");
    label.className = "filter";
    label.textContent = "filter rows ";
    var input = document.createElement("input");
    input.type = "search";
    input.setAttribute("aria-controls", table.id || "");
    var status = document.createElement("span");
    status.className = "muted";
    status.setAttribute("aria-live", "polite");
    label.appendChild(input);
    label.appendChild(status);
    table.parentNode.insertBefore(label, table);
    input.addEventListener("input", function () { filterBy(table, input.value, status); });
  }

  function enhance(table) {
    if (!table.tHead || !table.tBodies.length) return;
    addFilter(table);
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header, index) {
      var button = document.createElement("button");
      button.type = "button";
      button.className = "sort";
      button.setAttribute("aria-label", "sort by " + header.textContent.trim());
      header.appendChild(button);
      button.addEventListener("click", function () { sortBy(table, header, index); });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), enhance);
  });
})();
