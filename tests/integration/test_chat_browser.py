"""The chat page (/chat) in real headless Chromium against a real 5-server cluster, driven like the
dashboard test (Debian's chromium + chromium-driver through Selenium; nothing is downloaded).

One cluster, one story: two browsers log in on different servers and chat; one joins a room hosted by
the other's server and is routed there by itself; a TCP client speaking the Java client's protocol shares
the room; text from others stays text; the coordinator is SIGKILLed mid-conversation and both keep
chatting; then the browsers' server is SIGKILLed and each page gets back in elsewhere under its name, or
(when a TCP client grabbed the name first) says plainly why it cannot.

A screenshot becomes docs/chat.png when that file is missing or CHATMESH_UPDATE_SCREENSHOT=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_dashboard_browser import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS, save_screenshot
from tests.support import REPO, TEST_ADMIN_TOKEN, ChatClient, Cluster, start_cluster, wait_until

SCREENSHOT = REPO / "docs" / "chat.png"
# A page reacts within a second on an idle machine; this is for a loaded 2-core CI box.
PAGE_S = 15.0

READ_CHAT = """
const $ = (id) => document.getElementById(id);
return {
  phase: state.phase,
  server: state.serverId,
  identity: state.identity,
  room: $('room').textContent,
  status: $('status').textContent,
  rooms: Array.from(document.querySelectorAll('#rooms .room')).map(b => b.dataset.room),
  members: Array.from(document.querySelectorAll('#members .member')).map(
    li => [li.firstChild.textContent, li.classList.contains('owner')]),
  messages: Array.from(document.querySelectorAll('#messages .msg')).map(
    li => [li.dataset.identity, li.querySelector('.body').textContent]),
  events: Array.from(document.querySelectorAll('#messages .event')).map(li => li.textContent),
  notice: $('notice').hidden ? '' : $('notice').textContent,
  loginError: $('login-error').hidden ? '' : $('login-error').textContent,
};
"""


@pytest.fixture
def browsers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Any]]:
    """A factory of headless Chromium windows (each with its own profile); all quit in teardown."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        pytest.skip(f"!!! BROWSER TEST NOT RUN: selenium is not installed ({exc}); pip install selenium")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip(f"!!! BROWSER TEST NOT RUN: {path} is missing; apt-get install -y chromium chromium-driver")
    monkeypatch.setenv("SE_OFFLINE", "true")
    drivers: list[Any] = []

    def open_browser(name: str) -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag.replace("--window-size=1440,960", "--window-size=1100,720"))
        options.add_argument(f"--user-data-dir={tmp_path / f'profile-{name}'}")
        service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / f"chromedriver-{name}.log"))
        try:
            driver = webdriver.Chrome(service=service, options=options)
        except WebDriverException as exc:
            pytest.skip(f"!!! BROWSER TEST NOT RUN: chromium could not be started: {exc.msg}")
        driver.set_page_load_timeout(20)
        drivers.append(driver)
        return driver

    try:
        yield open_browser
    finally:
        for driver in drivers:
            with contextlib.suppress(Exception):
                driver.quit()


def read(driver: Any) -> dict[str, Any]:
    return dict(driver.execute_script(READ_CHAT))


