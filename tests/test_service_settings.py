"""Serving settings: one frozen dataclass from the constructor, ``--arg`` values or ``CSC_*`` variables."""

import dataclasses

import pytest

from csc_serve.service.settings import ServeSettings


def test_defaults_serve_the_bundled_model_on_the_fastest_backend():
    settings = ServeSettings.from_env(env={})
    assert settings.model == "csc-ctrl-rgb" and settings.backend == "auto" and settings.token is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.model = "other"


def test_arguments_win_over_the_environment_and_keywords_over_both():
    env = {"CSC_MODEL": "from-env", "CSC_MAX_BATCH_SIZE": "8", "CSC_BATCH_WAIT_MS": "2.5",
           "CSC_SERVE_TOKEN": "s3cret-token"}
    settings = ServeSettings.from_env({"model": "from-arg"}, env=env)
    assert settings.model == "from-arg" and settings.max_batch_size == 8 and settings.batch_wait_ms == 2.5
    assert settings.token == "s3cret-token" and settings.public()["token"] == "set"
    assert ServeSettings.from_env({"model": "from-arg"}, env=env, model="kw").model == "kw"


@pytest.mark.parametrize("arguments,env,message", [
    ({}, {"CSC_MAX_BATCH_SIZE": "many"}, "CSC_MAX_BATCH_SIZE must be an integer, got 'many'"),
    ({"max_pixels": "0"}, {}, "max_pixels must be a positive integer"),
    ({"backend": "gpu"}, {}, "backend must be one of"),
    ({"token": "set-by-arg"}, {}, "unknown serving argument 'token'"),
    ({"colour": "red"}, {}, "unknown serving argument 'colour'"),
    ({}, {"CSC_SERVE_TOKEN": "short"}, "at least 8 characters"),
    ({}, {"CSC_BATCH_WAIT_MS": "-1"}, "batch_wait_ms must be between"),
])
def test_bad_settings_fail_with_one_clear_line(arguments, env, message):
    with pytest.raises(ValueError) as caught:
        ServeSettings.from_env(arguments, env=env)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_paths_stay_hidden_unless_the_setting_turns_them_on():
    assert ServeSettings.from_env(env={}).show_paths is False
    assert ServeSettings.from_env(env={}).public()["show_paths"] is False
    for text, value in (("true", True), ("1", True), ("ON", True), ("yes", True), ("false", False), ("0", False),
                        ("off", False), ("", False)):
        assert ServeSettings.from_env(env={"CSC_SHOW_PATHS": text}).show_paths is value, text
    assert ServeSettings.from_env({"show_paths": "true"}, env={}).show_paths is True
    with pytest.raises(ValueError, match="CSC_SHOW_PATHS must be true or false"):
        ServeSettings.from_env(env={"CSC_SHOW_PATHS": "maybe"})
    with pytest.raises(ValueError, match="show_paths must be true or false"):
        ServeSettings(show_paths="yes")
