// Beacon's merchant dashboard. Every figure comes from the metrics API (POST /api/v2/query)
// with the session cookie the login set; the view (range, filters, chart metric) lives in the
// URL so it can be shared and bookmarked. No build step: plain ES2020 and uPlot.
'use strict';
(() => {
  const { $, el, ApiError } = window.beaconPage;

  // ---- what is shown ------------------------------------------------------------------
  const RANGES = ['day', '7d', '30d', 'month', 'custom'];
  const state = {
    site: null, name: null, tz: 'UTC', today: null,
    range: 'day', from: null, to: null,
    filters: [], // [{dim, value}]
    metric: 'visitors',
    // One counter per section: a refresh of some sections never orphans another's load.
    gen: { stats: 0, chart: 0, panels: 0 },
  };

  const STATS = [
    { key: 'visitors', label: 'Unique visitors', fmt: 'num' },
    { key: 'visits', label: 'Total visits', fmt: 'num', visit: true },
    { key: 'pageviews', label: 'Total pageviews', fmt: 'num' },
    { key: 'views_per_visit', label: 'Views per visit', fmt: 'dec', visit: true },
    { key: 'bounce_rate', label: 'Bounce rate', fmt: 'pct', visit: true, lowerIsBetter: true },
    { key: 'visit_duration', label: 'Visit duration', fmt: 'dur', visit: true },
  ];

  const PANELS = [
    { id: 'sources', title: 'Top sources', tabs: [['visit:source', 'Sources'], ['visit:utm_source', 'UTM sources'], ['visit:utm_medium', 'UTM mediums'], ['visit:utm_campaign', 'UTM campaigns']] },
    { id: 'pages', title: 'Top pages', tabs: [['event:page', 'Pages'], ['visit:entry_page', 'Entry pages'], ['visit:exit_page', 'Exit pages']] },
    { id: 'locations', title: 'Locations', tabs: [['visit:country', 'Countries'], ['visit:region', 'Regions'], ['visit:city', 'Cities']] },
    { id: 'devices', title: 'Devices', tabs: [['visit:device', 'Devices'], ['visit:browser', 'Browsers'], ['visit:os', 'Operating systems']] },
    { id: 'goals', title: 'Goals', tabs: [['event:goal', 'Goals']] },
  ];
  const PAGE_SIZE = 10;
  const panelState = {}; // id -> {tab, sort: [key, dir] | null, offset}

  const METRIC_LABELS = {
    visitors: 'Visitors', visits: 'Visits', pageviews: 'Pageviews', events: 'Completions',
    bounce_rate: 'Bounce', conversion_rate: 'CR', views_per_visit: 'Views/visit', visit_duration: 'Duration',
  };
  const FORMAT_OF = { bounce_rate: 'pct', conversion_rate: 'pct', views_per_visit: 'dec', visit_duration: 'dur' };

  // ---- formatting ---------------------------------------------------------------------
  const intFmt = new Intl.NumberFormat('en');
  const compactFmt = new Intl.NumberFormat('en', { notation: 'compact', maximumFractionDigits: 1 });
  const moneyFmt = new Intl.NumberFormat('en', { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  function fmt(kind, v) {
    if (v === null || v === undefined) return '—';
    switch (kind) {
      case 'pct': return `${Number(v).toFixed(0)}%`;
      case 'dec': return Number(v).toFixed(2);
      case 'dur': {
        const s = Math.round(Number(v));
        if (s < 60) return `${s}s`;
        const m = Math.floor(s / 60);
        return m < 60 ? `${m}m ${s % 60}s` : `${Math.floor(m / 60)}h ${m % 60}m`;
      }
      case 'money': return moneyFmt.format(Number(v));
      default: return Math.abs(v) >= 100000 ? compactFmt.format(v) : intFmt.format(v);
    }
  }

  // ---- dates (days as YYYY-MM-DD, arithmetic in UTC, meaning the merchant's zone) --------
  const DAY = 86400000;
  const parseDay = (s) => { const [y, m, d] = s.split('-').map(Number); return Date.UTC(y, m - 1, d); };
  const fmtDay = (ms) => new Date(ms).toISOString().slice(0, 10);
  const addDays = (s, n) => fmtDay(parseDay(s) + n * DAY);
  const daysBetween = (a, b) => Math.round((parseDay(b) - parseDay(a)) / DAY);
  const validDay = (s) => typeof s === 'string' && /^\d{4}-\d{2}-\d{2}$/.test(s) && !Number.isNaN(parseDay(s));

  function period() {
    const t = state.today;
    switch (state.range) {
      case '7d': return [addDays(t, -6), t];
      case '30d': return [addDays(t, -29), t];
      case 'month': return [t.slice(0, 8) + '01', t];
      case 'custom': return [state.from, state.to];
      default: return [t, t];
    }
  }

  // The period just before, of the same length (a month compares with the same days of
  // the month before).
  function previousPeriod([from, to]) {
    if (state.range === 'month') {
      const d = new Date(parseDay(from));
      const first = fmtDay(Date.UTC(d.getUTCFullYear(), d.getUTCMonth() - 1, 1));
      const lastDay = addDays(from, -1);
      const end = addDays(first, daysBetween(from, to));
      return [first, end < lastDay ? end : lastDay];
    }
    const n = daysBetween(from, to) + 1;
    return [addDays(from, -n), addDays(to, -n)];
  }

  function rangeLabel([from, to]) {
    const opts = { day: 'numeric', month: 'short', year: 'numeric', timeZone: 'UTC' };
    const f = new Date(parseDay(from)).toLocaleDateString('en', opts);
    if (from === to) return f;
    return `${f} – ${new Date(parseDay(to)).toLocaleDateString('en', opts)}`;
  }

  // ---- the URL is the view ------------------------------------------------------------
  function readUrl() {
    const p = new URLSearchParams(location.search);
    const range = p.get('range');
    state.range = RANGES.includes(range) ? range : 'day';
    state.from = p.get('from');
    state.to = p.get('to');
    if (state.range === 'custom' && !(validDay(state.from) && validDay(state.to) && state.from <= state.to)) {
      state.range = 'day';
    }
    state.filters = p.getAll('f').map((f) => {
      const i = f.indexOf('=');
      return i > 0 ? { dim: f.slice(0, i), value: f.slice(i + 1) } : null;
    }).filter(Boolean);
    const metric = p.get('metric');
    state.metric = STATS.some((s) => s.key === metric) ? metric : 'visitors';
  }

  function writeUrl(push) {
    const p = new URLSearchParams();
    if (state.range !== 'day') p.set('range', state.range);
    if (state.range === 'custom') { p.set('from', state.from); p.set('to', state.to); }
    for (const f of state.filters) p.append('f', `${f.dim}=${f.value}`);
    if (state.metric !== 'visitors') p.set('metric', state.metric);
    const url = `${location.pathname}${p.toString() ? '?' + p : ''}`;
    if (push) history.pushState(null, '', url); else history.replaceState(null, '', url);
  }

  // ---- the API ------------------------------------------------------------------------

  // At most 3 requests at once (the API runs a few queries per merchant at a time and answers
  // 429 beyond); a 429 is retried once after its Retry-After.
  const MAX_IN_FLIGHT = 3;
  let inFlight = 0;
  const waiting = [];
  async function slot(fn) {
    if (inFlight >= MAX_IN_FLIGHT) await new Promise((go) => waiting.push(go));
    inFlight += 1;
    try { return await fn(); } finally {
      inFlight -= 1;
      const next = waiting.shift();
      if (next) next();
    }
  }

  async function api(path, init) {
    let r = await slot(() => fetch(path, { credentials: 'same-origin', ...init }));
    if (r.status === 429) {
      const after = Math.min(5, Number(r.headers.get('retry-after')) || 1);
      await new Promise((go) => setTimeout(go, after * 1000));
      r = await slot(() => fetch(path, { credentials: 'same-origin', ...init }));
    }
    if (r.status === 401) {
      location.assign('/dashboard/login');
      throw new ApiError(401, 'logged out');
    }
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new ApiError(r.status, body.error || `${r.status} ${r.statusText}`);
    return body;
  }

  const apiFilters = () => state.filters.map((f) => ['is', f.dim, [f.value]]);
  const eventFiltered = () => state.filters.some((f) => f.dim.startsWith('event:'));

  function query(body) {
    return api('/api/v2/query', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ site_id: state.site, filters: apiFilters(), ...body }),
    });
  }

  // A section shows one of: loading, ready, empty, error (with a retry).
  function setState(section, s, message, retry) {
    section.dataset.state = s;
    if (s === 'loading') {
      section.setAttribute('aria-busy', 'true');
    } else {
      section.removeAttribute('aria-busy');
    }
    if (s === 'error' || s === 'empty' || s === 'unavailable') {
      section.replaceChildren(el('div', { class: `notice ${s}`, role: s === 'error' ? 'alert' : null },
        el('p', { text: message }),
        retry ? el('button', { type: 'button', class: 'retry', onclick: retry, text: 'Try again' }) : null));
    }
  }

  const stale = (part, gen) => gen !== state.gen[part];
  const unavailable = (e) => e instanceof ApiError && e.status === 400;

  // ---- top stats ----------------------------------------------------------------------
  async function loadStats(gen) {
    const box = $('#stats');
    setState(box, 'loading');
    if (!box.children.length || box.querySelector('.notice')) {
      box.replaceChildren(...STATS.map((s) => el('div', { class: 'stat skeleton' }, el('span', { class: 'label', text: s.label }))));
    }
    const cur = period();
    const prev = previousPeriod(cur);
    const eventMetrics = STATS.filter((s) => !s.visit).map((s) => s.key);
    const visitMetrics = STATS.filter((s) => s.visit).map((s) => s.key);
    const one = (metrics, range) => query({ metrics, date_range: range }).then((r) => {
      const row = r.results[0] ? r.results[0].metrics : metrics.map(() => 0);
      return Object.fromEntries(metrics.map((m, i) => [m, row[i]]));
    });
    const visitOk = !eventFiltered();
    try {
      const [a, b, c, d, goals, revenue] = await Promise.all([
        one(eventMetrics, cur), one(eventMetrics, prev),
        visitOk ? one(visitMetrics, cur) : {}, visitOk ? one(visitMetrics, prev) : {},
        query({ metrics: ['events'], date_range: cur, dimensions: ['event:goal'], pagination: { limit: 1000 } }).catch(() => null),
        query({ metrics: ['total_revenue'], date_range: cur, dimensions: ['event:currency'] }).catch(() => null),
      ]);
      if (stale('stats', gen)) return;
      const now = { ...a, ...c };
      const before = { ...b, ...d };
      const cards = STATS.map((s) => statCard(s, now[s.key], before[s.key], visitOk || !s.visit));
      const completions = goals ? goals.results.reduce((sum, r) => sum + (r.metrics[0] || 0), 0) : 0;
      if (completions > 0) {
        cards.push(staticCard('goal_completions', 'Goal completions', completions, fmt('num', completions)));
      }
      if (revenue && revenue.results.length) {
        const [top, ...more] = revenue.results;
        const currency = top.dimensions[0];
        cards.push(staticCard('revenue', `Revenue (${currency})`, top.metrics[0],
          fmt('money', top.metrics[0]) + (more.length ? ` +${more.length} more` : '')));
      }
      box.replaceChildren(...cards);
      setState(box, 'ready');
    } catch (e) {
      if (stale('stats', gen)) return;
      setState(box, 'error', `The figures could not be loaded: ${e.message}`, () => loadStats(state.gen.stats));
    }
  }

  function statCard(s, value, before, available) {
    const pressed = state.metric === s.key;
    let change = null;
    if (available && typeof value === 'number' && typeof before === 'number' && before > 0) {
      const pctChange = Math.round(((value - before) / before) * 100);
      const good = s.lowerIsBetter ? pctChange < 0 : pctChange > 0;
      const arrow = pctChange > 0 ? '↑' : pctChange < 0 ? '↓' : '→';
      change = el('span', {
        class: `change ${pctChange === 0 ? 'flat' : good ? 'good' : 'bad'}`,
        title: `previous period: ${fmt(s.fmt, before)}`,
        text: `${arrow} ${Math.abs(pctChange)}%`,
      });
    } else if (available && before === 0 && value > 0) {
      change = el('span', { class: 'change flat', text: 'new' });
    }
    return el('button', {
      type: 'button', class: 'stat', 'data-metric': s.key, 'aria-pressed': String(pressed),
      disabled: !available,
      title: available ? `Chart ${s.label.toLowerCase()}` : 'Visit figures cannot be filtered by an event dimension yet',
      onclick: () => { state.metric = s.key; writeUrl(true); refresh(['stats', 'chart']); },
    },
    el('span', { class: 'label', text: s.label }),
    el('span', { class: 'value', 'data-value': available && value !== null && value !== undefined ? String(value) : '', text: available ? fmt(s.fmt, value) : 'n/a' }),
    change);
  }

  function staticCard(key, label, value, shown) {
    return el('div', { class: 'stat', 'data-metric': key },
      el('span', { class: 'label', text: label }),
      el('span', { class: 'value', 'data-value': String(value), text: shown }));
  }

  // ---- the chart ----------------------------------------------------------------------
  let plot = null;
  let annotations = [];

  // A bucket label ("2026-12-06 10:00:00" or "2026-12-06") is wall time in the merchant's
  // zone; the chart draws wall times as if UTC, so its axis reads as the merchant's clock.
  function labelToX(label) {
    const [d, t] = label.split(' ');
    const [h, m] = (t || '00:00').split(':').map(Number);
    return (parseDay(d) + (h * 60 + m) * 60000) / 1000;
  }

  // uPlot formats a Date with local getters: shift a wall time (seconds, encoded as UTC) so
  // that the viewer's zone reads it as written, whatever zone the browser is in.
  const asWall = (x) => uPlot.tzDate(new Date(x * 1e3), 'Etc/UTC');

  const wallParts = new Map();
  function wallTime(ms) {
    let f = wallParts.get(state.tz);
    if (!f) {
      f = new Intl.DateTimeFormat('en-US', { timeZone: state.tz, year: 'numeric', month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });
      wallParts.set(state.tz, f);
    }
    const parts = Object.fromEntries(f.formatToParts(new Date(ms)).map((p) => [p.type, p.value]));
    return Date.UTC(+parts.year, +parts.month - 1, +parts.day, +parts.hour % 24, +parts.minute, +parts.second) / 1000;
  }

  const MARKER_COLORS = {
    activated: '#2563eb', promoted: '#16a34a', canary_started: '#d97706', canary_stopped: '#9ca3af',
    rolled_back: '#dc2626', removed: '#6b7280', reprocessed: '#7c3aed',
  };
  const MARKER_TEXT = {
    activated: (a) => `Pipeline v${a.version} activated`,
    promoted: (a) => `Canary v${a.version} promoted`,
    canary_started: (a) => `Canary v${a.version} started (${a.percent}% of visitors)`,
    canary_stopped: (a) => `Canary v${a.version} stopped`,
    rolled_back: (a) => `Rolled back to v${a.version}`,
    removed: () => 'Pipeline removed',
    reprocessed: (a) => (a.version ? `History re-processed with v${a.version}` : 'History re-processed'),
  };

  function markersPlugin() {
    return {
      hooks: {
        draw: [(u) => {
          const { ctx, bbox } = u;
          const [min, max] = [u.scales.x.min, u.scales.x.max];
          for (const a of annotations) {
            const x = wallTime(a.at);
            if (x < min || x > max) continue;
            const cx = Math.round(u.valToPos(x, 'x', true));
            ctx.save();
            ctx.strokeStyle = MARKER_COLORS[a.kind] || '#6b7280';
            ctx.lineWidth = 2 * devicePixelRatio;
            ctx.setLineDash([4 * devicePixelRatio, 3 * devicePixelRatio]);
            ctx.beginPath();
            ctx.moveTo(cx, bbox.top);
            ctx.lineTo(cx, bbox.top + bbox.height);
            ctx.stroke();
            ctx.restore();
          }
        }],
      },
    };
  }

  async function loadChart(gen) {
    const box = $('#chart');
    const stat = STATS.find((s) => s.key === state.metric) || STATS[0];
    const metric = stat.visit && eventFiltered() ? 'visitors' : stat.key;
    const cur = period();
    const prev = previousPeriod(cur);
    const hourly = cur[0] === cur[1];
    const dims = [hourly ? 'time:hour' : 'time:day'];
    setState(box, 'loading');
    try {
      const ask = (range) => query({ metrics: [metric], date_range: range, dimensions: dims, include: { time_labels: true } });
      const [now, before] = await Promise.all([ask(cur), ask(prev)]);
      if (stale('chart', gen)) return;
      const series = (r) => {
        const by = new Map(r.results.map((row) => [row.dimensions[0], row.metrics[0]]));
        const labels = r.meta.time_labels || [...by.keys()];
        return { labels, values: labels.map((l) => (by.has(l) ? by.get(l) : 0)) };
      };
      const a = series(now);
      const b = series(before);
      const xs = a.labels.map(labelToX);
      // Buckets that have not begun yet are not zero: the line stops at now.
      const nowX = wallTime(Date.now());
      const values = a.values.map((v, i) => (xs[i] > nowX ? null : v));
      const prevValues = xs.map((_, i) => (i < b.values.length ? b.values[i] : null));
      drawChart(box, xs, values, prevValues, metric, hourly);
      const total = a.values.reduce((s, v) => s + (v || 0), 0);
      box.dataset.points = String(xs.length);
      setState(box, total > 0 ? 'ready' : 'empty', 'No data for this period yet.');
      if (total === 0) plot = null;
      renderMarkers(xs);
    } catch (e) {
      if (stale('chart', gen)) return;
      plot = null;
      setState(box, unavailable(e) ? 'unavailable' : 'error',
        unavailable(e) ? `Not available with these filters: ${e.message}` : `The chart could not be loaded: ${e.message}`,
        unavailable(e) ? null : () => loadChart(state.gen.chart));
    }
  }

  function drawChart(box, xs, values, prevValues, metric, hourly) {
    box.replaceChildren();
    const kind = FORMAT_OF[metric] || 'num';
    const width = Math.max(280, box.clientWidth || 800);
    const opts = {
      width,
      height: width < 600 ? 220 : 300,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), 'Etc/UTC'),
      cursor: { drag: { x: false, y: false } },
      legend: { live: true },
      scales: { y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
      axes: [
        { stroke: '#6b7280', grid: { stroke: '#eef0f3' } },
        { stroke: '#6b7280', grid: { stroke: '#eef0f3' }, values: (u, ticks) => ticks.map((t) => fmt(kind, t)), size: 60 },
      ],
      series: [
        { value: (u, v) => (v === null ? '' : uPlot.fmtDate(hourly ? '{YYYY}-{MM}-{DD} {HH}:00' : '{YYYY}-{MM}-{DD}')(asWall(v))) },
        { label: METRIC_LABELS[metric] || metric, stroke: '#4f46e5', width: 2, fill: 'rgba(79,70,229,0.08)', value: (u, v) => fmt(kind, v) },
        { label: 'previous period', stroke: '#9ca3af', width: 1, dash: [5, 5], value: (u, v) => fmt(kind, v) },
      ],
      plugins: [markersPlugin()],
    };
    plot = new uPlot(opts, [xs, values, prevValues], box);
    box.setAttribute('role', 'img');
    const total = values.reduce((s, v) => s + (v || 0), 0);
    box.setAttribute('aria-label', `${METRIC_LABELS[metric] || metric} over ${xs.length} ${hourly ? 'hours' : 'days'}; total ${fmt(kind, total)}`);
  }

  function renderMarkers(xs) {
    const list = $('#markers');
    const [min, max] = [xs[0], xs[xs.length - 1] + (xs.length > 1 ? xs[1] - xs[0] : 3600)];
    const shown = annotations.filter((a) => { const x = wallTime(a.at); return x >= min && x < max; });
    list.replaceChildren(...shown.map((a) => {
      const when = uPlot.fmtDate('{YYYY}-{MM}-{DD} {HH}:{mm}')(asWall(wallTime(a.at)));
      const text = (MARKER_TEXT[a.kind] || ((x) => x.kind))(a);
      const extra = [a.plugins && a.plugins.length ? `plugins: ${a.plugins.join(' → ')}` : '', a.who ? `by ${a.who}` : '', a.reason].filter(Boolean).join(' · ');
      return el('li', { class: `marker ${a.kind}` },
        el('span', { class: 'swatch', 'aria-hidden': 'true', style: `background:${MARKER_COLORS[a.kind] || '#6b7280'}` }),
        el('time', { text: when }), ` ${text}`, extra ? el('span', { class: 'muted', text: ` — ${extra}` }) : null);
    }));
  }

  // The canary running now, if any: the last pipeline change decides.
  const runningCanary = () => {
    const last = [...annotations].reverse().find((a) => a.kind !== 'reprocessed');
    return last && last.kind === 'canary_started' ? last : null;
  };

  // While a canary runs: its note, and the period's figures per pipeline version side by side
  // (visit figures by the version of the visit's first event).
  const SPLIT = [
    ['visitors', 'visitors', 'num'], ['pageviews', 'pageviews', 'num'], ['events', 'events', 'num'],
    ['visits', 'visits', 'num'], ['bounce_rate', 'bounce rate', 'pct'], ['visit_duration', 'visit duration', 'dur'],
  ];
  async function loadCanary(gen) {
    const box = $('#canary');
    const canary = runningCanary();
    if (!canary) { box.hidden = true; box.dataset.state = 'none'; return; }
    box.hidden = false;
    const note = el('p', {},
      el('strong', { text: `Canary v${canary.version} is running` }),
      ` for ${canary.percent}% of visitors${canary.plugins.length ? ` (plugins: ${canary.plugins.join(' → ')})` : ''}. `,
      'Figures of this period by the pipeline version that processed the events (a visit counts for its first event\'s version):');
    box.dataset.state = 'loading';
    try {
      const r = await query({ metrics: SPLIT.map(([m]) => m), date_range: period(), dimensions: ['event:pipeline_version'] });
      if (stale('panels', gen)) return;
      const total = r.results.reduce((s, row) => s + (row.metrics[2] || 0), 0);
      const rows = r.results.map((row) => {
        const v = row.dimensions[0] || '(no plugins)';
        const share = total ? Math.round(((row.metrics[2] || 0) / total) * 100) : 0;
        return el('tr', { 'data-version': v, class: v === `v${canary.version}` ? 'canary-row' : null },
          el('th', { scope: 'row', text: v === `v${canary.version}` ? `${v} (canary)` : v }),
          ...row.metrics.map((m, i) => el('td', { 'data-value': String(m), text: fmt(SPLIT[i][2], m) })),
          el('td', { text: `${share}%` }));
      });
      box.replaceChildren(note, el('table', { class: 'split' },
        el('thead', {}, el('tr', {}, ...['version', ...SPLIT.map(([, h]) => h), 'share of events'].map((h) => el('th', { scope: 'col', text: h })))),
        el('tbody', {}, ...rows)));
      box.dataset.state = 'ready';
    } catch (e) {
      if (stale('panels', gen)) return;
      box.replaceChildren(note, el('p', { class: 'notice', text: `The split is not available: ${e.message}` }));
      box.dataset.state = unavailable(e) ? 'unavailable' : 'error';
    }
  }

  async function loadAnnotations() {
    try {
      const r = await api(`/api/v2/annotations?site_id=${encodeURIComponent(state.site)}`);
      annotations = r.annotations || [];
    } catch (e) {
      annotations = [];
    }
  }

  // ---- breakdown panels ---------------------------------------------------------------
  function panelMetrics(dim) {
    if (dim === 'event:goal') return state.filters.length ? ['visitors', 'events'] : ['visitors', 'events', 'conversion_rate'];
    if (dim.startsWith('event:')) return ['visitors', 'pageviews'];
    if (dim === 'visit:entry_page' || dim === 'visit:exit_page') return ['visitors', 'visits'];
    return eventFiltered() ? ['visitors', 'pageviews'] : ['visitors', 'visits', 'bounce_rate'];
  }

  function buildPanels() {
    const root = $('#panels');
    root.replaceChildren(...PANELS.map((p) => {
      panelState[p.id] = panelState[p.id] || { tab: p.tabs[0][0], sort: null, offset: 0 };
      const tabs = p.tabs.length > 1 ? el('div', { class: 'tabs', role: 'tablist', 'aria-label': p.title },
        ...p.tabs.map(([dim, label]) => el('button', {
          type: 'button', role: 'tab', 'data-dim': dim, id: `tab-${p.id}-${dim}`,
          'aria-selected': String(panelState[p.id].tab === dim),
          onclick: () => { panelState[p.id] = { tab: dim, sort: null, offset: 0 }; syncTabs(p.id); loadPanel(p.id, state.gen.panels); },
          text: label,
        }))) : null;
      return el('section', { class: 'panel', id: `panel-${p.id}`, 'aria-labelledby': `title-${p.id}` },
        el('header', {}, el('h2', { id: `title-${p.id}`, text: p.title }), tabs),
        el('div', { class: 'panel-body', 'data-state': 'loading', role: 'tabpanel' }));
    }));
  }

  function syncTabs(id) {
    for (const b of document.querySelectorAll(`#panel-${id} [role=tab]`)) {
      b.setAttribute('aria-selected', String(b.dataset.dim === panelState[id].tab));
    }
  }

  async function loadPanel(id, gen) {
    const ps = panelState[id];
    const body = $(`#panel-${id} .panel-body`);
    const dim = ps.tab;
    const metrics = panelMetrics(dim);
    setState(body, 'loading');
    const req = {
      metrics, date_range: period(), dimensions: [dim],
      pagination: { limit: PAGE_SIZE, offset: ps.offset }, include: { total_rows: true },
    };
    if (ps.sort && (ps.sort[0] === dim || metrics.includes(ps.sort[0]))) req.order_by = [ps.sort];
    try {
      const r = await query(req);
      if (stale('panels', gen) || panelState[id] !== ps) return;
      const total = r.meta.total_rows ?? r.results.length;
      if (!r.results.length) {
        setState(body, 'empty', ps.offset ? 'No more rows.' : 'Nothing for this period yet.');
        return;
      }
      body.replaceChildren(table(id, dim, metrics, r.results), pager(id, ps, total, r.results.length));
      setState(body, 'ready');
    } catch (e) {
      if (stale('panels', gen) || panelState[id] !== ps) return;
      setState(body, unavailable(e) ? 'unavailable' : 'error',
        unavailable(e) ? `Not available with these filters: ${e.message}` : `Could not load: ${e.message}`,
        unavailable(e) ? null : () => loadPanel(id, state.gen.panels));
    }
  }

  function table(id, dim, metrics, rows) {
    const ps = panelState[id];
    const max = Math.max(1, ...rows.map((r) => r.metrics[0] || 0));
    const dimLabel = (PANELS.find((p) => p.id === id).tabs.find(([d]) => d === dim) || [dim, dim])[1];
    const header = (key, label) => {
      const dir = ps.sort && ps.sort[0] === key ? ps.sort[1] : null;
      return el('th', { scope: 'col', 'aria-sort': dir === 'asc' ? 'ascending' : dir === 'desc' ? 'descending' : 'none' },
        el('button', {
          type: 'button', class: 'sort', 'data-sort': key,
          onclick: () => {
            const next = dir === 'desc' ? 'asc' : 'desc';
            panelState[id] = { ...ps, sort: [key, next], offset: 0 };
            loadPanel(id, state.gen.panels);
          },
          text: `${label}${dir === 'asc' ? ' ▲' : dir === 'desc' ? ' ▼' : ''}`,
        }));
    };
    const filtered = state.filters.some((f) => f.dim === dim);
    return el('table', { class: 'breakdown' },
      el('thead', {}, el('tr', {}, header(dim, dimLabel), ...metrics.map((m) => header(m, METRIC_LABELS[m] || m)))),
      el('tbody', {}, ...rows.map((r) => {
        const value = r.dimensions[0];
        const share = Math.round(((r.metrics[0] || 0) / max) * 100);
        const name = value === null || value === '' ? '(none)' : String(value);
        const cell = value === null || value === '' || filtered
          ? el('span', { class: 'row-name', text: name })
          : el('button', {
            type: 'button', class: 'row-name filter', 'data-dim': dim, 'data-value': String(value),
            title: `Filter by ${dimLabel.toLowerCase()}: ${name}`,
            onclick: () => addFilter(dim, String(value)),
            text: name,
          });
        return el('tr', { style: `--share:${share}%` },
          el('th', { scope: 'row' }, cell),
          ...r.metrics.map((v, i) => el('td', { 'data-value': v === null ? '' : String(v), text: fmt(FORMAT_OF[metrics[i]] || 'num', v) })));
      })));
  }

  function pager(id, ps, total, shown) {
    const first = ps.offset + 1;
    const last = ps.offset + shown;
    const go = (offset) => { panelState[id] = { ...ps, offset }; loadPanel(id, state.gen.panels); };
    return el('nav', { class: 'pager', 'aria-label': 'Pages of rows' },
      el('span', { class: 'muted', text: `${first}–${last} of ${intFmt.format(total)}` }),
      el('button', { type: 'button', disabled: ps.offset === 0, onclick: () => go(Math.max(0, ps.offset - PAGE_SIZE)), text: '← Previous' }),
      el('button', { type: 'button', disabled: last >= total, onclick: () => go(ps.offset + PAGE_SIZE), text: 'Next →' }));
  }

  // ---- filters ------------------------------------------------------------------------
  const DIM_NAMES = Object.fromEntries(PANELS.flatMap((p) => p.tabs));

  function addFilter(dim, value) {
    state.filters = state.filters.filter((f) => f.dim !== dim).concat([{ dim, value }]);
    for (const id of Object.keys(panelState)) panelState[id].offset = 0;
    writeUrl(true);
    refresh();
  }

  function renderFilters() {
    const box = $('#filters');
    box.hidden = state.filters.length === 0;
    box.replaceChildren(...state.filters.map((f) => el('span', { class: 'chip' },
      `${DIM_NAMES[f.dim] || f.dim} is `, el('strong', { text: f.value }),
      el('button', {
        type: 'button', class: 'remove', 'aria-label': `Remove filter ${DIM_NAMES[f.dim] || f.dim} is ${f.value}`,
        onclick: () => { state.filters = state.filters.filter((x) => x !== f); writeUrl(true); refresh(); },
        text: '×',
      }))),
    state.filters.length > 1 ? el('button', { type: 'button', class: 'clear', onclick: () => { state.filters = []; writeUrl(true); refresh(); }, text: 'Clear all' }) : null);
  }

  // ---- range picker -------------------------------------------------------------------
  function renderRange() {
    for (const b of document.querySelectorAll('.ranges [data-range]')) {
      b.setAttribute('aria-pressed', String(b.dataset.range === state.range));
    }
    const custom = $('#custom-range');
    const open = state.range === 'custom' || !custom.hidden;
    custom.hidden = !open;
    $('.ranges [data-range=custom]').setAttribute('aria-expanded', String(open));
    const [from, to] = period();
    $('#custom-from').value = from;
    $('#custom-to').value = to;
    $('#range-label').textContent = rangeLabel([from, to]);
  }

  function wireRange() {
    for (const b of document.querySelectorAll('.ranges [data-range]')) {
      b.addEventListener('click', () => {
        if (b.dataset.range === 'custom') {
          const custom = $('#custom-range');
          custom.hidden = !custom.hidden;
          b.setAttribute('aria-expanded', String(!custom.hidden));
          if (!custom.hidden) $('#custom-from').focus();
          return;
        }
        state.range = b.dataset.range;
        $('#custom-range').hidden = true;
        writeUrl(true);
        refresh();
      });
    }
    $('#custom-range').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const from = $('#custom-from').value;
      const to = $('#custom-to').value;
      if (!validDay(from) || !validDay(to) || from > to) {
        $('#custom-to').setCustomValidity('The end must not be before the start');
        $('#custom-to').reportValidity();
        return;
      }
      $('#custom-to').setCustomValidity('');
      Object.assign(state, { range: 'custom', from, to });
      writeUrl(true);
      refresh();
    });
  }

  // ---- realtime -----------------------------------------------------------------------
  async function loadRealtime() {
    const box = $('#realtime');
    try {
      const r = await api(`/api/v2/realtime?site_id=${encodeURIComponent(state.site)}`);
      box.dataset.state = 'ready';
      box.dataset.value = String(r.visitors);
      box.textContent = `${intFmt.format(r.visitors)} current visitor${r.visitors === 1 ? '' : 's'}`;
    } catch (e) {
      box.dataset.state = 'error';
      box.textContent = 'realtime unavailable';
    }
  }

  // ---- putting it together ------------------------------------------------------------
  function refresh(parts = ['stats', 'chart', 'panels']) {
    renderRange();
    renderFilters();
    if (parts.includes('stats')) loadStats(++state.gen.stats);
    if (parts.includes('chart')) loadChart(++state.gen.chart);
    if (parts.includes('panels')) {
      const gen = ++state.gen.panels;
      loadCanary(gen);
      for (const p of PANELS) loadPanel(p.id, gen);
    }
  }

  async function start() {
    let me;
    try {
      me = await api('/dashboard/session');
    } catch (e) {
      setState($('#stats'), 'error', `Cannot reach Beacon: ${e.message}`, () => location.reload());
      return;
    }
    Object.assign(state, { site: me.site_id, name: me.name, tz: me.time_zone, today: me.today });
    $('#site-name').textContent = me.name || me.site_id;
    document.title = `${me.name || me.site_id} · Beacon`;
    $('#tz').textContent = me.time_zone;
    readUrl();
    writeUrl(false);
    wireRange();
    buildPanels();
    await loadAnnotations();
    refresh();
    loadRealtime();
    setInterval(loadRealtime, 15000);
    // A page left open: a new day, new pipeline changes.
    setInterval(async () => {
      try {
        const now = await api('/dashboard/session');
        const newDay = now.today !== state.today;
        state.today = now.today;
        await loadAnnotations();
        refresh(newDay ? undefined : ['panels']);
      } catch (e) { /* the next tick tries again */ }
    }, 300000);
    addEventListener('popstate', () => { readUrl(); refresh(); });
    let resizing = null;
    addEventListener('resize', () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => {
        const box = $('#chart');
        if (plot) plot.setSize({ width: Math.max(280, box.clientWidth), height: box.clientWidth < 600 ? 220 : 300 });
      }, 150);
    });
    document.body.dataset.ready = 'true';
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
