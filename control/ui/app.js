/* app.js - the web UI of pgrelay-control: login, fleet, charts, queries and operations.
 *
 * Everything it shows comes from /api/v1/ (docs/protocol.md) with the admin token the
 * operator typed, kept in sessionStorage (this tab only) and sent as the same
 * "Authorization: Bearer" header pgrelayctl sends. A 401 returns to the login. The visible
 * page is polled once a second; when the control plane stops answering (or the replica asked
 * no longer holds the lease) a notice says so and polling goes on until it answers again.
 * The DOM is built with textContent only: nothing from the API is ever parsed as HTML. */
'use strict';

const API = '/api/v1';
const POLL_MS = 1000;
const TOKEN_KEY = 'pgrelay.token';
const DEP_KEY = 'pgrelay.deployment';
const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf', '#8c564b',
  '#e377c2', '#7f7f7f', '#bcbd22'];

const ui = {
  token: sessionStorage.getItem(TOKEN_KEY),
  dep: sessionStorage.getItem(DEP_KEY),
  page: 'fleet',
  timer: null,
  polling: false,
  down: null,          /* since when the control plane does not answer (Date), or null */
  deployments: [],
  proxies: [],
  nodes: [],
  metrics: [],
  leaders: [],
  charts: null,        /* chart state (charts page) */
  querySort: {key: 'duration_ms', dir: -1},
  plans: [],          /* GET .../plans, or .../plans?changed=1 with "plan changes only" */
  selectedPlan: null, /* id of the plan (or "change/" + index) shown below the table */
  queries: [],
  selectedQuery: null,
  opRunning: null,     /* what this tab runs now: {kind, text, started, result} */
  tabOps: [],          /* maintenance and config operations run from this tab */
};

/* ---------- small helpers ---------- */

function $(id) { return document.getElementById(id); }

/* An element with attributes (class, dataset via data-*, others as attributes) and children
 * (strings become text nodes). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'onclick') el.addEventListener('click', v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    el.appendChild(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
  return el;
}

function setRows(table, rows) {
  const tbody = table.tBodies[0];
  tbody.replaceChildren(...rows);
}

function fmtNum(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return '-';
  return Number(v).toLocaleString('en-US', {maximumFractionDigits: digits === undefined ? 1 : digits});
}

function fmtBytes(v) {
  if (v === null || v === undefined || v < 0) return '-';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : String(v)) + ' ' + units[i];
}

function fmtMs(ms) {
  if (ms === null || ms === undefined || ms < 0) return '-';
  if (ms < 1000) return ms + ' ms';
  if (ms < 60000) return (ms / 1000).toFixed(1) + ' s';
  return Math.floor(ms / 60000) + ' min ' + Math.floor((ms % 60000) / 1000) + ' s';
}

function fmtTime(ms) {
  if (!ms) return '-';
  const d = new Date(ms);
  return d.toLocaleTimeString('en-GB', {hour12: false});
}

function fmtDateTime(ms) {
  if (!ms) return '-';
  const d = new Date(ms);
  return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
}

function yesNo(b) {
  return h('span', {class: b ? 'yes' : 'no'}, b ? 'yes' : 'no');
}

function depPath(suffix) {
  return API + '/deployments/' + encodeURIComponent(ui.dep) + suffix;
}

/* ---------- API access ---------- */

class Unauthorized extends Error {}
class Unreachable extends Error {}

/* One call to the API: {status, data}. Throws Unauthorized after a 401 (the login is shown),
 * Unreachable when the control plane does not answer or does not serve (notice shown). */
async function api(method, path, body) {
  const opts = {method, cache: 'no-store', headers: {Authorization: 'Bearer ' + ui.token}};
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, opts);
  } catch (e) {
    markDown('the control plane does not answer');
    throw new Unreachable(String(e));
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = {error: text}; }
  if (resp.status === 401) {
    signOut('The token was refused: ' + ((data && data.error) || '401 Unauthorized'));
    throw new Unauthorized();
  }
  /* a replica that does not serve (lease, store): the notice; an orchestration's own 503
   * (its step could not be recorded) is its answer, shown with the operation */
  if (resp.status === 503 && method === 'GET' && data && /lease|store/.test(data.error || '')) {
    markDown('this control plane replica does not serve: ' + data.error);
    throw new Unreachable(data.error);
  }
  markUp();
  return {status: resp.status, data};
}

async function get(path) {
  const r = await api('GET', path);
  if (r.status !== 200) throw new Error(path + ': ' + r.status + ' ' + ((r.data && r.data.error) || ''));
  return r.data;
}

function markDown(why) {
  if (!ui.down) ui.down = new Date();
  const n = $('notice');
  n.className = 'notice down';
  n.textContent = 'Reconnecting: ' + why + ' (since ' + fmtTime(ui.down.getTime()) +
    '); retrying every second. What is shown is as of then.';
  document.body.classList.add('stale');
}

function markUp() {
  if (!ui.down) return;
  const n = $('notice');
  n.className = 'notice';
  n.textContent = 'Reconnected at ' + fmtTime(Date.now()) + ' after ' +
    fmtMs(Date.now() - ui.down.getTime()) + ' without the control plane.';
  ui.down = null;
  document.body.classList.remove('stale');
  setTimeout(() => { if (!ui.down) n.className = 'notice hidden'; }, 8000);
}

/* ---------- login ---------- */

function showLogin(message) {
  $('app').classList.add('hidden');
  $('login').classList.remove('hidden');
  $('login-error').textContent = message || '';
  $('token').value = '';
  $('token').focus();
}

function signOut(message) {
  stopPolling();
  ui.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin(message);
}

