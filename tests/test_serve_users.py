"""The user store (SQLite, versioned, durable), `palm users`, the API key, and the crash test:
1,000 users written by 8 concurrent writers through `palm serve`, killed with SIGKILL in the
middle; every acknowledged write is there afterwards and the store passes its integrity check."""

import shutil
import sqlite3
import threading

import openai
import pytest
import yaml

from palm_tasks.serve.users import MIGRATIONS, UserIdError, UserStore, UserStoreError, check_user_id
from serving import PROMPT, http_request, preferences_crash, serve, start_palm_serve

KEY = "sk-test-users"
W = {"safety": 0.5, "humor": 0.25, "brevity": 0.25}


def test_the_store_keeps_users_across_opens_and_versions_its_schema(tmp_path):
    path = tmp_path / "deep" / "users.db"
    store = UserStore(path)
    assert store.get("alice") is None and store.count() == 0  # created on first use
    first = store.set("alice", W)
    later = UserStore(path).set("alice", {**W, "safety": 0.0})
    assert later.created_at == first.created_at and later.updated_at >= first.updated_at
    store.set("bob", W)
    assert [p.user for p in UserStore(path).list()] == ["alice", "bob"]
    assert [p.user for p in store.list(limit=1, after="alice")] == ["bob"]
    assert UserStore(path).get("alice").weights == {**W, "safety": 0.0}
    assert store.delete("alice") is True and store.delete("alice") is False
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(UserStoreError, match="newer than this palm knows"):
        UserStore(path).get("bob")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(UserStoreError, match="not a usable SQLite database"):
        UserStore(garbage).get("bob")
    assert garbage.read_bytes() == b"not a database at all" * 100  # refused, not overwritten


def test_concurrent_writers_in_one_process(tmp_path):
    store = UserStore(tmp_path / "users.db")

    def write(t):
        for i in range(50):
            UserStore(store.path).set(f"u{t}-{i}", W)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 400 and store.integrity() == "ok"


@pytest.mark.parametrize("user, problem", [
    ("", "1 to 256"), ("x" * 10_000, "has 10000"), ("../../etc/passwd", "characters other"), ("..", "only dots"),
    ("a b", "characters other"), ("a\x00b", "characters other"), ("é", "characters other"), (5, "a string"),
])
def test_bad_user_ids(user, problem):
    with pytest.raises(UserIdError, match=problem):
        check_user_id(user)


