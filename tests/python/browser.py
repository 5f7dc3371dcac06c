"""What the browser tests share: Debian's headless Chromium through its ChromeDriver
(Selenium), and a login through a page's form (a wrong token first, which must be refused)."""

import os

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

WAIT = 60


def chrome(width, height):
    # A browser far west of UTC (and of the merchants' zones): the pages must show the
    # merchant's times whatever zone the viewer's browser is in.
    os.environ["TZ"] = os.environ.get("BEACON_BROWSER_TZ", "America/Los_Angeles")
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("BEACON_CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(os.environ.get("BEACON_CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=options)


def login(driver, page, wrong, token, landed, shot=None):
    """Opens `page` (expecting its login form), tries `wrong` (returns the refusal shown),
    then `token`, and waits until the URL ends with `landed`. `shot`: a screenshot file of the
    refusal. The refused attempt's 401 is
    taken out of the browser's log, so what remains there is the page's own."""
    driver.get(page)
    first_url = driver.current_url
    driver.find_element(By.ID, "token").send_keys(wrong)
    driver.find_element(By.ID, "login").click()
    refusal = WebDriverWait(driver, WAIT).until(
        lambda d: d.find_elements(By.ID, "login-error"))[0].text
    if shot:
        driver.save_screenshot(shot)
    WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.ID, "token"))
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, WAIT).until(lambda d: d.current_url.split("?")[0].endswith(landed))
    driver.get_log("browser")
    return first_url, refusal