async function signIn(token) {
  ui.token = token;
  try {
    const r = await api('GET', API + '/deployments');
    if (r.status !== 200) {
      $('login-error').textContent = 'The control plane answered ' + r.status + ': ' +
        ((r.data && r.data.error) || '');
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    ui.deployments = r.data;
    showApp();
  } catch (e) {
    if (e instanceof Unreachable)
      $('login-error').textContent = /lease/.test(e.message)
        ? 'This control plane replica does not hold the lease: open the UI of the one that does.'
        : 'The control plane does not answer' + (e.message ? ' (' + e.message + ').' : '.');
  }
}

function showApp() {
  $('login').classList.add('hidden');
  $('app').classList.remove('hidden');
  route();
}

/* ---------- navigation and polling ---------- */

const PAGES = ['fleet', 'charts', 'queries', 'operations', 'plans'];

function route() {
  const want = (location.hash || '#fleet').slice(1);
  ui.page = PAGES.includes(want) ? want : 'fleet';
  for (const p of PAGES) {
    $('page-' + p).classList.toggle('hidden', p !== ui.page);
    $('nav-' + p).classList.toggle('active', p === ui.page);
  }
  if (ui.page !== 'charts') ui.charts = null;
  if (ui.page === 'operations') loadOperationsForm();
  startPolling();
}

function stopPolling() {
  if (ui.timer) clearTimeout(ui.timer);
  ui.timer = null;
  ui.pollGen = (ui.pollGen || 0) + 1; /* a poll still under way does not schedule another */
}

function startPolling() {
  stopPolling();
  poll();
}

async function poll() {
  if (!ui.token) return;
  if (ui.timer) clearTimeout(ui.timer);
  ui.timer = null;
  const gen = ui.pollGen;
  const page = ui.page;
  const started = Date.now();
  try {
    await refreshDeployments();
    if (ui.dep) {
      if (page === 'fleet') await refreshFleet();
      else if (page === 'charts') await refreshCharts();
      else if (page === 'queries') await refreshQueries();
      else if (page === 'operations') await refreshOperations();
      else if (page === 'plans') await refreshPlans();
    }
    $('updated').textContent = 'updated ' + fmtTime(Date.now());
  } catch (e) {
    if (e instanceof Unauthorized) return;
    if (!(e instanceof Unreachable)) console.warn('pgrelay UI: ' + e.message);
  }
  /* once a second from start to start; a slow answer delays the next poll, never overlaps it */
  if (ui.token && gen === ui.pollGen)
    ui.timer = setTimeout(poll, Math.max(100, POLL_MS - (Date.now() - started)));
}

async function refreshDeployments() {
  ui.deployments = await get(API + '/deployments');
  if (!ui.deployments.some(d => d.name === ui.dep))
    ui.dep = ui.deployments.length ? ui.deployments[0].name : null;
  if (ui.dep) sessionStorage.setItem(DEP_KEY, ui.dep);
  const sel = $('deployment');
  const names = ui.deployments.map(d => d.name);
  if ([...sel.options].map(o => o.value).join('\n') !== names.join('\n'))
    sel.replaceChildren(...names.map(n => h('option', {value: n}, n)));
  sel.value = ui.dep || '';
}

function currentDeployment() {
  return ui.deployments.find(d => d.name === ui.dep) || null;
}

/* ---------- fleet ---------- */

async function refreshFleet() {
  const [proxies, nodes, metrics, leaders] = await Promise.all([
    get(depPath('/proxies')), get(depPath('/nodes')), get(depPath('/metrics')),
    get(depPath('/leaders'))]);
  ui.proxies = proxies;
  ui.nodes = nodes;
  ui.metrics = metrics;
  ui.leaders = leaders;
  renderFleet();
}

function renderFleet() {
  const dep = currentDeployment();
  $('leader').textContent = dep && dep.leader ? dep.leader : 'none';
  $('epoch').textContent = dep ? String(dep.epoch) : '-';
  $('live-count').textContent = dep ? dep.live + ' / ' + dep.proxies : '-';
  const inMaint = ui.proxies.filter(p => p.live && p.maintenance).length;
  const mEl = $('maint-state');
  mEl.textContent = inMaint ? 'on (' + inMaint + ')' : 'off';
  mEl.className = 'big' + (inMaint ? ' warn' : '');

  $('deployments').replaceChildren(...(ui.deployments.length > 1 ? ui.deployments.map(d =>
    h('span', {class: 'dep' + (d.name === ui.dep ? ' current' : ''), 'data-name': d.name,
      onclick: () => selectDeployment(d.name)},
    d.name + ': ' + (d.leader || 'no leader') + ' @ ' + d.epoch + ', ' + d.live + '/' + d.proxies +
      ' live')) : []));

  const now = Date.now();
  setRows($('proxies'), ui.proxies.map(p => {
    let maint = p.maintenance ? h('span', {class: 'warn'}, 'on') : 'off';
    if (p.maintenance && p.maintenance_until_ms)
      maint = h('span', {class: 'warn', title: 'the proxy resumes by itself then, unless the control ' +
        'plane renews its pause first (it does while the operator\'s maintenance is on)'},
      'on, ends by itself ' + fmtTime(p.maintenance_until_ms));
    const sameLeader = dep && p.leader === dep.leader && p.epoch === dep.epoch;
    return h('tr', {'data-node-id': p.node_id, class: p.live ? '' : 'stale'},
      h('td', {class: 'mono'}, p.node_id),
      h('td', {}, p.status),
      h('td', {}, yesNo(p.live)),
      h('td', {}, p.hostname || '-'),
      h('td', {class: 'mono'}, (p.listen || []).join(' ')),
      h('td', {}, p.version || '-'),
      h('td', {class: 'num' + (sameLeader || !p.live ? '' : ' warn')}, String(p.epoch)),
      h('td', {class: sameLeader || !p.live ? '' : 'warn'}, p.leader || '-'),
      h('td', {}, maint),
      h('td', {class: 'num'}, String(p.config_version)),
      h('td', {}, p.last_seen ? fmtMs(p.last_seen_age_ms) + ' ago' : 'never'));
  }));

  /* per node: sessions and rates summed over the live proxies, latency weighted by rate */
  const perNode = {};
  for (const m of ui.metrics) {
    if (!m.live) continue;
    for (const n of m.nodes || []) {
      const a = perNode[n.name] || (perNode[n.name] = {sessions: 0, rate: null, latW: 0, latN: 0, p99: null});
      a.sessions += n.sessions || 0;
      const r = n.rates && n.rates.statements;
      if (r !== null && r !== undefined) a.rate = (a.rate || 0) + r;
      if (n.latency_ms !== null && n.latency_ms !== undefined) {
        const w = r || 1;
        a.latW += n.latency_ms * w; a.latN += w;
      }
      if (n.p99_ms !== null && n.p99_ms !== undefined) a.p99 = Math.max(a.p99 || 0, n.p99_ms);
    }
  }
  setRows($('nodes'), ui.nodes.map(n => {
    const a = perNode[n.name] || {sessions: 0, rate: null, latN: 0, p99: null};
    const health = Object.entries(n.health || {}).map(([proxy, st]) =>
      h('span', {class: 'tag ' + (st === 'up' ? 'yes' : 'no')}, proxy + ': ' + st));
    const role = [h('span', {class: 'tag' + (n.leader ? ' leader' : '')}, n.leader ? 'write leader' : (n.role || '?'))];
    if (n.in_recovery) role.push(h('span', {class: 'tag'}, 'in recovery'));
    const seenUp = Object.values(n.health || {}).includes('up');
    return h('tr', {'data-node': n.name, class: seenUp ? '' : 'stale'},
      h('td', {class: 'mono'}, n.name),
      h('td', {class: 'mono'}, (n.host || '?') + ':' + (n.port || '?')),
      h('td', {}, role),
      h('td', {}, health),
      h('td', {class: 'num'}, n.in_recovery ? fmtBytes(n.lag_bytes) : '-'),
      h('td', {class: 'num'}, n.in_recovery ? fmtMs(n.lag_ms) : '-'),
      h('td', {class: 'num'}, (n.write_sessions || 0) + ' write / ' + (n.read_sessions || 0) + ' read'),
      h('td', {class: 'num'}, fmtNum(a.rate)),
      h('td', {class: 'num'}, a.latN || a.p99 !== null ? (a.latN ? fmtNum(a.latW / a.latN, 2) : '-') +
        ' / ' + (a.p99 !== null ? fmtNum(a.p99, 2) : '-') + ' ms' : '-'));
  }));

  setRows($('leaders'), ui.leaders.length ? ui.leaders.map(l => h('tr', {},
    h('td', {}, fmtDateTime(l.at)), h('td', {class: 'mono'}, l.leader || 'none'),
    h('td', {class: 'num'}, String(l.epoch)), h('td', {}, l.why))) :
    [h('tr', {}, h('td', {colspan: 4, class: 'muted'}, 'No change since this control plane took the lease.'))]);
}

function selectDeployment(name) {
  ui.dep = name;
  sessionStorage.setItem(DEP_KEY, name);
  ui.charts = null;
  startPolling();
}

/* ---------- charts (hand-drawn on canvas) ---------- */

const CHARTS = [
  {key: 'statements', title: 'Statements per second', idx: 1, fmt: v => fmtNum(v)},
  {key: 'latency', title: 'Mean latency (ms)', idx: 5, fmt: v => fmtNum(v, 2)},
  {key: 'sessions', title: 'Sessions', idx: 6, fmt: v => fmtNum(v, 0), integer: true},
  {key: 'bytes', title: 'Bytes per second (in + out)', idx: -1, fmt: v => fmtBytes(Math.round(v))},
  {key: 'errors', title: 'Errors per second', idx: 4, fmt: v => fmtNum(v, 2)},
];

function chartValue(def, p) {
  if (def.idx >= 0) return p[def.idx];
  if (p[2] === null || p[3] === null) return null;
  return p[2] + p[3];
}

function initCharts() {
  const box = $('charts');
  const charts = {};
  box.replaceChildren(...CHARTS.map(def => {
    const canvas = h('canvas', {id: 'chart-' + def.key, 'data-points': 0, 'data-last': 0});
    const legend = h('div', {class: 'legend'});
    charts[def.key] = {def, canvas, legend};
    return h('div', {class: 'chart'}, h('h3', {}, def.title), canvas, legend);
  }));
  ui.charts = {dep: ui.dep, since: 0, series: {}, maint: [], charts, maintOpen: null};
}

/* series key -> {label, dashed, points: [[t, ...]]} */
function addPoints(key, label, dashed, points) {
  const c = ui.charts;
  const s = c.series[key] || (c.series[key] = {label, dashed, points: []});
  const last = s.points.length ? s.points[s.points.length - 1][0] : 0;
  for (const p of points) if (p[0] > last) s.points.push(p);
  const cutoff = Date.now() - 3600 * 1000;
  while (s.points.length && s.points[0][0] < cutoff) s.points.shift();
}

async function refreshCharts() {
  if (!ui.charts || ui.charts.dep !== ui.dep) initCharts();
  const c = ui.charts;
  const [hist, leaders, proxies] = await Promise.all([
    get(depPath('/metrics/history?since_ms=' + c.since)), get(depPath('/leaders')),
    get(depPath('/proxies'))]);
  if (ui.charts !== c) return;
  for (const p of hist.proxies) {
    addPoints('p:' + p.node_id, p.node_id, false, p.points);
    for (const n of p.nodes) addPoints('n:' + p.node_id + ':' + n.name, n.name + ' via ' + p.node_id, true, n.points);
  }
  /* every point up to the answer's 'now' was in it: ask for what comes after */
  c.since = Math.max(c.since, hist.now || 0);
  ui.leaders = leaders;
  /* maintenance periods, as seen while this page is open */
  const on = proxies.some(p => p.live && p.maintenance);
  const now = Date.now();
  if (on && !c.maintOpen) { c.maintOpen = [now, null]; c.maint.push(c.maintOpen); }
  if (c.maintOpen) c.maintOpen[1] = now;
  if (!on) c.maintOpen = null;
  drawCharts();
}

function drawCharts() {
  const c = ui.charts;
  /* proxies first (p:...), then the nodes as each proxy sees them, drawn over them dashed */
  const keys = Object.keys(c.series).sort((a, b) => (b[0] === 'p') - (a[0] === 'p') || a.localeCompare(b));
  const t1 = Date.now();
  let windowS = Number($('chart-window').value);
  if (!windowS) { /* auto: the data there is, at least a minute, at most an hour */
    let first = t1;
    for (const k of keys) if (c.series[k].points.length) first = Math.min(first, c.series[k].points[0][0]);
    windowS = Math.min(3600, Math.max(60, Math.ceil((t1 - first) / 1000 / 60) * 60));
  }
  const t0 = t1 - windowS * 1000;
  for (const {def, canvas, legend} of Object.values(c.charts)) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 500, hgt = canvas.clientHeight || 200;
    if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
    if (canvas.height !== Math.round(hgt * dpr)) canvas.height = Math.round(hgt * dpr);
    const g = canvas.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, hgt);
    const L = 64, R = 8, T = 8, B = 22;
    const pw = w - L - R, ph = hgt - T - B;
    let max = 0, count = 0, last = 0;
    for (const k of keys) for (const p of c.series[k].points) {
      const v = chartValue(def, p);
      if (p[0] >= t0 && v !== null && v > max) max = v;
      count++;
      if (p[0] > last) last = p[0];
    }
    canvas.dataset.points = String(count);
    canvas.dataset.maintenance = String(c.maint.filter(([, b]) => b >= t0).length);
    canvas.dataset.last = String(last);
    max = def.integer ? Math.max(4, Math.ceil(max / 4) * 4) : niceMax(max);
    const x = t => L + (t - t0) / (t1 - t0) * pw;
    const y = v => T + ph - (v / max) * ph;
    /* maintenance shading */
    g.fillStyle = 'rgba(154, 103, 0, 0.12)';
    for (const [a, b] of c.maint) if (b >= t0) g.fillRect(Math.max(x(a), L), T, Math.max(x(b) - Math.max(x(a), L), 2), ph);
    /* grid and axes */
    g.strokeStyle = '#e3e7ec'; g.fillStyle = '#5f6b7a'; g.lineWidth = 1;
    g.font = '11px system-ui, sans-serif';
    for (let i = 0; i <= 4; i++) {
      const v = max * i / 4, yy = Math.round(y(v)) + 0.5;
      g.beginPath(); g.moveTo(L, yy); g.lineTo(L + pw, yy); g.stroke();
      g.textAlign = 'right'; g.textBaseline = 'middle';
      g.fillText(def.fmt(v), L - 4, yy);
    }
    g.textAlign = 'center'; g.textBaseline = 'top';
    const step = windowS <= 120 ? 15 : windowS <= 300 ? 60 : windowS <= 900 ? 180 : 600;
    for (let t = Math.ceil(t0 / 1000 / step) * step * 1000; t <= t1; t += step * 1000) {
      const label = step < 60 ? fmtTime(t) : fmtTime(t).slice(0, 5);
      if (x(t) + g.measureText(label).width / 2 <= w) g.fillText(label, x(t), T + ph + 4);
    }
    /* leader changes */
    g.strokeStyle = '#b42318'; g.fillStyle = '#b42318'; g.setLineDash([2, 2]);
    const drawn = [];
    for (const l of ui.leaders) {
      if (l.at < t0) continue;
      drawn.push((l.leader || 'none') + '@' + l.epoch);
      const xx = Math.round(x(l.at)) + 0.5;
      g.beginPath(); g.moveTo(xx, T); g.lineTo(xx, T + ph); g.stroke();
      const label = (l.leader || 'none') + ' @' + l.epoch;
      const right = xx + 3 + g.measureText(label).width > L + pw;
      g.textAlign = right ? 'right' : 'left'; g.textBaseline = 'top';
      g.fillText(label, right ? xx - 3 : xx + 3, T + 2);
    }
    /* series */
    keys.forEach((k, i) => {
      const s = c.series[k];
      g.strokeStyle = COLORS[i % COLORS.length];
      g.lineWidth = s.dashed ? 1.2 : 2;
      g.setLineDash(s.dashed ? [5, 3] : []);
      g.fillStyle = COLORS[i % COLORS.length];
      g.beginPath();
      let run = []; /* the points of the current unbroken stretch */
      const flush = () => { /* a lone point between gaps gets a dot: a path of one point shows nothing */
        if (run.length === 1) g.fillRect(run[0][0] - 1.5, run[0][1] - 1.5, 3, 3);
        run = [];
      };
      for (const p of s.points) {
        const v = chartValue(def, p);
        if (p[0] < t0 || v === null) { flush(); continue; }
        if (run.length) g.lineTo(x(p[0]), y(v)); else g.moveTo(x(p[0]), y(v));
        run.push([x(p[0]), y(v)]);
      }
      flush();
      g.stroke();
    });
    canvas.dataset.leaders = drawn.join(' ');
    g.setLineDash([]);
    g.strokeStyle = '#9aa5b1'; g.lineWidth = 1;
    g.strokeRect(L + 0.5, T + 0.5, pw, ph);
    legend.replaceChildren(...keys.map((k, i) => {
      const sw = h('span', {class: 'sw'});
      sw.style.background = COLORS[i % COLORS.length];
      return h('span', {}, sw, c.series[k].label);
    }));
  }
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

