"""JSON log lines: the fields Logstash reads, secrets masked, a daily file beside stdout."""

import calendar
import io
import json
import logging
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.logfile import DailyLogFile

import sse_twisted._logging
from sse_twisted._logging import JSONLogObserver, bridge_standard_logging, mask_subscribe_path
from tests.logs import json_log
from tests.secrets_tracking import new_password

NONCE = "3c9d2f7e-1b4a-4e8d-a6c5-7f0e2b9d4c31"


def emit(observer: JSONLogObserver) -> Logger:
    publisher = LogPublisher(observer)
    return Logger(namespace="sse_twisted.test", observer=publisher)


def test_each_event_is_one_json_line_with_the_logstash_fields(tmp_path: Path) -> None:
    stdout = io.StringIO()
    observer = JSONLogObserver("prod", "sse", tmp_path / "logs", stream=stdout)
    emit(observer).warn(
        "skipped message at offset {offset}", offset=12, correlation_id="abc", reason="bad"
    )
    observer.close()
    [line] = stdout.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "skipped message at offset 12"
    assert record["@level"] == "warn"
    assert record["env"] == "prod"
    assert record["index"] == "sse"
    assert record["correlation_id"] == "abc"
    assert record["offset"] == 12
    assert record["reason"] == "bad"
    assert record["@timestamp"].endswith("+00:00")
    assert (tmp_path / "logs" / "sse.log").read_text().splitlines() == [line]


def test_failures_carry_the_error_and_traceback() -> None:
    stdout = io.StringIO()
    observer = JSONLogObserver("dev", "sse", None, stream=stdout)
    try:
        raise ValueError("broken")
    except ValueError:
        emit(observer).failure("it failed")
    record = json.loads(stdout.getvalue())
    assert record["@level"] == "critical"
    assert record["error"] == "broken"
    assert "ValueError" in record["traceback"]


def test_configured_secrets_and_subscribe_tokens_never_reach_a_line() -> None:
    stdout = io.StringIO()
    observer = JSONLogObserver("dev", "sse", None, secrets=["hunter2", ""], stream=stdout)
    log = emit(observer)
    log.info("connecting with {password}", password="hunter2")
    log.info("GET {path}", path=f"/subscribe/a/b/{NONCE}?x=1")
    output = stdout.getvalue()
    assert "hunter2" not in output
    assert NONCE not in output
    assert "/subscribe/a/b/****?x=1" in output


def test_mask_subscribe_path_keeps_topic_and_userid() -> None:
    assert mask_subscribe_path(f"GET /subscribe/t/u/{NONCE} 200") == "GET /subscribe/t/u/**** 200"


def test_levels_are_named_as_logstash_expects() -> None:
    stdout = io.StringIO()
    log = emit(JSONLogObserver("dev", "sse", None, stream=stdout))
    for level in (LogLevel.debug, LogLevel.info, LogLevel.error):
        log.emit(level, "x")
    assert [json.loads(line)["@level"] for line in stdout.getvalue().splitlines()] == [
        "debug",
        "info",
        "error",
    ]


def test_standard_logging_records_reach_the_json_log() -> None:
    bridge_standard_logging()
    bridge_standard_logging()
    with json_log() as written:
        logging.getLogger("pika.adapters.test").error("connection_lost: %s", "refused")
        logging.getLogger("pika.adapters.test").info("not forwarded")
    [record] = [json.loads(line) for line in written.getvalue().splitlines()]
    assert record["message"] == "connection_lost: refused"
    assert record["@level"] == "error"
    assert record["logger"] == "pika.adapters.test"


class _RiggedDailyLogFile(DailyLogFile):
    """A DailyLogFile whose day follows ``clock`` (UTC), as Twisted's own tests rig it."""

    clock = 0.0

    def _openFile(self) -> None:
        super()._openFile()
        self.lastDate = self.toDate()

    def toDate(self, *args: float) -> tuple[int, int, int]:
        return time.gmtime(*(args or (self.clock,)))[:3]  # type: ignore[return-value]


def test_rotation_at_midnight_loses_no_line_and_splits_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse_twisted._logging, "DailyLogFile", _RiggedDailyLogFile)
    before_midnight = calendar.timegm((2031, 3, 9, 23, 59, 58))
    _RiggedDailyLogFile.clock = before_midnight
    observer = JSONLogObserver("prod", "sse", tmp_path, stream=io.StringIO())
    log = emit(observer)
    for number in range(3):
        log.info("line {number}", number=number, padding="x" * 5000)
    _RiggedDailyLogFile.clock = before_midnight + 3  # 00:00:01 the next day
    for number in range(3, 6):
        log.info("line {number}", number=number, padding="x" * 5000)
    observer.close()

    rotated = tmp_path / "sse.log.2031_3_9"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sse.log", rotated.name]
    old_day = [json.loads(line)["number"] for line in rotated.read_text().splitlines()]
    new_day = [
        json.loads(line)["number"] for line in (tmp_path / "sse.log").read_text().splitlines()
    ]
    assert (old_day, new_day) == ([0, 1, 2], [3, 4, 5])


def lines_logged(secrets: list[str], *texts: str) -> list[str]:
    """The lines the observer writes for one ``failed: {reason}`` event per text."""
    stdout = io.StringIO()
    log = emit(JSONLogObserver("dev", "sse", None, secrets=secrets, stream=stdout))
    for text in texts:
        log.warn("failed: {reason}", reason=text)
    return stdout.getvalue().splitlines()


def test_a_word_like_password_is_masked_as_a_credential_and_nowhere_else() -> None:
    ordinary = [
        "consuming guest-events at 127.0.0.1:5672 as guest",
        "Guest: the guestbook",
    ]
    as_credentials = {
        "amqp://guest:guest@127.0.0.1:5672/": "amqp://guest:****@127.0.0.1:5672/",
        "host=db password=guest dbname=users": "host=db password=**** dbname=users",
        "{'password': 'guest'}": "{'password': '****'}",
        '{"pass": "GUEST"}': '{"pass": "****"}',
    }
    lines = lines_logged(["guest"], *ordinary, *as_credentials)
    reasons = [json.loads(line)["reason"] for line in lines]
    assert reasons == [*ordinary, *as_credentials.values()]


def test_a_password_with_a_quote_and_a_backslash_is_masked_in_its_escaped_forms() -> None:
    password = new_password() + '"q\\b'
    escaped = json.dumps(password)[1:-1]
    texts = [
        f"as is {password} end",
        f'a JSON body {{"password": {json.dumps(password)}}} end',
        f"a repr {password!r} end",
        f"a URL amqp://user:{quote(password, safe='')}@host end",
    ]
    lines = lines_logged([password, "unused-long-secret"], *texts)
    assert len(lines) == len(texts)
    for line in lines:
        reason = json.loads(line)["reason"]
        assert reason.startswith(("as is ****", "a JSON body", "a repr", "a URL")), reason
        assert reason.count("****") == 1 and reason.endswith(" end"), reason
        for form in (password, escaped, repr(password)[1:-1], quote(password, safe="")):
            assert form.lower() not in line.lower() and form.lower() not in reason.lower()


def test_fields_named_like_a_secret_are_masked_in_the_field_and_the_message() -> None:
    stdout = io.StringIO()
    log = emit(JSONLogObserver("dev", "sse", None, stream=stdout))
    log.info("logging in with {password}", password="s3cret", nested={"Token": ["t0k"]})
    record = json.loads(stdout.getvalue())
    assert record["message"] == "logging in with ****"
    assert record["password"] == "****"
    assert record["nested"] == {"Token": "****"}
