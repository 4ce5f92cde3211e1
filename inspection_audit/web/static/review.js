// inspection-audit review station: keyboard shortcuts (no library).
//   queue page:      j / k  select the next / previous item, Enter or o  open it,
//                    c  confirm the selected item as a miss, x  clear it
//   inspection page: c  confirmed miss, x  cleared (the next item opens), j / k  next / previous
(function () {
  "use strict";
  function typing(event) {
    var t = event.target;
    return t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName));
  }
  function submit(form) {
    if (form && !form.dataset.sent) { form.dataset.sent = "1"; form.submit(); }
  }
  var page = document.body.dataset.page;
  var rows = Array.prototype.slice.call(document.querySelectorAll("tr.item"));
  var selected = 0;
  function select(i) {
    if (!rows.length) { return; }
    selected = Math.max(0, Math.min(rows.length - 1, i));
    rows.forEach(function (r, n) { r.classList.toggle("selected", n === selected); });
    rows[selected].scrollIntoView({ block: "nearest" });
  }
  if (page === "queue") { select(0); }
  document.addEventListener("keydown", function (event) {
    if (typing(event) || event.ctrlKey || event.metaKey || event.altKey) { return; }
    var key = event.key;
    if (page === "queue" && rows.length) {
      var row = rows[selected];
      if (key === "j") { select(selected + 1); }
      else if (key === "k") { select(selected - 1); }
      else if (key === "c") { submit(row.querySelector("form.verdict-confirmed")); }
      else if (key === "x") { submit(row.querySelector("form.verdict-cleared")); }
      else if (key === "o" || key === "Enter") { window.location = row.querySelector("a.open").href; }
      else { return; }
      event.preventDefault();
    } else if (page === "inspection") {
      var link;
      if (key === "c") { submit(document.getElementById("form-confirmed")); }
      else if (key === "x") { submit(document.getElementById("form-cleared")); }
      else if (key === "j" && (link = document.getElementById("next-item"))) { window.location = link.href; }
      else if (key === "k" && (link = document.getElementById("prev-item"))) { window.location = link.href; }
      else { return; }
      event.preventDefault();
    }
  });
  // A note typed on the inspection page goes with whichever button is used.
  var note = document.getElementById("note");
  if (note) {
    document.querySelectorAll("form.verdict").forEach(function (f) {
      f.addEventListener("submit", function () { f.querySelector("input[name=note]").value = note.value; });
    });
  }
})();
