// Sortable tables, as progressive enhancement: without JavaScript every row and number is already on the
// page in the order the site ranks them; with it, each column header of a table.sortable gets a button
// (so mouse and keyboard both work; a header's own link stays a link) that sorts the rows by that column,
// again to reverse.
// Cells carry their exact value in data-value; an empty value (a reference's rank, a missing result) sorts last.
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

  function enhance(table) {
    if (!table.tHead || !table.tBodies.length) return;
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
