//! The admin console's only script: follows a running job's log over server-sent events
//! (GET /admin/jobs/{id}/events) and appends what each step prints. Text is added with
//! textContent and the classes come from the server's fixed set, so nothing is parsed as HTML.
"use strict";
(function () {
  var log = document.getElementById("log");
  if (!log || !window.EventSource) { return; }
  var url = log.getAttribute("data-events");
  if (!url) { return; }

  function span(cls, text) {
    var s = document.createElement("span");
    s.className = cls;
    s.textContent = text;
    return s;
  }

  function entry(id) {
    var sec = document.getElementById("entry-" + id);
    if (sec) { return sec; }
    sec = document.createElement("section");
    sec.className = "entry";
    sec.id = "entry-" + id;
    var h = document.createElement("h3");
    h.appendChild(span("key", ""));
    h.appendChild(document.createTextNode(" "));
    h.appendChild(span("exit", ""));
    h.appendChild(document.createTextNode(" "));
    h.appendChild(span("duration", ""));
    sec.appendChild(h);
    var pre = document.createElement("pre");
    pre.className = "out";
    sec.appendChild(pre);
    log.appendChild(sec);
    return sec;
  }

  var source = new EventSource(url);
  source.addEventListener("entry", function (ev) {
    var e = JSON.parse(ev.data);
    var sec = entry(e.entry);
    sec.querySelector(".key").textContent = e.key;
    sec.querySelector(".exit").textContent = e.exit;
    sec.querySelector(".duration").textContent = e.duration;
    var pre = sec.querySelector("pre");
    if (e.reset) {
      while (pre.firstChild) { pre.removeChild(pre.firstChild); }
    }
    e.segments.forEach(function (s) {
      pre.appendChild(s[0] ? span(s[0], s[1]) : document.createTextNode(s[1]));
    });
  });
  source.addEventListener("state", function (ev) {
    var s = JSON.parse(ev.data);
    var badge = document.getElementById("job-state");
    if (badge) {
      badge.textContent = s.state;
      badge.className = "state state-" + s.state;
    }
    if (s.final) { source.close(); }
  });
})();
