// Silverguard console: the live board (SSE), its sound and flash, and relative ages.
// Served by the binary itself (CSP script-src 'self'); no framework, no build step.
(function () {
  "use strict";

  var SEV = { critical: 0, high: 1, medium: 2, low: 3 };
  var SOUND_KEY = "sg.sound";

  function ageText(ms, lang) {
    var s = Math.max(0, Math.floor((Date.now() - ms) / 1000));
    if (lang === "en") {
      if (s < 60) return s + " s ago";
      if (s < 3600) return Math.floor(s / 60) + " min ago";
      if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min ago";
      return Math.floor(s / 86400) + " d ago";
    }
    if (s < 60) return s + " 秒前";
    if (s < 3600) return Math.floor(s / 60) + " 分钟前";
    if (s < 86400) return Math.floor(s / 3600) + " 小时 " + Math.floor((s % 3600) / 60) + " 分前";
    return Math.floor(s / 86400) + " 天前";
  }

  function refreshAges(root, lang) {
    var els = root.querySelectorAll(".age[data-opened]");
    for (var i = 0; i < els.length; i++) {
      els[i].textContent = ageText(Number(els[i].getAttribute("data-opened")), lang);
    }
  }

  // ---- sound: WebAudio beeps, after one user gesture (browsers require it) ----
  var audio = null;
  function soundWanted() {
    try { return localStorage.getItem(SOUND_KEY) === "on"; } catch (e) { return false; }
  }
  function setSoundWanted(on) {
    try { localStorage.setItem(SOUND_KEY, on ? "on" : "off"); } catch (e) { /* private mode */ }
  }
  function ensureAudio() {
    if (!audio) {
      var Ctx = window.AudioContext || window.webkitAudioContext;
      if (!Ctx) return null;
      audio = new Ctx();
    }
    if (audio.state === "suspended") { audio.resume(); }
    return audio;
  }
  function beep(times, freq) {
    if (!soundWanted() || !audio || audio.state !== "running") return false;
    var t = audio.currentTime + 0.02;
    for (var i = 0; i < times; i++) {
      var o = audio.createOscillator();
      var g = audio.createGain();
      o.type = "square";
      o.frequency.value = freq;
      g.gain.setValueAtTime(0.0001, t);
      g.gain.exponentialRampToValueAtTime(0.25, t + 0.02);
      g.gain.exponentialRampToValueAtTime(0.0001, t + 0.28);
      o.connect(g);
      g.connect(audio.destination);
      o.start(t);
      o.stop(t + 0.3);
      t += 0.42;
    }
    return true;
  }

  function initBoard(board) {
    var lang = board.getAttribute("data-lang") || "zh-CN";
    var list = document.getElementById("alerts");
    var empty = document.getElementById("empty");
    var count = document.getElementById("count");
    var live = document.getElementById("live");
    var banner = document.getElementById("banner");
    var soundBtn = document.getElementById("sound");
    var baseTitle = document.title;
    var unseen = 0;
    var bannerTimer = null;
    window.sgBoard = { events: 0, resyncs: 0, beeps: 0, flashes: 0 };

    function paintSound() {
      var on = soundWanted();
      var blocked = on && (!audio || audio.state !== "running");
      soundBtn.setAttribute("aria-pressed", on ? "true" : "false");
      soundBtn.classList.toggle("blocked", blocked);
      soundBtn.textContent = board.getAttribute(
        blocked ? "data-sound-blocked" : on ? "data-sound-on" : "data-sound-off");
    }
    soundBtn.addEventListener("click", function () {
      var on = !soundWanted();
      setSoundWanted(on);
      if (on) {
        var ctx = ensureAudio();
        if (ctx && ctx.state !== "running") {
          ctx.resume().then(function () { paintSound(); beep(1, 880); });
        } else {
          beep(1, 880);
        }
      }
      paintSound();
    });
    // Any gesture unlocks audio for a user who turned sound on earlier.
    function unlock() {
      if (soundWanted()) {
        var ctx = ensureAudio();
        if (ctx) ctx.resume().then(paintSound);
      }
    }
    document.addEventListener("pointerdown", unlock, { passive: true });
    document.addEventListener("keydown", unlock);
    if (soundWanted()) ensureAudio();
    paintSound();

    function key(li) {
      return [
        li.getAttribute("data-status") === "open" ? 0 : 1,
        SEV[li.getAttribute("data-severity")] === undefined ? 4 : SEV[li.getAttribute("data-severity")],
        -Number(li.getAttribute("data-opened")),
        -Number(li.getAttribute("data-id"))
      ];
    }
    function before(a, b) {
      var ka = key(a), kb = key(b);
      for (var i = 0; i < ka.length; i++) {
        if (ka[i] !== kb[i]) return ka[i] < kb[i];
      }
      return false;
    }
    function place(li) {
      var kids = list.children;
      for (var i = 0; i < kids.length; i++) {
        if (kids[i] !== li && before(li, kids[i])) { list.insertBefore(li, kids[i]); return; }
      }
      list.appendChild(li);
    }
    function counts() {
      var n = list.children.length;
      count.textContent = String(n);
      empty.hidden = n > 0;
    }
    function alarm(severity) {
      window.sgBoard.flashes++;
      banner.hidden = false;
      clearTimeout(bannerTimer);
      bannerTimer = setTimeout(function () { banner.hidden = true; }, 15000);
      if (document.hidden) {
        unseen++;
        document.title = "(" + unseen + ") " + board.getAttribute("data-new-sos") + " · " + baseTitle;
      }
      if (severity === "critical") {
        if (beep(3, 988)) window.sgBoard.beeps++;
      } else if (severity === "high") {
        if (beep(2, 784)) window.sgBoard.beeps++;
      }
      if (navigator.vibrate) { try { navigator.vibrate([300, 150, 300]); } catch (e) { /* ignore */ } }
    }
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) { unseen = 0; document.title = baseTitle; }
    });

    function apply(msg) {
      var old = document.getElementById("alert-" + msg.id);
      if (msg.status === "resolved" || !msg.html) {
        if (old) old.parentNode.removeChild(old);
        counts();
        return;
      }
      var tpl = document.createElement("template");
      tpl.innerHTML = msg.html.trim();
      var li = tpl.content.firstElementChild;
      if (!li) return;
      var isNew = !old;
      var repeated = old && Number(old.getAttribute("data-repeat")) < msg.repeat;
      if (old) old.parentNode.removeChild(old);
      place(li);
      counts();
      if (msg.status === "open" && (isNew || repeated)) {
        li.classList.add("fresh");
        alarm(msg.severity);
      }
    }

    var resyncing = false;
    function resync() {
      if (resyncing) return;
      resyncing = true;
      window.sgBoard.resyncs++;
      fetch("/console/board/rows", { credentials: "same-origin", cache: "no-store" })
        .then(function (r) {
          if (r.redirected && r.url.indexOf("/login") >= 0) { location.href = "/login?next=/"; return null; }
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          resyncing = false;
          if (html === null || html === undefined) return;
          var known = {};
          for (var i = 0; i < list.children.length; i++) known[list.children[i].id] = list.children[i].getAttribute("data-repeat");
          list.innerHTML = html;
          for (var j = 0; j < list.children.length; j++) {
            var li = list.children[j];
            var was = known[li.id];
            if (li.getAttribute("data-status") === "open" &&
                (was === undefined || Number(was) < Number(li.getAttribute("data-repeat")))) {
              li.classList.add("fresh");
              alarm(li.getAttribute("data-severity"));
            }
          }
          counts();
        })
        .catch(function () { resyncing = false; });
    }

    var es = null;
    function connect() {
      es = new EventSource("/console/events");
      es.onopen = function () {
        live.className = "live on";
        live.textContent = live.getAttribute("data-on");
        document.body.setAttribute("data-live", "on");
        resync(); // whatever happened while we were not connected
      };
      es.onerror = function () {
        live.className = "live off";
        live.textContent = live.getAttribute("data-off");
        document.body.setAttribute("data-live", "off");
        if (es.readyState === EventSource.CLOSED) {
          // The server refused (e.g. 401): check the session, then try again.
          setTimeout(function () {
            fetch("/console/board/rows", { credentials: "same-origin" }).then(function (r) {
              if (r.redirected && r.url.indexOf("/login") >= 0) location.href = "/login?next=/";
              else connect();
            }).catch(function () { setTimeout(connect, 3000); });
          }, 2000);
        }
        // Otherwise EventSource reconnects by itself; onopen resyncs.
      };
      es.addEventListener("alert", function (e) {
        window.sgBoard.events++;
        try { apply(JSON.parse(e.data)); } catch (err) { resync(); }
      });
      es.addEventListener("resync", resync);
      es.addEventListener("bye", function () { es.close(); location.href = "/login"; });
    }
    connect();
    setInterval(function () { refreshAges(list, lang); }, 15000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var board = document.getElementById("board");
    if (board) initBoard(board);
    var lang = document.documentElement.lang === "en" ? "en" : "zh-CN";
    if (!board) {
      var lists = document.querySelectorAll(".alerts");
      for (var i = 0; i < lists.length; i++) refreshAges(lists[i], lang);
    }
    // Ask before leaving an alert unresolved with an empty note: the form says "required".
    var resolve = document.getElementById("resolve-form");
    if (resolve) {
      resolve.addEventListener("submit", function (e) {
        var note = document.getElementById("note");
        if (note && !note.value.trim()) { e.preventDefault(); note.focus(); }
      });
    }
  });
})();
