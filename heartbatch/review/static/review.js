// heartbatch review: one film at a time, its boxes drawn over it in original-image pixels (SVG viewBox),
// edges dragged to correct them; every decision is POSTed at once and saved by the server before it answers.
// A row measured by a model with masks also has the masks' outlines: a transparent PNG over the film, under
// the boxes (which stay draggable), shown or hidden with O or the toolbar's checkbox.
(function () {
  'use strict';
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  var $ = function (id) { return document.getElementById(id); };
  var SVG = 'http://www.w3.org/2000/svg';
  var state = { items: [], current: null, boxes: null, zoom: 1, drag: null, showOutlines: true };

  function api(method, url, body) {
    var options = { method: method, headers: { 'Accept': 'application/json' }, credentials: 'same-origin' };
    if (body !== undefined) {
      options.headers['Content-Type'] = 'application/json';
      options.headers['X-CSRF-Token'] = csrf;
      options.body = JSON.stringify(body);
    }
    return fetch(url, options).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) throw new Error(data.error || ('HTTP ' + r.status));
        return data;
      });
    });
  }

  function fmt(v, digits) { return (v === null || v === undefined || !isFinite(v)) ? '–' : Number(v).toFixed(digits || 3); }
  // the runtime's CTR (heartbatch.geometry.ctr): heart width / thorax width
  function ctr(h, t) { return (h && t && t[2] - t[0] > 0) ? (h[2] - h[0]) / (t[2] - t[0]) : null; }
  function copy(box) { return box ? box.slice() : null; }
  function same(a, b) {
    if (!a || !b) return a === b;
    for (var i = 0; i < 4; i++) if (Math.abs(a[i] - b[i]) > 0.5) return false;
    return true;
  }

  function message(text, error) {
    var m = $('message'); m.textContent = text; m.className = error ? 'error' : '';
  }

  function setCounts(c) {
    var left = $('left');
    left.dataset.left = c.left;
    left.textContent = c.left + ' left to review · ' + c.decided + ' decided (' + c.accepted + ' accepted, ' +
      c.corrected + ' corrected, ' + c.rejected + ' rejected)';
  }

  function renderList() {
    var queue = $('queue'), others = $('others');
    queue.textContent = ''; others.textContent = '';
    var n = 0;
    state.items.forEach(function (item) {
      var li = document.createElement('li');
      li.dataset.id = item.id;
      if (state.current && state.current.id === item.id) li.className = 'current';
      var name = document.createElement('span'); name.textContent = item.name; li.appendChild(name);
      var tag = document.createElement('span');
      tag.className = 'tag ' + (item.decision || '');
      tag.textContent = item.decision || ('CTR ' + fmt(item.ctr, 2));
      li.appendChild(tag);
      li.addEventListener('click', function () { open(item.id); });
      if (item.queue) queue.appendChild(li); else { others.appendChild(li); n++; }
    });
    $('others-count').textContent = n;
    if (!queue.children.length) {
      var done = document.createElement('li'); done.textContent = 'Nothing left to review.'; queue.appendChild(done);
    }
  }

  function loadState() {
    return api('GET', '/api/state').then(function (s) {
      state.items = s.items;
      $('reviewer').textContent = 'reviewer: ' + s.reviewer;
      setCounts(s.counts);
      renderList();
      return s;
    });
  }

  function open(id) {
    return api('GET', '/api/items/' + id).then(function (item) {
      state.current = item;
      var r = item.review;
      state.boxes = { heart: copy(r && r.heart ? r.heart : item.heart), thorax: copy(r && r.heart ? r.thorax : item.thorax) };
      var img = $('film');
      img.onload = function () {
        $('canvas').style.display = 'block'; $('empty').hidden = true; fit();
        document.body.dataset.film = item.id;  // the film shown is decoded
      };
      img.onerror = function () { message('The film cannot be shown: the file cannot be read now.', true); };
      img.src = item.film;
      loadOutlines(item);
      $('boxes').setAttribute('viewBox', '0 0 ' + item.columns + ' ' + item.rows);
      $('path').textContent = item.path;
      $('ctr-model').textContent = fmt(item.ctr) + (item.uncertainty !== null ? ' ± ' + fmt(item.uncertainty) : '');
      $('reason').textContent = item.flagged ? (item.review_reason || 'flagged') : 'not flagged';
      $('chest-score').textContent = fmt(item.chest_score, 2);
      $('view').textContent = (item.view || '–') + ' · ' + (item.study_date || '–');
      if (item.patient) {
        $('patient-label').hidden = false; $('patient').hidden = false;
        $('patient').textContent = item.patient.patient_id + ' · ' + item.patient.accession_number;
      }
      showDecision(item);
      draw();
      renderList();
      message('');
      document.body.dataset.item = item.id;
    }).catch(function (e) { message(e.message, true); });
  }

  function loadOutlines(item) {
    var layer = $('outlines');
    layer.onload = function () { document.body.dataset.outlinesFilm = item.id; };
    layer.onerror = function () {
      if (state.current !== item) return;
      layer.removeAttribute('src'); showOutlines(); message('The mask outlines cannot be shown.', true);
    };
    if (item.outlines) layer.src = item.outlines; else layer.removeAttribute('src');
    $('outlines-control').hidden = !item.outlines;
    showOutlines();
  }

  // the outlines are shown when the row has them and the reviewer has not hidden them (kept from row to row)
  function showOutlines() {
    var c = state.current, has = !!(c && c.outlines && $('outlines').getAttribute('src'));
    $('outlines-toggle').checked = state.showOutlines;
    $('outlines').hidden = !(has && state.showOutlines);
    document.body.dataset.outlines = has ? (state.showOutlines ? 'shown' : 'hidden') : 'none';
  }

  function toggleOutlines() {
    if (!state.current || !state.current.outlines) return;
    state.showOutlines = !state.showOutlines; showOutlines();
  }

  function showDecision(item) {
    var r = item.review, s = $('state');
    s.className = 'state ' + (r ? r.status : '');
    s.dataset.status = r ? r.status : '';
    s.textContent = r ? (r.status + (r.ctr !== null ? ' · CTR ' + fmt(r.ctr) : '') + (r.note ? ' · ' + r.note : '') +
      ' · ' + r.reviewer + ' · ' + r.reviewed_at) : 'not reviewed';
  }

  function edited() {
    var c = state.current;
    return c && (!same(state.boxes.heart, c.heart) || !same(state.boxes.thorax, c.thorax));
  }

  function draw() {
    var svg = $('boxes'), c = state.current;
    svg.textContent = '';
    if (!c) return;
    [['thorax', c.thorax], ['heart', c.heart]].forEach(function (pair) {
      var name = pair[0], box = state.boxes[name];
      if (!box) return;
      if (!same(box, pair[1]) && pair[1]) svg.appendChild(rect(pair[1], 'box model ' + name));
      svg.appendChild(rect(box, 'box ' + name));
      [['x0', box[0], box[1], box[0], box[3]], ['x1', box[2], box[1], box[2], box[3]],
       ['y0', box[0], box[1], box[2], box[1]], ['y1', box[0], box[3], box[2], box[3]]].forEach(function (e) {
        var line = document.createElementNS(SVG, 'line');
        line.setAttribute('x1', e[1]); line.setAttribute('y1', e[2]); line.setAttribute('x2', e[3]); line.setAttribute('y2', e[4]);
        line.setAttribute('class', 'handle ' + e[0]);
        line.dataset.box = name; line.dataset.edge = e[0];
        line.addEventListener('pointerdown', startDrag);
        svg.appendChild(line);
      });
    });
    var value = ctr(state.boxes.heart, state.boxes.thorax);
    $('ctr-now').textContent = fmt(value);
    $('ctr-now').dataset.value = value === null ? '' : value.toFixed(4);
    $('accept').firstChild.textContent = edited() ? 'Save correction ' : 'Accept ';
  }

  function rect(box, cls) {
    var r = document.createElementNS(SVG, 'rect');
    r.setAttribute('x', box[0]); r.setAttribute('y', box[1]);
    r.setAttribute('width', box[2] - box[0]); r.setAttribute('height', box[3] - box[1]);
    r.setAttribute('class', cls);
    return r;
  }

  function imagePoint(event) {
    var svg = $('boxes'), p = svg.createSVGPoint();
    p.x = event.clientX; p.y = event.clientY;
    return p.matrixTransform(svg.getScreenCTM().inverse());
  }

  function startDrag(event) {
    event.preventDefault();
    var line = event.target;
    state.drag = { box: line.dataset.box, edge: line.dataset.edge };
    line.classList.add('dragging');
    $('boxes').setPointerCapture(event.pointerId);
  }

  function moveDrag(event) {
    if (!state.drag) return;
    var p = imagePoint(event), c = state.current, box = state.boxes[state.drag.box];
    var i = { x0: 0, y0: 1, x1: 2, y1: 3 }[state.drag.edge];
    var horizontal = i % 2 === 0, v = horizontal ? p.x : p.y, limit = horizontal ? c.columns : c.rows;
    v = Math.min(Math.max(v, 0), limit);
    if (i < 2) v = Math.min(v, box[i + 2] - 1); else v = Math.max(v, box[i - 2] + 1);  // keep a positive size
    box[i] = Math.round(v * 1000) / 1000;
    draw();
    document.querySelector('line.handle.' + state.drag.edge + '[data-box="' + state.drag.box + '"]').classList.add('dragging');
  }

  function endDrag() { if (state.drag) { state.drag = null; draw(); } }

  function decide(body) {
    var c = state.current;
    if (!c) return Promise.resolve();
    message('saving…');
    return api('POST', '/api/items/' + c.id + '/decision', body).then(function (answer) {
      state.current = answer.item;
      var r = answer.item.review;
      state.boxes = { heart: copy(r.heart || answer.item.heart), thorax: copy(r.heart ? r.thorax : answer.item.thorax) };
      showDecision(answer.item);
      draw();
      setCounts(answer.counts);
      message('saved: ' + r.status);
      $('message').dataset.saved = (Number($('message').dataset.saved || 0) + 1);
      return loadState();
    }).catch(function (e) { message('not saved: ' + e.message, true); });
  }

  function accept() {
    if (!state.current) return;
    if (edited()) decide({ status: 'corrected', heart: state.boxes.heart, thorax: state.boxes.thorax });
    else decide({ status: 'accepted' });
  }

  function reject() {
    var reason = $('reject-reason').value || $('reject-other').value.trim();
    if (!reason) { $('reject-other').hidden = false; $('reject-other').focus(); message('type the reason', true); return; }
    decide({ status: 'rejected', note: reason });
  }

  function step(direction) {
    var ids = state.items.filter(function (i) { return direction > 0 ? i.queue : true; }).map(function (i) { return i.id; });
    if (direction > 0) {  // next in the queue after the current row (wrapping), else the next row
      var cur = state.current ? state.current.id : -1;
      var after = ids.filter(function (id) { return id > cur; });
      var target = after.length ? after[0] : ids[0];
      if (target === undefined) { message('Nothing left to review.'); return; }
      open(target);
    } else {
      var all = state.items.map(function (i) { return i.id; }), at = state.current ? all.indexOf(state.current.id) : 0;
      if (at > 0) open(all[at - 1]);
    }
  }

  function fit() {
    var c = state.current, stage = $('stage');
    if (!c) return;
    var scale = Math.min((stage.clientWidth - 8) / c.columns, (stage.clientHeight - 8) / c.rows);
    state.base = scale; state.zoom = 1; applyZoom();
  }

  function applyZoom() {
    var c = state.current, canvas = $('canvas');
    canvas.style.width = Math.round(c.columns * state.base * state.zoom) + 'px';
    canvas.style.height = Math.round(c.rows * state.base * state.zoom) + 'px';
  }

  function zoom(factor) { if (state.current) { state.zoom = Math.min(Math.max(state.zoom * factor, 0.5), 8); applyZoom(); } }

  function windowing() {
    $('film').style.filter = 'brightness(' + $('brightness').value / 100 + ') contrast(' + $('contrast').value / 100 + ')';
  }

  $('boxes').addEventListener('pointermove', moveDrag);
  $('boxes').addEventListener('pointerup', endDrag);
  $('boxes').addEventListener('pointercancel', endDrag);
  $('accept').addEventListener('click', accept);
  $('reject').addEventListener('click', reject);
  $('reset').addEventListener('click', function () {
    if (!state.current) return;
    state.boxes = { heart: copy(state.current.heart), thorax: copy(state.current.thorax) }; draw();
  });
  $('next').addEventListener('click', function () { step(1); });
  $('prev').addEventListener('click', function () { step(-1); });
  $('zoom-in').addEventListener('click', function () { zoom(1.25); });
  $('zoom-out').addEventListener('click', function () { zoom(0.8); });
  $('zoom-fit').addEventListener('click', fit);
  $('outlines-toggle').addEventListener('change', function () {
    state.showOutlines = $('outlines-toggle').checked; showOutlines();
  });
  $('brightness').addEventListener('input', windowing);
  $('contrast').addEventListener('input', windowing);
  $('reject-reason').addEventListener('change', function () { $('reject-other').hidden = $('reject-reason').value !== ''; });
  $('stage').addEventListener('wheel', function (e) { if (e.ctrlKey || e.metaKey) { e.preventDefault(); zoom(e.deltaY < 0 ? 1.1 : 0.9); } }, { passive: false });
  window.addEventListener('resize', function () { if (state.current) { var z = state.zoom; fit(); state.zoom = z; applyZoom(); } });
  document.addEventListener('keydown', function (e) {
    if ((e.target.tagName === 'INPUT' && e.target.type !== 'checkbox') || e.target.tagName === 'SELECT' ||
        e.ctrlKey || e.metaKey || e.altKey) return;
    var k = e.key.toLowerCase();
    var actions = { a: accept, r: reject, n: function () { step(1); }, p: function () { step(-1); },
      u: function () { $('reset').click(); }, o: toggleOutlines,
      '+': function () { zoom(1.25); }, '=': function () { zoom(1.25); },
      '-': function () { zoom(0.8); }, '0': fit };
    if (actions[k]) { e.preventDefault(); actions[k](); }
  });

  loadState().then(function (s) {
    var first = s.items.filter(function (i) { return i.queue; })[0] || s.items[0];
    document.body.dataset.ready = '1';
    if (first) return open(first.id);
  }).catch(function (e) { message(e.message, true); });
})();