/* ---------- queries ---------- */

async function refreshQueries() {
  ui.queries = await get(depPath('/queries'));
  renderQueries();
}

function renderQueries() {
  const f = $('query-filter').value.trim().toLowerCase();
  const {key, dir} = ui.querySort;
  const rows = ui.queries.filter(q => !f || ['text', 'user', 'database', 'node', 'node_id', 'state', 'client']
    .some(k => String(q[k] || '').toLowerCase().includes(f)));
  rows.sort((a, b) => {
    const x = a[key], y = b[key];
    if (typeof x === 'number' && typeof y === 'number') return (x - y) * dir;
    return String(x || '').localeCompare(String(y || '')) * dir;
  });
  for (const th of $('queries').tHead.rows[0].cells) {
    th.classList.toggle('asc', th.dataset.key === key && dir > 0);
    th.classList.toggle('desc', th.dataset.key === key && dir < 0);
  }
  $('query-count').textContent = rows.length + ' of ' + ui.queries.length + ' running statements';
  setRows($('queries'), rows.map(q => h('tr', {'data-proxy': q.node_id, 'data-session': q.session,
    onclick: () => { ui.selectedQuery = q.node_id + '/' + q.session; renderQueryDetail(); }},
  h('td', {class: 'num'}, fmtMs(q.duration_ms)),
  h('td', {}, h('div', {class: 'stmt mono'}, q.text || '')),
  h('td', {}, q.user || ''), h('td', {}, q.database || ''), h('td', {class: 'mono'}, q.node || ''),
  h('td', {class: 'mono'}, q.node_id), h('td', {}, q.state || ''), h('td', {class: 'mono'}, q.client || ''))));
  renderQueryDetail();
}

