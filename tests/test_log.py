"""One logger (`sharedllm`), one progress helper, and the CLI's -q / -v."""
import io
import logging

import pytest

from sharedllm import log
from sharedllm.cli import main
from sharedllm.cli import say as cli_say


@pytest.fixture(autouse=True)
def fresh_logger():
    """Each test starts as a library user would: no handler, no level, default settings."""
    saved = (list(log.LOGGER.handlers), log.LOGGER.level, dict(log._settings))
    log.LOGGER.handlers.clear()
    log.LOGGER.setLevel(logging.NOTSET)
    log._settings.update(verbosity=log.NORMAL, bars=True)
    yield
    log.LOGGER.handlers[:], _, _ = saved[0], log.LOGGER.setLevel(saved[1]), log._settings.update(saved[2])


def test_library_use_reaches_the_current_stderr_at_info(capsys):
    assert cli_say is log.say
    log.say("hello")
    assert capsys.readouterr().err == "[sharedllm] hello\n"
    log.debug("not shown by default")
    assert capsys.readouterr().err == ""


def test_messages_go_through_the_sharedllm_logger(caplog):
    with caplog.at_level(logging.INFO, logger="sharedllm"):
        log.say("through logging")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("sharedllm", "through logging")]


def test_a_handler_configured_by_the_user_is_respected(capsys):
    mine = io.StringIO()
    log.LOGGER.addHandler(logging.StreamHandler(mine))
    log.LOGGER.setLevel(logging.INFO)
    log.say("to my handler")
    assert mine.getvalue() == "to my handler\n" and capsys.readouterr().err == ""


def test_quiet_keeps_warnings_only_and_verbose_shows_debug(capsys):
    with log.configured(log.QUIET):
        log.say("hidden")
        log.LOGGER.warning("a warning")
    with log.configured(log.VERBOSE):
        log.debug("details")
    assert capsys.readouterr().err == "[sharedllm] a warning\n[sharedllm] details\n"


def test_progress_bars_follow_terminal_quiet_json_and_verbose(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    assert not log.bars_enabled()
    with log.configured(log.VERBOSE):
        assert log.bars_enabled()
    with log.configured(log.VERBOSE, bars=False):  # --json wins over -v
        assert not log.bars_enabled()
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert log.bars_enabled()
    with log.configured(log.QUIET):
        assert not log.bars_enabled()


def test_verbose_draws_a_bar_with_eta_on_stderr(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    with log.configured(log.VERBOSE):
        for _ in log.progress(range(3), desc="work", leave=True):
            pass
    assert "work" in err.getvalue() and "3/3" in err.getvalue() and "<" in err.getvalue()  # elapsed<remaining


def _adapt(user_text, tmp_path, *flags):
    return main(["adapt", "--text", str(user_text), "--out", str(tmp_path / "a.safetensors"), "--base", "tiny",
                 "--steps", "20", "--seq", "32", "--window", "32", "--eval-tokens", "64", *flags])


def test_cli_quiet_silences_messages_and_progress(capsys, user_text, tmp_path):
    assert _adapt(user_text, tmp_path, "-q") == 0
    assert capsys.readouterr().err == ""
    assert _adapt(user_text, tmp_path) == 0  # default, stderr not a terminal: messages and 10 % milestones
    err = capsys.readouterr().err
    assert "[sharedllm] loading base tiny" in err and "step 2/20" in err
    assert log.LOGGER.level == logging.NOTSET and not log.LOGGER.handlers  # main left the process as it was


def test_cli_verbose_draws_bars_off_a_terminal_and_json_hides_them(capsys, user_text, tmp_path):
    assert main(["-v", "eval", "--text", str(user_text), "--base", "tiny", "--window", "32"]) == 0
    assert "score" in capsys.readouterr().err
    assert _adapt(user_text, tmp_path, "-v", "--json") == 0
    err = capsys.readouterr().err
    assert "[sharedllm] loading base tiny" in err and "it/s" not in err and "step/s" not in err
