// What Beacon's pages (the merchant dashboard, the operator page) share. DOM is built with
// text and attributes only, never parsed markup, so no API value can become HTML.
'use strict';
window.beaconPage = (() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const el = (tag, attrs = {}, ...children) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  };
  // An API answer other than 2xx: its status and the API's `error` message.
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  return Object.freeze({ $, el, ApiError });
})();