function renderQueryDetail() {
  const box = $('query-detail');
  const q = ui.queries.find(x => x.node_id + '/' + x.session === ui.selectedQuery);
  if (!q) { box.classList.add('hidden'); return; }
  box.classList.remove('hidden');
  box.replaceChildren(
    h('h3', {}, 'Session ' + q.session + ' on ' + q.node_id + ' (' + (q.node || '?') + ')'),
    h('pre', {}, q.text || ''),
    h('p', {class: 'muted'}, 'Running for ' + fmtMs(q.duration_ms) + ' as ' + q.user + ' in ' +
      q.database + '.'),
    q.plan_id
      ? h('a', {href: '#plans', 'data-plan': q.plan_id,
                onclick: () => { ui.selectedPlan = q.plan_id; $('plan-changed').checked = false; }},
          'Its plan')
      : h('p', {class: 'muted'}, 'No plan of it yet (plans are made for slow and sampled statements).'));
}

/* ---------- plans ---------- */

async function refreshPlans() {
  ui.plans = await get(depPath($('plan-changed').checked ? '/plans?changed=1' : '/plans'));
  renderPlans();
}

/* One plan node and its children as EXPLAIN's text form reads ("->  Seq Scan on t  (cost=..)"). */
function planLines(node, depth, out) {
  if (!node || typeof node !== 'object') return out;
  let label = node['Node Type'] || '?';
  if (node['Join Type'] && /Join|Nested Loop/.test(label)) label = node['Join Type'] + ' ' + label;
  if (node['Index Name']) label += ' using ' + node['Index Name'];
  if (node['Relation Name'])
    label += ' on ' + (node['Schema'] ? node['Schema'] + '.' : '') + node['Relation Name'] +
      (node['Alias'] && node['Alias'] !== node['Relation Name'] ? ' ' + node['Alias'] : '');
  const cost = node['Startup Cost'] !== undefined
    ? '  (cost=' + Number(node['Startup Cost']).toFixed(2) + '..' + Number(node['Total Cost']).toFixed(2) +
      ' rows=' + node['Plan Rows'] + ' width=' + node['Plan Width'] + ')' : '';
  const pad = ' '.repeat(Math.max(0, depth * 6 - 4));
  out.push((depth ? pad + '->  ' : '') + label + cost);
  for (const k of ['Filter', 'Index Cond', 'Hash Cond', 'Join Filter', 'Recheck Cond'])
    if (node[k]) out.push(' '.repeat(depth * 6 + 2) + k + ': ' + node[k]);
  for (const child of node['Plans'] || []) planLines(child, depth + 1, out);
  return out;
}

