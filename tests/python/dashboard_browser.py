"""Drives the merchant dashboard in a real browser (Debian's headless Chromium through its
ChromeDriver, with Selenium) as a person would, and prints what the page showed as JSON, for
tests/dashboard.rs to check against the metrics API.

usage: dashboard_browser.py BASE_URL READ_TOKEN SCREENSHOT_DIR

Steps: open the dashboard (redirected to the login), a wrong token (refused), the right one;
read the top figures and the sources panel for today; 7 days; click a source row (a filter);
open the shared URL afresh (same figures); a keyboard-only pass (30 days, then a filter, by
Tab and Enter); phone width (no sideways scrolling); log out. Screenshots at desktop and phone
width go to SCREENSHOT_DIR.
"""

import json
import os
import sys
import time
from urllib.parse import parse_qs, urlparse

from browser import WAIT, chrome, login
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.support.ui import WebDriverWait

BASE, TOKEN, SHOTS = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
os.makedirs(SHOTS, exist_ok=True)

# Every section has settled: figures, chart and panels are ready, empty or refused.
SETTLED = """
const b = document.body;
if (b.dataset.ready !== 'true') return false;
const states = [...document.querySelectorAll('#stats, #chart, .panel-body, #canary:not([hidden]), #realtime')].map(e => e.dataset.state);
return states.length > 2 && states.every(s => s && s !== 'loading');
"""

FIGURES = """
const val = (m) => {
  const v = document.querySelector(`#stats [data-metric="${m}"] .value`);
  return v && v.dataset.value !== '' ? Number(v.dataset.value) : null;
};
const rows = (panel) => [...document.querySelectorAll(`#panel-${panel} tbody tr`)].map(tr => ({
  name: tr.querySelector('th').textContent,
  metrics: [...tr.querySelectorAll('td')].map(td => td.dataset.value === '' ? null : Number(td.dataset.value)),
}));
return {
  states: Object.fromEntries([...document.querySelectorAll('#stats, #chart')].map(e => [e.id, e.dataset.state])),
  visitors: val('visitors'), pageviews: val('pageviews'), visits: val('visits'),
  bounce_rate: val('bounce_rate'),
  sources: rows('sources'), pages: rows('pages'),
  chart_points: Number(document.querySelector('#chart').dataset.points || 0),
  markers: [...document.querySelectorAll('#markers li')].map(li => li.className.replace('marker ', '')),
  canary: document.querySelector('#canary').hidden ? null : document.querySelector('#canary p').textContent,
  split: [...document.querySelectorAll('#canary tbody tr')].map(tr => ({
    version: tr.dataset.version,
    metrics: [...tr.querySelectorAll('td[data-value]')].map(td => Number(td.dataset.value)),
  })),
  filters: [...document.querySelectorAll('#filters .chip')].map(c => c.textContent),
  range_label: document.querySelector('#range-label').textContent,
  realtime: document.querySelector('#realtime').dataset.value ?? null,
};
"""


def settle(driver):
    WebDriverWait(driver, WAIT).until(lambda d: d.execute_script(SETTLED))


def figures(driver):
    out = driver.execute_script(FIGURES)
    out["query"] = parse_qs(urlparse(driver.current_url).query)
    return out


def press_tab_until(driver, css, limit=120):
    """Tabs through the page until the focused element matches `css`; how many presses."""
    for n in range(1, limit + 1):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        if driver.execute_script("return document.activeElement.matches(arguments[0])", css):
            return n
    raise AssertionError(f"never reached {css} with Tab")


def main():
    driver = chrome(1280, 1800)
    out = {"urls": []}
    try:
        out["first_url"], out["login_error"] = login(
            driver, f"{BASE}/dashboard/", "br_not_a_token", TOKEN, "/dashboard/",
            shot=os.path.join(SHOTS, "login.png"))
        settle(driver)
        cookie = driver.get_cookie("beacon_session") or {}
        out["cookie"] = {k: cookie.get(k) for k in ("httpOnly", "sameSite", "path")}
        out["token_in_storage"] = driver.execute_script(
            "return JSON.stringify(localStorage).includes(arguments[0]) || "
            "JSON.stringify(sessionStorage).includes(arguments[0]) || document.cookie.includes(arguments[0])",
            TOKEN)
        out["day"] = figures(driver)
        out["urls"].append(driver.current_url)
        driver.save_screenshot(os.path.join(SHOTS, "dashboard-desktop.png"))

        # 7 days.
        driver.find_element(By.CSS_SELECTOR, '.ranges [data-range="7d"]').click()
        settle(driver)
        out["week"] = figures(driver)
        out["urls"].append(driver.current_url)

        # A click on the first source filters everything by it.
        first = driver.find_element(By.CSS_SELECTOR, "#panel-sources .filter")
        out["filter_value"] = first.get_attribute("data-value")
        first.click()
        settle(driver)
        out["filtered"] = figures(driver)
        shared = driver.current_url
        out["urls"].append(shared)
        driver.save_screenshot(os.path.join(SHOTS, "dashboard-filtered.png"))

        # The URL is the view: opened afresh, it shows the same.
        driver.get(f"{BASE}/dashboard/")
        settle(driver)
        driver.get(shared)
        settle(driver)
        out["shared"] = figures(driver)

        # Keyboard only: back to today, then 30 days and a filter by Tab and Enter.
        driver.get(f"{BASE}/dashboard/")
        settle(driver)
        driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);")
        out["tabs_to_range"] = press_tab_until(driver, '.ranges [data-range="30d"]')
        ActionChains(driver).send_keys(Keys.ENTER).perform()
        WebDriverWait(driver, WAIT).until(lambda d: "range=30d" in d.current_url)
        settle(driver)
        out["tabs_to_filter"] = press_tab_until(driver, "#panel-sources .filter")
        focused = driver.execute_script("return document.activeElement.dataset.value")
        ActionChains(driver).send_keys(Keys.ENTER).perform()
        WebDriverWait(driver, WAIT).until(lambda d: "f=" in d.current_url)
        settle(driver)
        out["keyboard"] = {"filter_value": focused, **figures(driver)}
        out["urls"].append(driver.current_url)

        # Phone width: nothing scrolls sideways.
        driver.get(f"{BASE}/dashboard/")
        driver.set_window_size(390, 1800)
        settle(driver)
        # Let the chart take the new width (its resize handler waits 150 ms for the last event).
        WebDriverWait(driver, WAIT).until(lambda d: d.execute_script(
            "const u = document.querySelector('#chart .uplot'); return !u || u.offsetWidth <= innerWidth"))
        out["phone"] = {
            "scroll_width": driver.execute_script("return document.documentElement.scrollWidth"),
            "inner_width": driver.execute_script("return innerWidth"),
        }
        driver.save_screenshot(os.path.join(SHOTS, "dashboard-phone.png"))
        driver.set_window_size(1280, 1800)

        # Log out: the page is closed again.
        driver.find_element(By.CSS_SELECTOR, ".logout button").click()
        WebDriverWait(driver, WAIT).until(lambda d: urlparse(d.current_url).path == "/dashboard/login")
        driver.get(f"{BASE}/dashboard/")
        out["after_logout_url"] = driver.current_url
        out["console_errors"] = [
            e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"
            and "favicon" not in e["message"]
        ]
    finally:
        driver.quit()
    print(json.dumps(out))


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"browser pass took {time.monotonic() - started:.1f} s", file=sys.stderr)