def wait_page(driver: Any, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = PAGE_S) -> None:
    try:
        wait_until(lambda: predicate(read(driver)), timeout, 0.05, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the page shows {read(driver)}") from None


def login(driver: Any, url: str, identity: str) -> None:
    driver.get(url + "/chat")
    assert driver.title.startswith("chatmesh")
    wait_until(lambda: driver.execute_script("return state.servers.length > 0"), PAGE_S, 0.05, "the server list")
    driver.find_element("id", "identity").send_keys(identity)
    driver.find_element("id", "login-button").click()
    wait_page(driver, lambda p: p["phase"] == "chat" and p["room"].startswith("MainHall-"), f"{identity} logged in")


def say(driver: Any, content: str) -> None:
    box = driver.find_element("id", "text")
    box.send_keys(content)
    driver.find_element("id", "send").click()


def sees(content: str, author: str) -> Callable[[dict[str, Any]], bool]:
    return lambda p: [author, content] in p["messages"]


def click_room(driver: Any, room: str) -> None:
    wait_page(driver, lambda p: room in p["rooms"], f"room {room} in the list")
    driver.find_element("css selector", f'#rooms .room[data-room="{room}"]').click()


def test_two_browsers_chat_through_routes_a_coordinator_kill_and_their_servers_death(
    browsers: Callable[[str], Any], tmp_path: Path
) -> None:
    with start_cluster(tmp_path, 5) as cluster:
        _story(cluster, browsers("alice"), browsers("bob"), tmp_path)


def _story(cluster: Cluster, alice: Any, bob: Any, tmp_path: Path) -> None:
    login(alice, cluster.admin_url("s1"), "Alice")
    login(bob, cluster.admin_url("s2"), "Bob")
    assert read(alice)["server"] == "s1" and read(bob)["server"] == "s2"

    # Alice makes a room on s1; Bob joins it from s2 and is routed to s1 by his page.
    alice.find_element("id", "new-room").send_keys("kitchen")
    alice.find_element("id", "create-button").click()
    wait_page(alice, lambda p: p["room"] == "kitchen" and p["members"] == [["Alice", True]], "Alice in kitchen")
    bob.find_element("id", "refresh").click()
    click_room(bob, "kitchen")
    wait_page(bob, lambda p: p["room"] == "kitchen" and p["server"] == "s1", "Bob routed to s1's kitchen")
    wait_page(bob, lambda p: sorted(p["members"]) == [["Alice", True], ["Bob", False]], "members, owner marked")
    assert any("switched to server s1" in e for e in read(bob)["events"])

    say(alice, "hi Bob")
    wait_page(bob, sees("hi Bob", "Alice"), "Bob to see Alice's line")
    say(bob, "hello Alice")
    wait_page(alice, sees("hello Alice", "Bob"), "Alice to see Bob's line")

    # A client of the Java client's protocol, over TCP, in the same room; its markup stays text.
    carl = ChatClient.connect(cluster.client_address("s1"))
    try:
        assert carl.login("Carl")
        carl.send({"type": "joinroom", "roomid": "kitchen"})
        carl_sees = []
        deadline = time.monotonic() + PAGE_S
        while (m := carl.recv())["type"] != "roomchange" or m["identity"] != "Carl" or m["roomid"] != "kitchen":
            assert time.monotonic() < deadline
        carl.send({"type": "message", "content": "hi both, I am on the terminal client"})
        for page in (alice, bob):
            wait_page(page, sees("hi both, I am on the terminal client", "Carl"), "Carl's line")
        say(bob, "hi Carl")
        while (m := carl.recv())["type"] != "message":
            carl_sees.append(m)
        assert m == {"type": "message", "identity": "Bob", "content": "hi Carl"}

        save_screenshot(alice, tmp_path / "chat.png")
        if not SCREENSHOT.exists() or os.environ.get("CHATMESH_UPDATE_SCREENSHOT") == "1":
            save_screenshot(alice, SCREENSHOT)

        # The coordinator dies mid-conversation: the chat goes on, and the cluster keeps approving.
        cluster.kill("s5")
        say(alice, "did something happen?")
        wait_page(bob, sees("did something happen?", "Alice"), "Bob to see Alice's line after the kill")
        say(bob, "nothing I noticed")
        wait_page(alice, sees("nothing I noticed", "Bob"), "Alice to see Bob's line after the kill")
        assert cluster.wait_coordinator("s4", 20) == "s4"
        say(bob, "still here")
        wait_page(alice, sees("still here", "Bob"), "Alice to see Bob after the new coordinator")
    finally:
        carl.close()

    # Now their own server dies. A TCP client on s2 tries to take Bob's name meanwhile: Bob's page must
    # either get back in as Bob, or say plainly that the name is someone else's now.
    cluster.kill("s1")
    grabber = None
    deadline = time.monotonic() + PAGE_S
    while time.monotonic() < deadline and read(bob)["phase"] != "chat":
        attempt = ChatClient.connect(cluster.client_address("s2"))
        if attempt.login("Bob"):
            grabber = attempt
            break
        attempt.close()
        time.sleep(0.05)
    try:
        wait_page(alice, lambda p: p["phase"] == "chat" and p["server"] not in ("s1", None), "Alice back in")
        assert read(alice)["identity"] == "Alice" and "Reconnected" in read(alice)["notice"]
        if grabber is None:
            wait_page(bob, lambda p: p["phase"] == "chat" and p["server"] not in ("s1", None), "Bob back in")
            room = read(alice)["room"]
            if read(bob)["room"] != room:
                bob.find_element("id", "refresh").click()
                click_room(bob, room)
                wait_page(bob, lambda p: p["room"] == room, f"Bob in {room}")
            say(alice, "we made it")
            wait_page(bob, sees("we made it", "Alice"), "Bob to see Alice after both moved")
            print(f"both pages reconnected: Alice on {read(alice)['server']}, Bob on {read(bob)['server']}")
        else:
            wait_page(bob, lambda p: p["phase"] == "lost" and "someone else" in p["notice"], "Bob told why")
            print(f"Bob's name was taken first; his page says: {read(bob)['notice']}")
    finally:
        if grabber is not None:
            grabber.close()


def test_a_taken_name_is_refused_plainly_and_the_page_fits_a_phone(browsers: Callable[[str], Any],
                                                                     tmp_path: Path) -> None:
    with start_cluster(tmp_path, 1) as cluster:
        holder = ChatClient.connect(cluster.client_address("s1"))
        try:
            assert holder.login("Taken")
            page = browsers("phone")
            page.set_window_size(390, 780)
            page.get(cluster.admin_url("s1") + "/chat")
            wait_until(lambda: page.execute_script("return state.servers.length > 0"), PAGE_S, 0.05, "servers")
            page.find_element("id", "identity").send_keys("Taken")
            page.find_element("id", "login-button").click()
            wait_page(page, lambda p: "already in use" in p["loginError"], "the refusal")
            page.find_element("id", "identity").clear()
            page.find_element("id", "identity").send_keys("Free")
            page.find_element("id", "login-button").click()
            wait_page(page, lambda p: p["phase"] == "chat", "logged in as Free")
            holder.send({"type": "message", "content": "<img src=x onerror=window.pwned=1> is text"})
            wait_page(page, sees("<img src=x onerror=window.pwned=1> is text", "Taken"), "the markup line")
            assert page.execute_script("return window.pwned === undefined && !document.querySelector('#messages img')")
            for i in range(39):
                holder.send({"type": "message", "content": f"line {i} " + "word " * 30})
            wait_page(page, lambda p: len(p["messages"]) == 40, "forty lines")
            assert page.execute_script(
                "const m = document.getElementById('messages');"
                "return m.scrollHeight - m.scrollTop - m.clientHeight < 80"), "the view follows the newest line"
            assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
            save_screenshot(page, tmp_path / "chat-phone.png")
            # Dropped by its (still living) server, e.g. kicked: the page gets back in under its name there.
            kick = urllib.request.Request(
                cluster.admin_url("s1") + "/admin/kick", data=json.dumps({"identity": "Free"}).encode(),
                headers={"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}, method="POST")  # fmt: skip
            urllib.request.urlopen(kick, timeout=5).close()
            wait_page(page, lambda p: "Reconnected to server s1 as Free" in p["notice"], "the page back in")
            holder.send({"type": "message", "content": "welcome back"})
            wait_page(page, sees("welcome back", "Taken"), "a line after the reconnection")
        finally:
            holder.close()