function planText(plan) {
  const root = Array.isArray(plan) ? plan[0] : plan;
  return root && root['Plan'] ? planLines(root['Plan'], 0, []).join('\n') : '(no plan)';
}

function renderPlans() {
  const changed = $('plan-changed').checked;
  const f = $('plan-filter').value.trim().toLowerCase();
  const rows = ui.plans.filter(p => !f || String(p.text || '').toLowerCase().includes(f));
  $('plan-count').textContent = rows.length + (changed ? ' plan changes' : ' plans');
  setRows($('plans'), rows.map((p, i) => {
    const key = changed ? 'change/' + p.id + '/' + p.at_ms : p.id;
    return h('tr', {'data-plan': p.id, class: ui.selectedPlan === key ? 'selected' : null,
                    onclick: () => { ui.selectedPlan = key; renderPlans(); }},
      h('td', {}, fmtTime(changed ? p.at_ms : p.planned_at_ms)),
      h('td', {}, changed ? 'changed' : p.reason || ''),
      h('td', {class: 'num'}, changed ? '' : fmtMs(p.duration_ms)),
      h('td', {}, h('div', {class: 'stmt mono'}, p.text || '')),
      h('td', {}, p.user || ''), h('td', {}, p.database || ''), h('td', {class: 'mono'}, p.node || ''),
      h('td', {class: 'num'}, changed || p.total_cost === undefined ? '' : fmtNum(p.total_cost, 2)),
      h('td', {class: 'mono'}, changed ? '' : p.top_node || ''),
      h('td', {class: 'num'}, changed ? '' : String(p.changes || 0)),
      h('td', {}, p.error ? h('span', {class: 'no'}, p.error) : (changed ? '' : 'planned')));
  }));
  const box = $('plan-detail');
  const p = rows.find(x => (changed ? 'change/' + x.id + '/' + x.at_ms : x.id) === ui.selectedPlan);
  if (!p) { box.classList.add('hidden'); return; }
  box.classList.remove('hidden');
  box.replaceChildren(
    h('h3', {}, 'Plan ' + p.id + ' on ' + (p.node || '?') + ', as ' + p.user + ' in ' + p.database),
    h('pre', {}, p.text || ''),
    changed
      ? [h('h3', {}, 'Before'), h('pre', {class: 'plan-tree'}, planText(p.old_plan)),
         h('h3', {}, 'After'), h('pre', {class: 'plan-tree', id: 'plan-tree'}, planText(p.new_plan))]
      : p.plan ? h('pre', {class: 'plan-tree', id: 'plan-tree'}, planText(p.plan))
               : h('p', {class: 'no'}, p.error || 'no plan'));
}

