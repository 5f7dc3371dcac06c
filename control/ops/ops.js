// Beacon's operator page: the admin API (/v1/...) with the session cookie, refreshed every
// 10 s. Changes (rollback, promote) send X-Beacon-CSRF and are the API's own compare-and-set.
'use strict';
(() => {
  const { $, el, ApiError } = window.beaconPage;
  const num = new Intl.NumberFormat('en');
  const when = (ms) => (ms ? new Date(ms).toISOString().replace('T', ' ').slice(0, 19) + ' UTC' : '—');
  const ago = (ms) => {
    if (!ms) return '—';
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    return s < 90 ? `${s} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
  };

  async function api(path, init = {}) {
    const r = await fetch(path, { credentials: 'same-origin', ...init });
    if (r.status === 401) { location.assign('/ops/login'); throw new ApiError(401, 'logged out'); }
    const body = await r.json().catch(() => ({}));
    if (!r.ok && !(path === '/readyz' && r.status === 503)) throw new ApiError(r.status, body.error || `${r.status} ${r.statusText}`);
    return body;
  }
  const change = (path, body) => api(path, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-beacon-csrf': '1' },
    body: JSON.stringify(body),
  });

  function show(id, ...content) {
    const box = $(`#${id}`);
    box.replaceChildren(...content.filter((c) => c !== null && c !== undefined));
    box.dataset.state = 'ready';
  }
  function failed(id, e) {
    const box = $(`#${id}`);
    box.dataset.state = 'error';
    box.replaceChildren(el('p', { class: 'notice error', role: 'alert', text: `Could not load: ${e.message}` }));
  }
  const table = (head, rows, numeric = []) => el('div', { class: 'scroll' }, el('table', {},
    el('thead', {}, el('tr', {}, ...head.map((h, i) => el('th', { scope: 'col', class: numeric.includes(i) ? 'num' : null, text: h })))),
    el('tbody', {}, ...rows)));
  const badge = (ok, text) => el('span', { class: `badge ${ok ? 'ok' : 'bad'}`, text });

  async function loadHealth() {
    try {
      const r = await api('/readyz');
      const rows = Object.entries(r.checks || {}).map(([name, c]) => el('tr', { 'data-check': name },
        el('td', { text: name }), el('td', {}, badge(c.ok, c.ok ? 'ready' : 'not ready')),
        el('td', { class: 'num', text: `${c.for_s} s` }), el('td', { class: 'num', text: String(c.failures) }),
        el('td', { class: 'muted', text: c.detail || '' })));
      show('health', el('p', {}, badge(r.ready, r.ready ? 'node ready' : 'node not ready')),
        rows.length ? table(['check', 'state', 'for', 'failures', 'detail'], rows, [2, 3]) : el('p', { class: 'notice', text: 'No checks registered.' }));
    } catch (e) { failed('health', e); }
  }

  async function loadIngest() {
    try {
      const r = await api('/v1/ingest');
      const s = r.stream;
      const c = r.consumer;
      const backlog = c.error ? null : (c.pending || 0) + (c.ack_pending || 0);
      const dl = el('dl', { class: 'stats' },
        el('dt', { text: 'events stream' }), el('dd', { text: `${num.format(s.messages)} batches, ${num.format(Math.round(s.bytes / 1024))} KiB, sequence ${num.format(s.last_sequence)}` }),
        el('dt', { text: 'last stored' }), el('dd', { text: ago(s.last_at) }),
        el('dt', { text: 'ingest backlog' }), el('dd', { 'data-backlog': backlog === null ? '' : String(backlog) },
          c.error ? el('span', { class: 'badge bad', text: c.error })
            : el('span', { class: `badge ${backlog === 0 ? 'ok' : backlog < 1000 ? 'warn' : 'bad'}`, text: `${num.format(backlog)} batches` })),
        el('dt', { text: 'committed up to' }), el('dd', { text: c.error ? '—' : `sequence ${num.format(c.acknowledged_sequence)} (${ago(c.last_acknowledged_at)})` }));
      show('ingest', dl);
    } catch (e) { failed('ingest', e); }
  }

  async function loadEdges() {
    try {
      const edges = await api('/v1/edges');
      if (!edges.length) { show('edges', el('p', { class: 'notice', text: 'No live edge.' })); return; }
      show('edges', table(['edge', 'region', 'QUIC', 'HTTP', 'in flight', 'pipelines applied', 'reported'],
        edges.map((e) => el('tr', { 'data-edge': e.edge_id },
          el('td', {}, el('code', { text: e.edge_id })), el('td', { text: e.region || '—' }),
          el('td', { text: e.addr }), el('td', { text: e.http_addr || '—' }),
          el('td', { class: 'num', text: String(e.in_flight) }),
          el('td', { text: Object.entries(e.pipelines || {}).map(([m, rev]) => `${m}@${rev}`).join(', ') || '—' }),
          el('td', { text: ago(e.updated_at) }))), [4]));
    } catch (e) { failed('edges', e); }
  }

  const open = new Set(); // merchants whose history is shown
  // The search (part of an id) and the pages walked: `after` of each page shown so far.
  const listing = { q: '', pages: [null] };
  $('#merchant-search').addEventListener('submit', (e) => {
    e.preventDefault();
    listing.q = $('#merchant-q').value.trim();
    listing.pages = [null];
    loadMerchants();
  });
  const turn = (after) => { if (after === undefined) listing.pages.pop(); else listing.pages.push(after); loadMerchants(); };
  async function loadMerchants() {
    try {
      const params = new URLSearchParams();
      if (listing.q) params.set('q', listing.q);
      const after = listing.pages[listing.pages.length - 1];
      if (after) params.set('after', after);
      const r = await api(`/v1/merchants?${params}`);
      if (!r.merchants.length) {
        show('merchants', el('p', { class: 'notice', text: listing.q ? `No merchant id with “${listing.q}” has a pipeline.` : 'No merchant has a pipeline yet.' }));
        return;
      }
      const rows = [];
      for (const m of r.merchants) {
        rows.push(el('tr', { 'data-merchant': m.id },
          el('td', {}, el('strong', { text: m.name || '' }), el('br'), el('code', { text: m.id })),
          el('td', { text: `v${m.active_version}` }),
          el('td', { text: m.plugins.join(' → ') || '(none)' }),
          el('td', {}, m.canary ? el('span', { class: 'badge warn', text: `v${m.canary[0]} at ${m.canary[1]}%` }) : '—'),
          el('td', { text: `${when(m.changed_at)} by ${m.changed_by || '?'}` }),
          el('td', {}, el('button', {
            type: 'button', 'aria-expanded': String(open.has(m.id)), 'data-history': m.id,
            onclick: () => { if (open.has(m.id)) open.delete(m.id); else open.add(m.id); loadMerchants(); },
            text: open.has(m.id) ? 'Hide history' : 'History',
          }))));
        if (open.has(m.id)) rows.push(el('tr', { class: 'history-row' }, el('td', { colspan: '6' }, await history(m))));
      }
      const pager = listing.pages.length > 1 || r.next
        ? el('p', { class: 'pager' },
          listing.pages.length > 1 ? el('button', { type: 'button', 'data-page': 'previous', onclick: () => turn(), text: 'Previous 500' }) : null,
          ` page ${listing.pages.length} `,
          r.next ? el('button', { type: 'button', 'data-page': 'next', onclick: () => turn(r.next), text: 'Next 500' }) : null)
        : null;
      show('merchants', table(['merchant', 'active', 'plugins', 'canary', 'last change', ''], rows), pager);
    } catch (e) { failed('merchants', e); }
  }

  // A merchant's history, newest first, with one-click rollback to any earlier version and
  // promotion of a running canary (each asks once more before it acts).
  async function history(m) {
    const entries = await api(`/v1/merchants/${encodeURIComponent(m.id)}/pipeline/history`);
    const seen = new Set();
    const items = [];
    for (const h of [...entries].reverse()) {
      const p = h.pipeline;
      if (!p) { items.push(el('li', { class: 'muted', text: `revision ${h.revision}: removed` })); continue; }
      const v = p.active.version;
      const text = `revision ${h.revision}: v${v} active${p.canary ? `, canary v${p.canary.def.version} at ${p.canary.percent}%` : ''} — ${when(p.changed_at)} by ${p.changed_by || '?'}${p.reason ? ` (${p.reason})` : ''}`;
      const action = v !== m.active_version && !seen.has(v)
        ? confirmButton(`Roll back to v${v}`, `Make v${v} active for ${m.id}?`, 'danger',
          () => change(`/v1/merchants/${encodeURIComponent(m.id)}/pipeline/rollback`, { to: v, expect_revision: m.revision, reason: 'rolled back from the operator page' }), `rollback-${v}`)
        : null;
      seen.add(v);
      items.push(el('li', {}, text, ' ', action));
    }
    const promote = m.canary
      ? confirmButton(`Promote canary v${m.canary[0]}`, `Make v${m.canary[0]} active for all visitors of ${m.id}?`, 'primary',
        () => change(`/v1/merchants/${encodeURIComponent(m.id)}/pipeline/promote`, { expect_revision: m.revision, reason: 'promoted from the operator page' }), 'promote')
      : null;
    return el('div', {}, promote, el('ol', { class: 'history', reversed: true }, ...items));
  }

  function confirmButton(label, question, kind, act, id) {
    const wrap = el('span', { class: 'confirm' });
    const first = el('button', {
      type: 'button', class: kind, 'data-action': id, text: label,
      onclick: () => {
        const yes = el('button', {
          type: 'button', class: kind, 'data-confirm': id, text: 'Yes, do it',
          onclick: async () => {
            yes.disabled = true;
            const status = $('#action');
            try {
              const r = await act();
              status.className = 'action ok';
              status.textContent = `Done: ${r.pipeline.merchant_id} now runs v${r.pipeline.active.version} (revision ${r.revision}).`;
            } catch (e) {
              status.className = 'action error';
              status.textContent = `Refused: ${e.message}`;
            }
            await loadMerchants();
            $('#merchants').focus();
          },
        });
        const no = el('button', { type: 'button', text: 'Cancel', onclick: () => wrap.replaceChildren(first) });
        wrap.replaceChildren(el('span', { text: question }), yes, no);
        yes.focus();
      },
    });
    wrap.append(first);
    return wrap;
  }

  async function loadFailed() {
    try {
      const r = await api('/v1/failed');
      if (!r.groups.length) { show('failed', el('p', { class: 'notice', text: 'No failed events in the last 24 hours.' })); return; }
      show('failed', table(['merchant', 'stage', 'plugin', 'version', 'events', 'last', 'example reason'],
        r.groups.map((g) => el('tr', {},
          el('td', {}, el('code', { text: g.merchant_id })), el('td', { text: g.stage }),
          el('td', { text: g.plugin || '—' }), el('td', { text: g.pipeline_version == null ? '—' : `v${g.pipeline_version}` }),
          el('td', { class: 'num', text: num.format(g.events) }), el('td', { text: g.last_at || '' }),
          el('td', { class: 'muted', text: g.example || '' }))), [4]));
    } catch (e) {
      if (e.status === 404) show('failed', el('p', { class: 'notice', text: 'This admin server has no warehouse to read failed events from.' }));
      else failed('failed', e);
    }
  }

  async function refresh(all) {
    const jobs = [loadHealth(), loadIngest(), loadEdges()];
    if (all) jobs.push(loadMerchants(), loadFailed());
    await Promise.all(jobs);
    $('#updated').textContent = `updated ${new Date().toLocaleTimeString('en-GB')}`;
    document.body.dataset.ready = 'true';
  }
  refresh(true);
  // The pipelines table too, unless the operator is in the middle of confirming a change (a
  // change names the revision shown, so a stale view is refused, never acted on).
  setInterval(() => refresh(!document.querySelector('[data-confirm]')), 10000);
})();
