"""Drives the operator page in a real browser (Debian's headless Chromium, Selenium) and
prints what it showed and did as JSON, for tests/dashboard.rs to check against the admin API.

usage: ops_browser.py ADMIN_URL ADMIN_TOKEN SCREENSHOT_DIR MERCHANT_ID

Steps: a wrong token (refused), the admin token; readiness, ingest, edges, the merchant's
pipeline with its canary; a search by part of its id, and one that finds nothing; open its history, promote the canary (asked twice), then roll back
to the version before (asked twice); log out. A screenshot of the page goes to SCREENSHOT_DIR.
"""

import json
import os
import sys

from browser import WAIT, chrome, login
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

BASE, TOKEN, SHOTS, MERCHANT = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3], sys.argv[4]
os.makedirs(SHOTS, exist_ok=True)

SETTLED = """
if (document.body.dataset.ready !== 'true') return false;
return [...document.querySelectorAll('.body')].every(e => e.dataset.state && e.dataset.state !== 'loading');
"""

SEEN = """
const row = document.querySelector(`#merchants tr[data-merchant="${arguments[0]}"]`);
return {
  states: Object.fromEntries([...document.querySelectorAll('.body')].map(e => [e.id, e.dataset.state])),
  checks: [...document.querySelectorAll('#health tr[data-check]')].map(tr => tr.dataset.check),
  edges: [...document.querySelectorAll('#edges tr[data-edge]')].map(tr => tr.dataset.edge),
  backlog: document.querySelector('#ingest [data-backlog]')?.dataset.backlog ?? null,
  merchant_row: row ? row.textContent : null,
  operator: document.querySelector('.who strong').textContent,
  action: document.querySelector('#action').textContent,
};
"""


def settle(driver):
    WebDriverWait(driver, WAIT).until(lambda d: d.execute_script(SETTLED))


def click(driver, css):
    WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
    driver.find_element(By.CSS_SELECTOR, css).click()


def act(driver, action):
    """Clicks an action's button, then its confirmation, and waits for the outcome."""
    driver.execute_script("document.querySelector('#action').textContent = ''")
    click(driver, f'[data-action="{action}"]')
    click(driver, f'[data-confirm="{action}"]')
    WebDriverWait(driver, WAIT).until(
        lambda d: d.find_element(By.ID, "action").text.strip() != "")
    settle(driver)
    return driver.find_element(By.ID, "action").text


def search(driver, text):
    """Searches merchants by part of an id; the ids listed (or the notice when none)."""
    box = driver.find_element(By.ID, "merchant-q")
    box.clear()
    box.send_keys(text)
    driver.execute_script("document.querySelector('#merchants').dataset.state = 'loading'")
    driver.find_element(By.CSS_SELECTOR, "#merchant-search button").click()
    settle(driver)
    return driver.execute_script("""
const rows = [...document.querySelectorAll('#merchants tr[data-merchant]')].map(tr => tr.dataset.merchant);
return rows.length ? rows : document.querySelector('#merchants .notice')?.textContent ?? null;
""")


def main():
    driver = chrome(1280, 1400)
    out = {}
    try:
        out["first_url"], out["login_error"] = login(
            driver, f"{BASE}/ops/", "ba_not_an_admin_token", TOKEN, "/ops/")
        settle(driver)
        out["before"] = driver.execute_script(SEEN, MERCHANT)
        out["searched"] = search(driver, MERCHANT[-6:].upper())
        out["searched_nothing"] = search(driver, "no-such-merchant")
        search(driver, "")
        click(driver, f'[data-history="{MERCHANT}"]')
        WebDriverWait(driver, WAIT).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, '[data-action="promote"]'))
        driver.save_screenshot(os.path.join(SHOTS, "ops.png"))
        out["promoted"] = act(driver, "promote")
        out["rolled_back"] = act(driver, "rollback-1")
        out["after"] = driver.execute_script(SEEN, MERCHANT)
        out["console_errors"] = [
            e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        click(driver, ".logout button")
        WebDriverWait(driver, WAIT).until(lambda d: d.current_url.endswith("/ops/login"))
        driver.get(f"{BASE}/ops/")
        out["after_logout_url"] = driver.current_url
    finally:
        driver.quit()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