/* ---------- operations ---------- */

function loadOperationsForm() {
  const sel = $('sw-node');
  const dep = currentDeployment();
  const names = ui.nodes.map(n => n.name);
  if (!names.length) {
    /* not before signing in and knowing the deployment (else /deployments/null/nodes) */
    if (ui.token && ui.dep)
      get(depPath('/nodes')).then(n => { ui.nodes = n; loadOperationsForm(); }).catch(() => {});
    return;
  }
  const labels = names.map(n => n + (dep && n === dep.leader ? ' (current leader)' : ''));
  if ([...sel.options].map(o => o.textContent).join('\n') === labels.join('\n')) return;
  const keep = sel.value;
  sel.replaceChildren(...names.map((n, i) => h('option', {value: n}, labels[i])));
  const other = names.find(n => !dep || n !== dep.leader);
  sel.value = names.includes(keep) && (!dep || keep !== dep.leader) ? keep : (other || names[0]);
}

async function refreshOperations() {
  const [ops, nodes] = await Promise.all([get(depPath('/operations')), get(depPath('/nodes'))]);
  ui.nodes = nodes;
  loadOperationsForm();
  ui.operations = ops;
  renderOperations();
}

function stepList(steps) {
  return h('ol', {}, (steps || []).map(s => h('li', {},
    h('b', {}, s.step), ' ' + fmtTime(s.at) + (s.detail ? ': ' + s.detail : ''))));
}

function renderOperations() {
  const live = $('op-live');
  const r = ui.opRunning;
  if (r) {
    const parts = [h('h2', {}, r.result ? 'Last operation from this tab' : 'Running'),
      h('p', {}, h('b', {}, r.kind), ' started ' + fmtTime(r.started) + ': ' + r.text)];
    let op = null;
    if (r.kind === 'switchover') {
      op = (ui.operations || []).find(o => o.id > r.lastId && o.kind === 'switchover');
      if (op) {
        parts.push(h('p', {}, 'Operation ' + op.id + ', ' + op.state + (op.step ? ', step ' + op.step : '')));
        parts.push(stepList(op.steps));
      } else {
        parts.push(h('p', {class: 'muted'}, 'waiting for the operation record...'));
      }
    }
    if (r.result) parts.push(resultView(r.result, !!op));
    else parts.push(h('p', {class: 'muted'}, 'waiting for every proxy to acknowledge...'));
    live.className = 'live';
    live.dataset.started = String(r.started);
    live.dataset.state = r.result ? 'done' : 'running';
    live.replaceChildren(...parts);
  }
  const past = [...ui.tabOps, ...(ui.operations || []).map(o => ({
    id: String(o.id), started: o.created, kind: o.kind + (o.promote ? ' --promote' : ''),
    target: (o.old_leader || '?') + ' \u2192 ' + o.node, state: o.state, outcome: o.outcome || '',
    steps: o.steps}))].sort((a, b) => b.started - a.started);
  setRows($('op-history'), past.length ? past.map(o => h('tr', {'data-kind': o.kind},
    h('td', {}, o.id), h('td', {}, fmtDateTime(o.started)), h('td', {}, o.kind),
    h('td', {class: 'mono'}, o.target), h('td', {class: /done|ok/.test(o.state) ? 'yes' : (/running|committed/.test(o.state) ? 'warn' : 'no')}, o.state),
    h('td', {}, o.outcome), h('td', {}, (o.steps || []).map(s => s.step).join(' \u2192 ')))) :
    [h('tr', {}, h('td', {colspan: 7, class: 'muted'}, 'No operation yet.'))]);
}

