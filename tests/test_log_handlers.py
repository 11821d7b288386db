"""A library log handler made inside one test's capture keeps working in the next (conftest's
``_log_handlers_follow_stderr``): without it, '--- Logging error ---' lands in a later test's stderr, and
the tests that check for exactly one ``error:`` line fail depending on the order they run in."""


def test_handler_created_under_capture(capsys):
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.sensitivity_test")  # creates transformers' handler on this test's stderr
    print("captured")


def test_next_test_logs_cleanly(capsys):
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.sensitivity_test").warning("one warning")
    err = capsys.readouterr().err
    assert "Logging error" not in err and "one warning" in err, err