def test_palm_users_commands(registered, tmp_path, capsys):
    from flows.cli import main

    root = tmp_path / "project"
    shutil.copytree(registered[0], root)
    common = ["--root", str(root), "--params", str(root / "params.yaml")]
    assert main(["users", "set", "alice", "--weights", "safety=2,humor=1,brevity=1", *common]) == 0
    assert "user alice: safety=0.5, humor=0.25, brevity=0.25 (normalized)" in capsys.readouterr().out
    assert main(["users", "show", "alice", "--json", *common]) == 0
    assert '"weights": {"safety": 0.5, "humor": 0.25, "brevity": 0.25}' in capsys.readouterr().out
    assert main(["users", "set", "bob", "--weights", "safety=1,humor=0,brevity=0", *common]) == 0
    assert main(["users", "list", *common]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["alice\tsafety=0.5, humor=0.25, brevity=0.25",
                                                        "bob\tsafety=1, humor=0, brevity=0"]
    assert UserStore(root / "mlruns" / "users.db").count() == 2  # beside the MLflow store
    for args, code, message in [
        (["set", "../x", "--weights", "safety=1,humor=0,brevity=0"], 2, "characters other"),
        (["set", "carol", "--weights", "safety=-1,humor=0,brevity=0"], 2, "negative"),
        (["set", "carol", "--weights", "safety=nan,humor=0,brevity=0"], 2, "finite"),
        (["set", "carol", "--weights", "safety=1,humor=0"], 2, "missing trait"),
        (["show", "nobody"], 1, "no preferences stored for user 'nobody'"),
        (["delete", "nobody"], 1, "no preferences stored"),
        (["list", "--limit", "0"], 2, "invalid count"),
    ]:
        try:
            got = main(["users", *args, *common])
        except SystemExit as exc:  # argparse refuses the value before main runs
            got = exc.code
        assert got == code, args
        err = capsys.readouterr().err
        assert err.startswith("palm: error: ") and message in err and err.count("\n") == 1, err
    assert UserStore(root / "mlruns" / "users.db").count() == 2  # nothing lost
    assert main(["users", "delete", "bob", *common]) == 0
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["serve"] = {"users_db": "../outside.db"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["users", "list", *common]) == 2
    assert "serve.users_db" in capsys.readouterr().err and not (root.parent / "outside.db").exists()


def test_the_api_key_guards_every_v1_request_and_health_stays_open(registered, tmp_path):
    s = serve(registered, tmp_path, api_key=KEY)
    try:
        for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/chat/completions",
                                                               {"model": "palm", "messages": PROMPT}),
                                   ("POST", "/v1/completions", {"model": "palm", "prompt": "x"}),
                                   ("PUT", "/v1/users/alice/preferences", {"weights": W}),
                                   ("GET", "/v1/users/alice/preferences", None),
                                   ("DELETE", "/v1/users/alice/preferences", None),
                                   ("POST", "/v1/portfolio/reload", None), ("POST", "/route", {"weights": W}),
                                   ("GET", "/v1/nothing", None)]:
            for key in (None, "wrong", KEY[:-1]):
                status, answer = s.request(method, path, body, key=key)
                assert status == 401, (method, path, key)
                assert answer["error"]["code"] == "invalid_api_key" and set(answer["error"]) == {
                    "message", "type", "param", "code"}
                assert KEY not in answer["error"]["message"]
        assert s.request("GET", "/health", key=None)[0] == 200
        assert s.request("PUT", "/v1/users/alice/preferences", {"weights": W})[0] == 200  # with the key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.client.base_url, api_key="sk-wrong", max_retries=0).models.list()
        assert s.client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2, user="alice") \
            .model_extra["palm"]["source"] == "user"
    finally:
        s.stop()
        s.live.close()


def test_without_a_key_preferences_cannot_be_written_over_http(registered, tmp_path):
    s = serve(registered, tmp_path)
    try:
        s.users.set("alice", W)
        status, answer = s.request("PUT", "/v1/users/alice/preferences", {"weights": W})
        assert status == 403 and answer["error"]["code"] == "api_key_required"
        assert s.request("DELETE", "/v1/users/alice/preferences")[0] == 403
        assert s.users.get("alice").weights == W  # nothing changed
        assert s.request("GET", "/v1/users/alice/preferences")[1]["weights"] == W  # reading is open
    finally:
        s.stop()
        s.live.close()


def test_palm_serve_with_an_api_key_survives_sigkill_without_losing_an_acknowledged_write(registered, tmp_path):
    """The issue's crash test, through `palm serve` started as a user starts it (the key from
    PALM_API_KEY, and --api-key overriding it)."""
    root = tmp_path / "project"
    shutil.copytree(registered[0], root)
    process, url = start_palm_serve(root, "--api-key", KEY, env={"PALM_API_KEY": "not-this-one"})
    try:
        address = tuple(url.removeprefix("http://").split(":"))
        address = (address[0], int(address[1]))
        assert http_request(address, "GET", "/v1/models")[0] == 401
        assert http_request(address, "GET", "/v1/models", headers={"Authorization": "Bearer not-this-one"})[0] == 401
        assert http_request(address, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
        assert http_request(address, "GET", "/health")[0] == 200
    finally:
        process.terminate()
        process.wait(timeout=60)
    figures = preferences_crash(lambda: start_palm_serve(root, env={"PALM_API_KEY": KEY}), root / "mlruns" / "users.db",
                                ["safety", "humor", "brevity"], KEY)
    print("preferences crash test:", figures)
    assert figures["refused"] == []  # every write acknowledged or sent again, none answered otherwise
    assert figures["acknowledged"] == figures["users_stored"] == 1000
    assert 0 < figures["acknowledged_before_kill"] < 1000
    assert figures["missing"] == figures["wrong"] == 0 and figures["integrity"] == "ok"