/* The answer of an orchestration: ok or not, and each proxy's answer. */
function resultView(res, withRecord) {
  const d = res.data || {};
  const ok = res.status === 200 && d.ok !== false;
  /* A configuration committed but not yet acknowledged everywhere: in force, not failed. */
  const committed = res.status === 200 && d.state === 'committed';
  const rows = (d.proxies || []).map(p => h('tr', {'data-node-id': p.node_id, class: p.ok ? '' : 'refused'},
    h('td', {class: 'mono'}, p.node_id), h('td', {}, yesNo(p.ok)), h('td', {}, p.detail || '')));
  const headline = ok ? 'Succeeded' : committed ? 'Committed, not yet on every proxy' : 'Failed';
  const out = [h('p', {class: ok ? 'yes' : committed ? 'warn' : 'failed', id: 'op-headline'},
    headline + ' (HTTP ' + res.status + ')' +
    (d.error ? ': ' + d.error : '') + (d.leader ? '; leader ' + d.leader + ', epoch ' + d.epoch : '') +
    (d.version ? (ok || committed ? '; version ' : '; not applied: version ') + d.version : ''))];
  if (committed && (d.pending || []).length)
    out.push(h('p', {class: 'warn', id: 'op-pending'}, 'Pending: ' + d.pending.join(', ') +
      ' (each takes the version when it reports again; see Operations)'));
  const silent = p => /^no answer/.test(p.detail || '');
  const refused = (d.proxies || []).filter(p => !p.ok && !silent(p)).map(p => p.node_id);
  const unanswered = (d.proxies || []).filter(p => !p.ok && silent(p)).map(p => p.node_id);
  if (refused.length) out.push(h('p', {class: 'failed', id: 'op-refused'}, 'Refused by: ' + refused.join(', ')));
  if (unanswered.length) out.push(h('p', {class: 'warn'}, 'Did not answer: ' + unanswered.join(', ')));
  if (rows.length) out.push(h('table', {class: 'grid', id: 'op-result'},
    h('thead', {}, h('tr', {}, h('th', {}, 'proxy'), h('th', {}, 'ok'), h('th', {}, 'detail'))), h('tbody', {}, rows)));
  if (d.steps && typeof d.steps === 'object' && !withRecord)
    out.push(h('ul', {}, Object.entries(d.steps).map(([k, v]) => h('li', {}, h('b', {}, k), ': ' + v))));
  return h('div', {}, out);
}

/* Ask for confirmation naming what will happen; resolves true on Confirm. */
function confirmAction(title, text, diff) {
  return new Promise(resolve => {
    $('confirm-title').textContent = title;
    $('confirm-text').textContent = text;
    const pre = $('confirm-diff');
    if (diff) { pre.replaceChildren(...diff); pre.classList.remove('hidden'); }
    else pre.classList.add('hidden');
    $('confirm').classList.remove('hidden');
    const done = ok => {
      $('confirm').classList.add('hidden');
      $('confirm-ok').onclick = null;
      $('confirm-cancel').onclick = null;
      resolve(ok);
    };
    $('confirm-ok').onclick = () => done(true);
    $('confirm-cancel').onclick = () => done(false);
    $('confirm-ok').focus();
  });
}

function setOpButtons(disabled) {
  for (const id of ['maint-on', 'maint-off', 'sw-start', 'cfg-apply']) $(id).disabled = disabled;
}

/* Run one orchestration from this tab: the request is held open by the control plane until
 * it ends; meanwhile the page keeps polling (the switchover's steps come from /operations). */
async function runOperation(kind, text, path, body) {
  const lastId = Math.max(0, ...(ui.operations || []).map(o => o.id));
  ui.opRunning = {kind, text, started: Date.now(), result: null, lastId};
  setOpButtons(true);
  renderOperations();
  let res;
  try {
    res = await api('POST', path, body);
  } catch (e) {
    res = {status: 0, data: {ok: false, error: e instanceof Unreachable ? 'the control plane did not answer' : String(e)}};
  }
  ui.opRunning.result = res;
  if (kind !== 'switchover') {
    const d = res.data || {};
    ui.tabOps.push({id: 'tab', started: ui.opRunning.started, kind, target: ui.dep,
      state: res.status === 200 && d.ok !== false ? 'ok'
        : res.status === 200 && d.state === 'committed' ? 'committed' : 'failed (' + res.status + ')',
      outcome: d.error || ((d.proxies || []).map(p => p.node_id + ': ' + (p.detail || (p.ok ? 'ok' : 'no'))).join('; ')),
      steps: []});
  }
  setOpButtons(false);
  renderOperations();
  if (ui.page === 'operations') startPolling();
}

async function maintenance(on) {
  const after = Math.max(0, Number($('maint-after').value) || 0);
  const dep = currentDeployment();
  const live = dep ? dep.live : '?';
  const text = on
    ? 'Pause every live declared proxy of ' + ui.dep + ' (' + live + ' live, maintenance_exempt ones left out): ' +
      'new statements wait until maintenance is turned off' + (after ? ', or by itself after ' + after + ' s' : '') + '.'
    : 'Resume every proxy of ' + ui.dep + ': statements held by the maintenance run at once.';
  if (!await confirmAction(on ? 'Start maintenance?' : 'End maintenance?', text)) return;
  const body = {on, timeout_s: 30};
  if (on && after) body.resume_after_s = after;
  await runOperation(on ? 'maintenance on' : 'maintenance off', text, depPath('/maintenance'), body);
}

async function switchover() {
  const node = $('sw-node').value;
  const promote = $('sw-promote').checked;
  const timeout = Math.min(3600, Math.max(1, Number($('sw-timeout').value) || 30));
  const dep = currentDeployment();
  const old = dep && dep.leader ? dep.leader : 'none';
  if (!node) return;
  const text = 'Move the write leader of ' + ui.dep + ' from ' + old + ' to ' + node + ' under epoch ' +
    (dep ? dep.epoch + 1 : '?') + ' or higher: every live proxy pauses, ' +
    (old !== 'none' && old !== node ? old + ' is fenced (its sessions end), ' : '') +
    (promote ? node + ' catches up and is promoted with pg_promote(), ' : '') +
    'every proxy switches to ' + node + ', then resumes. Rolled back if a step fails or ' + timeout + ' s pass.';
  if (!await confirmAction('Switch over to ' + node + (promote ? ' with promote' : '') + '?', text)) return;
  await runOperation('switchover', text, depPath('/switchover'), {node, promote, timeout_s: timeout});
}

/* A line diff (longest common subsequence) of a and b as <span> lines. */
function lineDiff(a, b) {
  const x = a.split('\n'), y = b.split('\n');
  if (x.length * y.length > 4000000) return [h('span', {class: 'same'}, '(too large to compare line by line)')];
  const n = x.length, m = y.length;
  const L = Array.from({length: n + 1}, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--)
    for (let j = m - 1; j >= 0; j--)
      L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && x[i] === y[j]) { out.push(h('span', {class: 'same'}, '  ' + x[i])); i++; j++; }
    else if (j < m && (i >= n || L[i][j + 1] >= L[i + 1][j])) { out.push(h('span', {class: 'add'}, '+ ' + y[j])); j++; }
    else { out.push(h('span', {class: 'del'}, '- ' + x[i])); i++; }
  }
  return out;
}

/* An ini text as the keys an agent reports (POST /agent/config): [pgrelay] keys bare,
 * [node.X] keys as node.X.key, other sections as section.key. */
function iniKeys(text) {
  const keys = {};
  let section = '';
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line[0] === ';' || line[0] === '#') continue;
    const m = /^\[(.+)\]$/.exec(line);
    if (m) { section = m[1].trim(); continue; }
    const eq = line.indexOf('=');
    if (eq < 0) continue;
    const k = line.slice(0, eq).trim(), v = line.slice(eq + 1).trim();
    keys[section === 'pgrelay' ? k : section + '.' + k] = v;
  }
  return keys;
}

/* Per live proxy, the keys of text whose value differs from what it reports running. */
function settingChanges(text, proxies) {
  const want = iniKeys(text);
  const out = [];
  for (const p of proxies) {
    if (!p.live || !p.effective) continue;
    const changes = Object.keys(want).filter(k => !/password|token/.test(k) &&
      p.effective[k] !== undefined && p.effective[k] !== want[k])
      .map(k => k + ': ' + p.effective[k] + ' \u2192 ' + want[k]);
    const added = Object.keys(want).filter(k => p.effective[k] === undefined && /^node\./.test(k))
      .map(k => k + ': (new) ' + want[k]);
    out.push(h('span', {class: 'head'}, p.node_id + ': ' +
      (changes.length + added.length ? (changes.length + added.length) + ' setting(s) change' : 'no setting changes')));
    for (const c of [...changes, ...added]) out.push(h('span', {class: 'add'}, '  ' + c));
  }
  return out;
}

async function configApply() {
  const text = $('cfg-text').value;
  if (!text.trim()) { $('cfg-text').focus(); return; }
  let current;
  try { current = await get(depPath('/config')); } catch (e) { return; }
  const shown = settingChanges(text, current.proxies || []);
  let changed = 0;
  if (current.text !== null) {
    const diff = lineDiff(current.text, text);
    changed = diff.filter(d => d.className !== 'same').length;
    shown.push(h('span', {class: 'head'}, 'The file against version ' + current.version + ':'), ...diff);
  }
  const msg = 'Apply this pgrelay.ini to every live proxy of ' + ui.dep + ' as version ' +
    (current.version + 1) + ' or above: each proxy checks it first (config_prepare); only when all accept ' +
    'it is it written and reloaded everywhere, else no proxy changes. ' +
    (current.text === null ? 'No version was applied through the control plane yet; ' +
      'below, what changes against the settings each proxy runs now.' :
      changed + ' line(s) differ from version ' + current.version + '.');
  if (!await confirmAction('Apply the configuration?', msg, shown)) return;
  await runOperation('config apply', 'a new pgrelay.ini' + (current.text !== null ? ' (' + changed +
    ' line(s) differ from version ' + current.version + ')' : ''), depPath('/config'),
    {text, timeout_s: 30});
}

async function loadCurrentConfig() {
  try {
    const cur = await get(depPath('/config'));
    $('cfg-text').value = cur.text || '';
  } catch (e) { /* notice or login shown */ }
}

/* ---------- start ---------- */

function init() {
  $('login-form').addEventListener('submit', ev => {
    ev.preventDefault();
    const t = $('token').value.trim();
    if (t) signIn(t);
  });
  $('logout').addEventListener('click', () => signOut('Signed out.'));
  $('deployment').addEventListener('change', ev => selectDeployment(ev.target.value));
  window.addEventListener('hashchange', route);
  $('query-filter').addEventListener('input', renderQueries);
  $('plan-filter').addEventListener('input', renderPlans);
  $('plan-changed').addEventListener('change', () => { ui.selectedPlan = null; poll(); });
  for (const th of $('queries').tHead.rows[0].cells)
    th.addEventListener('click', () => {
      const k = th.dataset.key;
      ui.querySort = {key: k, dir: ui.querySort.key === k ? -ui.querySort.dir : (k === 'duration_ms' ? -1 : 1)};
      renderQueries();
    });
  $('chart-window').addEventListener('change', () => { if (ui.charts) drawCharts(); });
  window.addEventListener('resize', () => { if (ui.charts) drawCharts(); });
  $('maint-on').addEventListener('click', () => maintenance(true));
  $('maint-off').addEventListener('click', () => maintenance(false));
  $('sw-start').addEventListener('click', switchover);
  $('cfg-apply').addEventListener('click', configApply);
  $('cfg-load').addEventListener('click', loadCurrentConfig);
  $('cfg-file').addEventListener('change', ev => {
    const f = ev.target.files[0];
    if (f) f.text().then(t => { $('cfg-text').value = t; });
  });
  document.addEventListener('keydown', ev => {
    if (ev.key === 'Escape' && !$('confirm').classList.contains('hidden')) $('confirm-cancel').click();
  });
  if (ui.token) signIn(ui.token);
  else showLogin();
}

document.addEventListener('DOMContentLoaded', init);
